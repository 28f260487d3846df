"""Magnitude pruning (Han et al. 2015): zero the weights with the smallest |W|, no weight update.

scope="matrix" (default, the baseline of the Wanda/OWL/DLP code) compares all weights of the matrix; scope="row"
compares within each output row. N:M compares |W| within each group of m consecutive inputs of a row.
"""
from __future__ import annotations

import torch

from layerprune.errors import UserError
from layerprune.registry import Option, register_solver
from layerprune.solvers.common import check_options, check_sparsity, check_weight, matrix_mask, row_mask
from layerprune.solvers.nm import check_nm, nm_mask
from layerprune.stats import LayerStats


@register_solver
class Magnitude:
    name = "magnitude"
    needs: frozenset[str] = frozenset()
    options = (Option("scope", str, "matrix", "magnitude comparison group", choices=("matrix", "row"),
                      flag="--magnitude-scope"),)

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, nm=None, scope: str = "matrix",
              **options) -> torch.Tensor:
        check_options(self.name, options, ("scope",))
        check_weight(weight)
        score = weight.float().abs()
        if nm is not None:
            mask = nm_mask(score, *check_nm(nm, weight.shape[1]))
        elif scope == "matrix":
            mask = matrix_mask(score, check_sparsity(sparsity))
        elif scope == "row":
            mask = row_mask(score, check_sparsity(sparsity))
        else:
            raise UserError(f"magnitude: unknown scope {scope!r}; use 'matrix' or 'row'")
        return weight.masked_fill(mask, 0)
