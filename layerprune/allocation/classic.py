"""Classic per-layer allocations: ER / ERK, Global magnitude, LAMP.

ER (Mocanu 2018) / ERK (Evci et al. 2020, RigL): density_l = eps * ((n_in + n_out) / (n_in * n_out)) ** power, with eps
    solved exactly so the pruned fraction is the target (densities clipped to [1 - hi, 1 - lo], the clipped mass moved
    onto the other layers). For a linear layer ERK's kernel term is 1x1, so ERK == ER unless ``erk_power`` != 1.
Global: one threshold tau on |W| over all prunable weights; layer l prunes its weights with |w| <= tau.
LAMP (Lee et al. ICLR 2021): inside each layer sort weights by |w| ascending, score_u = w_u^2 / sum_{v >= u} w_v^2,
    then one global threshold on the scores.
Global and LAMP return exact counts: exactly p * N weights are selected (the smallest scores across all layers, ties
    and the fractional part p * N - floor(p * N) shared in model order), each layer's count clipped to
    [lo * numel, hi * numel] with the threshold moved until the budget holds. This needs every layer's sorted scores in
    memory at once (4 bytes per weight for Global, 8 for LAMP): fine for small models, heavy for 7B+ (~26 GB for 7B).
All four are per-layer; block sparsity = parameter-weighted mean of the block's layers.
"""
from __future__ import annotations

import numpy as np
import torch

from layerprune.allocation.base import AllocationContext, Allocation, BoundedAllocator, from_layers, solve_clipped
from layerprune.errors import UserError
from layerprune.registry import Option, register_allocator


@register_allocator
class ER(BoundedAllocator):
    name = "er"
    power = 1.0

    def allocate(self, target: float, ctx: AllocationContext) -> Allocation:
        target = self.check_target(target, ctx)
        raw = np.array([((l.shape[0] + l.shape[1]) / (l.shape[0] * l.shape[1])) ** self.power for l in ctx.layers])
        numel = np.array([l.numel for l in ctx.layers], dtype=np.float64)
        density = solve_clipped(np.zeros_like(raw), raw, numel, 1.0 - target, 1.0 - self.hi, 1.0 - self.lo)
        return from_layers(ctx, (1.0 - density).tolist(), {"method": self.name, "target": target, "power": self.power})


@register_allocator
class ERK(ER):
    name = "erk"
    options = (Option("erk_power", float, None, "ERK exponent of (n_in + n_out) / (n_in * n_out) (default 1)"),
               *BoundedAllocator.options)

    def __init__(self, erk_power: float = 1.0, lo: float = 0.0, hi: float = 0.99):
        super().__init__(lo, hi)
        self.power = float(erk_power)


def threshold_counts(sorted_scores: list[torch.Tensor], target: float, lo: float, hi: float) -> list[float]:
    """Pruned count per layer for one global threshold on non-negative scores (each tensor sorted ascending).

    c_l(tau) = #{scores of l <= tau} clipped to [lo * n_l, hi * n_l]; tau is the smallest score value with
    sum_l c_l(tau) >= p * N, found by bisection on the bit pattern of the float dtype (exact: 32 or 64 steps).
    The weights tied at tau (and the fractional remainder) are shared in model order so that sum_l c_l = p * N exactly.
    """
    dtype = sorted_scores[0].dtype
    idtype = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    n = np.array([s.numel() for s in sorted_scores], dtype=np.float64)
    goal = target * n.sum()

    def counts(bits: int | None) -> np.ndarray:
        if bits is None:  # tau below every score
            c = np.zeros_like(n)
        else:
            tau = torch.tensor([bits], dtype=idtype).view(dtype)
            c = np.array([torch.searchsorted(s, tau.to(s.device), right=True).item() for s in sorted_scores], float)
        return np.clip(c, lo * n, hi * n)

    left, right = 0, int(torch.tensor(float("inf"), dtype=dtype).view(idtype).item())
    while left < right:  # smallest bit pattern with F >= goal
        mid = (left + right) // 2
        if counts(mid).sum() >= goal:
            right = mid
        else:
            left = mid + 1
    prev, nxt = counts(left - 1 if left > 0 else None), counts(left)
    rest = max(goal - prev.sum(), 0.0)
    out = prev.copy()
    for i in range(len(out)):  # share the step at tau in model order
        take = min(rest, nxt[i] - prev[i])
        out[i] += take
        rest -= take
    return out.tolist()


@register_allocator
class Global(BoundedAllocator):
    name = "global"
    score = "magnitude"

    def layer_scores(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach().abs().float().reshape(-1).sort().values

    def allocate(self, target: float, ctx: AllocationContext) -> Allocation:
        target = self.check_target(target, ctx)
        if ctx.weights is None:
            raise UserError(f"the '{self.name}' allocation needs the model weights (ctx.weights)")
        scores = [self.layer_scores(ctx.weights(l.block, l.name)) for l in ctx.layers]
        if any(s.numel() != l.numel for s, l in zip(scores, ctx.layers)):
            raise UserError("a weight's size does not match its LayerInfo.numel")
        if any(not torch.isfinite(s).all() for s in scores):
            raise UserError("the model weights contain NaN or inf; cannot rank them")
        counts = threshold_counts(scores, target, self.lo, self.hi)
        sp = [c / l.numel for c, l in zip(counts, ctx.layers)]
        return from_layers(ctx, sp, {"method": self.name, "target": target, "score": self.score,
                                     "pruned_counts": counts})


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one layer, sorted ascending: w_u^2 / sum_{v >= u} w_v^2 over weights sorted by |w| (float64)."""
    sq = w.detach().double().reshape(-1).square().sort().values
    suffix = sq.flip(0).cumsum(0).flip(0)
    score = torch.where(suffix > 0, sq / suffix.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(sq))
    return score.sort().values


@register_allocator
class LAMP(Global):
    name = "lamp"
    score = "lamp"

    def layer_scores(self, w: torch.Tensor) -> torch.Tensor:
        return lamp_scores(w)
