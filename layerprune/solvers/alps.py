"""ALPS (Meng et al., NeurIPS 2024): ADMM on the layer-wise pruning problem, then a PCG refit of the kept weights.

For one linear with calibration Hessian H (any positive multiple of X^T X) the problem is
    min_W tr((W - W0) H (W - W0)^T)  s.t.  W has the target zero pattern (unstructured budget or N:M),
i.e. ||X (W - W0)^T||^2. As in the paper's code, H is first damped (H + percdamp * mean(diag H) * I, dead inputs
with diag 0 count as diag 1, massive inputs capped in the mean: ``common.damping_scale``) and then normalized to a
unit diagonal (H~ = S^-1 H S^-1, W~ = W S, S = sqrt(diag H)), so the penalty rho is on one scale for every layer.

ADMM splits W into a free copy B and a copy D in the pattern, with the scaled dual V:
    B = (W~0 H~ - V + rho D) (H~ + rho I)^-1          (a ridge solve: one matrix product with the inverse)
    D = P(B + V / rho)                                 (P: keep the largest |.| within the pattern)
    V = V + rho (B - D)
Every 3 iterations rho follows the support: with c the fraction of the kept entries whose membership changed since
the last check, rho *= 1.3 (c > 10%), 1.2 (c > 0.5%), 1.1 (any change, once rho has grown); before rho has ever
grown, any change restarts from W~0 with rho / 5 and no change divides rho by 5. ADMM stops when the support stops
changing after rho has grown, or after 30 iterations once c < 0.03%, or after ``admm_iters``; rho is capped at 1e6
and the ridge system is refactored (one Cholesky) only when rho changes. The pattern is then P(B).

PCG refit: with the support fixed, the kept weights of every row solve the least-squares problem
H~_SS w_S = (W~0 H~)_S, by conjugate gradients run on all rows at once (masked to the support), warm-started from
P(B), for at most ``pcg_iters`` iterations or until every row's residual is below 1e-4 of its right-hand side.
In the normalized basis the Jacobi (diagonal) preconditioner is the identity, so the normalization is the
preconditioner. All iterations are fp32.
"""
from __future__ import annotations

import torch

from layerprune.errors import UserError
from layerprune.registry import Option, positive_int, register_solver
from layerprune.solvers.common import (all_finite, check_options, check_sparsity, check_weight, damping_scale,
                                       kth_lowest, lowest_k, prune_count)
from layerprune.solvers.nm import check_nm, nm_keep
from layerprune.stats import LayerStats

UPDATE_EVERY = 3  # iterations between two rho updates
SWITCH_ITER = 30  # the iteration after which a near-still support (< STILL of the kept entries) stops ADMM
STILL = 3e-4
RHO_MAX = 1e6
PCG_RTOL = 1e-4


