"""Calibration statistics of a linear layer's input, collected by forward hooks.

Conventions (shared by every solver and allocation):
- ``x`` is the layer input reshaped to ``[tokens, in_features]``.
- ``sq_norm[j] = sum over calibration tokens of x[t, j]**2`` (so Wanda's ||X_j||_2 = sqrt(sq_norm[j])).
- ``hessian = (2 / ntokens) * X^T X`` (SparseGPT's running average), shape ``[in, in]``, fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerStats:
    """What a solver may use about one linear layer's calibration inputs."""

    ntokens: int = 0
    sq_norm: torch.Tensor | None = None  # [in] fp32, sum over tokens of x_j^2
    hessian: torch.Tensor | None = None  # [in, in] fp32, (2/ntokens) * X^T X
    sample: torch.Tensor | None = None  # [k, in] fp32, a fixed subsample of input rows (for error reports)
    derived: dict = field(default_factory=dict, repr=False, compare=False)  # see memo()

    def memo(self, key, make):
        """``make()``, computed once per statistics object: the linears that share one input (q/k/v, gate/up) share
        these stats, so a solver caches what it derives from them (e.g. SparseGPT's inverse Cholesky factor)."""
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 per input feature."""
        assert self.sq_norm is not None, "row norms were not collected"
        return self.sq_norm.sqrt()
