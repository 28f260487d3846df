"""Wanda (Sun et al., ICLR 2024): score S_ij = |W_ij| * ||X_j||_2, prune the lowest scores of each output row.

No weight update. ||X_j||_2 = sqrt(stats.sq_norm[j]); Wanda's own scaler divides by the number of samples, which does
not change any per-row ranking. N:M compares S within each group of m consecutive inputs of a row.
"""
from __future__ import annotations

import torch

from layerprune.scores import wanda_score
from layerprune.registry import register_solver
from layerprune.solvers.common import check_options, check_sparsity, check_weight, row_mask
from layerprune.solvers.nm import check_nm, nm_mask
from layerprune.stats import LayerStats


@register_solver
class Wanda:
    name = "wanda"
    needs = frozenset({"sq_norm"})
    options = ()

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, nm=None, **options) -> torch.Tensor:
        check_options(self.name, options, ())
        check_weight(weight)
        if stats.sq_norm is None or stats.sq_norm.shape != (weight.shape[1],):
            raise ValueError(f"wanda needs stats.sq_norm of shape [{weight.shape[1]}]")
        score = wanda_score(weight, stats.sq_norm)
        if nm is not None:
            mask = nm_mask(score, *check_nm(nm, weight.shape[1]))
        else:
            mask = row_mask(score, check_sparsity(sparsity))
        return weight.masked_fill(mask, 0)
