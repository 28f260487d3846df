"""Uniform allocation: every prunable linear gets the target sparsity."""
from __future__ import annotations

from layerprune.allocation.base import AllocationContext, Allocation, BoundedAllocator, from_blocks
from layerprune.registry import register_allocator


@register_allocator
class Uniform(BoundedAllocator):
    name = "uniform"

    def allocate(self, target: float, ctx: AllocationContext) -> Allocation:
        target = self.check_target(target, ctx)
        return from_blocks(ctx, [target] * ctx.num_blocks, {"method": self.name, "target": target})
