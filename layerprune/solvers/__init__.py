"""Intra-layer pruning solvers: pure tensor math on one weight matrix [out, in] and its input statistics.

Each solver returns a new weight (same shape, dtype and device) with the pruned entries exactly 0. Unstructured
pruning zeroes exactly round(sparsity * numel) weights; N:M (n, m) zeroes exactly n of every m consecutive inputs of
each row and ignores `sparsity`.
"""
from __future__ import annotations

from typing import Protocol

import torch

from layerprune.errors import UserError
from layerprune.solvers.common import relative_error
from layerprune.solvers.magnitude import Magnitude
from layerprune.solvers.nm import check_nm, nm_for_ratio, parse_nm
from layerprune.solvers.sparsegpt import SparseGPT
from layerprune.solvers.wanda import Wanda
from layerprune.stats import LayerStats


class Solver(Protocol):
    name: str
    needs: frozenset[str]  # subset of {"sq_norm", "hessian"}

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float,
              nm: tuple[int, int] | None = None, **options) -> torch.Tensor: ...


SOLVERS: dict[str, Solver] = {s.name: s for s in (Magnitude(), Wanda(), SparseGPT())}


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise UserError(f"unknown solver {name!r}; known solvers: {', '.join(SOLVERS)}")
    return SOLVERS[name]


__all__ = ["SOLVERS", "Solver", "get_solver", "relative_error", "parse_nm", "check_nm", "nm_for_ratio"]
