"""2:4 sparse kernels on GPUs: the linears of a pruned run swapped for PyTorch's semi-structured sparse tensors
(``torch.sparse.SparseSemiStructuredTensor``: cuSPARSELt, else CUTLASS; NVIDIA compute capability >= 8.0, fp16/bf16).

What runs anywhere (and is tested on CPU): ``is_2_4`` (the pattern check), ``shape_multiple`` (the backend's shape
rule), ``select`` (which block linears can be swapped, and why each other one stays dense), ``check_record`` and
``check_device`` (the one-line refusals before a model is loaded). What needs CUDA: ``swap`` and ``bench_sparse``.

    sel = select(model, torch.bfloat16)     # sel.swap: dotted names; sel.dense: {name: why it stays dense}
    swap(model, sel.swap)                   # weights become SparseSemiStructuredTensor; F.linear uses the kernels
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

SPARSE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # what the sparse kernels take here
MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with sparse tensor cores


def is_2_4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive inputs of every row of an ``[out, in]`` weight: the
    pattern the sparse tensor cores store (a group with fewer non-zeros is 2:4 too). ``in`` must divide by 4."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach().reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def backend() -> str:
    """The backend ``torch.sparse.to_sparse_semi_structured`` would use: cuSPARSELt when this torch has it (and
    CUTLASS is not forced), else CUTLASS."""
    from torch.sparse import SparseSemiStructuredTensor

    forced = getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
    return "cutlass" if forced or not torch.backends.cusparselt.is_available() else "cusparselt"


def _backend_class(name: str):
    return {"cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
            "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT}[name]


def shape_multiple(dtype: torch.dtype, backend_name: str | None = None) -> tuple[int, int]:
    """(rows, cols): a weight's shape must be a positive multiple of these for the backend and dtype."""
    rule = _backend_class(backend_name or backend())._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return rule.sparse_min_rows, rule.sparse_min_cols


