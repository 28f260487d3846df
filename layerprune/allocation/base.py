"""Shared types and math of the layer-wise sparsity allocators.

Budget convention (every allocator honours it to 1e-9 in the numbers it returns):
    the global target ``p`` is the PARAMETER-WEIGHTED mean sparsity over all prunable linears,
        p = sum_l numel_l * s_l / sum_l numel_l      (= the fraction of pruned weights),
    which equals the plain mean over blocks when all blocks have the same size (every LLaMA-like model).
Every ratio is clipped to [lo, hi] (defaults 0.0 and 0.99). Clipping never breaks the budget: the mass cut off by the
bounds is moved onto the units still inside them, by solving for the one shift (or scale) that makes the clipped
values meet the budget exactly (see ``solve_clipped``).

Two helpers are shared by all methods:
    ``rebalance(values, target, weights, lo, hi)``         recentre on target + clip + rebalance (additive shift)
    ``minmax_recentre(values, target, spread, invert)``    the OWL / DLP / DSA map: min-max normalise a per-block
                                                           statistic to [0, spread] (= [0, 2*lambda]) and recentre
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from layerprune.scores import NEEDS as SCORE_NEEDS
from layerprune.scores import block_scores
from layerprune.errors import UserError
from layerprune.registry import Option
from layerprune.stats import LayerStats


@dataclass
class LayerInfo:
    """One prunable linear layer."""

    block: int
    name: str  # e.g. "self_attn.q_proj"
    numel: int
    shape: tuple[int, int]  # (out, in)


@dataclass
class AllocationContext:
    """What an allocator may know about the model."""

    layers: list[LayerInfo]  # all prunable linears in model order
    num_blocks: int
    # Filled only when the allocator ``needs`` a dense pre-pass: its ``statistic`` of every block.
    block_stats: list[float] | None = None
    # (block, name) -> dense weight [out, in]; used by the magnitude-based classics (global, lamp).
    weights: Callable[[int, str], torch.Tensor] | None = None


@dataclass
class Allocation:
    block_sparsity: list[float]  # one per block: parameter-weighted mean of that block's layers
    layer_sparsity: dict[tuple[int, str], float]  # (block, name) -> sparsity; what the engine uses
    stats: dict = field(default_factory=dict)  # what it came from


class Allocator(Protocol):
    name: str
    needs: frozenset[str]  # LayerStats fields its statistic reads (a dense pre-pass collects them); empty: none

    def statistic(self, weights: dict[str, torch.Tensor], stats: dict[str, LayerStats]) -> float: ...

    def allocate(self, target: float, ctx: AllocationContext) -> Allocation: ...


class BoundedAllocator:
    """Base of all allocators: holds the clip range [lo, hi] and checks the target against it."""

    name = "base"
    needs_scores = False  # True: the statistic is ``block_statistic`` of the block's Wanda scores (scores.py)
    # layerprune.registry: subclasses add theirs: options = (Option("alpha", ...), *BoundedAllocator.options)
    options = (Option("lo", float, None, "lowest per-layer sparsity allowed (default 0)", flag="--min-sparsity"),
               Option("hi", float, None, "highest per-layer sparsity allowed (default 0.99)", flag="--max-sparsity"))

    def __init__(self, lo: float = 0.0, hi: float = 0.99):
        lo, hi = float(lo), float(hi)
        if not 0.0 <= lo < hi <= 1.0:
            raise UserError(f"sparsity bounds must satisfy 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi

    def check_target(self, target: float, ctx: AllocationContext) -> float:
        target = float(target)
        if not self.lo <= target <= self.hi:
            raise UserError(f"target sparsity {target} is outside the allowed range [{self.lo}, {self.hi}]; "
                            "pick a target inside it or change lo/hi")
        if not ctx.layers or ctx.num_blocks < 1:
            raise UserError("the model has no prunable linear layers to allocate sparsity to")
        return target

    def check(self, target: float, ctx: AllocationContext) -> None:
        """What can be checked from the layer census alone (no statistics, no weights), before any work."""
        self.check_target(target, ctx)

    @property
    def needs(self) -> frozenset[str]:
        """The input statistics (LayerStats fields) of the dense pre-pass ``statistic`` reads; empty: no pre-pass."""
        return SCORE_NEEDS if self.needs_scores else frozenset()

    def statistic(self, weights: dict[str, torch.Tensor], stats: dict[str, LayerStats]) -> float:
        """One block's statistic from its dense weights {name: [out, in]} and their input statistics."""
        return self.block_statistic(block_scores(weights, stats))


# ---------------------------------------------------------------------------------------------------------------------
# budget math


def block_weights(ctx: AllocationContext) -> np.ndarray:
    """Number of prunable parameters per block (float64, length num_blocks)."""
    w = np.zeros(ctx.num_blocks)
    for layer in ctx.layers:
        w[layer.block] += layer.numel
    return w


def weighted_mean(values, weights=None) -> float:
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    return float((w * v).sum() / w.sum())


