"""SparseGPT (Frantar & Alistarh, ICML 2023): OBS pruning with sequential compensation, one column at a time.

With H = (2/n) X^T X (+ percdamp * mean(diag H) * I, massive inputs capped in the mean: ``common.damping_scale``)
and U the upper Cholesky factor of H^-1 (H^-1 = U^T U):
- columns are swept left to right in blocks of `blocksize`;
- unstructured: at the start of a block the mask takes the lowest w^2 / U_jj^2 over the whole (rows x block) slice;
  the block prunes round(s * rows * end) - round(s * rows * start) weights, so the matrix total is round(s * numel);
- N:M: at the first column of each group of m columns, each row prunes the n lowest w^2 / U_jj^2 of the group;
- for each column j: q = w_j with the pruned entries zeroed (then optionally quantized), err = (w_j - q) / U_jj,
  W[:, j+1:] -= err * U[j, j+1:]. Inside a block the update is lazy: rank-1 within sub-blocks of 16 columns, one
  product per sub-block for the rest of the block.
- the later blocks' share is applied left-looking, without forming U: with H = R R^T (R upper, one Cholesky of the
  reversed H, by blocks of n / 8 (256-1024), once per input group: q/k/v and gate/up share it), U = R^-1, and the whole
  sweep gives W_end = W - E U (E: the errors), so Z = E U = W - W_end satisfies Z R = E. Solving that block row by
  block row, the update a block receives from all earlier ones is P_b = -(Z[:, <b] R[<b, b]) U_bb, with
  U_bb = R_bb^-1 (blocksize x blocksize). The share of earlier groups of 4 blocks is one product per group (a taller
  GEMM), that of the group's own earlier blocks one small product per block: the same rows x cols^2 flops as the
  right-looking sweep, ~all of it GEMM, and no
  n^3/3 triangular inverse.
Joint sparsify + quantize (the paper's section 3.5, GPTQ's sweep): with wbits, the kept entries of column j are rounded
to a min-max grid (layerprune.quant) before err is taken, so the quantization error is compensated by the later
columns exactly like the pruning error. groupsize -1 fits one grid per output row on the whole weight; groupsize g
refits at every g-th column on the current (compensated) weights of the group, pruned entries counted as 0. The sweep
block is rounded to a multiple of g (and of M for N:M) so that a group never straddles two blocks.
Dead inputs (diag H == 0, the feature is always zero) get diag 1; their weights score 0 (free to prune, so they are
pruned first) and never move, but are only zeroed within the budget, which keeps the zero count exact.
"""
from __future__ import annotations

import math
import warnings

import torch

from layerprune.errors import UserError
from layerprune.quant import check_quant, make_column_quantizer
from layerprune.registry import Option, positive_int, register_solver
from layerprune.solvers.common import (all_finite, check_options, check_sparsity, check_weight, damping_scale,
                                       lowest_k_t, prune_count)
from layerprune.solvers.nm import check_nm, nm_mask
from layerprune.stats import LayerStats

SUB = 16  # columns swept with rank-1 updates between two matrix-product updates
GROUP = 4  # blocks that take their share of all earlier groups as one product
CHOL_BLOCK, CHOL_MIN = 1024, 256  # the factor goes by blocks of n / 8 within these bounds (one LAPACK call below):
# MKL's one-call Cholesky ran at 38 GFLOP/s at n = 1536 and ~120 at 11008 here; blocks of 192-384, 512 and 1024 were
# the fastest at n = 1536, 4096 and 11008 (24 / 282 / 3944 ms against 59 / 350 (1024) / 4517 (512))
RETRIES = 4  # damping escalations (x10 each) tried when H + damp*I is not positive definite