@dataclass
class Selection:
    """Which block linears get the sparse kernels (``swap``, dotted names in the model, in block order) and why each
    other one stays dense (``dense``: name -> reason)."""

    swap: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)
    backend: str = ""
    blocks_path: str = ""  # the adapter's path of the blocks; a name is "<blocks_path>.<index>.<linear>"

    def per_block(self) -> dict[int, list[str]]:
        """Block index -> its swapped names (the index is the path element after the blocks' path)."""
        out: dict[int, list[str]] = {}
        for name in self.swap:
            out.setdefault(self._block_of(name), []).append(name)
        return out

    def representative_block(self) -> int:
        """The block with the most swapped linears; among equals the one nearest the middle."""
        blocks = self.per_block()
        if not blocks:
            raise ValueError("no linear was selected")
        order = sorted(blocks)
        mid = order[len(order) // 2]
        return max(order, key=lambda b: (len(blocks[b]), -abs(b - mid)))

    def _block_of(self, name: str) -> int:
        return int(name[len(self.blocks_path) + 1:].split(".", 1)[0])


def select(model: nn.Module, dtype: torch.dtype, backend_name: str | None = None) -> Selection:
    """The block linears that can be swapped: ``nn.Linear``, 2:4 (``is_2_4``), shape a multiple of the backend's rule
    for ``dtype``. Everything else stays dense, with its reason. Pure: reads the weights, changes nothing."""
    from .models.adapters import get_adapter

    if dtype not in SPARSE_DTYPES.values():
        raise UserError(f"sparse kernels take {' or '.join(SPARSE_DTYPES)} weights, not {dtype}: use --dtype bfloat16")
    adapter = get_adapter(model)
    name = backend_name or backend()
    rows, cols = shape_multiple(dtype, name)
    sel = Selection(backend=name, blocks_path=adapter.blocks_path)
    for i, block in enumerate(adapter.blocks(model)):
        for local, mod in adapter.linears(block).items():
            full = f"{adapter.blocks_path}.{i}.{local}"
            if type(mod) is not nn.Linear:
                sel.dense[full] = f"{type(mod).__name__} is not a plain nn.Linear"
            elif not is_2_4(mod.weight):
                sel.dense[full] = "not 2:4 (a group of 4 inputs holds more than 2 non-zeros)"
            elif mod.weight.shape[0] % rows or mod.weight.shape[1] % cols:
                r, c = mod.weight.shape
                sel.dense[full] = f"shape {r}x{c} is not a multiple of {rows}x{cols} ({name}, {dtype})"
            else:
                sel.swap.append(full)
    return sel


def to_sparse(weight: torch.Tensor, backend_name: str | None = None) -> torch.Tensor:
    """A 2:4 CUDA weight as a semi-structured sparse tensor of the chosen backend."""
    return _backend_class(backend_name or backend()).from_dense(weight.detach().contiguous())


def swap(model: nn.Module, names: list[str], convert=None) -> int:
    """Replace the weights of the named linears by ``convert(weight)`` (default: ``to_sparse``), frozen. Returns the
    number swapped. The model stays an ordinary module: ``F.linear`` dispatches to the sparse kernels."""
    convert = convert or to_sparse
    for name in names:
        mod = model.get_submodule(name)
        mod.weight = nn.Parameter(convert(mod.weight), requires_grad=False)
    return len(names)


# --- refusals before any model is loaded -----------------------------------------------------------------------------
def check_record(record: dict, run_dir) -> None:
    """The run must be N:M with M = 4 and N >= 2 pruned (a mixed N:M run's blocks with another N stay dense)."""
    nm = record.get("nm")
    if not nm:
        raise UserError(f"{run_dir} is not a 2:4 run ({record.get('method')}, sparsity {record.get('sparsity')}, "
                        "no --nm): --sparse-kernels needs one pruned with --nm 2:4")
    n, m = nm
    if m != 4 or n < 2:
        raise UserError(f"{run_dir} is a {n}:{m} run, not 2:4 (at most 2 kept of every 4): --sparse-kernels needs "
                        "one pruned with --nm 2:4")


def check_device(device: str | None) -> torch.device:
    """CUDA present, the device a CUDA one, compute capability >= 8.0; returns the device."""
    try:
        kind = torch.device(device).type if device is not None else "cuda"
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cuda or cuda:N") from None
    if kind != "cuda":
        raise UserError(f"--sparse-kernels runs on CUDA GPUs only, not --device {device}: use --device cuda")
    if not torch.cuda.is_available():
        raise UserError("--sparse-kernels needs a CUDA GPU (compute capability >= 8.0) and none is present: drop "
                        "--sparse-kernels (the dense timings need no GPU)")
    dev = torch.device(device or "cuda")
    cap = torch.cuda.get_device_capability(dev)
    if tuple(cap) < MIN_CAPABILITY:
        raise UserError(f"{torch.cuda.get_device_name(dev)} has compute capability {cap[0]}.{cap[1]}; 2:4 sparse "
                        f"kernels need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ampere, Ada, Hopper): drop "
                        "--sparse-kernels")
    return dev


# --- measurement (CUDA) ------------------------------------------------------------------------------------------
def _cuda_ms(fn, repeats: int, inner: int) -> list[float]:
    """Milliseconds per call of ``fn``, ``repeats`` times (each the mean of ``inner`` calls), CUDA events."""
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / inner)
    return out


