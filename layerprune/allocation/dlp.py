"""DLP (Dynamic Layerwise Pruning, ICML 2025): per-block sparsity from the block's "unimportance".

Per block l, with A = the Wanda scores |W_ij| * ||X_j||_2 of all the block's linears concatenated:
    S_l = median(A)  (paper; exact lower median)  or  mean(A)  (released code, ``stat="mean"``)
    I_l = 1 - S_l / sum_i S_i                        relative importance: small S -> important
    d_l = (I_l - min I) / (max I - min I) * 2*alpha
    R_l = p + mean(d) - d_l                          more important -> LOWER sparsity;
                                                     mean R = p, max R - min R = 2*alpha
then clipped to [lo, hi] and rebalanced. One sparsity per block.

alpha: a float (default 0.15, the paper's and code's value at 70%; Appendix G's per-sparsity values were not
recovered, so the same 0.15 is used at every sparsity), or a per-sparsity table {sparsity: alpha} (a dict or the string
"0.5:0.1,0.7:0.15"), linearly interpolated in the target and held constant outside the table's range.
"""
from __future__ import annotations

import numpy as np
import torch

from layerprune.allocation.base import (AllocationContext, Allocation, BoundedAllocator, block_mean, block_median,
                                        block_weights, from_blocks, minmax_recentre)
from layerprune.errors import UserError
from layerprune.registry import Option, register_allocator


def parse_alpha(alpha) -> float | dict[float, float]:
    """float | "0.15" | {sparsity: alpha} | "0.5:0.1,0.7:0.15" -> float or dict."""
    try:
        if isinstance(alpha, dict):
            table = {float(k): float(v) for k, v in alpha.items()}
        elif isinstance(alpha, str) and ":" in alpha:
            table = dict(tuple(map(float, item.split(":"))) for item in alpha.split(",") if item.strip())
        else:
            table = {None: float(alpha)}
    except ValueError:
        raise UserError(f"bad alpha {alpha!r}: give a number (0.15) or a table 'sparsity:alpha,...' (0.5:0.1,0.7:0.15)")
    if not table or any(v < 0 for v in table.values()):
        raise UserError(f"bad alpha {alpha!r}: alpha values must be >= 0")
    return table[None] if None in table else table


def alpha_for(alpha, target: float) -> float:
    if isinstance(alpha, dict):
        keys = sorted(alpha)
        return float(np.interp(target, keys, [alpha[k] for k in keys]))
    return float(alpha)


@register_allocator
class DLP(BoundedAllocator):
    name = "dlp"
    needs_scores = True
    options = (Option("alpha", float, None, "DLP alpha (spread 2*alpha)"),
               Option("stat", str, None, "DLP block statistic", choices=("median", "mean"), flag="--dlp-stat"),
               *BoundedAllocator.options)

    def __init__(self, alpha=0.15, stat: str = "median", lo: float = 0.0, hi: float = 0.99):
        super().__init__(lo, hi)
        if stat not in ("median", "mean"):
            raise UserError(f"DLP stat must be 'median' (paper) or 'mean' (released code), got {stat!r}")
        self.alpha, self.stat = parse_alpha(alpha), stat

    def block_statistic(self, scores_by_layer: dict[str, torch.Tensor]) -> float:
        return block_median(scores_by_layer) if self.stat == "median" else block_mean(scores_by_layer)

    def allocate(self, target: float, ctx: AllocationContext) -> Allocation:
        target = self.check_target(target, ctx)
        if ctx.block_stats is None or len(ctx.block_stats) != ctx.num_blocks:
            raise UserError("DLP needs one score statistic per block (ctx.block_stats); run the calibration pass first")
        s = np.asarray(ctx.block_stats, dtype=np.float64)
        if s.sum() == 0:
            raise UserError("all DLP block statistics are zero; the calibration scores are empty or all zero")
        importance = 1.0 - s / s.sum()
        alpha = alpha_for(self.alpha, target)
        bs = minmax_recentre(importance, target, 2 * alpha, invert=True, weights=block_weights(ctx),
                             lo=self.lo, hi=self.hi)
        return from_blocks(ctx, bs, {"method": self.name, "target": target, "statistic": self.stat,
                                     "values": s.tolist(), "importance": importance.tolist(), "alpha": alpha})
