"""What a pruning run is asked to do (``PruneConfig``) and the dtypes by name (the one list).

A leaf module: ``models/`` imports ``DTYPES`` from here, so nothing above ``errors`` is imported at module level.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # dtypes by name
OFFLOAD_MODES = ("none", "cpu", "disk")


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float | None = 0.5  # None: 0.5, or n/m with ``nm``
    nm: tuple[int, int] | None = None  # (n pruned, of m)
    allocation: str = "uniform"
    allocation_options: dict = field(default_factory=dict)
    solver_options: dict = field(default_factory=dict)
    true_sequential: bool = False
    batch_size: int = 8  # calibration windows per block forward
    compute_dtype: str = "float32"  # dtype of the forward passes; statistics and solves are always fp32
    offload: str = "none"
    skip: tuple[str, ...] = ()  # linear names (e.g. "mlp.down_proj") left dense
    # whether the sparsity was given (not the 0.5 default): set by the first validate(); not a result setting
    sparsity_given: bool | None = None

    def validate(self) -> None:
        from .solvers import get_solver  # here, not at the top: config stays a leaf (see the module docstring)
        from .solvers.nm import check_nm

        if self.sparsity_given is None:
            self.sparsity_given = self.sparsity is not None
        if self.nm is not None:  # N:M fixes the sparsity: n/m, recorded as such
            n, m = check_nm(self.nm, 0)
            if self.sparsity is None:
                self.sparsity = n / m
            elif abs(self.sparsity - n / m) > 1e-9:
                raise UserError(f"--sparsity {self.sparsity} conflicts with --nm {n}:{m}, which prunes {n / m:g}: "
                                "drop --sparsity (N:M sets it)")
        if self.sparsity is None:
            self.sparsity = 0.5
        if not (0.0 <= self.sparsity < 1.0):
            raise UserError(f"--sparsity {self.sparsity} is outside [0, 1): use e.g. 0.5 for 50%")
        if self.offload not in OFFLOAD_MODES:
            raise UserError(f"--offload {self.offload!r} is unknown: use one of {', '.join(OFFLOAD_MODES)}")
        if self.compute_dtype not in DTYPES:
            *first, last = DTYPES
            raise UserError(f"--compute-dtype {self.compute_dtype!r} is unknown: use {', '.join(first)} or {last}")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        get_solver(self.method)

    def result_settings(self) -> str:
        """The settings that decide the result, as JSON (offload and batch size do not): a checkpoint's key."""
        c = asdict(self)
        for k in ("offload", "batch_size", "sparsity_given"):
            c.pop(k)
        return json.dumps(c, sort_keys=True, default=str)
