"""Layer-wise sparsity allocation: from per-block statistics (or none) to one sparsity per prunable linear.

Budget convention: the target is the PARAMETER-WEIGHTED mean sparsity over all prunable linears (the fraction of pruned
weights; the plain block mean when blocks are equally sized). Every allocator meets it to 1e-9 and keeps every ratio
in [lo, hi] (default [0, 0.99]), rebalancing what clipping removes. See base.py.

    alloc = get_allocator("dlp", alpha=0.15, stat="median")
    if alloc.needs: ctx.block_stats = [alloc.statistic(weights_of(b), stats_of(b)) for b in blocks]  # dense pass
    allocation = alloc.allocate(0.7, ctx)          # allocation.layer_sparsity[(block, name)]
    (allocation/plan.py does this for the engine, mixed N:M included)

Every allocator class is registered with ``@register_allocator`` (layerprune.registry) and declares its ``options``;
the import order below is the registration order (the order of ``--help``): uniform, owl, dlp, dsa
("dsa:<function or preset>"), ipr-log, ipr-log-dec, ipr-lin, ipr-lin-dec, atp, er, erk, global, lamp, user
("user:0.4,0.5,..." / "user:file.json" or sparsities=...); then auto, registered by ``layerprune.search.auto`` (a
choice by a proxy, made by ``prune()`` before the run). A class with ``spec_arg`` takes the text after ':' as that
keyword.
"""
from __future__ import annotations

from layerprune.allocation.base import (Allocation, AllocationContext, Allocator, LayerInfo, block_median, block_mean,
                                        minmax_recentre, rebalance, solve_clipped)
from layerprune.allocation.uniform import Uniform
from layerprune.allocation.owl import OWL, nm_per_block, outlier_ratio
from layerprune.allocation.dlp import DLP
from layerprune.allocation.dsa import DSA
from layerprune.allocation.ipr import IPR, IPRLin, IPRLinDec, IPRLogDec, ipr_schedule
from layerprune.allocation.atp import ATP
from layerprune.allocation.classic import ER, ERK, LAMP, Global
from layerprune.allocation.user import User
from layerprune.errors import UserError
from layerprune.registry import ALLOCATOR_REGISTRY

ALLOCATORS = ALLOCATOR_REGISTRY  # name -> class


def split_spec(spec: str) -> tuple[str, str]:
    """"dsa:FUNC" -> ("dsa", "FUNC"); "DLP" -> ("dlp", "")."""
    name, _, arg = str(spec).strip().partition(":")
    return name.lower(), arg


def get_allocator(spec: str, **hparams) -> Allocator:
    """Build an allocator by registry name. Hyperparameters whose value is None are ignored (so a CLI may pass all of
    its options); any other name the allocator does not declare is an error. "user:<list or file>" passes sparsities."""
    name, arg = split_spec(spec)
    cls = ALLOCATORS.get(name)
    spec_arg = getattr(cls, "spec_arg", None)
    if arg:
        if spec_arg is None:
            takes = [n for n, c in ALLOCATORS.items() if getattr(c, "spec_arg", None)]
            raise UserError(f"only {' and '.join(repr(n) for n in takes)} take an argument after ':', got {spec!r}")
        hparams[spec_arg] = arg
    accepted = ([spec_arg] if spec_arg else []) + [o.name for o in cls.options]
    hparams = {k: v for k, v in hparams.items() if v is not None}
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise UserError(f"allocation '{name}' does not take {', '.join(unknown)}; it takes: {', '.join(accepted)}")
    return cls(**hparams)


__all__ = ["ALLOCATORS", "Allocation", "AllocationContext", "Allocator", "LayerInfo", "get_allocator", "split_spec",
           "rebalance", "minmax_recentre", "solve_clipped", "block_median", "block_mean", "outlier_ratio",
           "nm_per_block", "ipr_schedule", "Uniform", "OWL", "DLP", "DSA", "IPR", "IPRLogDec", "IPRLin", "IPRLinDec",
           "ATP", "ER", "ERK", "Global", "LAMP", "User"]
