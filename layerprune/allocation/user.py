"""User-given per-block sparsities: "0.4,0.5,..." or a JSON file holding a list or {"block_sparsity": [...]}.

The list must have one value per block, each inside [lo, hi], and its (parameter-weighted) mean must match the target
within 1e-3; the values are then shifted by that small difference so the budget holds exactly.
"""
from __future__ import annotations

import json
import os

from layerprune.allocation.base import AllocationContext, Allocation, BoundedAllocator, block_weights, from_blocks, \
    rebalance, weighted_mean
from layerprune.errors import UserError
from layerprune.registry import register_allocator

TOLERANCE = 1e-3


def parse_sparsities(spec) -> list[float]:
    """A list of numbers, a "0.4,0.5" string, or the path of a JSON file (list or {"block_sparsity": list})."""
    if isinstance(spec, (list, tuple)):
        values = spec
    elif isinstance(spec, str) and os.path.isfile(spec):
        try:
            with open(spec) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read sparsity file {spec}: {e}")
        values = data.get("block_sparsity") if isinstance(data, dict) else data
        if not isinstance(values, list):
            raise UserError(f"{spec} must hold a JSON list or an object with a 'block_sparsity' list")
    elif isinstance(spec, str):
        values = [v for v in spec.replace(" ", "").split(",") if v]
    else:
        raise UserError("user sparsities must be a list, a 'a,b,c' string or a JSON file path")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"user sparsities must be numbers, got {spec!r} (a missing file path is read as a list)")


@register_allocator
class User(BoundedAllocator):
    name = "user"
    spec_arg, usage = "sparsities", "user:LIST|FILE"  # --allocation user:0.4,0.5,... fills `sparsities`

    def __init__(self, sparsities=None, lo: float = 0.0, hi: float = 0.99):
        super().__init__(lo, hi)
        if sparsities is None:
            raise UserError("the 'user' allocation needs sparsities: 'user:0.4,0.5,...' or 'user:path/to/file.json'")
        self.values = parse_sparsities(sparsities)

    def check(self, target: float, ctx: AllocationContext) -> None:
        self.allocate(target, ctx)  # needs only the census: length, bounds and budget

    def allocate(self, target: float, ctx: AllocationContext) -> Allocation:
        target = self.check_target(target, ctx)
        v = self.values
        if len(v) != ctx.num_blocks:
            raise UserError(f"user sparsities have {len(v)} values but the model has {ctx.num_blocks} blocks; "
                            f"give exactly {ctx.num_blocks}")
        bad = [x for x in v if not self.lo <= x <= self.hi]
        if bad:
            raise UserError(f"user sparsity {bad[0]} is outside [{self.lo}, {self.hi}]")
        w = block_weights(ctx)
        mean = weighted_mean(v, w)
        if abs(mean - target) > TOLERANCE:
            raise UserError(f"user sparsities average {mean:.6f} but the target is {target:.6f} "
                            f"(must match within {TOLERANCE}); fix the list or the target")
        bs = rebalance(v, target, w, self.lo, self.hi)
        return from_blocks(ctx, bs, {"method": self.name, "target": target, "given": list(v), "given_mean": mean})
