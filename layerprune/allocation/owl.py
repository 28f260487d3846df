"""OWL (Yin et al., ICML 2024): outlier-weighed layer-wise sparsity, plus OWL's mixed N:M helper.

Per block l, with A = the Wanda scores |W_ij| * ||X_j||_2 of all the block's linears concatenated:
    D_l = fraction of A with A > M * mean(A)                   (outlier ratio, M = ``owl_m`` = 5)
    keep ratio ~ D: D is min-max scaled to [0, 2*lambda] (lambda = ``lam`` = 0.08) and recentred, so
    s_l = p + mean(d) - d_l                                     (more outliers -> LOWER sparsity)
One sparsity per block (the released code applies the block ratio to all its linears).
"""
from __future__ import annotations

import numpy as np
import torch

from layerprune.allocation.base import (AllocationContext, Allocation, BoundedAllocator, block_weights, from_blocks,
                                        minmax_recentre, flat_scores)
from layerprune.errors import UserError
from layerprune.registry import Option, register_allocator


def outlier_ratio(scores_by_layer: dict[str, torch.Tensor], m: float) -> float:
    """fraction(A > m * mean(A)) over the concatenation of the block's scores (no copy is made)."""
    flat = flat_scores(scores_by_layer)
    n = sum(t.numel() for t in flat)
    thr = m * sum(t.double().sum().item() for t in flat) / n
    return float(sum((t > thr).sum().item() for t in flat) / n)


@register_allocator
class OWL(BoundedAllocator):
    name = "owl"
    needs_scores = True
    options = (Option("owl_m", float, None, "OWL outlier threshold M"),
               Option("lam", float, None, "OWL/DSA lambda (spread 2*lambda)"),
               *BoundedAllocator.options)

    def __init__(self, owl_m: float = 5.0, lam: float = 0.08, lo: float = 0.0, hi: float = 0.99):
        super().__init__(lo, hi)
        self.m, self.lam = float(owl_m), float(lam)
        if self.lam < 0:
            raise UserError(f"OWL lambda must be >= 0, got {self.lam}")

    def block_statistic(self, scores_by_layer: dict[str, torch.Tensor]) -> float:
        return outlier_ratio(scores_by_layer, self.m)

    def allocate(self, target: float, ctx: AllocationContext) -> Allocation:
        target = self.check_target(target, ctx)
        if ctx.block_stats is None or len(ctx.block_stats) != ctx.num_blocks:
            raise UserError("OWL needs one outlier ratio per block (ctx.block_stats); run the calibration pass first")
        bs = minmax_recentre(ctx.block_stats, target, 2 * self.lam, invert=True, weights=block_weights(ctx),
                             lo=self.lo, hi=self.hi)
        return from_blocks(ctx, bs, {"method": self.name, "target": target, "statistic": "outlier_ratio",
                                     "values": [float(v) for v in ctx.block_stats], "owl_m": self.m, "lam": self.lam})


def nm_per_block(block_sparsity: list[float], m: int, target_n: int) -> list[int]:
    """OWL's mixed N:M: one n per block, n = number of PRUNED weights in every group of m consecutive inputs
    (Wanda/OWL code convention: "2:4" prunes 2 of every 4, sparsity n/m).

    n_b = round(s_b * m) clipped to [1, m-1]; then the sum is fixed to target_n * B so that mean(n_b / m) equals
    target_n / m exactly, one unit at a time, moving the block whose rounding residual s_b*m - n_b is largest (when n
    must grow) or smallest (when n must shrink). Plain (not parameter-weighted) mean: N:M blocks have equal shapes.
    """
    m, target_n = int(m), int(target_n)
    if m < 2 or not 1 <= target_n <= m - 1:
        raise UserError(f"mixed N:M needs m >= 2 and 1 <= n <= m-1, got n={target_n}, m={m}")
    x = np.asarray(block_sparsity, dtype=np.float64) * m
    n = np.clip(np.rint(x), 1, m - 1).astype(np.int64)
    diff = target_n * len(n) - int(n.sum())
    while diff != 0:
        resid = x - n
        if diff > 0:
            i = int(np.argmax(np.where(n < m - 1, resid, -np.inf)))
            n[i] += 1
            diff -= 1
        else:
            i = int(np.argmin(np.where(n > 1, resid, np.inf)))
            n[i] -= 1
            diff += 1
    return n.tolist()