def solve_clipped(a, b, weights, target: float, lo: float, hi: float) -> np.ndarray:
    """Return x_i = clip(a_i + b_i * c, lo, hi) with the one scalar c for which sum_i w_i x_i = target * sum_i w_i.

    b_i >= 0. f(c) = sum_i w_i clip(a_i + b_i c) is piecewise linear and non-decreasing, with kinks where a unit hits a
    bound, so c is found exactly: evaluate f at every kink, pick the segment holding the target, interpolate linearly.
    Units clipped at a bound keep it; the budget they free (or take) is spread over the units inside the bounds.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    assert a.shape == b.shape == w.shape and (b >= 0).all() and (w >= 0).all() and w.sum() > 0
    goal = target * w.sum()
    if not (lo * w.sum() - 1e-12 <= goal <= hi * w.sum() + 1e-12):
        raise UserError(f"target {target} cannot be met inside the bounds [{lo}, {hi}]")

    def f(c):  # c: [k] -> [k]
        return (w * np.clip(a + b * c[:, None], lo, hi)).sum(axis=1)

    move = b > 0
    kinks = np.unique(np.concatenate([(lo - a[move]) / b[move], (hi - a[move]) / b[move]]))
    if kinks.size == 0:  # nothing can move: only possible when the clipped values already meet the budget
        c = 0.0
    else:
        fk = f(kinks)
        j = int(np.searchsorted(fk, goal))  # first kink with f >= goal
        if j == 0:
            c = kinks[0]
        elif j == kinks.size:
            c = kinks[-1]
        else:
            c = kinks[j - 1] + (goal - fk[j - 1]) * (kinks[j] - kinks[j - 1]) / (fk[j] - fk[j - 1])
    x = np.clip(a + b * c, lo, hi)
    err = abs(float((w * x).sum()) - goal) / w.sum()
    if err > 1e-9:
        raise UserError(f"could not meet target {target} within bounds [{lo}, {hi}] (off by {err:.2e})")
    return x


def rebalance(values, target: float, weights=None, lo: float = 0.0, hi: float = 0.99) -> list[float]:
    """Recentre + clip + rebalance: x_i = clip(v_i + c, lo, hi) with c chosen so the weighted mean of x is target.

    When nothing is clipped c = target - weighted_mean(v), i.e. a plain recentring that keeps every difference
    v_i - v_j.
    """
    v = np.asarray(values, dtype=np.float64)
    return solve_clipped(v, np.ones_like(v), weights, target, lo, hi).tolist()


def minmax_recentre(values, target: float, spread: float, invert: bool = False, weights=None,
                    lo: float = 0.0, hi: float = 0.99) -> list[float]:
    """OWL / DLP / DSA map from one statistic per block to one sparsity per block.

        d_l = (v_l - min v) / (max v - min v) * spread                  # spread = 2*alpha (DLP) or 2*lambda (OWL, DSA)
        s_l = target + mean(d) - d_l      if invert  (larger statistic -> LOWER sparsity: OWL, DLP importance)
        s_l = target - mean(d) + d_l      otherwise  (larger statistic -> HIGHER sparsity: DSA)
    then clipped to [lo, hi] and rebalanced (``rebalance``). mean() is the parameter-weighted mean when ``weights`` is
    given. Unclipped, the result has mean exactly ``target`` and max - min exactly ``spread``.
    A constant statistic gives the uniform allocation.
    """
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise UserError("the per-block statistic contains NaN or inf; check the calibration data / model weights")
    span = v.max() - v.min()
    d = (v - v.min()) / span * spread if span > 0 else np.zeros_like(v)
    return rebalance(-d if invert else d, target, weights, lo, hi)


# ---------------------------------------------------------------------------------------------------------------------
# building the result


def from_blocks(ctx: AllocationContext, block_sparsity, stats: dict) -> Allocation:
    """One sparsity per block -> every layer of the block gets it."""
    bs = [float(s) for s in block_sparsity]
    return Allocation(bs, {(l.block, l.name): bs[l.block] for l in ctx.layers}, stats)


def from_layers(ctx: AllocationContext, layer_sparsity, stats: dict) -> Allocation:
    """One sparsity per layer (in ctx.layers order) -> block sparsity = parameter-weighted mean of its layers."""
    num, den = np.zeros(ctx.num_blocks), np.zeros(ctx.num_blocks)
    for layer, s in zip(ctx.layers, layer_sparsity):
        num[layer.block] += layer.numel * float(s)
        den[layer.block] += layer.numel
    bs = np.divide(num, den, out=np.zeros_like(num), where=den > 0).tolist()
    return Allocation(bs, {(l.block, l.name): float(s) for l, s in zip(ctx.layers, layer_sparsity)}, stats)


# ---------------------------------------------------------------------------------------------------------------------
# exact statistics of a block's concatenated scores


def flat_scores(scores_by_layer: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    if not scores_by_layer:
        raise UserError("no scores were collected for this block (no prunable linears?)")
    return [t.detach().reshape(-1) for t in scores_by_layer.values()]


def block_mean(scores_by_layer: dict[str, torch.Tensor]) -> float:
    """Exact mean of all scores of the block (float64 accumulation, no concatenation)."""
    flat = flat_scores(scores_by_layer)
    return float(sum(t.double().sum().item() for t in flat) / sum(t.numel() for t in flat))


def block_median(scores_by_layer: dict[str, torch.Tensor]) -> float:
    """Exact LOWER median of all scores of the block: the k-th smallest with k = (n + 1) // 2 (1-based),
    i.e. sorted[(n - 1) // 2]. For odd n this is the usual median; for even n it is the lower of the two middle values,
    which is what torch.median returns (numpy.median would average the two).

    torch.quantile refuses inputs above 16M elements, a LLaMA-7B block has ~202M scores. One fp32 concatenated copy of
    the block's scores is made and, on the CPU, partially sorted in place by numpy (``torch.median`` would make a
    second copy: 0.8 GB more at 7B); elsewhere ``torch.kthvalue`` selects the same element.
    """
    flat = flat_scores(scores_by_layer)
    n = sum(t.numel() for t in flat)
    x = torch.empty(n, dtype=torch.float32, device=flat[0].device)
    if len(flat) > 1:
        torch.cat([t.float() for t in flat], out=x)
    else:
        x.copy_(flat[0])
    k = (n - 1) // 2
    if x.device.type != "cpu":
        return float(torch.kthvalue(x, k + 1).values.item())
    a = x.numpy()
    a.partition(k)
    return float(a[k])
