"""The layer-wise driver, one way through: preflight -> capture the block-0 inputs -> plan -> for each block: onload,
run the block's program, propagate its *pruned* outputs to the next block, checkpoint, offload -> the run record.

The engine knows no method. Per block it asks two things: the targets (``allocation.plan``: per-linear sparsities,
the block ratio, N:M) and the solver's block program (``solvers.program``: a per-linear solver wrapped, or a
block-level solver's own), which gets the block, a ``collect(names, needs)`` callback and the targets. Module names
come from the model's adapter, forward passes from ``passes``, resume state from ``checkpoint``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from .progress import tqdm

from .allocation import get_allocator
from .allocation.base import LayerInfo
from .allocation.plan import Plan, allocation_statistics, block_statistics, layer_census, make_plan
from .allocation.plan import check as check_plan
from .checkpoint import Checkpoint, fingerprint
from .config import DTYPES, PruneConfig
from .errors import UserError
from .models.adapters import get_adapter
from .offload import MemoryStore
from .passes import ActivationBuffer, Timers, capture_inputs, dense_input_norms, make_collect, propagate
from .passes import block_out as _block_out
from .solvers import get_solver
from .solvers.program import block_program

# also importable from here, for the callers that always did
__all__ = ["preflight", "prune_model", "allocation_statistics", "dense_input_norms", "capture_inputs", "PruneConfig",
           "Checkpoint", "DTYPES", "MemoryStore", "_block_out"]

log = logging.getLogger(__name__)


def preflight(model, cfg: PruneConfig) -> list[LayerInfo]:
    """Every check that needs only the model's structure (a weightless meta skeleton will do): the solver's
    constraints, --skip names, N:M widths, and the allocation's census checks (e.g. a user list's length).
    Returns the layer census."""
    cfg.validate()
    adapter = get_adapter(model)
    program = block_program(get_solver(cfg.method), model, adapter, cfg)
    skip = set(cfg.skip)
    if program.changes_shapes and (cfg.nm is not None or skip):
        raise UserError(f"{cfg.method} prunes whole blocks and changes their shapes: --nm and --skip do not apply; "
                        "drop them")
    program.check(model)
    unknown = skip - set(adapter.linear_names())
    if unknown:
        raise UserError(f"--skip names {', '.join(sorted(unknown))} are not linears of this model: "
                        f"use some of {', '.join(adapter.linear_names())}")
    infos = layer_census(model, adapter, skip)
    check_plan(cfg, get_allocator(cfg.allocation, **cfg.allocation_options), infos, len(adapter.blocks(model)))
    return infos


def prune_model(model, calib: torch.Tensor, cfg: PruneConfig, *, device=None, out_dir: Path | None = None,
                resume: bool = False, store=None, progress: bool = True, block_stats: list[float] | None = None
                ) -> dict:
    """Prune ``model`` in place, block by block. Returns the run record (see ``record.py``).

    ``block_stats``: the allocator's per-block statistics when already known (``allocation_statistics`` on the same
    model and calibration); skips the dense pre-pass."""
    t_start = time.perf_counter()
    infos = preflight(model, cfg)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = DTYPES[cfg.compute_dtype]
    adapter = get_adapter(model)
    program = block_program(get_solver(cfg.method), model, adapter, cfg)
    blocks = adapter.blocks(model)
    params_before = sum(p.numel() for p in model.parameters())
    store = store or MemoryStore()
    timers = Timers()
    ckpt = Checkpoint(out_dir / ".checkpoint", fingerprint(model, calib, cfg.result_settings())) \
        if out_dir is not None else None
    state = ckpt.load() if (ckpt is not None and resume) else None

    with timers("capture"):  # the inputs of block 0 and every block's call arguments
        hidden, kwargs = capture_inputs(model, adapter, calib, device, dtype, cfg.batch_size)
    if state is not None:  # a resumed run keeps the plan it started with
        plan = Plan(state["allocation"], cfg.nm)
    else:
        plan = _plan(model, adapter, cfg, infos, block_stats, hidden, kwargs, device, dtype, store, timers, progress)

    prev_total = (state or {}).get("timings", {}).get("total", 0.0)  # wall time of the interrupted process(es)
    layers: list[dict] = state["layers"] if state else []
    per_block: list[dict] = (state or {}).get("block_timings", [])  # seconds per stage, one entry per block
    start = state["next_block"] if state else 0
    buf = ActivationBuffer(hidden, cfg.offload, device, folder=out_dir)
    del hidden
    persist = getattr(store, "persists", False)  # offload() writes each block's final shard (DiskStore.bind)
    if persist:
        store.restart_at(start)
    if state is not None:
        _restore(model, blocks, store, program, ckpt, state, buf, timers)
    bar = tqdm(range(start, len(blocks)), desc=f"prune {cfg.method}", unit="block", disable=not progress,
               initial=start, total=len(blocks))
    try:
        for i in bar:
            before = dict(timers.t)
            with timers("onload"):
                store.onload(model, i, device)
            block = blocks[i]
            t0, s0 = time.perf_counter(), timers.t["statistics"]
            collect = make_collect(block, buf, kwargs[i], cfg.batch_size, dtype, timers)
            rows = program.run(block, collect, plan.targets(i))
            layers += [{"block": i, **r} for r in rows]
            timers.t["solve"] += time.perf_counter() - t0 - (timers.t["statistics"] - s0)
            with timers("propagate"):
                propagate(block, buf, kwargs[i], cfg.batch_size, dtype)
            if persist:
                with timers("offload"):
                    store.offload(model, i)
            if ckpt is not None:  # a store that does not persist: before the offload, while the block is in memory
                with timers("checkpoint"):
                    ckpt.save(i, None if persist else block, buf.inputs, {
                        "allocation": plan.allocation, "layers": layers, "block_timings": per_block + [_delta(
                            i, before, timers.t)],
                        "timings": {**timers.t, "total": time.perf_counter() - t_start + prev_total}})
            if not persist:
                with timers("offload"):
                    store.offload(model, i)
            per_block.append(_delta(i, before, timers.t))
            errs = [r["rel_error"] for r in rows if r["rel_error"] is not None]
            bar.set_postfix(err=f"{sum(errs) / max(len(errs), 1):.3g}")
    finally:
        buf.close()
    extra = program.finish(model)
    timers.t["total"] = time.perf_counter() - t_start + prev_total
    return {
        **extra,
        "params": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        "method": cfg.method, "sparsity": cfg.sparsity, "nm": list(cfg.nm) if cfg.nm else None,
        "allocation": plan.allocation, "solver_options": cfg.solver_options, "true_sequential": cfg.true_sequential,
        "compute_dtype": cfg.compute_dtype, "offload": cfg.offload, "skip": sorted(set(cfg.skip)), "layers": layers,
        "timings": dict(timers.t), "block_timings": per_block,
        "peak_device_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "resumed_from_block": start if state else None,
    }


def _delta(i: int, before: dict, now: dict) -> dict:
    """Block i's seconds per stage: the growth of every stage timer since ``before``."""
    return {"block": i, **{k: round(v - before.get(k, 0.0), 4) for k, v in now.items() if v - before.get(k, 0.0) > 0}}


