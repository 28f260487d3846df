"""Intra-layer pruning solvers: pure tensor math on one weight matrix [out, in] and its input statistics.

Every solver class is registered with ``@register_solver`` (layerprune.registry) and declares its ``options``; the
CLI builds its flags from them. The import order below is the registration order (the order of ``--help``).

Per-linear solvers (``SOLVERS``) return a new weight (same shape, dtype and device) with the pruned entries
exactly 0. Unstructured pruning zeroes exactly round(sparsity * numel) weights; N:M (n, m) zeroes exactly n of every m
consecutive inputs of each row and ignores `sparsity`.

A solver that changes shapes (structured pruning, e.g. SlimGPT) supplies its own block program through
``program(model, adapter, cfg)``; every per-linear solver is wrapped in ``solvers.program.LinearProgram``. The engine
only ever calls a block program: ``run(block, collect, targets) -> rows``, ``load_block`` (resume), ``finish``.
"""
from __future__ import annotations

from typing import Protocol

import torch

from layerprune.registry import SOLVER_REGISTRY
from layerprune.solvers.magnitude import Magnitude
from layerprune.solvers.wanda import Wanda
from layerprune.solvers.sparsegpt import SparseGPT
from layerprune.solvers.slimgpt import SlimGPT
from layerprune.solvers.depth import Depth
from layerprune.solvers.alps import ALPS
from layerprune.solvers.common import relative_error
from layerprune.solvers.nm import check_nm, nm_for_ratio, parse_nm
from layerprune.stats import LayerStats


class Solver(Protocol):
    name: str
    needs: frozenset[str]  # subset of {"sq_norm", "hessian"}
    options: tuple  # layerprune.registry.Option, one per keyword option

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float,
              nm: tuple[int, int] | None = None, **options) -> torch.Tensor: ...


_instances: dict[type, object] = {}


def get_solver(name: str):
    """The (one) instance of the solver registered under ``name``."""
    cls = SOLVER_REGISTRY.get(name)
    if cls not in _instances:
        _instances[cls] = cls()
    return _instances[cls]


class _Solvers:
    """Live name -> instance view of the registered solvers that are (or are not) block-level."""

    def __init__(self, block_level: bool):
        self.block_level = block_level

    def _names(self) -> list[str]:
        return [n for n, cls in SOLVER_REGISTRY.items() if getattr(cls, "block_level", False) == self.block_level]

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __getitem__(self, name: str):
        if name not in self:
            raise KeyError(name)
        return get_solver(name)


SOLVERS = _Solvers(block_level=False)
BLOCK_SOLVERS = _Solvers(block_level=True)

__all__ = ["SOLVERS", "BLOCK_SOLVERS", "SOLVER_REGISTRY", "Solver", "get_solver", "relative_error", "parse_nm",
           "check_nm", "nm_for_ratio", "Magnitude", "Wanda", "SparseGPT", "SlimGPT", "Depth", "ALPS"]