@register_solver
class ALPS:
    name = "alps"
    needs = frozenset({"hessian"})
    options = (Option("admm_iters", positive_int, None, "ALPS: most ADMM iterations (default 300)"),
               Option("rho", float, None, "ALPS: initial ADMM penalty on the unit-diagonal Hessian (default 0.1)"),
               Option("pcg_iters", int, None, "ALPS: most PCG iterations refitting the kept weights "
                      "(default 10; 0: none)"),
               Option("percdamp", float, None, "SparseGPT damping, fraction of mean diag (0.01)"))

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, nm=None, **options) -> torch.Tensor:
        """One weight [out, in] pruned to ``sparsity`` (or N:M); the pruned entries are exactly 0."""
        return self.prune_group([weight], stats, [sparsity], nm, **options)[0]

    def prune_group(self, weights: list[torch.Tensor], stats: LayerStats, sparsities: list[float], nm=None,
                    admm_iters: int = 300, rho: float = 0.1, pcg_iters: int = 10, percdamp: float = 0.01,
                    **options) -> list[torch.Tensor]:
        """``prune`` on each weight (they read one input, e.g. q/k/v): the normalized Hessian is computed once."""
        check_options(self.name, options, ("admm_iters", "rho", "pcg_iters", "percdamp"))
        if not (isinstance(admm_iters, int) and admm_iters >= 1):
            raise UserError(f"alps: admm_iters must be a positive integer, got {admm_iters!r}")
        if not (isinstance(pcg_iters, int) and pcg_iters >= 0):
            raise UserError(f"alps: pcg_iters must be an integer >= 0, got {pcg_iters!r}")
        if not float(rho) > 0:
            raise UserError(f"alps: rho must be > 0, got {rho!r}")
        if not float(percdamp) >= 0:
            raise UserError(f"alps: percdamp must be >= 0, got {percdamp!r}")
        if len(weights) != len(sparsities):
            raise ValueError("alps: prune_group needs one sparsity per weight")
        for w in weights:
            check_weight(w)
        cols = weights[0].shape[1]
        if any(w.shape[1] != cols for w in weights):
            raise ValueError("alps: prune_group needs weights of one input width")
        if stats.hessian is None or stats.hessian.shape != (cols, cols):
            raise ValueError(f"alps needs stats.hessian of shape [{cols}, {cols}]")
        if nm is not None:
            nm = check_nm(nm, cols)
        else:
            sparsities = [check_sparsity(s) for s in sparsities]
        device = weights[0].device
        Hn, scale, dead = stats.memo(("alps.Hn", float(percdamp), str(device)),
                                     lambda: normalized_hessian(stats.hessian, float(percdamp), device))
        out, self.last_info = [], []  # last_info: per weight, what the iterations did (the record's rows show it)
        for w, s in zip(weights, sparsities):
            if nm is None and prune_count(s, w.numel()) == 0:  # nothing to prune: unchanged
                out.append(w.clone())
                self.last_info.append({})
                continue
            Wn = w.to(torch.float32) * scale  # the weight in the normalized basis
            Wn[:, dead] = 0  # a dead input's weight changes no output: free to prune, so pruned first
            project = _projector(Wn.shape, s, nm)
            target = Wn @ Hn
            info = {}
            B = admm(Wn, Hn, target, project, float(rho), admm_iters, info)
            keep = project(B).bool()
            B = pcg_refit(Wn, Hn, B.masked_fill(~keep, 0), keep, pcg_iters, target, info)
            self.last_info.append(info)
            new = B.div_(scale).masked_fill_(~keep, 0).add_(0.0)  # +0.0: no -0.0 entries
            if bool(dead.any()):  # the dead weights within the budget are zeroed, the rest keep their value
                new[:, dead] = torch.where(keep[:, dead], w[:, dead].to(torch.float32), new[:, dead])
            out.append(new.to(w.dtype))
        return out


def normalized_hessian(hessian: torch.Tensor, percdamp: float, device):
    """(H~, s, dead): H damped by percdamp * damping_scale(diag) (dead inputs, diag 0, count as diag 1),
    s = sqrt(diag), H~ = H / (s s^T), which has a unit diagonal, and the dead inputs' mask."""
    H = hessian.to(device=device, dtype=torch.float32, copy=True)
    if not all_finite(H):
        raise ValueError("alps: the Hessian has NaN/inf entries")
    diag = H.diagonal()
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    diag.add_(percdamp * damping_scale(diag, dead))
    if not bool((diag > 0).all()):
        raise UserError("alps: the Hessian has a negative diagonal entry after damping; use more calibration "
                        "samples or a larger percdamp")
    s = diag.sqrt()
    H.div_(s[:, None]).div_(s[None, :])
    H.diagonal().fill_(1.0)
    return H, s, dead


def _projector(shape, sparsity, nm):
    """P as a keep mask in float (1 = kept, 0 = pruned) of a [rows, in] matrix, keeping the largest |.|: all but the
    round(sparsity * numel) lowest over the whole matrix, or all but the n lowest of every m consecutive inputs of a
    row (ties: earliest pruned first). Float masks: on the CPU, comparisons, fills and counts on bool tensors cost
    3-8x their float forms here."""
    if nm is not None:
        return lambda Z: nm_keep(Z.abs(), nm[0], nm[1])
    k = prune_count(sparsity, shape[0] * shape[1])
    kept = shape[0] * shape[1] - k

    def project(Z):
        if 0 < k < Z.numel():
            a = Z.abs()
            keep = a.sub_(kth_lowest(a.reshape(1, -1), k)[0].to(a.device)).clamp_(min=0).sign_()  # 1: |z| > kth
            if int(keep.sum()) == kept:  # no tie at the k-th value: exact
                return keep
        return (~lowest_k(Z.abs(), k)).to(Z.dtype)  # ties at the k-th value: the earliest are pruned

    return project


