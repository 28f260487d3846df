"""The plan of a run: what each block is pruned to. From the allocator, the per-block statistic it declares (``needs``,
``statistic``; one dense pre-pass when it needs one) and the layer census: per-linear target sparsities, the block
ratios and, with N:M, one (n, m) per block (mixed N:M: ``nm_per_block``; a uniform allocation gives n everywhere).

    infos = layer_census(model, adapter, skip)
    check(cfg, allocator, infos, num_blocks)                     # before any work
    stats = block_statistics(model, adapter, {"a": allocator}, hidden, kwargs, ...)["a"]   # if allocator.needs
    plan = make_plan(cfg, allocator, infos, num_blocks, stats)
    plan.targets(i)        # BlockTargets(ratio, {linear: sparsity}, nm)
    plan.allocation        # the record's "allocation"; Plan(allocation, cfg.nm) resumes from it
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from layerprune.allocation.base import AllocationContext, LayerInfo
from layerprune.allocation.owl import nm_per_block
from layerprune.config import DTYPES
from layerprune.errors import UserError
from layerprune.models.adapters import get_adapter
from layerprune.offload import MemoryStore
from layerprune.passes import capture_inputs, dense_input_norms
from layerprune.solvers.nm import check_nm


@dataclass
class BlockTargets:
    ratio: float  # the block's sparsity (parameter-weighted mean of its linears' targets)
    layers: dict[str, float]  # linear name -> target sparsity
    nm: tuple[int, int] | None  # (n pruned, of m) for every linear of the block, or None


class Plan:
    def __init__(self, allocation: dict, nm):
        self.allocation = allocation
        self.layer = {(int(k.split(":")[0]), k.split(":", 1)[1]): v for k, v in allocation["layer"].items()}
        self.block_nm = [tuple(x) for x in allocation["block_nm"]] if nm is not None else None

    def targets(self, i: int) -> BlockTargets:
        return BlockTargets(self.allocation["block"][i], {n: v for (b, n), v in self.layer.items() if b == i},
                            self.block_nm[i] if self.block_nm else None)


def layer_census(model, adapter, skip=()) -> list[LayerInfo]:
    """Every prunable linear (not in ``skip``) of every block, in model order."""
    infos = []
    for b, block in enumerate(adapter.blocks(model)):
        for name, mod in adapter.linears(block).items():
            if name in skip:
                continue
            shape = tuple(adapter.get_weight(mod).shape)
            infos.append(LayerInfo(b, name, shape[0] * shape[1], shape))
    return infos


def check(cfg, allocator, infos: list[LayerInfo], num_blocks: int) -> None:
    """What the census alone can refuse: N:M widths, the allocation's own checks (e.g. a user list's length)."""
    if cfg.nm is not None:
        for info in infos:
            check_nm(cfg.nm, info.shape[1])
    allocator.check(cfg.sparsity, AllocationContext(infos, num_blocks))


@torch.no_grad()
def block_statistics(model, adapter, allocators: dict, hidden, kwargs, *, batch_size: int, device, dtype, store,
                     skip, offload: str = "none", progress: bool = False) -> dict[str, list[float]]:
    """{key: [statistic per block]} of several allocators from ONE dense pass (``dense_input_norms``): each
    allocator's ``statistic`` of the block's dense weights and the input statistics they ``need``."""
    needs = set().union(*(a.needs for a in allocators.values()))
    out = {k: [] for k in allocators}
    for _, block, collectors in dense_input_norms(model, adapter, hidden, kwargs, batch_size, device, dtype, store,
                                                  skip, offload, progress, needs=needs):
        mods = adapter.linears(block)
        weights = {n: adapter.get_weight(mods[n]) for n in collectors}
        stats = {n: c.stats() for n, c in collectors.items()}
        for k, a in allocators.items():
            out[k].append(float(a.statistic(weights, stats)))
        del weights, stats
    return out


def allocation_statistics(model, calib: torch.Tensor, allocators: dict, *, batch_size: int = 8, device=None,
                          compute_dtype: str = "float32", skip=()) -> dict[str, list[float]]:
    """{key: per-block statistic} for several allocators from ONE dense pass over ``calib`` (pass the lists to
    ``prune(block_stats=...)``). The model is not changed."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = DTYPES[compute_dtype]
    adapter = get_adapter(model)
    hidden, kwargs = capture_inputs(model, adapter, calib, device, dtype, batch_size)
    return block_statistics(model, adapter, allocators, hidden, kwargs, batch_size=batch_size, device=device,
                            dtype=dtype, store=MemoryStore(), skip=set(skip))


def make_plan(cfg, allocator, infos: list[LayerInfo], num_blocks: int, block_stats=None, weights=None) -> Plan:
    """The plan for ``cfg`` (sparsity, nm, allocation name and options). ``block_stats``: the allocator's statistic
    per block when it ``needs`` one; ``weights(block, name)``: dense weights, for allocators that read them."""
    ctx = AllocationContext(infos, num_blocks, weights=weights)
    if allocator.needs and block_stats is not None:
        if len(block_stats) != num_blocks:
            raise UserError(f"block_stats has {len(block_stats)} values for a model with {num_blocks} blocks")
        ctx.block_stats = [float(x) for x in block_stats]
    alloc = allocator.allocate(cfg.sparsity, ctx)
    allocation = {"name": cfg.allocation, "options": cfg.allocation_options, "target": cfg.sparsity,
                  "block": alloc.block_sparsity, "stats": alloc.stats,
                  "layer": {f"{b}:{n}": v for (b, n), v in alloc.layer_sparsity.items()}}
    if cfg.nm is not None:  # mixed N:M: per-block n approximating the block's ratio, mean n exact
        n, m = cfg.nm
        allocation["block_nm"] = [[k, m] for k in nm_per_block(alloc.block_sparsity, m, n)]
    return Plan(allocation, cfg.nm)
