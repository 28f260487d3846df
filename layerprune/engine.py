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
from . import distributed
from .checkpoint import Checkpoint, checkpoint_mode, fingerprint
from .config import DTYPES, PruneConfig
from .errors import UserError
from .models.adapters import get_adapter
from .offload import MemoryStore
from .passes import ActivationBuffer, Timers, capture_inputs, dense_input_norms, make_collect, propagate
from .passes import block_out as _block_out
from .solvers import get_solver
from .reconstruct import wrap as wrap_reconstruction
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
    distributed.current().check(cfg)
    adapter = get_adapter(model)
    program = _program(model, adapter, cfg)
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
                resume: bool = False, store=None, progress: bool = True, block_stats: list[float] | None = None,
                checkpoint: str | None = None, checkpoint_every: float = 0.0) -> dict:
    """Prune ``model`` in place, block by block. Returns the run record (see ``record.py``).

    ``block_stats``: the allocator's per-block statistics when already known (``allocation_statistics`` on the same
    model and calibration); skips the dense pre-pass. ``checkpoint``: what a run with ``out_dir`` keeps to be resumed
    (``checkpoint.checkpoint_mode``: full, weights or none; default full on the CPU, weights on a GPU; on N processes
    full, since a rank rebuilds no inputs). ``checkpoint_every``: seconds between two commits of the checkpoint (0:
    after every block; a resume redoes at most that much work): the commit comes after the first block that ends
    this long after the previous one (rank 0's clock) and saves every block pruned since.

    On N processes (``layerprune.distributed.init``) every rank calls this with the same ``calib`` and works on its
    shard of the windows; only rank 0 writes the checkpoint under ``out_dir``."""
    t_start = time.perf_counter()
    world = distributed.current()
    world.check(cfg, calib.shape[0])
    world.begin()
    infos = preflight(model, cfg)
    progress = progress and world.rank == 0
    device = torch.device(device) if device is not None else torch.device("cpu")
    mode = checkpoint_mode(checkpoint, device)
    if world.active and cfg.reconstruct != "none":
        raise UserError("--reconstruct runs on one process (its dense activation stream is not sharded): drop it "
                        "or run without torchrun")
    if world.active and mode == "weights":
        if checkpoint is not None:
            raise UserError("--checkpoint weights is for one process (a resume rebuilds the inputs by rerunning the "
                            "finished blocks); on N processes use --checkpoint full or none")
        mode = "full"
    if not checkpoint_every >= 0:
        raise UserError(f"--checkpoint-every {checkpoint_every} must be >= 0 seconds (0: after every block)")
    if resume and mode == "none":
        raise UserError("--resume needs the run's checkpoint, and --checkpoint none keeps none: drop one of them")
    dtype = DTYPES[cfg.compute_dtype]
    adapter = get_adapter(model)
    program = _program(model, adapter, cfg)
    params_before = sum(p.numel() for p in model.parameters())
    if getattr(program, "whole_model", False):  # a program that decides over the whole model at once
        return _whole_model(model, calib, cfg, program, device, dtype, progress, t_start, params_before)
    blocks = adapter.blocks(model)
    store = world.local_store(store or MemoryStore())
    timers = Timers(device)
    if device.type == "cuda":  # the peak reported is this prune's, not an earlier evaluation's
        torch.cuda.reset_peak_memory_stats(device)
    keep = out_dir is not None and mode != "none"
    ckpt = Checkpoint(out_dir / ".checkpoint", fingerprint(model, calib, cfg.result_settings()),
                      activations=mode == "full", background=True) if keep and world.rank == 0 else None
    state = _load_state(ckpt, world) if (keep and resume) else None

    with timers("capture"):  # the inputs of block 0 and every block's call arguments (of this rank's windows)
        hidden, kwargs = capture_inputs(model, adapter, calib[world.shard(calib.shape[0])], device, dtype,
                                        cfg.batch_size)
    world.started = True
    if state is not None:  # a resumed run keeps the plan it started with
        plan = Plan(state["allocation"], cfg.nm)
    else:
        plan = _plan(model, adapter, cfg, infos, block_stats, hidden, kwargs, device, dtype, store, timers, progress)

    prev_total = (state or {}).get("timings", {}).get("total", 0.0)  # wall time of the interrupted process(es)
    layers: list[dict] = state["layers"] if state else []
    per_block: list[dict] = (state or {}).get("block_timings", [])  # seconds per stage, one entry per block
    start = state["next_block"] if state else 0
    buf = ActivationBuffer(hidden, cfg.offload, device, folder=out_dir if world.rank == 0 else None)
    del hidden
    persist = getattr(store, "persists", False)  # offload() writes each block's final shard (DiskStore.bind)
    if persist:
        store.restart_at(start)
    if state is not None:
        _restore(model, blocks, store, program, ckpt, state, buf, timers, world, kwargs, cfg.batch_size, dtype,
                 device)
        if hasattr(program, "restore_state"):  # the program's own resume state (e.g. a dense activation stream)
            program.restore_state(ckpt.extra(state), buf.inputs, device, out_dir)
    uncommitted: list[int] = []  # blocks pruned since the last commit of the checkpoint
    last_commit = time.perf_counter()
    bar = tqdm(range(start, len(blocks)), desc=f"prune {cfg.method}", unit="block", disable=not progress,
               initial=start, total=len(blocks))
    try:
        for i in bar:
            before = dict(timers.t)
            with timers("onload"):
                store.onload(model, i, device)
            block = blocks[i]
            t0, s0 = timers.now(), dict(timers.t)
            collect = make_collect(block, buf, kwargs[i], cfg.batch_size, dtype, timers)
            collect.context = {"buffer": buf, "kwargs": kwargs[i], "batch_size": cfg.batch_size, "dtype": dtype,
                               "timers": timers, "index": i, "folder": out_dir, "linears": adapter.linears,
                               "input_groups": adapter.input_groups, "get_weight": adapter.get_weight,
                               "set_weight": adapter.set_weight}
            rows = program.run(block, collect, plan.targets(i))
            if not getattr(program, "sharded", False):  # it ran on every rank: rank 0's block is the result
                world.sync_block(block)
            layers += [{"block": i, **r} for r in rows]
            timers.t["solve"] += timers.now() - t0 - sum(v - s0.get(k, 0.0) for k, v in timers.t.items())
            with timers("propagate"):
                propagate(block, buf, kwargs[i], cfg.batch_size, dtype)
            if persist:
                with timers("offload"):
                    store.offload(model, i)
            uncommitted.append(i)
            if keep and world.share(time.perf_counter() - last_commit >= checkpoint_every):  # rank 0's clock decides
                with timers("checkpoint"):  # written by a writer thread while the next block is pruned
                    # N processes: every rank's windows, on rank 0 (arriving meanwhile); --checkpoint weights keeps none
                    acts = world.gather_rows_async(buf.inputs, calib.shape[0], tag=i) if mode == "full" else None
                    if ckpt is not None:  # the blocks pruned since the last commit (a persisting store has them)
                        ckpt.save(i, {} if persist else {j: blocks[j] for j in uncommitted}, acts,
                                  extra=_resume_state(program), state={
                                      "allocation": plan.allocation, "layers": layers, "world_size": world.world,
                                      "block_timings": per_block + [_delta(i, before, timers.t)],
                                      "timings": {**timers.t, "total": time.perf_counter() - t_start + prev_total}})
                    del acts
                uncommitted, last_commit = [], time.perf_counter()
            if not persist:
                with timers("offload"):
                    store.offload(model, i)
            per_block.append(_delta(i, before, timers.t))
            world.block_done(i)
            errs = [r["rel_error"] for r in rows if r["rel_error"] is not None]
            bar.set_postfix(err=f"{sum(errs) / max(len(errs), 1):.3g}")
        if ckpt is not None:
            ckpt.flush()  # the last block's commit is on disk (its error, if any, raised here)
        world.flush()  # another rank: its last rows have reached rank 0
    finally:
        if ckpt is not None:
            _quietly(ckpt.close)  # after an error too: the write in flight finishes (or fails), the state stays whole
        buf.close()
    extra = program.finish(model) if world.rank == 0 else {}  # another rank's model is not the run's
    timers.t["total"] = time.perf_counter() - t_start + prev_total
    return {
        **extra,
        "params": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        "method": cfg.method, "sparsity": cfg.sparsity, "nm": list(cfg.nm) if cfg.nm else None,
        "allocation": plan.allocation, "solver_options": cfg.solver_options, "true_sequential": cfg.true_sequential,
        "compute_dtype": cfg.compute_dtype, "offload": cfg.offload, "skip": sorted(set(cfg.skip)), "layers": layers,
        **({"reconstruct": {"method": cfg.reconstruct, **cfg.reconstruct_options}}
           if cfg.reconstruct != "none" else {}),
        "timings": dict(timers.t), "block_timings": per_block,
        "peak_device_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "resumed_from_block": start if state else None, "checkpoint": mode,
        **({"distributed": world.summary()} if world.active else {}),
    }