class _Ridge:
    """X -> X (H~ + rho I)^-1 for the ADMM's free copy, refactored only when rho changes. The Cholesky factor is
    solved against directly (two triangular solves, about one product's flops a call) when the weight has no more
    rows than inputs; otherwise the explicit inverse (one Cholesky and an inverse, ~in^3, per rho) makes each call one
    product of rows x in^2, cheaper there."""

    def __init__(self, Hn: torch.Tensor, rows: int):
        self.Hn, self.direct, self.rho = Hn, rows <= Hn.shape[0], None

    def set(self, rho: float) -> None:
        if rho == self.rho:
            return
        A = self.Hn.clone()
        A.diagonal().add_(rho)
        L, info = torch.linalg.cholesky_ex(A)
        if info != 0:
            raise UserError("alps: the damped Hessian is not positive definite; use a larger percdamp")
        if self.direct:
            self.L, self.U = L, L.t().contiguous()
        else:
            self.inv = torch.cholesky_inverse(L)
        self.rho = rho

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        if not self.direct:
            return X @ self.inv
        Y = torch.linalg.solve_triangular(self.U, X, upper=True, left=False)  # Y L^T = X
        return torch.linalg.solve_triangular(self.L, Y, upper=False, left=False)  # B L = Y


def admm(Wn: torch.Tensor, Hn: torch.Tensor, target: torch.Tensor, project, rho: float, iters: int,
         info: dict | None = None) -> torch.Tensor:
    """The ADMM iterate B (free copy) after the stopping rule (see the module docstring); [rows, in] fp32.
    ``target``: W~0 H~, the ridge solve's right-hand side; ``project``: Z -> its float keep mask (``_projector``);
    ``info``: filled with the iterations run (``admm_iters``) and the last penalty (``rho``)."""
    keep = project(Wn)
    D0 = Wn * keep
    D, B, V = D0.clone(), Wn.clone(), torch.zeros_like(Wn)
    kept = max(int(keep.sum()), 1)
    ridge = _Ridge(Hn, Wn.shape[0])
    ridge.set(rho)
    grown, R = False, torch.empty_like(Wn)
    for it in range(iters):
        B = ridge(torch.sub(target, V, out=R).add_(D, alpha=rho))  # (W~0 H~ - V + rho D) (H~ + rho I)^-1
        Z = torch.add(B, V, alpha=1 / rho)
        new = project(Z)
        D = Z * new
        V = Z.sub_(D).mul_(rho)  # = rho (Z - D) = V + rho (B - D)
        if (it + 1) % UPDATE_EVERY:
            continue
        change = int((new - keep).abs_().sum())
        keep = new
        frac = change / kept
        if frac > 0.1:
            rho, grown = rho * 1.3, True
        elif frac > 0.005:
            rho, grown = rho * 1.2, True
        elif change > 0:
            if grown:
                rho *= 1.1
            else:  # rho too large to start with: start over with a smaller one
                rho /= 5
                B, D, V = Wn.clone(), D0.clone(), torch.zeros_like(Wn)
        elif grown:
            break
        else:
            rho /= 5
        rho = min(rho, RHO_MAX)
        if it >= SWITCH_ITER and frac < STILL:
            break
        ridge.set(rho)
    if info is not None:
        info.update(admm_iters=it + 1, rho=rho)
    return B


def pcg_refit(Wn: torch.Tensor, Hn: torch.Tensor, B: torch.Tensor, keep: torch.Tensor, iters: int,
              target=None, info: dict | None = None) -> torch.Tensor:
    """Conjugate gradients on every row's normal equations restricted to its support ``keep``:
    (B H~)_S = (W~0 H~)_S, warm-started at ``B`` (zero off the support); rows stop together once all residuals are
    below PCG_RTOL of their right-hand side. ``target``: W~0 H~ when the caller has it; ``info``: filled with the
    iterations run (``pcg_iters``)."""
    if iters == 0:
        if info is not None:
            info["pcg_iters"] = 0
        return B
    m = keep.to(torch.float32)
    rhs = (Wn @ Hn if target is None else target) * m
    stop = PCG_RTOL * rhs.norm(dim=1)
    R = rhs - (B @ Hn) * m
    P = R.clone()
    rr = R.square().sum(1)
    for done in range(iters + 1):
        if done == iters or bool((R.norm(dim=1) <= stop).all()):
            break
        AP = (P @ Hn) * m
        pap = (P * AP).sum(1)
        alpha = torch.where(pap > 0, rr / pap.clamp_min(1e-30), torch.zeros_like(rr))
        B = B + alpha[:, None] * P
        R = R - alpha[:, None] * AP
        rr_new = R.square().sum(1)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr))
        P = R + beta[:, None] * P
        rr = rr_new
    if info is not None:
        info["pcg_iters"] = done
    return B
