"""Forward passes over the calibration windows, one decoder block at a time.

capture_inputs     block-0 input hidden states and every block's other call arguments (embeddings only)
ActivationBuffer   block inputs/outputs of all windows: on the device, in CPU RAM, or memory-mapped on disk
make_collect       collect(names, needs) -> {name: LayerStats}: the block as it is now, hooks on the named linears
propagate          the block's outputs become the next block's inputs
dense_input_norms  one pass through the *unpruned* blocks collecting every linear's input statistics
"""
from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from .progress import tqdm

from .hooks import HookSet
from .models.adapters import Adapter


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


def cast(obj, device, dtype):
    """Move tensors (recursively through lists, tuples and dicts) to device; floating tensors also to dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast(v, device, dtype) for k, v in obj.items()}
    return obj


def block_out(out):
    """A block's output hidden states (blocks return a tensor or a tuple starting with it)."""
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
    kwargs = {i: cast(v, device, dtype) for i, v in sink["kwargs"].items()}
    for args, kw in kwargs.values():
        kw["use_cache"] = False
        for key in adapter.cache_kwargs:
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
    """Wall time per named stage: ``with timers("solve"): ...``; ``timers.t`` holds the sums.

    On a CUDA device kernels run asynchronously, so a stage's wall time is only its own once the device has finished
    the work queued before it and in it: ``Timers(device)`` synchronizes the device at both ends of every stage (and in
    ``now()``). On the CPU nothing is synchronized."""

    def __init__(self, device=None, sync=None):
        self.t: dict[str, float] = defaultdict(float)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.sync = sync if sync is not None else (
            (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None)

    def now(self) -> float:
        """perf_counter() after the device has finished its queued work."""
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = self.now()
        try:
            yield
        finally:
            self.t[name] += self.now() - t0


def forward_copy(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The module the forward passes run through: the block itself, or a copy in the compute dtype."""
    p = next(block.parameters())
    return block if p.dtype == dtype else copy.deepcopy(block).to(dtype)


@torch.no_grad()
def forward_all(block, buf: ActivationBuffer, kwargs, batch_size: int, keep: bool) -> None:
    args, kw = kwargs
    for s, x in buf.batches(batch_size):
        out = block_out(block(x, *args, **kw))
        if keep:
            buf.write(s, out)


def make_collect(block: nn.Module, buf: ActivationBuffer, kwargs, batch_size: int, dtype, timers: Timers):
    """collect(names, needs) -> {name: LayerStats}: runs the block *as it is now* (a fresh forward copy in the compute
    dtype) over the calibration inputs with hooks on the named submodules; a batch stops once all of them were called,
    before the last one computes (the statistics need their inputs only: e.g. down_proj's product is never run)."""

    @torch.no_grad()
    def collect(names, needs) -> dict:
        with timers("statistics"):
            return _collect(names, needs)

    def _collect(names, needs) -> dict:
        fwd = forward_copy(block, dtype)
        mods = {n: fwd.get_submodule(n) for n in names}
        seen: set = set()

        def stop(name):
            seen.add(name)
            if len(seen) == len(mods):
                raise _Stop

        args, kw = kwargs
        with HookSet(mods, set(needs)) as hs:  # its pre-hooks run first (registered first)
            handles = [m.register_forward_pre_hook(lambda m, a, n=n: stop(n)) for n, m in mods.items()]
            try:
                for _, x in buf.batches(batch_size):
                    seen.clear()
                    try:
                        fwd(x, *args, **kw)
                    except _Stop:
                        pass
            finally:
                for h in handles:
                    h.remove()
        out = {}
        for n in names:  # one input Hessian and its accumulator at a time
            out[n] = hs.collectors[n].stats()
            hs.collectors[n].free()
        return out

    return collect


def propagate(block: nn.Module, buf: ActivationBuffer, kwargs, batch_size: int, dtype) -> None:
    """The block's outputs (in the compute dtype) become the buffer's inputs: what the next block sees."""
    forward_all(forward_copy(block, dtype), buf, kwargs, batch_size, keep=True)
    buf.swap()


@torch.no_grad()
def dense_input_norms(model, adapter, hidden, kwargs, batch_size, device, dtype, store, skip, offload="none",
                      progress=False, desc="allocation statistics", needs=("sq_norm",)):
    """One dense pass: block inputs propagated through the *unpruned* blocks. Yields (i, block, collectors) per
    block, the collectors holding ``needs`` (default sq_norm: the sum over tokens of x_j^2) of every prunable linear's
    input; the block is onloaded while the caller uses it and offloaded afterwards."""
    buf = ActivationBuffer(hidden, "cpu" if offload == "none" else offload, device)
    blocks = adapter.blocks(model)
    names = [n for n in adapter.linear_names() if n not in skip]
    try:
        for i in tqdm(range(len(blocks)), desc=desc, disable=not progress, leave=False):
            store.onload(model, i, device)
            block = blocks[i]
            fwd = forward_copy(block, dtype)
            mods = adapter.linears(fwd)
            with HookSet({n: mods[n] for n in names}, set(needs), sample_rows=0) as hs:
                forward_all(fwd, buf, kwargs[i], batch_size, keep=True)
            del fwd
            yield i, block, {n: hs.collectors[n] for n in names}
            buf.swap()
            store.offload(model, i)
    finally:
        buf.close()
