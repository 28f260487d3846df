"""Exact-count mask selection shared by the solvers, input checks, and the reconstruction error report.

Every selector returns a bool mask (True = prune) with an exact number of True entries. Scores are ordered with a
stable sort, so ties are broken by position: ties never change the counts and equal inputs give equal masks.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from layerprune.errors import UserError
from layerprune.stats import LayerStats


def check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight [out, in], got {tuple(weight.shape)} {weight.dtype}")


def check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise UserError(f"sparsity must be a fraction in [0, 1], got {sparsity}; pass e.g. 0.5 for 50%")
    return s


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``: one fp32 sum (a NaN or inf entry makes it non-finite), and only when the sum is not finite
    (NaN/inf, or an overflow of large finite entries) the exact elementwise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_options(solver: str, options: dict, known: tuple[str, ...]) -> None:
    if options:
        raise UserError(f"{solver}: unknown option(s) {sorted(options)}; known options: {', '.join(known) or 'none'}")


def prune_count(sparsity: float, numel: int) -> int:
    """Number of weights to prune: round(sparsity * numel)."""
    return int(round(sparsity * numel))


ERROR_ROWS = 64  # output rows relative_error sums over with a Hessian when the exact sum is costly
ERROR_EXACT = 2 ** 31  # rows x cols^2 up to which it is exact (4x that in flops: < 0.1 s). Not lower: on SmolLM2 a
# 128-row estimate was off by a median 9% and up to 6.4x (q/o rows' errors are heavy-tailed), so its linears stay exact


MASSIVE = 1000  # in the damping scale an input's diag H counts at most this many times the median live input's


def damping_scale(diag: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """The scale that SparseGPT-style damping multiplies (``percdamp * scale`` is added to diag H): the mean of diag H,
    each entry capped at MASSIVE x the median over the live (not ``dead``) inputs.

    The plain mean (the reference code's) is dominated by a few massive-activation inputs (diag 1e3-1e6 x the
    median, common in down projections): the damping then exceeds every other input's own diag, the solve turns into
    magnitude pruning without compensation, and its error can exceed Wanda's. Capped, those inputs weigh like any
    large one; on a Hessian without such inputs (no diag above the cap) the scale is the plain mean, unchanged."""
    live = diag if dead is None else diag[~dead]
    if live.numel() == 0:
        return diag.mean()
    cap = MASSIVE * live.median()
    return diag.clamp(max=cap).mean() if cap > 0 else diag.mean()


def kth_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th lowest value (1-based) of each row of a 2-D ``score`` [rows], as ``torch.kthvalue(score, k, dim=1)``.
    On the CPU by numpy's introselect, which returns the same element ~15x faster than ``kthvalue`` here."""
    if score.device.type != "cpu" or score.dtype == torch.bfloat16:
        return torch.kthvalue(score, k, dim=1).values
    a = score.detach().numpy()
    return torch.from_numpy(np.partition(a, k - 1, axis=1)[:, k - 1].copy())