@torch.inference_mode()
def linear_speed(dense: dict[str, torch.Tensor], sparse: dict[str, torch.Tensor], tokens: int, repeats: int = 5,
                 inner: int = 20, seed: int = 0) -> dict:
    """Per linear: ``F.linear(x, W)`` for x of ``tokens`` rows, dense weight vs its sparse twin, interleaved, medians
    (ms). Also the sum over the linears (one block's matmuls)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows, tot_d, tot_s = {}, 0.0, 0.0
    for name, wd in dense.items():
        ws = sparse[name]
        x = torch.randn(tokens, wd.shape[1], generator=g).to(wd.device, wd.dtype)
        for w in (wd, ws):  # warm-up (cuSPARSELt picks its plan on the first call)
            torch.nn.functional.linear(x, w)
        torch.cuda.synchronize()
        td, ts = [], []
        for _ in range(repeats):
            td += _cuda_ms(lambda: torch.nn.functional.linear(x, wd), 1, inner)
            ts += _cuda_ms(lambda: torch.nn.functional.linear(x, ws), 1, inner)
        d, s = statistics.median(td), statistics.median(ts)
        rows[name] = {"shape": list(wd.shape), "dense_ms": d, "sparse_ms": s, "speedup": d / s}
        tot_d, tot_s = tot_d + d, tot_s + s
    return {"tokens": tokens, "linears": rows, "dense_ms": tot_d, "sparse_ms": tot_s,
            "speedup": tot_d / tot_s if tot_s else None}


def bench_sparse(run_dir, *, dense: str | None = None, device: str | None = None, dtype: str = "bfloat16",
                 prefill_tokens: int = 512, new_tokens: int = 128, prompt_tokens: int = 32, repeats: int = 5) -> dict:
    """A 2:4 run with its linears on the sparse kernels vs the dense model, both in ``dtype`` on CUDA: the
    representative block's matmuls (dense vs sparse weights of the same linears), end-to-end prefill and decode
    (``layerprune.speed.compare_speed``), and how far the swap moved the run's own logits."""
    from .models.loading import load_model
    from .record import read_record
    from .speed import compare_speed

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    check_record(record, run_dir)
    dev = check_device(device)
    if dtype not in SPARSE_DTYPES:
        raise UserError(f"--sparse-kernels runs in {' or '.join(SPARSE_DTYPES)}, not {dtype}: use --dtype bfloat16")
    dense = dense or record.get("model")
    if not dense:
        raise UserError(f"{run_dir}/layerprune.json names no dense model: pass --dense MODEL")
    pruned, _ = load_model(str(run_dir), dtype)
    pruned = pruned.to(dev).eval()
    sel = select(pruned, SPARSE_DTYPES[dtype])
    if not sel.swap:
        first = next(iter(sel.dense.items()), ("-", "no block linears"))
        raise UserError(f"no linear of {run_dir} can use the sparse kernels ({first[0]}: {first[1]}): prune with "
                        "--nm 2:4")
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, pruned.config.vocab_size, (1, min(prefill_tokens, 128)), generator=g).to(dev)
    with torch.inference_mode():
        ref = pruned(input_ids=probe, use_cache=False).logits.float()
    block = sel.representative_block()
    names = sel.per_block()[block]
    dense_w = {n: pruned.get_submodule(n).weight.detach().clone() for n in names}
    swap(pruned, sel.swap)
    with torch.inference_mode():
        got = pruned(input_ids=probe, use_cache=False).logits.float()
    diff = (got - ref).abs().max().item()
    linears = linear_speed(dense_w, {n: pruned.get_submodule(n).weight for n in names}, prefill_tokens, repeats)
    del dense_w
    base, _ = load_model(dense, dtype)
    base = base.to(dev).eval()
    res = compare_speed({"dense": base, "sparse": pruned}, pruned.config.vocab_size, prefill_tokens=prefill_tokens,
                        new_tokens=new_tokens, prompt_tokens=prompt_tokens, repeats=repeats)
    d, s = res["dense"], res["sparse"]
    return {
        "run_dir": str(run_dir), "dense": dense, "method": record.get("method"), "nm": record.get("nm"),
        "device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
        "torch": torch.__version__, "backend": sel.backend, "dtype": dtype,
        "swapped": len(sel.swap), "kept_dense": len(sel.dense), "kept_dense_why": sel.dense,
        "logits_max_abs_diff_after_swap": diff, "logits_max_abs": ref.abs().max().item(),
        "block": block, "block_linears": linears,
        "prefill_tokens": prefill_tokens, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "repeats": repeats,
        "results": res,
        "prefill_tokens_per_s": {k: prefill_tokens / v["prefill_s"]["median"] for k, v in res.items()},
        "prefill_speedup": d["prefill_s"]["median"] / s["prefill_s"]["median"],
        "decode_speedup": s["decode_tokens_per_s"]["median"] / d["decode_tokens_per_s"]["median"],
    }