def _whole_model(model, calib, cfg: PruneConfig, program, device, dtype, progress, t_start, params_before) -> dict:
    """A whole-model program (``program.whole_model``): it scores and changes the model in one call,
    ``run_model(model, calib, ...) -> {"layers": rows, ...}``; no per-block plan, checkpoint or resume."""
    extra = program.run_model(model, calib, device=device, dtype=dtype, batch_size=cfg.batch_size,
                              progress=progress)
    layers = extra.pop("layers")
    total = time.perf_counter() - t_start
    n = len(get_adapter(model).blocks(model))
    return {
        "sparsity": cfg.sparsity, **extra,
        "params": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        "method": cfg.method, "nm": None, "allocation": {"name": cfg.allocation, "blocks_after": n},
        "solver_options": cfg.solver_options, "true_sequential": cfg.true_sequential,
        "compute_dtype": cfg.compute_dtype, "offload": cfg.offload, "skip": [], "layers": layers,
        "timings": {"solve": total, "total": total}, "block_timings": [],
        "peak_device_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "resumed_from_block": None,
    }


def _program(model, adapter, cfg: PruneConfig):
    """The block program of ``cfg.method`` (``solvers.program.block_program``), wrapped by the reconstruction
    ``cfg.reconstruct`` names (``reconstruct.wrap``; itself when none)."""
    return wrap_reconstruction(block_program(get_solver(cfg.method), model, adapter, cfg), cfg)


