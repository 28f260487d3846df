"""Inference speed of a pruned run against its dense model, measured in one process for a fair ratio.

    prefill  one forward of batch 1 x `prefill_tokens` tokens with logits for the last position only (what generation
             does before its first token), no KV cache kept
    decode   `new_tokens` greedy steps of one token each through the KV cache, after a `prompt_tokens` prefill that is
             not timed; tokens/s = new_tokens / time of the steps

Both models see the same random token ids. Runs alternate dense / pruned, after one untimed warm-up each, and the
reported numbers are medians over `repeats` runs (plus min and max).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .errors import UserError
from .record import read_record


def _sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    ids = ids.to(model.device)
    _sync(ids.device)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    _sync(ids.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    prompt = prompt.to(model.device)
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    return time.perf_counter() - t0


def _summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def compare_speed(models: dict, vocab_size: int, *, prefill_tokens: int = 512, new_tokens: int = 128,
                  prompt_tokens: int = 32, repeats: int = 5, seed: int = 0) -> dict:
    """Prefill latency and decode tokens/s of several models ({label: model}), interleaved, medians."""
    if prefill_tokens < 1 or new_tokens < 1 or prompt_tokens < 1 or repeats < 1:
        raise UserError("bench-speed: token counts and --repeats must be positive")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, prefill_tokens), generator=g)
    prompt = torch.randint(0, vocab_size, (1, prompt_tokens), generator=g)
    times = {k: {"prefill": [], "decode": []} for k in models}
    for m in models.values():  # warm-up
        prefill_seconds(m, ids)
        decode_seconds(m, prompt, min(new_tokens, 8))
    for _ in range(repeats):
        for k, m in models.items():
            times[k]["prefill"].append(prefill_seconds(m, ids))
            times[k]["decode"].append(decode_seconds(m, prompt, new_tokens))
    out = {}
    for k, t in times.items():
        out[k] = {"prefill_s": _summary(t["prefill"]),
                  "decode_tokens_per_s": _summary([new_tokens / s for s in t["decode"]]),
                  "params": sum(p.numel() for p in models[k].parameters())}
    return out


def bench_speed(run_dir, *, dense: str | None = None, prefill_tokens: int = 512, new_tokens: int = 128,
                prompt_tokens: int = 32, repeats: int = 5, threads: int | None = None, dtype: str = "float32",
                device=None) -> dict:
    """Pruned run vs its dense model (the record's ``model`` unless `dense` is given), on ``device`` (default: the
    CPU). Returns a JSON-able dict."""
    from .models.loading import load_model

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    dense = dense or record.get("model")
    if not dense:
        raise UserError(f"{run_dir}/layerprune.json names no dense model: pass --dense MODEL")
    if threads is not None:
        torch.set_num_threads(threads)
    pruned, _ = load_model(str(run_dir), dtype)
    base, _ = load_model(dense, dtype)
    if device is not None:
        pruned, base = pruned.to(device), base.to(device)
    res = compare_speed({"dense": base, "pruned": pruned}, pruned.config.vocab_size, prefill_tokens=prefill_tokens,
                        new_tokens=new_tokens, prompt_tokens=prompt_tokens, repeats=repeats)
    d, p = res["dense"], res["pruned"]
    return {
        "run_dir": str(run_dir), "dense": dense, "method": record.get("method"), "sparsity": record.get("sparsity"),
        "allocation": (record.get("allocation") or {}).get("name"), "dtype": dtype, "threads": torch.get_num_threads(),
        "device": str(pruned.device),
        "prefill_tokens": prefill_tokens, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
        "repeats": repeats, "results": res,
        "prefill_speedup": d["prefill_s"]["median"] / p["prefill_s"]["median"],
        "decode_speedup": p["decode_tokens_per_s"]["median"] / d["decode_tokens_per_s"]["median"],
        "params_ratio": p["params"] / d["params"],
    }
