"""The Wanda score S_ij = |W_ij| * ||X_j||_2 (Sun et al., ICLR 2024), the one place it is computed.

The Wanda solver prunes the lowest scores of each row; the score-based allocators (OWL, DLP, DSA) reduce a block's
scores to one statistic; the DSA proxy ranks them. ||X_j||_2 = sqrt(sq_norm_j), sq_norm from ``LayerStats``.
"""
from __future__ import annotations

import torch

from layerprune.stats import LayerStats

NEEDS = frozenset({"sq_norm"})  # what the score reads from LayerStats


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2 in fp32, [out, in], from a weight [out, in] and the sum over tokens of x_j^2 [in]."""
    return weight.float().abs() * sq_norm.to(device=weight.device, dtype=torch.float32).sqrt()[None, :]


def block_scores(weights: dict[str, torch.Tensor], stats: dict[str, LayerStats]) -> dict[str, torch.Tensor]:
    """The Wanda scores of a block's linears: {name: score [out, in]} for every name in ``weights``."""
    return {n: wanda_score(w, stats[n].sq_norm) for n, w in weights.items()}