def upper_inverse(R: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """R^-1 for an upper-triangular R, by halves: [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]], so all but
    the small diagonal leaves is matrix products (~2/3 n^3 flops)."""
    n = R.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(R, torch.eye(n, dtype=R.dtype, device=R.device), upper=True)
    h = n // 2
    Ai, Ci = upper_inverse(R[:h, :h], leaf), upper_inverse(R[h:, h:], leaf)
    out = torch.zeros_like(R)
    out[:h, :h], out[h:, h:] = Ai, Ci
    out[:h, h:] = -(Ai @ R[:h, h:]) @ Ci
    return out


def reversed_cholesky(H: torch.Tensor, percdamp: float, dead: torch.Tensor | None = None) -> torch.Tensor:
    """Upper R with R R^T = H + p * m * I (H with diag 1 at ``dead``, m = ``damping_scale``: mean(diag H) with massive
    inputs capped); p starts at percdamp and grows x10 while that fails. ``H`` is not changed.

    With J the order reversal, chol(J A J) = M M^T gives A = R R^T for the upper R = J M J; then A^-1 = U^T U with
    U = R^-1 the upper Cholesky factor of A^-1 that the sweep uses (never formed whole: see the module docstring).
    """
    diag = H.diagonal().float()
    if dead is not None:
        diag = diag.masked_fill(dead, 1.0)
    mean_diag = damping_scale(diag, dead)
    p = percdamp
    for attempt in range(RETRIES + 1):
        R = H.to(torch.float32, copy=True)
        R.diagonal().copy_(diag + p * mean_diag)
        if _reversed_cholesky_(R, min(CHOL_BLOCK, max(CHOL_MIN, R.shape[0] // 8))):
            if attempt:
                warnings.warn(f"sparsegpt: Hessian not positive definite with percdamp={percdamp}; "
                              f"used percdamp={p:g}", stacklevel=3)
            return R
        p = p * 10 if p > 0 else 0.01
    raise UserError(f"sparsegpt: the Hessian stays not positive definite even with percdamp={p / 10:g}; "
                    f"use more calibration samples or a larger percdamp")


@register_solver
class SparseGPT:
    name = "sparsegpt"
    needs = frozenset({"hessian"})
    options = (Option("blocksize", positive_int, None, "SparseGPT column block size (default 128)"),
               Option("percdamp", float, None, "SparseGPT damping, fraction of mean diag (0.01)"),
               Option("wbits", int, None, "SparseGPT only: quantize the kept weights jointly (GPTQ-style) to this many "
                      "bits", choices=(3, 4, 8)),
               Option("groupsize", int, None, "with --wbits: one grid per this many input columns (default: one per "
                      "output channel)"))

    @classmethod
    def resolve_options(cls, o: dict) -> dict:
        """Flag values -> options: --groupsize needs --wbits; with --wbits the groupsize is always recorded."""
        if o["wbits"] is None and o["groupsize"] is not None:
            raise UserError("--groupsize only applies with --wbits: add e.g. --wbits 4, or drop --groupsize")
        opts = {k: o[k] for k in ("blocksize", "percdamp") if o[k] is not None}
        if o["wbits"] is not None:
            opts.update(wbits=o["wbits"], groupsize=-1 if o["groupsize"] is None else o["groupsize"])
            check_quant(opts["wbits"], opts["groupsize"])
        return opts

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, nm=None, **options) -> torch.Tensor:
        """Prune (and with wbits, quantize) one weight; returns the dequantized weight, pruned entries exactly 0.

        Options: blocksize (128), percdamp (0.01); wbits/groupsize/sym: GPTQ-style min-max grid, see layerprune.quant.
        `quantizer`, instead of wbits, is any callable quantizer(j, column, block, mask) -> column, called once per
        column j in order, where block is the solver's working copy of columns j..end of the current sub-block (always
        whole groups, already compensated) and mask its pruned entries (True = pruned) so far; if it has a
        `groupsize` attribute the sweep blocks are aligned to it as for wbits.
        """
        return self.prune_group([weight], stats, [sparsity], nm, **options)[0]

    def prune_group(self, weights: list[torch.Tensor], stats: LayerStats, sparsities: list[float], nm=None,
                    blocksize: int = 128, percdamp: float = 0.01, wbits: int | None = None, groupsize: int = -1,
                    sym: bool = False, quantizer=None, **options) -> list[torch.Tensor]:
        """``[prune(w, stats, s, nm, ...) for w, s in zip(weights, sparsities)]`` for linears that read one input
        (q/k/v, gate/up), in one sweep: the rows of all of them, each weight's mask chosen over its own rows. A row's
        sweep never reads another row, so the result is the same; the per-column steps run once for the group."""
        check_options(self.name, options, ("blocksize", "percdamp", "wbits", "groupsize", "sym", "quantizer"))
        if not weights or len(weights) != len(sparsities):
            raise ValueError("sparsegpt: prune_group needs one sparsity per weight")
        for w in weights:
            check_weight(w)
        cols = weights[0].shape[1]
        if any(w.shape[1] != cols or w.device != weights[0].device for w in weights):
            raise ValueError("sparsegpt: prune_group needs weights of one input width, on one device")
        if not (isinstance(blocksize, int) and blocksize >= 1):
            raise UserError(f"sparsegpt: blocksize must be a positive integer, got {blocksize!r}")
        if not float(percdamp) >= 0:
            raise UserError(f"sparsegpt: percdamp must be >= 0, got {percdamp!r}")
        if wbits is None and (groupsize != -1 or sym):
            raise UserError("sparsegpt: groupsize/sym only apply with wbits; pass wbits (e.g. 4) or drop them")
        if wbits is not None and quantizer is not None:
            raise UserError("sparsegpt: pass either wbits (built-in grid) or a quantizer callable, not both")
        if quantizer is not None and len(weights) > 1:  # a quantizer callable sees one weight's columns
            return [self.prune_group([w], stats, [s], nm, blocksize, percdamp, quantizer=quantizer)[0]
                    for w, s in zip(weights, sparsities)]
        if stats.hessian is None or stats.hessian.shape != (cols, cols):
            raise ValueError(f"sparsegpt needs stats.hessian of shape [{cols}, {cols}]")
        align = 1
        if nm is not None:
            n, m = check_nm(nm, cols)
            align = m
        else:
            sparsities = [check_sparsity(s) for s in sparsities]
            if quantizer is None and wbits is None and 0 in sparsities:  # nothing to prune there: unchanged
                todo = [i for i, s in enumerate(sparsities) if s != 0]
                done = self.prune_group([weights[i] for i in todo], stats, [sparsities[i] for i in todo], nm,
                                        blocksize, percdamp) if todo else []
                out = [w.clone() for w in weights]
                for i, w in zip(todo, done):
                    out[i] = w
                return out
        if wbits is not None:
            check_quant(wbits, groupsize)
        gs = groupsize if wbits is not None else getattr(quantizer, "groupsize", -1)
        if gs != -1:
            align = math.lcm(align, gs)
        blocksize = max(align, blocksize // align * align)  # whole N:M groups and quantization groups per block

        bounds = [0]  # the weights' rows in the working copy: weight w is rows bounds[w]:bounds[w + 1]
        for w in weights:
            bounds.append(bounds[-1] + w.shape[0])
        rows = bounds[-1]
        Wt = torch.empty(cols, rows, dtype=torch.float32, device=weights[0].device)  # the sweep's working copy,
        for w, r0, r1 in zip(weights, bounds, bounds[1:]):  # transposed: column j of W is the contiguous row Wt[j]
            Wt[:, r0:r1] = w.t()
        W = Wt.t()
        R, dead = stats.memo(("sparsegpt.R", float(percdamp), str(W.device)),
                             lambda: _factor(stats.hessian, float(percdamp), W.device))
        d = R.diagonal().reciprocal()  # diag U
        has_dead = bool(dead.any())
        maskt = torch.zeros(cols, rows, dtype=torch.bool, device=W.device)  # transposed, like Wt below
        mask = maskt.t()
        if wbits is not None:  # fitted here (per channel: on the whole weight, as GPTQ / SparseGPT do)
            quantizer = make_column_quantizer(W, wbits, groupsize, sym)
        sub = max(align, SUB // align * align)  # columns per rank-1 stretch; whole N:M and quantization groups

        # The sweep works on the transpose: column j of W is the contiguous row Wt[j]
        # (Zt[j]: its total change, Z = E U).
        # Inside a sub-block of `sub` columns each column's error is a rank-1 update of the sub-block's later columns;
        # the rest of the block gets the sub-block's errors as one product; a block gets all earlier blocks' as one.
        Zt = torch.empty_like(Wt)
        span = blocksize * GROUP  # columns whose share of all earlier ones is one product (a taller GEMM)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            g1 = i1 // span * span  # the group of blocks this one is in
            if i1 == g1 and g1:
                S = R[:g1, g1:g1 + span].t() @ Zt[:g1]  # R[<g, g]^T Z[:, <g]^T, for the group's blocks at once
            W1 = Wt[i1:i2]  # [block columns, rows], a view: updated in place
            Err1 = torch.empty_like(W1)
            U1 = upper_inverse(R[i1:i2, i1:i2])
            Zt[i1:i2] = W1
            if i1:  # P_b^T = -U_bb^T (R[<b, b]^T Z[:, <b]^T): the group's product plus its earlier blocks
                if i1 == g1:
                    T = S[:i2 - i1]
                elif g1:
                    T = torch.addmm(S[i1 - g1:i2 - g1], R[g1:i1, i1:i2].t(), Zt[g1:i1])
                else:
                    T = R[:i1, i1:i2].t() @ Zt[:i1]
                W1.addmm_(U1.t(), T)
            if nm is None:
                score = W1.square().div_(d[i1:i2, None].square())  # transposed, like W1
                if has_dead:
                    score[dead[i1:i2]] = 0
                for s, r0, r1 in zip(sparsities, bounds, bounds[1:]):  # each weight over its own rows
                    k = prune_count(s, (r1 - r0) * i2) - prune_count(s, (r1 - r0) * i1)
                    maskt[i1:i2, r0:r1] = lowest_k_t(score[:, r0:r1], k)
            pruned = maskt[i1:i2].view(torch.uint8).float() if quantizer is None else None  # (bool->float: 5x slower)
            for s1 in range(0, i2 - i1, sub):
                s2 = min(s1 + sub, i2 - i1)
                if quantizer is None:
                    _sweep_pruned(W1, Err1, U1, maskt[i1:i2], pruned, d[i1:i2], dead[i1:i2], s1, s2, nm)
                else:
                    for i in range(s1, s2):
                        j = i1 + i
                        if nm is not None and i % m == 0:
                            mask[:, j:j + m] = _nm_group(W1[i:i + m], d[j:j + m], dead[j:j + m], nm)
                        w = W1[i]
                        q = w.masked_fill(maskt[j], 0)
                        q = quantizer(j, q, W1[i:s2].t(), mask[:, j:i1 + s2]).masked_fill(maskt[j], 0)
                        err = (w - q).div_(U1[i, i])
                        W1[i + 1:s2].addmm_(U1[i, i + 1:s2, None], err[None], alpha=-1)  # rank 1 (faster than addr_)
                        W1[i] = q
                        Err1[i] = err
                W1[s2:].addmm_(U1[s1:s2, s2:].t(), Err1[s1:s2], alpha=-1)
            Zt[i1:i2] -= W1
        # each in its weight's layout (a transposed result makes the copy into the module a strided one); cast first:
        # fewer bytes to transpose
        return [Wt[:, r0:r1].to(w.dtype).t().contiguous() for w, r0, r1 in zip(weights, bounds, bounds[1:])]


def _nm_group(cols_t: torch.Tensor, d: torch.Tensor, dead: torch.Tensor, nm) -> torch.Tensor:
    """The N:M mask [rows, m] of one group of m columns (given transposed, [m, rows]): per row the n lowest
    w^2/U_jj^2."""
    score = cols_t.t().square() / d.square()
    score[:, dead] = 0
    return nm_mask(score, nm[0], nm[1])


def _sweep_pruned(W1, Err1, U1, maskt1, pruned, d1, dead1, s1: int, s2: int, nm) -> None:
    """Columns s1..s2-1 of one block without quantization (arguments: the block's slices; ``pruned`` = ``maskt1`` as
    0/1 floats, both written here for N:M): err_i = w_i * pruned_i / U_ii is one product and one rank-1 update per
    column, and the sub-block's pruned entries are zeroed once at its end (no later column writes them)."""
    step = s2 - s1 if nm is None else nm[1]  # columns whose mask is known at once: the sub-block, or one N:M group
    # per-column views made in one call each (indexing a tensor per column cost more than the arithmetic at 576 wide)
    w, e = W1[s1:s2].unbind(0), Err1[s1:s2].unbind(0)
    e_row, u_col = Err1[s1:s2, None].unbind(0), U1[s1:s2, :, None].unbind(0)  # [1, rows] and [block, 1] each
    for g in range(s1, s2, step):
        if nm is not None:
            maskt1[g:g + step] = _nm_group(W1[g:g + step], d1[g:g + step], dead1[g:g + step], nm).t()
            pruned[g:g + step] = maskt1[g:g + step].view(torch.uint8)
        scale = (pruned[g:g + step] / d1[g:g + step, None]).unbind(0)
        for i in range(g, g + step):
            torch.mul(w[i - s1], scale[i - g], out=e[i - s1])
            if i + 1 < s2:
                W1[i + 1:s2].addmm_(u_col[i - s1][i + 1:s2], e_row[i - s1], alpha=-1)  # rank 1 (faster than addr_)
    # x * 0 keeps the sign of x; -0.0 + 0.0 = +0.0 (masked_fill_: 30x slower)
    W1[s1:s2].mul_(1 - pruned[s1:s2]).add_(0.0)


def _reversed_cholesky_(A: torch.Tensor, nb: int) -> bool:
    """In place: the symmetric A (its upper triangle is read) becomes the upper R with R R^T = A, by blocks of ``nb``
    from the bottom-right: R22 from the last diagonal block (one LAPACK call on it reversed), R12 = A12 R22^-T, then
    A11 -= R12 R12^T on its upper blocks only (matrix products: ~all of the n^3/3 flops), and the same again on A11.
    The lower triangle is zeroed. False when a block is not positive definite (A is then garbage)."""
    n = A.shape[0]
    for k in range(n, 0, -nb):
        s = max(0, k - nb)
        C = A[s:k, s:k]
        M, info = torch.linalg.cholesky_ex(C.flip(0, 1))
        if info != 0 or not bool(torch.isfinite(M.diagonal()).all()):
            return False
        R22 = M.flip(0, 1)
        C.copy_(R22)
        if s:
            R12 = A[:s, s:k]
            R12.copy_(torch.linalg.solve_triangular(R22.T, R12, upper=False, left=False))  # X R22^T = A12
            for i in range(0, s, nb):  # the trailing update, upper blocks of each block row
                e = min(i + nb, s)
                A[i:e, i:s].addmm_(R12[i:e], R12[i:s].T, alpha=-1)
        A[s:k, :s].zero_()
    return True


def _factor(hessian: torch.Tensor, percdamp: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, dead) for one Hessian: dead inputs (diag 0, the feature is always zero) get diag 1, then R R^T = the damped
    Hessian, R upper. Computed once per input group (q/k/v and gate/up share it)."""
    H = hessian.to(device=device)
    if not all_finite(H):
        raise ValueError("sparsegpt: the Hessian has NaN/inf entries")
    dead = H.diagonal() == 0
    return reversed_cholesky(H, percdamp, dead), dead
