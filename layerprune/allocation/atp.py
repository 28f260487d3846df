"""ATP (Huang et al. 2025, arXiv 2502.14770): arithmetic-progression sparsity over depth.

    s_i = S - beta * (L - 1) / 2 + beta * i,      i = 0..L-1   (constant step beta, mean S)
ATP grid-searches beta in (0, beta_max], beta_max = min(2S, 2(1 - S)) / (L - 1) (the largest step keeping every s_i in
[0, 1]), by WikiText-2 perplexity. Without a search we default to beta = 0.3 * beta_max (``beta_frac``); pass ``beta``
to set the step directly. The schedule is then clipped to [lo, hi] and rebalanced (only needed when beta is large or
the blocks differ in size).
"""
from __future__ import annotations

from layerprune.allocation.base import AllocationContext, Allocation, BoundedAllocator, block_weights, from_blocks, \
    rebalance
from layerprune.registry import Option, register_allocator


def atp_beta_max(target: float, num_blocks: int) -> float:
    return min(2 * target, 2 * (1 - target)) / max(num_blocks - 1, 1)


def atp_schedule(target: float, num_blocks: int, beta: float) -> list[float]:
    L = num_blocks
    return [target - beta * (L - 1) / 2 + beta * i for i in range(L)]


@register_allocator
class ATP(BoundedAllocator):
    name = "atp"
    options = (Option("beta", float, None, "ATP step"),
               Option("beta_frac", float, None, "ATP step as a fraction of beta_max, when --beta is not given "
                      "(default 0.3)"), *BoundedAllocator.options)

    def __init__(self, beta: float | None = None, beta_frac: float = 0.3, lo: float = 0.0, hi: float = 0.99):
        super().__init__(lo, hi)
        self.beta = None if beta is None else float(beta)
        self.beta_frac = float(beta_frac)

    def allocate(self, target: float, ctx: AllocationContext) -> Allocation:
        target = self.check_target(target, ctx)
        beta = self.beta if self.beta is not None else self.beta_frac * atp_beta_max(target, ctx.num_blocks)
        raw = atp_schedule(target, ctx.num_blocks, beta)
        bs = rebalance(raw, target, block_weights(ctx), self.lo, self.hi)
        return from_blocks(ctx, bs, {"method": self.name, "target": target, "beta": beta,
                                     "beta_max": atp_beta_max(target, ctx.num_blocks)})
