"""SlimGPT's Incremental Pruning Ratio (IPR, NeurIPS 2024, eq. 6) and its linear / decreasing variants.

Raw schedules over the real depth L (block i = 0..L-1), from r0 (first block) to r_end (last block):
    log-increase  r_i = r0 + (r_end - r0) * ln(i + 1) / ln(L)         (paper eq. 6; the code hard-codes ln(32))
    lin-increase  r_i = r0 + (r_end - r0) * i / (L - 1)
    *-dec         the increasing schedule reversed (block 0 gets r_end)

Ends. By default they are derived from the target with SlimGPT's 20%-recipe ratio r0 = r_end / 4 (min 0.0625, max 0.25):
r_i = r_end * (1/4 + 3/4 * g_i), g_i in [0, 1] the shape above, so r_end = p / (1/4 + 3/4 * mean(g)) makes the
(parameter-weighted) mean exactly p. If the user passes ``r0`` and ``r_end`` (both), the schedule is taken as given
and shifted by one constant so that its mean is p (the differences r_i - r_j are kept). Either way the result is then
clipped to [lo, hi] and rebalanced.
"""
from __future__ import annotations

import math

import numpy as np

from layerprune.allocation.base import AllocationContext, Allocation, BoundedAllocator, block_weights, from_blocks, \
    rebalance
from layerprune.errors import UserError
from layerprune.registry import Option, register_allocator

KINDS = ("log", "log-dec", "lin", "lin-dec")


def ipr_shape(kind: str, num_blocks: int) -> list[float]:
    """g_i in [0, 1]: 0 at the block that gets r0, 1 at the block that gets r_end."""
    if kind not in KINDS:
        raise UserError(f"unknown IPR schedule {kind!r}; known: {', '.join(KINDS)}")
    L = int(num_blocks)
    if L == 1:
        return [0.0]
    i = np.arange(L, dtype=np.float64)
    g = np.log(i + 1) / math.log(L) if kind.startswith("log") else i / (L - 1)
    return (g[::-1] if kind.endswith("-dec") else g).tolist()


def ipr_schedule(kind: str, num_blocks: int, r0: float, r_end: float) -> list[float]:
    """The raw (unshifted, unclipped) SlimGPT schedule r_i = r0 + (r_end - r0) * g_i."""
    return [r0 + (r_end - r0) * g for g in ipr_shape(kind, num_blocks)]


@register_allocator
class IPR(BoundedAllocator):
    name = "ipr-log"
    kind = "log"
    options = (Option("r0", float, None, "IPR first-block ratio (with --r-end)"),
               Option("r_end", float, None, "IPR last-block ratio (with --r0)"),
               *BoundedAllocator.options)

    def __init__(self, r0: float | None = None, r_end: float | None = None, lo: float = 0.0, hi: float = 0.99):
        super().__init__(lo, hi)
        if (r0 is None) != (r_end is None):
            raise UserError("IPR: pass both r0 and r_end, or neither (then r0 = r_end/4 is derived from the target)")
        self.r0 = None if r0 is None else float(r0)
        self.r_end = None if r_end is None else float(r_end)

    def allocate(self, target: float, ctx: AllocationContext) -> Allocation:
        target = self.check_target(target, ctx)
        w = block_weights(ctx)
        g = np.asarray(ipr_shape(self.kind, ctx.num_blocks))
        if self.r0 is None:
            r_end = target / (0.25 + 0.75 * float((w * g).sum() / w.sum()))
            r0 = r_end / 4
        else:
            r0, r_end = self.r0, self.r_end
        raw = ipr_schedule(self.kind, ctx.num_blocks, r0, r_end)
        bs = rebalance(raw, target, w, self.lo, self.hi)
        return from_blocks(ctx, bs, {"method": self.name, "target": target, "r0": r0, "r_end": r_end,
                                     "user_ends": self.r0 is not None, "raw": raw})


@register_allocator
class IPRLogDec(IPR):
    name, kind = "ipr-log-dec", "log-dec"


@register_allocator
class IPRLin(IPR):
    name, kind = "ipr-lin", "lin"


@register_allocator
class IPRLinDec(IPR):
    name, kind = "ipr-lin-dec", "lin-dec"
