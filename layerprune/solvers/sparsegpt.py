"""SparseGPT (Frantar & Alistarh, ICML 2023): OBS pruning with sequential compensation, one column at a time.

With H = (2/n) X^T X (+ percdamp * mean(diag H) * I) and U the upper Cholesky factor of H^-1 (H^-1 = U^T U):
- columns are swept left to right in blocks of `blocksize`;
- unstructured: at the start of a block the mask takes the lowest w^2 / U_jj^2 over the whole (rows x block) slice;
  the block prunes round(s * rows * end) - round(s * rows * start) weights, so the matrix total is round(s * numel);
- N:M: at the first column of each group of m columns, each row prunes the n lowest w^2 / U_jj^2 of the group;
- for each column j: q = w_j with the pruned entries zeroed (then optionally quantized), err = (w_j - q) / U_jj,
  W[:, j+1:] -= err * U[j, j+1:] inside the block; after the block the rest gets W[:, end:] -= Err @ U[block, end:].
Dead inputs (diag H == 0, the feature is always zero) get diag 1; their weights score 0 (free to prune, so they are
pruned first) and never move, but are only zeroed within the budget, which keeps the zero count exact.
"""
from __future__ import annotations

import warnings

import torch

from layerprune.errors import UserError
from layerprune.solvers.common import check_options, check_sparsity, check_weight, lowest_k, prune_count
from layerprune.solvers.nm import check_nm, nm_mask
from layerprune.stats import LayerStats

RETRIES = 4  # damping escalations (x10 each) tried when H + damp*I is not positive definite


def inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper U with U^T U = (H + p * mean(diag H) * I)^-1; p starts at percdamp and grows x10 while that fails."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = H.diagonal().mean()
    p = percdamp
    for attempt in range(RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + p * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                if attempt:
                    warnings.warn(f"sparsegpt: Hessian not positive definite with percdamp={percdamp}; "
                                  f"used percdamp={p:g}", stacklevel=3)
                return U
        p = p * 10 if p > 0 else 0.01
    raise UserError(f"sparsegpt: the Hessian stays not positive definite even with percdamp={p / 10:g}; "
                    f"use more calibration samples or a larger percdamp")


class SparseGPT:
    name = "sparsegpt"
    needs = frozenset({"hessian"})

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, nm=None, blocksize: int = 128,
              percdamp: float = 0.01, quantizer=None, **options) -> torch.Tensor:
        """`quantizer(column, j) -> column`, if given, quantizes each column after pruning (joint GPTQ path)."""
        check_options(self.name, options, ("blocksize", "percdamp", "quantizer"))
        check_weight(weight)
        rows, cols = weight.shape
        if not (isinstance(blocksize, int) and blocksize >= 1):
            raise UserError(f"sparsegpt: blocksize must be a positive integer, got {blocksize!r}")
        if not float(percdamp) >= 0:
            raise UserError(f"sparsegpt: percdamp must be >= 0, got {percdamp!r}")
        if stats.hessian is None or stats.hessian.shape != (cols, cols):
            raise ValueError(f"sparsegpt needs stats.hessian of shape [{cols}, {cols}]")
        if nm is not None:
            n, m = check_nm(nm, cols)
            blocksize = max(m, blocksize // m * m)  # whole N:M groups per block
        else:
            s = check_sparsity(sparsity)
            if s == 0 and quantizer is None:
                return weight.clone()

        W = weight.float().clone()
        H = stats.hessian.to(device=W.device, dtype=torch.float32).clone()
        if not torch.isfinite(H).all():
            raise ValueError("sparsegpt: the Hessian has NaN/inf entries")
        dead = H.diagonal() == 0
        H.diagonal()[dead] = 1
        U = inverse_cholesky(H, float(percdamp))
        d = U.diagonal()
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)

        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            if nm is None:
                score = W1.square() / d[i1:i2].square()
                score[:, dead[i1:i2]] = 0
                k = prune_count(s, rows * i2) - prune_count(s, rows * i1)
                mask[:, i1:i2] = lowest_k(score, k)
            for i in range(i2 - i1):
                j = i1 + i
                if nm is not None and i % m == 0:
                    score = W1[:, i:i + m].square() / d[j:j + m].square()
                    score[:, dead[j:j + m]] = 0
                    mask[:, j:j + m] = nm_mask(score, n, m)
                w = W1[:, i]
                q = w.masked_fill(mask[:, j], 0)
                if quantizer is not None:
                    q = quantizer(q, j).masked_fill(mask[:, j], 0)
                err = (w - q) / U1[i, i]
                W1[:, i + 1:] -= err[:, None] * U1[i, i + 1:][None, :]
                W1[:, i] = q
                Err1[:, i] = err
            W[:, i1:i2] = W1
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        return W.to(weight.dtype)
