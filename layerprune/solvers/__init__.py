"""Intra-layer pruning solvers: pure tensor math on one weight matrix [out, in] and its input statistics.

Per-linear solvers (``SOLVERS``) return a new weight (same shape, dtype and device) with the pruned entries
exactly 0. Unstructured pruning zeroes exactly round(sparsity * numel) weights; N:M (n, m) zeroes exactly n of every m
consecutive inputs of each row and ignores `sparsity`.

Block-level solvers (``BLOCK_SOLVERS``, attribute ``block_level = True``) prune a whole decoder block at once and may
change its shapes (structured pruning): ``prune_block(block, adapter, collect, ratio, geometry, **options) -> rows``,
where ``collect(names, needs) -> {name: LayerStats}`` runs the block as it is now over the calibration inputs;
``load_block(block, adapter, geometry, state_dict)`` (resume) and ``finish(model, adapter) -> dict`` (after the last
block; merged into the run record).
"""
from __future__ import annotations

from typing import Protocol

import torch

from layerprune.errors import UserError
from layerprune.solvers.common import relative_error
from layerprune.solvers.magnitude import Magnitude
from layerprune.solvers.nm import check_nm, nm_for_ratio, parse_nm
from layerprune.solvers.slimgpt import SlimGPT
from layerprune.solvers.sparsegpt import SparseGPT
from layerprune.solvers.wanda import Wanda
from layerprune.stats import LayerStats


class Solver(Protocol):
    name: str
    needs: frozenset[str]  # subset of {"sq_norm", "hessian"}

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float,
              nm: tuple[int, int] | None = None, **options) -> torch.Tensor: ...


SOLVERS: dict[str, Solver] = {s.name: s for s in (Magnitude(), Wanda(), SparseGPT())}
BLOCK_SOLVERS = {s.name: s for s in (SlimGPT(),)}


def get_solver(name: str):
    if name in SOLVERS:
        return SOLVERS[name]
    if name in BLOCK_SOLVERS:
        return BLOCK_SOLVERS[name]
    raise UserError(f"unknown solver {name!r}; known solvers: {', '.join([*SOLVERS, *BLOCK_SOLVERS])}")


__all__ = ["SOLVERS", "BLOCK_SOLVERS", "Solver", "get_solver", "relative_error", "parse_nm", "check_nm", "nm_for_ratio"]
