"""Scale: a LLaMA-2-7B-shaped model (hidden 4096, MLP 11008, 32 heads, random bf16 weights) pruned on this machine
with ``--offload disk`` (one block in memory at a time; a SlimGPT block is written once, at its new widths), issue #16.

The model is built once under ``--work`` (all ``--blocks`` blocks, one safetensors shard per block, written block by
block so it never sits in RAM; the tokenizer is SmolLM2's, so the vocabulary is 49152 instead of LLaMA-2's 32000).
Every method then runs as its own ``layerprune prune`` process, measured from outside:

- wall time, and from the run's ``layerprune.json`` the seconds per stage, in total and per block;
- peak RSS of the process (``os.wait4``);
- peak extra disk: the most bytes the run itself had written at any moment (sampled every second): everything new
  under ``--work`` (its output, checkpoint, activation and offload folders; the run's TMPDIR points there too),
  never the file system's free space, which other processes move;
- the saved run's size;
- SparseGPT's solve against its arithmetic floor: the GEMM-shaped flops of one block (the column sweep's updates,
  rows x cols^2 per linear, plus one Cholesky and one triangular inverse, 2/3 n^3, per distinct input: issue #16's
  floor) at the fp32 GEMM rate of the run's device (CPU, or the GPU with ``--device cuda``) measured here in the same
  process before the runs; and against the strict floor of
  today's solver, which needs the Cholesky alone (1/3 n^3);
- the extrapolation to 128 x 2048 calibration tokens: statistics and propagation grow with the token count (x64
  from 8 x 512; attention's quadratic part is ignored, so this is a lower bound), the solve does not.

    python -m bench.scale                               # 32 blocks, every method -> bench/results/scale_cpu.json
    python -m bench.scale --blocks 4 --methods wanda    # a quicker look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from layerprune.outputs import remove_ours

from .common import ROOT, RESULTS, device_name, gemm_gflops, provenance, write_json

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
METHODS = {  # name -> prune flags
    "wanda": ["--method", "wanda", "--sparsity", "0.5", "--offload", "disk"],
    "sparsegpt": ["--method", "sparsegpt", "--sparsity", "0.5", "--offload", "disk"],
    "slimgpt": ["--method", "slimgpt", "--sparsity", "0.2", "--offload", "disk"],
    "wanda-dlp70": ["--method", "wanda", "--sparsity", "0.7", "--allocation", "dlp", "--offload", "disk"],
    "sparsegpt-70": ["--method", "sparsegpt", "--sparsity", "0.7", "--offload", "disk"],
    "alps-70": ["--method", "alps", "--sparsity", "0.7", "--offload", "disk"],  # issue #30: solve vs sparsegpt-70
}
RATIOS = {"alps-70": "sparsegpt-70"}  # method -> the baseline whose median solve per block it is reported against


def build_model(folder: Path, blocks: int, seed: int = 0, tokenizer: str | None = None) -> Path:
    """config + tokenizer + sharded random bf16 weights, block by block (reused when complete). ``tokenizer``: a
    folder holding one (default: the built-in SmolLM2's, from its dequantized cache)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from transformers import AutoTokenizer

    from layerprune.offload import resolve_safetensors_dir

    done, ours = folder / ".complete", folder / ".built-by-bench-scale"
    if done.is_file() and json.loads(done.read_text()) == {"blocks": blocks, "seed": seed, **SHAPE}:
        return folder
    if folder.exists():  # an incomplete or other-shape build of this script is rebuilt; anything else is kept
        if not ours.is_file() and any(folder.iterdir()):
            sys.exit(f"{folder} exists and bench.scale did not build it: pass another --work")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ours.touch()
    src = tokenizer or resolve_safetensors_dir("smollm2-135m")  # the built-in model's dequantized cache has one
    if src is None:
        from layerprune.models.loading import load_model

        load_model("smollm2-135m")  # builds that cache once
        src = resolve_safetensors_dir("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src)
    tok.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=blocks, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, dtype="bfloat16", **SHAPE)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    h, m, n = SHAPE["hidden_size"], SHAPE["intermediate_size"], blocks + 1
    shard = lambda k: f"model-{k:05d}-of-{n:05d}.safetensors"  # noqa: E731
    rand = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    ones = lambda s: torch.ones(s, dtype=torch.bfloat16)  # noqa: E731
    weight_map, total = {}, 0

    def write(k, tensors):
        nonlocal total
        save_file(tensors, folder / shard(k), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = shard(k)
            total += t.numel() * t.element_size()

    write(1, {"model.embed_tokens.weight": rand(len(tok), h), "model.norm.weight": ones(h),
              "lm_head.weight": rand(len(tok), h)})
    for i in range(blocks):
        p = f"model.layers.{i}."
        write(i + 2, {p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
                      **{p + f"self_attn.{x}_proj.weight": rand(h, h) for x in "qkvo"},
                      p + "mlp.gate_proj.weight": rand(m, h), p + "mlp.up_proj.weight": rand(m, h),
                      p + "mlp.down_proj.weight": rand(h, m)})
        print(f"built block {i + 1}/{blocks}", file=sys.stderr, flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    done.write_text(json.dumps({"blocks": blocks, "seed": seed, **SHAPE}))
    return folder


def tree_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (files that vanish while it is read count as 0)."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f), follow_symlinks=False).st_size
            except OSError:
                pass
    return total


def sparsegpt_block_flops(factor: float = 2 / 3) -> float:
    """GEMM-shaped flops of SparseGPT on one block: the sweep's updates (rows x cols^2 per linear) plus ``factor`` n^3
    per distinct input (q/k/v share one Hessian, gate/up another; o and down have their own). 2/3: a Cholesky and a
    triangular inverse (issue #16's floor); 1/3: the Cholesky alone, all the left-looking sweep needs (the strict
    floor of today's solver)."""
    h, m = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    linears = [(h, h)] * 4 + [(m, h)] * 2 + [(h, m)]
    return sum(r * c * c for r, c in linears) + factor * (3 * h ** 3 + m ** 3)


def run_one(model: Path, out: Path, flags: list[str], nsamples: int, seqlen: int, data_dir: str | None,
            device: str = "cpu") -> dict:
    if device != "cpu":  # a GPU machine: the model stays in CPU RAM, one block at a time on the GPU
        flags = [f if f != "disk" else "none" for f in flags]
    cmd = [sys.executable, "-m", "layerprune", "prune", "--model", str(model), *flags, "--dtype", "bfloat16",
           "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--eval", "", "--out", str(out), "--force",
           "--device", device]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    work = out.parent
    tmp = work / f"tmp-{out.name}"  # the run's TMPDIR: its temporary files count as written by it
    tmp.mkdir(parents=True, exist_ok=True)
    base = tree_bytes(work)  # the model and anything else already there
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.wait(1.0):
            peak[0] = max(peak[0], tree_bytes(work) - base)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], tree_bytes(work) - base)
    shutil.rmtree(tmp, ignore_errors=True)  # created above by this script
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        return {"command": " ".join(cmd), "rc": rc}
    rec = json.loads((out / "layerprune.json").read_text())
    size = sum(p.stat().st_size for p in out.glob("model*.safetensors"))
    blocks = rec.get("block_timings", [])
    return {"command": " ".join(cmd), "rc": rc, "wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2 ** 20,
            "peak_written_gb": peak[0] / 2 ** 30, "output_gb": size / 2 ** 30,
            "block_gb": size / 2 ** 30 / max(len(blocks), 1),
            "timings": rec["timings"], "block_timings": blocks, "peak_device_memory_gb":
                (rec.get("peak_device_memory") or 0) / 2 ** 30 or None,
            "measured_sparsity": rec.get("measured_sparsity"),
            "params": rec.get("params"), "layers": rec.get("layers")}  # per linear: error, solver facts (ALPS: iters)


def summarize(r: dict, n_blocks: int, tokens_now: int, tokens_target: int, floor_s: float | None,
              strict_floor_s: float | None = None) -> dict:
    """Per-block medians per stage, the 128 x 2048 extrapolation and (SparseGPT) the solve / floor ratio."""
    bt = r.get("block_timings") or []
    med = lambda k: sorted(b.get(k, 0.0) for b in bt)[len(bt) // 2] if bt else None  # noqa: E731
    per_block = {k: med(k) for k in ("statistics", "solve", "propagate", "onload", "offload", "checkpoint")}
    scale = tokens_target / tokens_now
    t = r["timings"]
    grow = t.get("statistics", 0) + t.get("propagate", 0) + t.get("allocation", 0) + t.get("capture", 0)
    out = {"per_block_median_s": per_block, "total_s": t["total"],
           "extrapolated_128x2048_total_s": t["total"] - grow + grow * scale,
           "extrapolated_128x2048_32_blocks_h": (t["total"] - grow + grow * scale) * 32 / n_blocks / 3600}
    if floor_s is not None and per_block["solve"]:
        out["solve_floor_s"] = floor_s
        out["solve_over_floor"] = per_block["solve"] / floor_s
    if strict_floor_s is not None and per_block["solve"]:
        out["solve_strict_floor_s"] = strict_floor_s
        out["solve_over_strict_floor"] = per_block["solve"] / strict_floor_s
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=32, help="decoder blocks of the 7B-shaped model (32 = LLaMA-2-7B)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--work", default="/tmp/layerprune-scale", help="where the model and the runs go (~2.5x its size)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (then use --nsamples 128 "
                    "--seqlen 2048; the model stays in CPU RAM instead of on disk)")
    ap.add_argument("--tokenizer", default=None, help="a folder with the tokenizer to build the model with (default: "
                    "SmolLM2's, from the built-in model's cache)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/scale_cpu[_<blocks>b].json)")
    a = ap.parse_args(argv)
    work = Path(a.work)
    provenance()  # the code, command and CPU GEMM rate, taken before anything is written
    t = time.perf_counter()
    model = build_model(work / f"llama7b-shape-{a.blocks}b", a.blocks, tokenizer=a.tokenizer)
    build_s = time.perf_counter() - t
    rate = gemm_gflops(a.device)  # the floor is at the rate of the device that runs the solves
    floor = sparsegpt_block_flops() / (rate * 1e9)
    strict = sparsegpt_block_flops(1 / 3) / (rate * 1e9)
    results = {}
    for name in a.methods.split(","):
        r = run_one(model, work / f"run-{name}", METHODS[name], a.nsamples, a.seqlen, a.data_dir, a.device)
        if r["rc"] == 0:
            r["summary"] = summarize(r, a.blocks, a.nsamples * a.seqlen, 128 * 2048,
                                     *((floor, strict) if name == "sparsegpt" else (None, None)))
        results[name] = r
        print(name, json.dumps(r.get("summary", r), indent=1), flush=True)
        remove_ours(work / f"run-{name}")  # a layerprune run directory, or refused
    for name, base in RATIOS.items():  # the same run: both medians measured on this machine within minutes
        s, b = (results.get(k, {}).get("summary", {}).get("per_block_median_s", {}).get("solve") for k in (name, base))
        if s and b:
            results[name]["summary"][f"solve_over_{base}"] = s / b
    kind = "cpu" if a.device == "cpu" else "gpu"
    out = Path(a.out) if a.out else RESULTS / (f"scale_{kind}.json" if a.blocks == 32
                                               else f"scale_{kind}_{a.blocks}b.json")
    write_json(out, {"shape": SHAPE, "blocks": a.blocks, "vocab": "SmolLM2 tokenizer (49152)", "weights": "random bf16",
                     "calibration": f"{a.nsamples} x {a.seqlen} C4", "threads": torch.get_num_threads(),
                     "device": a.device, "device_name": device_name(a.device),
                     "model_build_s": build_s, "gemm_gflops_fp32_device": rate,
                     "sparsegpt_block_gflop": sparsegpt_block_flops() / 1e9,
                     "sparsegpt_block_gflop_strict": sparsegpt_block_flops(1 / 3) / 1e9, "results": results})
    print(f"wrote {out}")
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
