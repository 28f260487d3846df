"""N:M semi-structured sparsity helpers: n of every m consecutive input weights in a row are pruned
(2:4 keeps 2 of 4)."""
from __future__ import annotations

import math

import torch

from layerprune.errors import UserError


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4). Checks 0 < n < m; the width check is done by check_nm."""
    parts = str(text).strip().split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"bad N:M pattern {text!r}; write it as 'n:m' with integers, e.g. '2:4'")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise UserError(f"bad N:M pattern {text!r}: need 0 < n < m (n pruned of every m), e.g. '2:4'")
    return n, m


def check_nm(nm, in_features: int) -> tuple[int, int]:
    """Validate an (n, m) pair (or 'n:m' text) against a layer with `in_features` inputs."""
    if isinstance(nm, str):
        n, m = parse_nm(nm)
    else:
        try:
            n, m = nm
        except (TypeError, ValueError):
            raise UserError(f"bad N:M pattern {nm!r}; pass (n, m) such as (2, 4)") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 0 < n < m:
            raise UserError(f"bad N:M pattern {nm!r}: need integers 0 < n < m (n pruned of every m), e.g. (2, 4)")
    if in_features % m:
        raise UserError(f"N:M pattern {n}:{m} needs the input width {in_features} to be a multiple of {m}; "
                        f"pick an m that divides it")
    return n, m


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask pruning the n lowest scores in every group of m consecutive columns of each row (ties -> lower index)."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order, True)
    return mask.reshape(rows, cols)


def _nth_lowest(groups: torch.Tensor, n: int) -> torch.Tensor:
    """The n-th lowest value (1-based) of each group along the last dimension: a min/max network for m = 4 (2:4 and
    its kin, ~10x a sort on the CPU here), else the sorted values."""
    if groups.shape[-1] == 4:
        x0, x1, x2, x3 = groups.unbind(-1)
        lo01, hi01 = torch.minimum(x0, x1), torch.maximum(x0, x1)
        lo23, hi23 = torch.minimum(x2, x3), torch.maximum(x2, x3)
        if n == 1:
            return torch.minimum(lo01, lo23)
        if n == 2:
            return torch.minimum(torch.maximum(lo01, lo23), torch.minimum(hi01, hi23))
        if n == 3:
            return torch.maximum(torch.maximum(lo01, lo23), torch.minimum(hi01, hi23))
    return torch.sort(groups, dim=-1).values[..., n - 1]


def nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``~nm_mask(score, n, m)`` as a float mask (1 = kept): the entries above their group's n-th lowest score, and
    ``nm_mask`` itself where a tie at that score makes the split ambiguous. For solvers that project every iteration
    (ALPS): float compares and counts cost a fraction of sorting and of bool masks on the CPU."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    keep = (groups - _nth_lowest(groups, n)[..., None]).clamp_(min=0).sign_().reshape(rows, cols)
    if int(keep.sum()) == rows * (cols // m) * (m - n):  # each group keeps at most m - n: equality means all do
        return keep
    return (~nm_mask(score, n, m)).to(score.dtype)


def nm_for_ratio(ratio: float, m: int) -> int:
    """The valid n in [1, m-1] nearest to ratio*m (halves round up); used to turn per-block ratios into N:M."""
    if not (isinstance(m, int) and m >= 2):
        raise UserError(f"N:M group size m must be an integer >= 2, got {m!r}")
    r = float(ratio)
    if not (math.isfinite(r) and 0.0 <= r <= 1.0):
        raise UserError(f"N:M target ratio must be in [0, 1], got {ratio}")
    return min(max(math.floor(r * m + 0.5), 1), m - 1)