def _plan(model, adapter, cfg, infos, block_stats, hidden, kwargs, device, dtype, store, timers, progress) -> Plan:
    """The allocation plan; when the allocator ``needs`` input statistics and ``block_stats`` are not given, one dense
    pass (``block_statistics``) computes its per-block statistic first."""
    allocator = get_allocator(cfg.allocation, **cfg.allocation_options)
    if allocator.needs and block_stats is None:
        with timers("allocation"):
            block_stats = block_statistics(model, adapter, {0: allocator}, hidden, kwargs, device=device, dtype=dtype,
                                           batch_size=cfg.batch_size, store=store, skip=set(cfg.skip),
                                           offload=cfg.offload, progress=progress)[0]
    blocks = adapter.blocks(model)
    weights = lambda b, n: adapter.get_weight(adapter.linears(blocks[b])[n]).detach().float()  # noqa: E731
    return make_plan(cfg, allocator, infos, len(blocks), block_stats, weights)


def _restore(model, blocks, store, program, ckpt: Checkpoint, state: dict, buf: ActivationBuffer, timers) -> None:
    """Resume: the finished blocks' pruned weights, the next block's inputs, the time already spent per stage."""
    for i in range(state["next_block"]):
        if getattr(store, "persists", False):  # the finished blocks are the store's shards already
            if i not in store.modified:
                raise UserError(f"{ckpt.folder.parent} lacks the shard of pruned block {i}, so the run cannot be "
                                "resumed: rerun with --force to start over")
            if program.changes_shapes:  # the (meta) block takes its shard's widths; its weights stay on disk
                program.load_block(blocks[i], store.block_shapes(i))
            continue
        store.onload(model, i, "cpu")
        program.load_block(blocks[i], ckpt.block_weights(i))
        store.offload(model, i)
    buf.a.copy_(ckpt.activations(state).to(buf.a.dtype))
    for k, v in state.get("timings", {}).items():
        if k != "total":
            timers.t[k] += v
    log.info("resuming at block %d of %d", state["next_block"], len(blocks))


def prune_to_blocks(model, calib: torch.Tensor, block_sparsity, compute_dtype: str = "float32",
                    method: str = "wanda") -> dict:
    """Prune ``model`` in place with ``method`` at the given per-block sparsities (a ``user`` allocation, parameter-
    weighted mean as the target), block by block with propagation on ``calib``: what the allocation proxies that
    propagate (``search.proxy``, ``prune_fn``) run per candidate. Returns the run record."""
    bs = [float(s) for s in block_sparsity]
    adapter = get_adapter(model)
    sizes = [sum(adapter.get_weight(m).numel() for m in adapter.linears(b).values()) for b in adapter.blocks(model)]
    mean = sum(w * s for w, s in zip(sizes, bs)) / sum(sizes)
    cfg = PruneConfig(method=method, sparsity=mean, allocation="user",
                      allocation_options={"sparsities": bs, "lo": 0.0, "hi": 1.0}, compute_dtype=compute_dtype)
    return prune_model(model, calib, cfg, progress=False)
