"""The layer-wise driver: capture block-0 inputs, then for each block: onload, collect statistics,
ask the allocation for the block's sparsity, prune with the solver, propagate the *pruned* outputs to
the next block, offload, checkpoint.

The engine knows no method: solvers come from ``layerprune.solvers`` (tensor in, tensor out) and
sparsities from ``layerprune.allocation``. Module names come from the model's adapter. A block-level solver
(``block_level = True``, e.g. structured pruning that changes shapes) gets the whole block, its ratio and a
``collect`` callback instead, and the engine only propagates what it returns.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .allocation import AllocationContext, LayerInfo, get_allocator, nm_per_block
from .errors import UserError
from .hooks import HookSet
from .models.adapters import Adapter, get_adapter
from .offload import MemoryStore
from .solvers import get_solver, relative_error
from .solvers.nm import check_nm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # compute dtypes by name

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "cpu", "disk")


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float | None = 0.5  # None: 0.5, or n/m with ``nm``
    nm: tuple[int, int] | None = None  # (n pruned, of m)
    allocation: str = "uniform"
    allocation_options: dict = field(default_factory=dict)
    solver_options: dict = field(default_factory=dict)
    true_sequential: bool = False
    batch_size: int = 8  # calibration windows per block forward
    compute_dtype: str = "float32"  # dtype of the forward passes; statistics and solves are always fp32
    offload: str = "none"
    skip: tuple[str, ...] = ()  # linear names (e.g. "mlp.down_proj") left dense

    def validate(self) -> None:
        if self.nm is not None:  # N:M fixes the sparsity: n/m, recorded as such
            n, m = check_nm(self.nm, 0)
            if self.sparsity is None:
                self.sparsity = n / m
            elif abs(self.sparsity - n / m) > 1e-9:
                raise UserError(f"--sparsity {self.sparsity} conflicts with --nm {n}:{m}, which prunes {n / m:g}: "
                                "drop --sparsity (N:M sets it)")
        if self.sparsity is None:
            self.sparsity = 0.5
        if not (0.0 <= self.sparsity < 1.0):
            raise UserError(f"--sparsity {self.sparsity} is outside [0, 1): use e.g. 0.5 for 50%")
        if self.offload not in OFFLOAD_MODES:
            raise UserError(f"--offload {self.offload!r} is unknown: use one of {', '.join(OFFLOAD_MODES)}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"--compute-dtype {self.compute_dtype!r} is unknown: use float32, bfloat16 or float16")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        get_solver(self.method)


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a block while capturing: records its inputs and passes hidden states through."""

    def __init__(self, index: int, sink: dict, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.sink.setdefault("hidden", []).append(hidden_states.detach())
        if self.index not in self.sink.setdefault("kwargs", {}):
            self.sink["kwargs"][self.index] = (args, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def _cast(obj, device, dtype):
    """Move tensors (recursively) to device; floating tensors also to dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, device, dtype) for k, v in obj.items()}
    return obj


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(model, adapter: Adapter, calib: torch.Tensor, device, dtype, batch_size: int):
    """Block-0 input hidden states for every calibration window, and every block's other call arguments.

    Each block's positional/keyword arguments (attention mask, position ids, ``position_embeddings``,
    per-layer-type masks, ...) are recorded from a batch-1 pass; the cache is disabled. Blocks are
    replaced by pass-through catchers, so the capture costs only the embeddings.
    """
    blocks = adapter.blocks(model)
    real = list(blocks)
    sink: dict = {}
    for i in range(len(real)):
        blocks[i] = _Catcher(i, sink, last=i == len(real) - 1)
    model_device = next(p.device for p in model.parameters() if p.device.type != "meta")
    moved = model_device != device
    try:
        if moved:
            model.to(device)  # only the non-block modules are left in the model
        for start in range(0, calib.shape[0], batch_size):
            x = calib[start:start + batch_size].to(device)
            if start == 0 and x.shape[0] > 1:  # the call arguments come from a batch-1 pass
                try:
                    model(input_ids=x[:1], use_cache=False)
                except _Stop:
                    pass
                sink["hidden"].clear()
            try:
                model(input_ids=x, use_cache=False)
            except _Stop:
                pass
    finally:
        if moved:
            model.to(model_device)
        for i, b in enumerate(real):
            blocks[i] = b
    hidden = torch.cat([h.to(dtype) for h in sink["hidden"]], dim=0)
    kwargs = {i: _cast(v, device, dtype) for i, v in sink["kwargs"].items()}
    for args, kw in kwargs.values():
        kw["use_cache"] = False
        for key in ("past_key_values", "past_key_value", "layer_past"):
            if key in kw:
                kw[key] = None
    return hidden, kwargs


class ActivationBuffer:
    """Block inputs/outputs for all calibration windows: on the device, in CPU RAM, or memory-mapped on disk."""

    def __init__(self, like: torch.Tensor, mode: str, device, folder: Path | None = None):
        self.mode, self.device = mode, device
        if mode == "disk":
            if folder is not None:
                Path(folder).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="layerprune-acts-", dir=folder))
            self.a = self._file_tensor("a", like)
            self.b = self._file_tensor("b", like)
            self.a.copy_(like)
        else:
            where = device if mode == "none" else torch.device("cpu")
            self.a = like.to(where).clone()
            self.b = torch.empty_like(self.a)

    def _file_tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        path = self._dir / name
        return torch.from_file(str(path), shared=True, size=like.numel(), dtype=like.dtype).view(like.shape)

    @property
    def inputs(self) -> torch.Tensor:
        return self.a

    def batches(self, batch_size: int):
        for s in range(0, self.a.shape[0], batch_size):
            yield s, self.a[s:s + batch_size].to(self.device, non_blocking=True)

    def write(self, start: int, out: torch.Tensor) -> None:
        self.b[start:start + out.shape[0]].copy_(out)

    def swap(self) -> None:
        self.a, self.b = self.b, self.a

    def close(self) -> None:
        if self.mode == "disk":
            del self.a, self.b
            shutil.rmtree(self._dir, ignore_errors=True)


class Timers:
    def __init__(self):
        self.t: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] += time.perf_counter() - t0


class Checkpoint:
    """Per-block resume state under ``<out>/.checkpoint``: pruned block weights, the next block's inputs, and a
    state file written last (the commit point), all by atomic rename."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint

    def load(self) -> dict | None:
        p = self.folder / "state.json"
        if not p.is_file():
            return None
        try:
            state = json.loads(p.read_text())
            if not isinstance(state, dict) or not (self.folder / state["activations"]).is_file():
                raise ValueError("incomplete")
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{p} is corrupt or incomplete, so the run cannot be resumed: rerun with --force "
                            "to start over") from None
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"{self.folder} belongs to a run with other settings (model, method, sparsity, allocation "
                            "or calibration differ): rerun with the same settings, or use --force to start over")
        return state

    def block_weights(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / f"block_{i:04d}.safetensors"))

    def activations(self, state: dict) -> torch.Tensor:
        return load_file(str(self.folder / state["activations"]))["x"]

    def _atomic(self, name: str, write) -> None:
        tmp = self.folder / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, self.folder / name)

    def save(self, i: int, block: nn.Module, acts: torch.Tensor, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        self._atomic(f"block_{i:04d}.safetensors", lambda p: save_file(sd, str(p)))
        name = f"acts_{i + 1:04d}.safetensors"
        self._atomic(name, lambda p: save_file({"x": acts.detach().to("cpu").contiguous()}, str(p)))
        state = {**state, "fingerprint": self.fingerprint, "next_block": i + 1, "activations": name}
        self._atomic("state.json", lambda p: p.write_text(json.dumps(state)))
        for old in self.folder.glob("acts_*.safetensors"):  # only the latest block's inputs are needed to resume
            if old.name != name:
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def fingerprint(model, calib: torch.Tensor, cfg: PruneConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(calib.cpu().numpy().tobytes())
    c = asdict(cfg)
    for k in ("offload", "batch_size"):  # do not change the result
        c.pop(k)
    h.update(json.dumps(c, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _layer_infos(model, adapter: Adapter, skip) -> list[LayerInfo]:
    infos = []
    for b, block in enumerate(adapter.blocks(model)):
        for name, mod in adapter.linears(block).items():
            if name in skip:
                continue
            shape = tuple(adapter.get_weight(mod).shape)
            infos.append(LayerInfo(b, name, shape[0] * shape[1], shape))
    return infos


@torch.no_grad()
def _forward_all(block, buf: ActivationBuffer, kwargs, batch_size: int, keep: bool) -> None:
    args, kw = kwargs
    for s, x in buf.batches(batch_size):
        out = _block_out(block(x, *args, **kw))
        if keep:
            buf.write(s, out)


def _forward_copy(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The module the forward passes run through: the block itself, or a copy in the compute dtype."""
    p = next(block.parameters())
    return block if p.dtype == dtype else copy.deepcopy(block).to(dtype)


def _collector(block: nn.Module, buf: ActivationBuffer, kwargs, cfg: PruneConfig, dtype, timers: Timers):
    """collect(names, needs) -> {name: LayerStats}: runs the block *as it is now* (a fresh forward copy in the compute
    dtype) over the calibration inputs with hooks on the named submodules; a batch stops once all of them ran."""

    @torch.no_grad()
    def collect(names, needs) -> dict:
        fwd = _forward_copy(block, dtype)
        mods = {n: fwd.get_submodule(n) for n in names}
        seen: set = set()

        def stop(m, args, out, name):
            seen.add(name)
            if len(seen) == len(mods):
                raise _Stop

        args, kw = kwargs
        with timers("statistics"), HookSet(mods, set(needs)) as hs:
            handles = [m.register_forward_hook(lambda m, a, o, n=n: stop(m, a, o, n)) for n, m in mods.items()]
            try:
                for _, x in buf.batches(cfg.batch_size):
                    seen.clear()
                    try:
                        fwd(x, *args, **kw)
                    except _Stop:
                        pass
            finally:
                for h in handles:
                    h.remove()
        return {n: hs.collectors[n].stats() for n in names}

    return collect


@torch.no_grad()
def _wanda_scores(adapter, block, names, collectors) -> dict[str, torch.Tensor]:
    mods = adapter.linears(block)
    return {n: adapter.get_weight(mods[n]).float().abs() * collectors[n].stats().norm.unsqueeze(0) for n in names}


@torch.no_grad()
def dense_input_norms(model, adapter, hidden, kwargs, batch_size, device, dtype, store, skip, offload="none",
                      progress=False, desc="allocation statistics"):
    """One dense pass: block inputs propagated through the *unpruned* blocks. Yields (i, block, collectors) per
    block, the collectors holding sq_norm (sum over tokens of x_j^2) of every prunable linear's input; the block is
    onloaded while the caller uses it and offloaded afterwards."""
    buf = ActivationBuffer(hidden, "cpu" if offload == "none" else offload, device)
    blocks = adapter.blocks(model)
    names = [n for n in adapter.linear_names() if n not in skip]
    try:
        for i in tqdm(range(len(blocks)), desc=desc, disable=not progress, leave=False):
            store.onload(model, i, device)
            block = blocks[i]
            fwd = _forward_copy(block, dtype)
            mods = adapter.linears(fwd)
            with HookSet({n: mods[n] for n in names}, {"sq_norm"}, sample_rows=0) as hs:
                _forward_all(fwd, buf, kwargs[i], batch_size, keep=True)
            del fwd
            yield i, block, {n: hs.collectors[n] for n in names}
            buf.swap()
            store.offload(model, i)
    finally:
        buf.close()


def prepass_scores(model, adapter, allocator, hidden, kwargs, cfg, device, dtype, store, skip, progress):
    """One dense pass (``dense_input_norms``, as DLP/OWL do): per block, the allocator's statistic of the block's
    Wanda scores |W| * ||X_j||.

    ``allocator`` may also be a dict {key: allocator}: then one pass serves them all and the result is
    {key: [statistic per block]} (the allocation sweep uses this to share the pass)."""
    many = isinstance(allocator, dict)
    allocators = allocator if many else {None: allocator}
    stats = {k: [] for k in allocators}
    for _, block, collectors in dense_input_norms(model, adapter, hidden, kwargs, cfg.batch_size, device, dtype,
                                                   store, skip, cfg.offload, progress):
        scores = _wanda_scores(adapter, block, list(collectors), collectors)
        for k, a in allocators.items():
            stats[k].append(float(a.block_statistic(scores)))
        del scores
    return stats if many else stats[None]


def allocation_statistics(model, calib: torch.Tensor, allocators: dict, *, batch_size: int = 8, device=None,
                          compute_dtype: str = "float32", skip=()) -> dict[str, list[float]]:
    """{key: per-block statistic} for several score-based allocators from ONE dense pass (pass the lists to
    ``prune_model(block_stats=...)``). The model is not changed."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cfg = PruneConfig(batch_size=batch_size, compute_dtype=compute_dtype)
    dtype = DTYPES[compute_dtype]
    adapter = get_adapter(model)
    hidden, kwargs = capture_inputs(model, adapter, calib, device, dtype, batch_size)
    return prepass_scores(model, adapter, allocators, hidden, kwargs, cfg, device, dtype, MemoryStore(), set(skip),
                          progress=False)


def preflight(model, cfg: PruneConfig) -> list[LayerInfo]:
    """Every check that needs only the model's structure (a weightless meta skeleton will do): the solver's
    constraints, --skip names, N:M widths, and the allocation's census checks (e.g. a user list's length).
    Returns the layer census."""
    cfg.validate()
    adapter = get_adapter(model)
    solver = get_solver(cfg.method)
    skip = set(cfg.skip)
    if getattr(solver, "block_level", False) and (cfg.nm is not None or skip or cfg.offload == "disk"):
        raise UserError(f"{cfg.method} prunes whole blocks and changes their shapes: --nm, --skip and --offload disk "
                        "do not apply; drop them")
    if hasattr(solver, "check_model"):  # e.g. SlimGPT: removable heads, and a config for every outcome
        solver.check_model(model, adapter, cfg.solver_options)
    unknown = skip - set(adapter.linear_names())
    if unknown:
        raise UserError(f"--skip names {', '.join(sorted(unknown))} are not linears of this model: "
                        f"use some of {', '.join(adapter.linear_names())}")
    infos = _layer_infos(model, adapter, skip)
    if cfg.nm is not None:
        for info in infos:
            check_nm(cfg.nm, info.shape[1])
    allocator = get_allocator(cfg.allocation, **cfg.allocation_options)
    allocator.check(cfg.sparsity, AllocationContext(infos, len(adapter.blocks(model))))
    return infos


def prune_model(model, calib: torch.Tensor, cfg: PruneConfig, *, device=None, out_dir: Path | None = None,
                resume: bool = False, store=None, progress: bool = True, block_stats: list[float] | None = None) -> dict:
    """Prune ``model`` in place, block by block. Returns the run record (see ``record.py``).

    ``block_stats``: the allocator's per-block statistics when already known (from ``prepass_scores`` on the same
    model and calibration); skips the dense pre-pass."""
    t_start = time.perf_counter()
    infos = preflight(model, cfg)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = DTYPES[cfg.compute_dtype]
    adapter = get_adapter(model)
    solver = get_solver(cfg.method)
    block_level = getattr(solver, "block_level", False)
    blocks = adapter.blocks(model)
    nblocks = len(blocks)
    skip = set(cfg.skip)
    params_before = sum(p.numel() for p in model.parameters())
    store = store or MemoryStore()
    timers = Timers()
    ckpt = Checkpoint(out_dir / ".checkpoint", fingerprint(model, calib, cfg)) if out_dir is not None else None
    state = ckpt.load() if (ckpt is not None and resume) else None

    # 1. capture the inputs of block 0 and every block's call arguments
    with timers("capture"):
        hidden, kwargs = capture_inputs(model, adapter, calib, device, dtype, cfg.batch_size)

    # 2. allocation: per-layer target sparsities
    allocator = get_allocator(cfg.allocation, **cfg.allocation_options)
    if state is not None:
        allocation = state["allocation"]
        layer_sparsity = {(int(k.split(":")[0]), k.split(":", 1)[1]): v for k, v in allocation["layer"].items()}
    else:
        ctx = AllocationContext(infos, nblocks)
        if allocator.needs_scores and block_stats is not None:
            if len(block_stats) != nblocks:
                raise UserError(f"block_stats has {len(block_stats)} values for a model with {nblocks} blocks")
            ctx.block_stats = [float(x) for x in block_stats]
        elif allocator.needs_scores:
            with timers("allocation"):
                ctx.block_stats = prepass_scores(model, adapter, allocator, hidden, kwargs, cfg, device, dtype,
                                                 store, skip, progress)
        ctx.weights = lambda b, n: adapter.get_weight(adapter.linears(blocks[b])[n]).detach().float()
        target = cfg.sparsity
        alloc = allocator.allocate(target, ctx)
        layer_sparsity = alloc.layer_sparsity
        allocation = {"name": cfg.allocation, "options": cfg.allocation_options, "target": target,
                      "block": alloc.block_sparsity, "stats": alloc.stats,
                      "layer": {f"{b}:{n}": v for (b, n), v in layer_sparsity.items()}}
        if cfg.nm is not None:  # mixed N:M: per-block n approximating the block's ratio, mean n exact
            n_blocks = nm_per_block(alloc.block_sparsity, cfg.nm[1], cfg.nm[0]) if cfg.allocation != "uniform" \
                else [cfg.nm[0]] * nblocks
            allocation["block_nm"] = [[n, cfg.nm[1]] for n in n_blocks]
    block_nm = [tuple(x) for x in allocation["block_nm"]] if cfg.nm is not None else [None] * nblocks

    prev_total = (state or {}).get("timings", {}).get("total", 0.0)  # wall time of the interrupted process(es)
    layers: list[dict] = state["layers"] if state else []
    start = state["next_block"] if state else 0
    buf = ActivationBuffer(hidden, cfg.offload, device, folder=out_dir)
    del hidden
    if state is not None:
        for i in range(start):
            store.onload(model, i, "cpu")
            if block_level:
                solver.load_block(blocks[i], adapter, adapter.geometry(model.config), ckpt.block_weights(i))
            else:
                blocks[i].load_state_dict(ckpt.block_weights(i))
            store.offload(model, i)
        buf.a.copy_(ckpt.activations(state).to(buf.a.dtype))
        for k, v in state.get("timings", {}).items():
            if k != "total":
                timers.t[k] += v
        log.info("resuming at block %d of %d", start, nblocks)

    # 3. block by block
    bar = tqdm(range(start, nblocks), desc=f"prune {cfg.method}", unit="block", disable=not progress,
               initial=start, total=nblocks)
    try:
        for i in bar:
            with timers("onload"):
                store.onload(model, i, device)
            block = blocks[i]
            if block_level:
                t0, s0 = time.perf_counter(), timers.t["statistics"]
                collect = _collector(block, buf, kwargs[i], cfg, dtype, timers)
                rows = solver.prune_block(block, adapter, collect, allocation["block"][i],
                                          adapter.geometry(model.config), **cfg.solver_options)
                layers += [{"block": i, **r} for r in rows]
                timers.t["solve"] += time.perf_counter() - t0 - (timers.t["statistics"] - s0)
            fwd = _forward_copy(block, dtype)
            for stage in ([] if block_level else adapter.stages(cfg.true_sequential)):
                groups = [[n for n in g if n not in skip] for g in stage]
                groups = [g for g in groups if g]
                if not groups:
                    continue
                fmods = adapter.linears(fwd)
                with timers("statistics"), HookSet({g[0]: fmods[g[0]] for g in groups}, set(solver.needs)) as hs:
                    _forward_all(fwd, buf, kwargs[i], cfg.batch_size, keep=False)
                with timers("solve"):
                    mods = adapter.linears(block)
                    for g in groups:
                        st = hs.collectors[g[0]].stats()
                        for name in g:
                            w = adapter.get_weight(mods[name]).detach()
                            target = layer_sparsity[(i, name)]
                            new = solver.prune(w, st, target, block_nm[i], **cfg.solver_options)
                            err = relative_error(w.float(), new.float(), st)
                            adapter.set_weight(mods[name], new)
                            achieved = float((new == 0).sum()) / new.numel()
                            layers.append({"block": i, "name": name, "shape": list(new.shape), "target": target,
                                           "nm": list(block_nm[i]) if block_nm[i] else None,
                                           "achieved": achieved, "rel_error": err})
                        hs.collectors[g[0]].free()
                if fwd is not block:
                    with torch.no_grad():
                        for pf, pb in zip(fwd.parameters(), block.parameters()):
                            pf.copy_(pb)
            with timers("propagate"):
                _forward_all(fwd, buf, kwargs[i], cfg.batch_size, keep=True)
                buf.swap()
            del fwd
            if ckpt is not None:  # before the offload: with --offload disk the block leaves memory there
                with timers("checkpoint"):
                    ckpt.save(i, block, buf.inputs, {"allocation": allocation, "layers": layers, "timings": {
                        **timers.t, "total": time.perf_counter() - t_start + prev_total}})
            with timers("offload"):
                store.offload(model, i)
            errs = [r["rel_error"] for r in layers if r["block"] == i and r["rel_error"] is not None]
            bar.set_postfix(err=f"{sum(errs) / max(len(errs), 1):.3g}")
    finally:
        buf.close()
    extra = solver.finish(model, adapter) if block_level else {}
    timers.t["total"] = time.perf_counter() - t_start + prev_total
    return {
        **extra,
        "params": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        "method": cfg.method,
        "sparsity": cfg.sparsity,
        "nm": list(cfg.nm) if cfg.nm else None,
        "allocation": allocation,
        "solver_options": cfg.solver_options,
        "true_sequential": cfg.true_sequential,
        "compute_dtype": cfg.compute_dtype,
        "offload": cfg.offload,
        "skip": sorted(skip),
        "layers": layers,
        "timings": dict(timers.t),
        "resumed_from_block": start if state else None,
    }