def _first_k_per_row(score: torch.Tensor, counts: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """Mask of the first counts[r] entries of each row in stable ascending order, given kth[r] = the counts[r]-th
    lowest value of row r: everything below kth, then the earliest ties equal to kth. O(n) instead of a sort."""
    kth = kth[:, None]
    mask = score < kth
    need = counts - mask.sum(1)
    eq = score == kth
    if torch.equal(eq.sum(1), need):  # the usual case: every tie at kth is needed (no running count)
        mask |= eq
    else:
        mask |= eq & (eq.cumsum(1) <= need[:, None])
    mask &= (counts > 0)[:, None]
    return mask


def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries of `score` (any shape), compared over the whole tensor (ties: earliest first)."""
    flat = score.reshape(1, -1)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= flat.shape[1]:
        return torch.ones_like(score, dtype=torch.bool)
    kth = kth_lowest(flat, k)
    counts = torch.tensor([k], device=score.device)
    return _first_k_per_row(flat, counts, kth).view_as(score)


def lowest_k_t(score_t: torch.Tensor, k: int) -> torch.Tensor:
    """``lowest_k(score_t.t(), k).t()`` without transposing: the k lowest entries of a score held transposed
    ([cols, rows], contiguous), ties broken earliest first in the order of the untransposed [rows, cols] score."""
    if k <= 0:
        return torch.zeros_like(score_t, dtype=torch.bool)
    if k >= score_t.numel():
        return torch.ones_like(score_t, dtype=torch.bool)
    kth = kth_lowest(score_t.reshape(1, -1), k)[0]
    mask = score_t < kth
    eq = score_t == kth
    need = k - int(mask.sum())
    if int(eq.sum()) == need:
        mask |= eq
    else:  # the earliest ties in [rows, cols] order
        idx = eq.t().nonzero()[:need]
        mask[idx[:, 1], idx[:, 0]] = True
    return mask


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One comparison group for the whole matrix: prune the round(s*numel) lowest scores."""
    return lowest_k(score, prune_count(sparsity, score.numel()))


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each row is a comparison group, and the matrix total is exactly round(s*numel).

    Every row prunes base = k // rows (= floor(s*in)) lowest scores. The remaining k - rows*base prunes go one each to
    the rows whose next candidate (their (base+1)-th lowest score) is lowest across the matrix. Equal to taking the
    first counts[r] entries of each row's stable sort, computed with kthvalue (linear time).
    """
    rows, cols = score.shape
    k = prune_count(sparsity, score.numel())
    base = k // rows
    if base >= cols:
        return torch.ones_like(score, dtype=torch.bool)
    counts, up, nxt = row_counts(k, rows, lambda b: kth_lowest(score, b + 1), score.device)
    kth = kth_lowest(score, base) if base > 0 else torch.zeros(rows, dtype=score.dtype,
                                                                                  device=score.device)
    if up is not None:
        kth[up] = nxt[up]
    return _first_k_per_row(score, counts, kth)


def row_counts(k: int, rows: int, next_lowest, device=None):
    """How many of its lowest scores each row prunes for a matrix total of k (``row_mask``): base = k // rows in every
    row, one more in the k % rows rows whose next candidate is lowest (ties: lower row). ``next_lowest(base)`` gives
    every row's (base+1)-th lowest score [rows]; it is called only when k % rows > 0.
    Returns (counts [rows], the rows that prune one more or None, next_lowest(base) or None)."""
    base, extra = divmod(k, rows)
    counts = torch.full((rows,), base, dtype=torch.long, device=device)
    if not extra:
        return counts, None, None
    nxt = next_lowest(base)
    up = torch.sort(nxt, stable=True).indices[:extra]
    counts[up] += 1
    return counts, up, nxt


def relative_error(weight_dense: torch.Tensor, weight_pruned: torch.Tensor, stats: LayerStats,
                   max_rows: int = ERROR_ROWS) -> float:
    """||(W - W')X||^2 / ||W X||^2 over the calibration inputs.

    With the Hessian H = (2/n) X^T X this is tr(dW H dW^T) / tr(W H W^T) (the 2/n cancels), summed over at most
    ``max_rows`` evenly spaced output rows once rows x cols^2 > ``ERROR_EXACT`` (the full sum costs 4 rows cols^2
    flops, twice SparseGPT's own sweep; 64 rows of a 7B down projection, 4096 x 11008, cost ~2% of its block's
    solve): a rough estimate for those (7B widths: see ERROR_EXACT), exact below (every SmolLM2 linear); without a
    Hessian it is computed from the stored input sample [k, in]. Returns 0.0 when both are zero and inf when only the
    dense output is zero.
    """
    W, Wp = weight_dense, weight_pruned.to(weight_dense.device)
    if stats.hessian is not None and W.shape[0] > max_rows and W.shape[0] * W.shape[1] ** 2 > ERROR_EXACT:
        pick = torch.linspace(0, W.shape[0] - 1, max_rows, device=W.device).round().long()
        W, Wp = W[pick], Wp[pick]  # the rows first: no full-size float copies
    W = W.float()
    dW = W - Wp.float()
    if stats.hessian is not None:
        H = stats.hessian.to(device=W.device, dtype=torch.float32)
        num, den = ((dW @ H) * dW).sum().item(), ((W @ H) * W).sum().item()
    elif stats.sample is not None:
        X = stats.sample.to(device=W.device, dtype=torch.float32)
        num, den = (X @ dW.T).square().sum().item(), (X @ W.T).square().sum().item()
    else:
        raise ValueError("relative_error needs stats.hessian or stats.sample")
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den