def _quietly(fn) -> None:
    """``fn()``, its error dropped: cleanup after the run (or its first error, which is the one reported)."""
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass


def _resume_state(program) -> dict:
    """Tensors the block program needs to resume (``program.resume_state()``), saved with the next block's inputs."""
    return program.resume_state() if hasattr(program, "resume_state") else {}


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


def _load_state(ckpt: Checkpoint | None, world) -> dict | None:
    """The resume state (rank 0 reads it, every rank gets it); a run started on another number of processes is
    refused (its statistics are summed over other shards)."""
    try:
        state = ckpt.load() if ckpt is not None else None
        n = (state or {}).get("world_size", 1)
        err = None if state is None or n == world.world else (
            f"{ckpt.folder.parent} was pruned on {n} process{'es' if n > 1 else ''} and is resumed on {world.world}: "
            f"resume with the same number ({'torchrun --nproc-per-node ' + str(n) if n > 1 else 'one process'}), "
            "or use --force to start over")
    except UserError as e:
        state, err = None, str(e)
    if world.active:
        err, state = world.share((err, state))
    if err:
        raise distributed.Shared(err)
    return state


def _restore(model, blocks, store, program, ckpt: Checkpoint | None, state: dict, buf: ActivationBuffer, timers,
             world, kwargs, batch_size: int, dtype, device) -> None:
    """Resume: the finished blocks' pruned weights (rank 0: the only one that saves them), the next block's inputs
    (each rank its shard; on one process rebuilt by running the finished blocks over the captured block-0 inputs when
    the checkpoint kept no inputs, ``--checkpoint weights``), the time already spent per stage."""
    acts = ckpt.activations(state) if ckpt is not None else None
    rebuild = ckpt is not None and acts is None  # one process only (N processes keep full checkpoints)
    for i in range(state["next_block"] if ckpt is not None else 0):
        if getattr(store, "persists", False):  # the finished blocks are the store's shards already
            if i not in store.modified:
                raise UserError(f"{ckpt.folder.parent} lacks the shard of pruned block {i}, so the run cannot be "
                                "resumed: rerun with --force to start over")
            if program.changes_shapes:  # the (meta) block takes its shard's widths; its weights stay on disk
                program.load_block(blocks[i], store.block_shapes(i))
            if rebuild:
                with timers("propagate"):
                    store.onload(model, i, device)
                    propagate(blocks[i], buf, kwargs[i], batch_size, dtype)
                    store.offload(model, i)
            continue
        store.onload(model, i, device if rebuild else "cpu")
        program.load_block(blocks[i], ckpt.block_weights(i))
        if rebuild:
            with timers("propagate"):
                propagate(blocks[i], buf, kwargs[i], batch_size, dtype)
        store.offload(model, i)
    if world.active:
        buf.a.copy_(world.scatter_rows(acts, buf.a).to(buf.a.dtype))
    elif not rebuild:
        buf.a.copy_(acts.to(buf.a.dtype))
    for k, v in state.get("timings", {}).items():
        if k != "total":
            timers.t[k] += v
    log.info("resuming at block %d of %d", state["next_block"], len(blocks))
