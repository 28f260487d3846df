"""SlimGPT structured pruning (Ling et al., NeurIPS 2024): the tensor math, and the block-level solver that drives it.

Layer-wise objective  min ||W X - Ŵ X||²  over an input-column mask, with H = (2/n) X Xᵀ of the layer input.
Attention heads are groups of `head_dim` input columns of o_proj; FFN channels are single input columns of down_proj.

Column OBS (all rows share H): removing a set Q of columns jointly costs
    ΔE = tr(W_Q ([H⁻¹]_QQ)⁻¹ W_Qᵀ)      and the optimal compensation is    δW = -W_Q ([H⁻¹]_QQ)⁻¹ [H⁻¹]_{Q,:}.
SlimGPT realises this with the upper Cholesky factor U of the permuted H⁻¹ (Q first): the column-by-column local
update inside Q (Err[:, i] = W_Q[:, i] / U_ii ; W_Q[:, i:] -= Err[:, i] ⊗ U[i, i:]) is exactly the triangular solve
Err = W_Q U_QQ⁻¹, and the rest gets one global update W_R -= Err U_QR. We use the solve (same numbers, no Python loop).

Batched Greedy Pruning: remove one head (or one FFN group) per iteration, then mask H (pruned rows/cols -> 0, their
diagonal -> 1) and re-score with the masked H's inverse, so every choice sees the compensation already applied. H⁻¹ is
computed once and downdated after each removal (block-inverse identity, O(n² |Q|)) instead of re-inverted (O(n³));
the channel search keeps the downdates apart and forms only the rows it reads (_LazyInverse, O(|Q| k n)).
  * heads: grouped Cholesky score, d = diag(cholesky([H⁻¹]_hh))² per head block h, err_col = Σ_rows W² / d,
    head error = Σ of err_col over the head's columns. d_i is the OBS pivot of column i after columns < i of the same
    head are removed (a Schur complement), so intra-head correlation enters the score; the columns of W are not
    updated inside the score, so it is an estimate of the joint error, not the joint error itself (score="exact" gives
    the joint error ||W_Q U_QQ⁻¹||²; not in the paper).
  * FFN channels: err_col = Σ_rows W² / [H⁻¹]_jj; remove the `cnt` lowest columns at once, `cnt` from the Dynamic
    Group Size schedule (dgs_schedule).
All math is fp32; the returned weight has the input dtype/device and the removed columns exactly zero.

`SlimGPT` (bottom) is the solver the engine finds by name; its block program (`SlimGPTProgram`, the interface of
layerprune.solvers.program) per block prunes heads (o_proj Hessian), re-collects the down_proj Hessian through the
pruned attention, prunes channels, and removes the pruned rows/columns physically.
"""
import math
import warnings

import torch
from torch import Tensor

from layerprune.errors import UserError
from layerprune.models import structured
from layerprune.models.structured import GQA_MODES
from layerprune.registry import Option, positive_int, register_solver
from layerprune.solvers.common import all_finite, relative_error

SCORES = ("obs", "magnitude", "exact")


# ----------------------------------------------------------------------------- numerics

# Not sparsegpt.inverse_cholesky on purpose: SparseGPT damps one Hessian out of place (H + p*mean(diag)*I, p x10 per
# retry, each from the undamped H) and factors its inverse once; here H is symmetrised first, factored again after
# every greedy removal (masked H), and Cholesky also runs on blocks of H^-1 (grouped scores, joint OBS updates), so a
# failing matrix gets its extra damping in place and keeps it for the later iterations. One shared policy would change
# the results of one solver or the other.
def _cholesky(A: Tensor, upper: bool = False, damp: float = 1e-2) -> Tensor:
    """Cholesky of a (batch of) symmetric matrix. If it fails, add 10·damp·mean(diag)·I to A *in place* (×10 per
    retry, with a warning) so the damping sticks for later iterations; damp=0 starts at 1e-6."""
    L, info = torch.linalg.cholesky_ex(A, upper=upper)
    if not bool(info.any()):
        return L
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    scale = A.diagonal(dim1=-2, dim2=-1).abs().mean(-1)[..., None, None].clamp_min(1e-12)
    extra = 10 * damp if damp > 0 else 1e-6
    for _ in range(12):
        warnings.warn(f"slimgpt: Cholesky failed (matrix not positive definite), adding damping {extra:g} x mean(diag)")
        A += extra * scale * eye * (info > 0)[..., None, None]     # only the failing matrices of a batch
        L, info = torch.linalg.cholesky_ex(A, upper=upper)
        if not bool(info.any()):
            return L
        extra *= 10
    raise UserError("slimgpt: Hessian is not positive definite even after heavy damping; check the calibration "
                    "activations for NaN/inf or raise percdamp")


def _inverse(H: Tensor, percdamp: float) -> Tensor:
    """H⁻¹ via Cholesky; a non-PD H gets extra damping in place (see _cholesky)."""
    return torch.cholesky_inverse(_cholesky(H, damp=percdamp))


def _prepare(weight: Tensor, hessian: Tensor, percdamp: float) -> tuple[Tensor, Tensor]:
    """fp32 copies; dead inputs (diag H = 0) get diag 1 and a zero weight column; H += percdamp·mean(diag H)·I."""
    if weight.dim() != 2:
        raise UserError(f"slimgpt: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise UserError(f"slimgpt: hessian must be [{cols}, {cols}] for a weight with {cols} input columns, "
                        f"got {tuple(hessian.shape)}")
    if percdamp < 0:
        raise UserError(f"slimgpt: percdamp must be >= 0, got {percdamp}")
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    if not all_finite(H):
        raise UserError("slimgpt: hessian contains NaN/inf; check the calibration activations")
    _symmetrize_(H)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * torch.diag(H).mean())  # + percdamp·mean(diag)·I without an n x n identity
    return W, H


def _symmetrize_(H: Tensor, tile: int = 1024) -> None:
    """H = (H + Hᵀ) / 2 in place, tile by tile (the same values, without an n x n temporary)."""
    n = H.shape[0]
    for i in range(0, n, tile):
        d = H[i:i + tile, i:i + tile]
        d.copy_((d + d.T).mul_(0.5))
        low, up = H[i:i + tile, :i], H[:i, i:i + tile]
        avg = (low + up.T).mul_(0.5)
        low.copy_(avg)
        up.copy_(avg.T)


def _mask(H: Tensor, cols: Tensor) -> None:
    """Remove `cols` from the problem: H[cols, :] = H[:, cols] = 0, H[cols, cols] = 1 (in place)."""
    H[cols, :] = 0.0
    H[:, cols] = 0.0
    H[cols, cols] = 1.0


def _obs_remove(W: Tensor, Hinv: Tensor, Q: Tensor, compensate: bool, percdamp: float) -> None:
    """Zero columns Q of W (in place); with `compensate`, first apply the joint OBS update to the alive columns.
    Then Hinv becomes the inverse of H with Q masked (see _mask), in place.

    U = upper Cholesky of [H⁻¹]_QQ, i.e. the first |Q| rows of the upper Cholesky of H⁻¹ permuted with Q first.
    Local: Err = W_Q U⁻¹ (= the column-by-column loop). Global: W_R -= Err · U_QR with U_QR = U⁻ᵀ [H⁻¹]_QR.
    Downdate: with Z = U⁻ᵀ [H⁻¹]_Q: the masked inverse is H⁻¹ - Zᵀ Z on the other columns (the block-inverse identity
    (H_RR)⁻¹ = [H⁻¹]_RR - [H⁻¹]_RQ ([H⁻¹]_QQ)⁻¹ [H⁻¹]_QR), identity on Q: 2 n² |Q| flops instead of a new inverse.
    """
    U = _cholesky(Hinv[Q][:, Q], upper=True, damp=percdamp)                     # fresh copy: damping stays local
    Z = torch.linalg.solve_triangular(U.T, Hinv[Q], upper=False)                # [|Q|, n] = U⁻ᵀ [H⁻¹]_Q:
    if compensate:  # W_R -= Err Z_R as one in-place product: Z is zero on the removed columns, W_Q is zeroed below
        W.addmm_(torch.linalg.solve_triangular(U, W[:, Q], upper=True, left=False), Z, alpha=-1)
    W[:, Q] = 0.0
    Hinv.addmm_(Z.T, Z, alpha=-1)
    _mask(Hinv, Q)


# ----------------------------------------------------------------------------- scores

def _head_scores(W: Tensor, Hinv: Tensor, head_dim: int, grouped_cholesky: bool, percdamp: float) -> Tensor:
    """Per-head OBS error estimate Σ_{cols of head} Σ_rows W² / d  (d: grouped-Cholesky pivots or raw diag H⁻¹)."""
    nh = W.shape[1] // head_dim
    if grouped_cholesky:
        idx = torch.arange(nh, device=W.device)
        blocks = Hinv.view(nh, head_dim, nh, head_dim)[idx, :, idx, :]          # [nh, hd, hd] diagonal blocks
        d = _cholesky(blocks, damp=percdamp).diagonal(dim1=-2, dim2=-1).reshape(-1) ** 2
    else:
        d = torch.diag(Hinv)
    return W.square().sum(0).div_(d).view(nh, head_dim).sum(1)


def _joint_errors(W: Tensor, Hinv: Tensor, units: Tensor, percdamp: float) -> Tensor:
    """Exact joint OBS error tr(W_Q ([H⁻¹]_QQ)⁻¹ W_Qᵀ) = ||W_Q U_QQ⁻¹||² for each row of column sets `units` [k, m]."""
    blocks = Hinv[units[:, :, None], units[:, None, :]]                          # [k, m, m]
    U = _cholesky(blocks, upper=True, damp=percdamp)
    Wq = W[:, units].permute(1, 0, 2)                                            # [k, out, m]
    return torch.linalg.solve_triangular(U, Wq, upper=True, left=False).pow(2).sum((1, 2))


def _head_columns(heads: list[int] | Tensor, head_dim: int, device) -> Tensor:
    heads = torch.as_tensor(heads, dtype=torch.long, device=device)
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=device)).reshape(-1)


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise UserError(f"slimgpt: unknown score {score!r}; use one of {', '.join(SCORES)}")


def _check_heads(weight: Tensor, head_dim: int) -> int:
    if head_dim <= 0 or weight.dim() != 2 or weight.shape[1] % head_dim:
        raise UserError(f"slimgpt: weight with shape {tuple(weight.shape)} does not split into heads of {head_dim} "
                        "columns; pass the o_proj weight and the model's head_dim")
    return weight.shape[1] // head_dim


def _check_groups(groups: list[list[int]], n_heads: int) -> None:
    flat = sorted(h for g in groups for h in g)
    if not groups or any(len(g) == 0 for g in groups) or flat != list(range(n_heads)):
        raise UserError(f"slimgpt: groups must split the {n_heads} query heads into non-empty KV groups, each head "
                        "in exactly one group")


# ----------------------------------------------------------------------------- greedy driver

def _greedy(weight: Tensor, hessian: Tensor, head_dim: int, units: list[list[int]], n_units: int, quota, *,
            compensate: bool, grouped_cholesky: bool, percdamp: float, score: str) -> tuple[Tensor, list[int]]:
    """Remove `n_units` units (lists of heads), one per iteration. quota(unit, removed) -> may this unit go now?"""
    W, H = _prepare(weight, hessian, percdamp)
    nh = W.shape[1] // head_dim
    dev = W.device
    unit_heads = torch.as_tensor(units, dtype=torch.long, device=dev)               # [k, m] (equal sizes)
    unit_cols = _head_columns(unit_heads.reshape(-1), head_dim, dev).view(len(units), -1)
    if score == "magnitude":
        compensate = False
    removed: list[int] = []
    Hinv = None
    for _ in range(n_units):
        if score == "magnitude":
            err = (W ** 2).sum(0).view(nh, head_dim).sum(1)[unit_heads].sum(1)
        else:
            if Hinv is None:
                Hinv = _inverse(H, percdamp)  # then kept current by _obs_remove's downdate
            if score == "exact":
                err = _joint_errors(W, Hinv, unit_cols, percdamp)
            else:
                err = _head_scores(W, Hinv, head_dim, grouped_cholesky, percdamp)[unit_heads].sum(1)
        allowed = torch.tensor([u not in removed and quota(u, removed) for u in range(len(units))], device=dev)
        err = torch.where(allowed, err, torch.full_like(err, float("inf")))
        best = int(torch.argmin(err))
        Q = unit_cols[best]
        if score == "magnitude":
            W[:, Q] = 0.0
        else:
            _obs_remove(W, Hinv, Q, compensate, percdamp)
        removed.append(best)
    return W.to(weight.dtype), sorted(removed)


def prune_heads(weight: Tensor, hessian: Tensor, head_dim: int, n_remove: int, *,
                groups: list[list[int]] | None = None, compensate: bool = True, grouped_cholesky: bool = True,
                percdamp: float = 0.01, score: str = "obs") -> tuple[Tensor, list[int]]:
    """Remove `n_remove` attention heads from o_proj [out, n_heads*head_dim] by Batched Greedy Pruning.

    hessian: [in, in] = (2/n) Σ x xᵀ of the o_proj input. One head per iteration: score every remaining head
    (score="obs": grouped-Cholesky estimate, or raw diag(H⁻¹) with grouped_cholesky=False; "exact": joint OBS error;
    "magnitude": squared L2 norm of the head's columns, never compensated), remove the lowest with the joint OBS
    update (compensate=False: only zero it), mask H and recompute H⁻¹.
    groups (GQA): KV groups as lists of query-head indices; n_remove/len(groups) heads are removed from every group
    (the greedy pick is restricted to groups that still owe removals).
    Returns (weight with the removed heads' columns exactly zero, sorted removed head indices).
    """
    _check_score(score)
    nh = _check_heads(weight, head_dim)
    if not 0 <= n_remove <= nh:
        raise UserError(f"slimgpt: cannot remove {n_remove} of {nh} heads; ask for 0..{nh}")
    head_group = [0] * nh
    per_group = n_remove
    if groups is not None:
        _check_groups(groups, nh)
        if n_remove % len(groups):
            raise UserError(f"slimgpt: {n_remove} heads cannot be removed evenly from {len(groups)} KV groups; "
                            f"use a multiple of {len(groups)}")
        per_group = n_remove // len(groups)
        smallest = min(len(g) for g in groups)
        if per_group > smallest:
            raise UserError(f"slimgpt: cannot remove {per_group} heads from a KV group of {smallest}; ask for fewer")
        for gi, g in enumerate(groups):
            for h in g:
                head_group[h] = gi

    def quota(u, removed):
        return sum(head_group[r] == head_group[u] for r in removed) < per_group

    return _greedy(weight, hessian, head_dim, [[h] for h in range(nh)], n_remove, quota, compensate=compensate,
                   grouped_cholesky=grouped_cholesky, percdamp=percdamp, score=score)


def prune_kv_groups(weight: Tensor, hessian: Tensor, head_dim: int, n_remove: int, groups: list[list[int]], *,
                    compensate: bool = True, grouped_cholesky: bool = True, percdamp: float = 0.01,
                    score: str = "obs") -> tuple[Tensor, list[int]]:
    """Remove `n_remove` whole KV groups (all their query heads at once) from o_proj, one group per iteration.

    Group error = sum of its heads' scores (score="exact": joint OBS error over the union of the group's columns);
    the OBS update is joint over that union. All groups must have the same number of heads.
    Returns (weight with the removed groups' columns exactly zero, sorted removed group indices).
    """
    _check_score(score)
    nh = _check_heads(weight, head_dim)
    _check_groups(groups, nh)
    if len({len(g) for g in groups}) != 1:
        raise UserError("slimgpt: KV groups must all have the same number of query heads")
    if not 0 <= n_remove <= len(groups):
        raise UserError(f"slimgpt: cannot remove {n_remove} of {len(groups)} KV groups; ask for 0..{len(groups)}")
    return _greedy(weight, hessian, head_dim, [list(g) for g in groups], n_remove, lambda u, removed: True,
                   compensate=compensate, grouped_cholesky=grouped_cholesky, percdamp=percdamp, score=score)


# ----------------------------------------------------------------------------- FFN channels

def dgs_schedule(target: int, *, dynamic_group_size: bool = True, fixed_group: int = 64) -> list[int]:
    """Group sizes used to remove `target` columns.

    Dynamic Group Size: b = (target - 512)//2; repeat cnt = min(remaining, max(b, 64), 1024), b = (b - 512)//2.
    Fixed (ablation): cnt = min(remaining, fixed_group).
    """
    if target < 0:
        raise UserError(f"slimgpt: cannot remove a negative number of channels ({target})")
    if not dynamic_group_size and fixed_group <= 0:
        raise UserError(f"slimgpt: fixed_group must be positive, got {fixed_group}")
    sizes, left, b = [], target, (target - 512) // 2
    while left > 0:
        cnt = min(left, max(b, 64), 1024) if dynamic_group_size else min(left, fixed_group)
        sizes.append(cnt)
        left -= cnt
        b = (b - 512) // 2
    return sizes


def prune_channels(weight: Tensor, hessian: Tensor, n_remove: int, *, dynamic_group_size: bool = True,
                   fixed_group: int = 64, compensate: bool = True, percdamp: float = 0.01,
                   score: str = "obs") -> tuple[Tensor, list[int]]:
    """Remove `n_remove` FFN channels (input columns of down_proj [out, intermediate]) group by group.

    Per group: err_col = Σ_rows W² / [H⁻¹]_jj, drop the cnt lowest alive columns with the joint OBS update, mask H
    (its inverse follows by the downdates of _LazyInverse, never re-inverted). cnt follows dgs_schedule.
    score="magnitude": the n_remove columns with the smallest L2 norm, no compensation. Returns (weight with removed
    columns exactly zero, sorted removed channel indices).
    """
    if score not in ("obs", "magnitude"):
        raise UserError(f"slimgpt: unknown channel score {score!r}; use obs or magnitude")
    if weight.dim() != 2 or not 0 <= n_remove <= weight.shape[1]:
        raise UserError(f"slimgpt: cannot remove {n_remove} channels from a weight of shape {tuple(weight.shape)}")
    sizes = dgs_schedule(n_remove, dynamic_group_size=dynamic_group_size, fixed_group=fixed_group)
    W, H = _prepare(weight, hessian, percdamp)
    if score == "magnitude":
        Q = torch.topk(W.norm(dim=0), n_remove, largest=False).indices
        W[:, Q] = 0.0
        return W.to(weight.dtype), sorted(Q.tolist())
    alive = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    Hinv = _inverse(H, percdamp)  # once; the removals' downdates are kept apart (_LazyInverse)
    del H
    lazy = _LazyInverse(Hinv, n_remove)
    for cnt in sizes:
        err = W.square().sum(0).div_(lazy.diag)  # Σ_rows W² / [H⁻¹]_jj (one division per column, not per weight)
        err[~alive] = float("inf")
        Q = torch.topk(err, cnt, largest=False).indices           # ascending error, like the permuted order
        HQ = lazy.rows(Q, alive)
        U = _cholesky(HQ[:, Q], upper=True, damp=percdamp)
        Z = torch.linalg.solve_triangular(U.T, HQ, upper=False)  # [|Q|, n] = U⁻ᵀ [H⁻¹]_Q, zero on removed columns
        if compensate:  # W_R -= Err Z_R; Z is zero on the removed columns, and W_Q is zeroed below
            W.addmm_(torch.linalg.solve_triangular(U, W[:, Q], upper=True, left=False), Z, alpha=-1)
        W[:, Q] = 0.0
        lazy.downdate(Z, Q)
        alive[Q] = False
    return W.to(weight.dtype), sorted((~alive).nonzero().flatten().tolist())


class _LazyInverse:
    """The masked inverse of the channel search without rewriting the n x n matrix after every removal.

    After removing column sets Q_1..Q_t, the inverse of H with them masked is H⁻¹ - Σ_s Z_sᵀ Z_s on the alive entries
    (each Z_s = U_s⁻ᵀ [current H⁻¹]_{Q_s}: the downdate of _obs_remove) and the identity on the removed ones. Only its
    diagonal (the scores) and the rows of the next Q are ever read, so the Z_s are stacked and those are formed on
    demand: 2 |Q| k n flops per removal (k removed so far) instead of the 2 n² |Q| of an in-place downdate, and no
    pass over the n x n matrix (at 7B widths, n = 11008, that pass dominated the search)."""

    def __init__(self, Hinv: Tensor, capacity: int):
        self.Hinv = Hinv
        self.diag = Hinv.diagonal().clone()
        self.buf = Hinv.new_empty(capacity, Hinv.shape[0])  # the stacked Z_s (rows 0..k), filled in place
        self.k = 0

    def rows(self, Q: Tensor, alive: Tensor) -> Tensor:
        """Rows Q (alive) of the current masked inverse: zero on the removed columns."""
        HQ = self.Hinv[Q]
        if self.k:
            Z = self.buf[:self.k]
            HQ.addmm_(Z[:, Q].T, Z, alpha=-1)
        HQ[:, ~alive] = 0.0
        return HQ

    def downdate(self, Z: Tensor, Q: Tensor) -> None:
        self.diag -= Z.square().sum(0)
        self.diag[Q] = 1.0
        self.buf[self.k:self.k + Z.shape[0]] = Z
        self.k += Z.shape[0]


# ----------------------------------------------------------------------------- block-level solver (engine protocol)

def plan_block(ratio: float, heads: int, kv_heads: int, head_dim: int, hidden: int, channels: int, *,
               gqa: str = "heads", budget: str = "params") -> tuple[int, int, int]:
    """(query heads, KV heads, FFN channels) to remove from a block pruned at `ratio`.

    Heads are removed in steps that keep GQA valid: one query head per KV group (gqa="heads", KV heads stay) or one
    whole KV group (gqa="kv-groups"; always for multi-head attention); the step count is round(ratio·heads / step),
    and at least one step of heads is kept. Channels: budget="ratio" removes round(ratio·channels) (SlimGPT: the same
    ratio for heads and channels); budget="params" (default) picks the channel count whose removed parameters
    (3·hidden each) bring the block's removed weights closest to ratio × its weights, so the coarse head steps do not
    move the parameter budget. At least one channel is kept.
    """
    if gqa not in GQA_MODES:
        raise UserError(f"slimgpt: unknown gqa mode {gqa!r}; use one of {', '.join(GQA_MODES)}")
    if budget not in ("params", "ratio"):
        raise UserError(f"slimgpt: unknown budget {budget!r}; use params or ratio")
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"slimgpt: block ratio {ratio} is outside [0, 1]")
    rep = heads // kv_heads
    kv_mode = gqa == "kv-groups" or rep == 1
    step = rep if kv_mode else kv_heads
    steps = min(heads // step - 1, math.floor(ratio * heads / step + 0.5))
    q_rm = steps * step
    kv_rm = steps if kv_mode else 0
    if budget == "ratio":
        ch = math.floor(ratio * channels + 0.5)
    else:
        total = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * channels
        attn = hidden * head_dim * (2 * q_rm + 2 * kv_rm)
        ch = math.floor((ratio * total - attn) / (3 * hidden) + 0.5)
    return q_rm, kv_rm, max(0, min(channels - 1, ch))


def group_magnitude(block, adapter, head_dim: int, q_rm: int, kv_rm: int, ch_rm: int):
    """Structured magnitude baseline: the squared L2 norm of all the weights that go with a unit, lowest removed first.

    Query head: its q_proj rows and o_proj columns; KV group (kv_rm > 0): its query heads plus its k/v rows; channel:
    its gate/up rows and down_proj column. Without kv_rm, q_rm / kv_heads heads go from every KV group (valid GQA).
    Returns (query heads, KV heads, channels) to remove, sorted; ties go to the lower index.
    """
    lin = adapter.linears(block)
    sq = lambda role: adapter.get_weight(lin[role]).detach().float().pow(2)  # noqa: E731
    nh, nkv, _ = structured.block_widths(block, adapter, head_dim)
    rep = nh // nkv
    head = sq(adapter.q).view(nh, -1).sum(1) + sq(adapter.o).view(-1, nh, head_dim).sum((0, 2))
    if kv_rm:
        group = head.view(nkv, rep).sum(1) + sq(adapter.k).view(nkv, -1).sum(1) + sq(adapter.v).view(nkv, -1).sum(1)
        kv = sorted(torch.argsort(group, stable=True)[:kv_rm].tolist())
        heads = [g * rep + j for g in kv for j in range(rep)]
    else:
        per = q_rm // nkv
        kv = []
        heads = sorted(g * rep + j for g in range(nkv)
                       for j in torch.argsort(head.view(nkv, rep)[g], stable=True)[:per].tolist())
    ch = sq(adapter.gate).sum(1) + sq(adapter.up).sum(1) + sq(adapter.down).sum(0)
    return heads, kv, sorted(torch.argsort(ch, stable=True)[:ch_rm].tolist())


@register_solver
class SlimGPT:
    """Block-level solver for the engine: heads of o_proj first, then FFN channels of down_proj with statistics
    re-collected through the pruned attention; the block is made physically smaller (layerprune.models.structured).

    Options: gqa ("heads" | "kv-groups"), budget ("params" | "ratio"), score ("obs" | "magnitude": the structured
    magnitude baseline, see group_magnitude; no calibration statistics, no compensation), compensate,
    grouped_cholesky, dynamic_group_size / fixed_group, percdamp.
    """

    name = "slimgpt"
    summary = "structured: heads + FFN channels"
    needs = frozenset({"hessian"})
    block_level = True
    options = (Option("gqa", str, "heads", "slimgpt: remove query heads evenly within KV groups, or whole KV groups",
                      choices=GQA_MODES),
               Option("budget", str, "params", "slimgpt: FFN channels fill the block's parameter budget, or use the "
                      "head ratio", choices=("params", "ratio"), flag="--slim-budget"),
               Option("score", str, "obs", "slimgpt: OBS error, or the structured-magnitude baseline (L2 norm)",
                      choices=("obs", "magnitude"), flag="--slim-score"),
               Option("compensate", bool, True, "slimgpt ablation: no OBS weight update", flag="--no-compensate"),
               Option("grouped_cholesky", bool, True, "slimgpt ablation: raw diag(H^-1) head score, no grouped "
                      "Cholesky", flag="--no-gcd"),
               Option("fixed_group", positive_int, None, "slimgpt ablation: fixed FFN group size instead of Dynamic "
                      "Group Size"),
               Option("percdamp", float, None, "damping, fraction of mean diag (0.01)"))

    @classmethod
    def resolve_options(cls, o: dict) -> dict:
        """Flag values -> options: a fixed group size turns Dynamic Group Size off."""
        opts = {k: o[k] for k in ("gqa", "budget", "score", "compensate", "grouped_cholesky")}
        if o["fixed_group"] is not None:
            opts.update(dynamic_group_size=False, fixed_group=o["fixed_group"])
        if o["percdamp"] is not None:
            opts["percdamp"] = o["percdamp"]
        return opts

    OPTIONS = ("gqa", "budget", "score", "compensate", "grouped_cholesky", "dynamic_group_size", "fixed_group",
               "percdamp")

    def check_options(self, options: dict) -> dict:
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise UserError(f"slimgpt: unknown option(s) {sorted(unknown)}; known options: {', '.join(self.OPTIONS)}")
        o = {"gqa": "heads", "budget": "params", "score": "obs", "compensate": True, "grouped_cholesky": True,
             "dynamic_group_size": True, "fixed_group": 64, "percdamp": 0.01, **options}
        if o["score"] not in ("obs", "magnitude"):
            raise UserError(f"slimgpt: unknown score {o['score']!r}; use obs or magnitude")
        plan_block(0.0, 1, 1, 1, 1, 2, gqa=o["gqa"], budget=o["budget"])  # validates the two modes
        return o

    def check_model(self, model, adapter, options: dict) -> None:
        """Before any work (the engine's preflight; a meta skeleton will do): the options, whether heads/channels can
        be removed from this family, and whether every outcome can be saved as a config."""
        self.check_options(options)
        structured.check_expressible(model)

    def program(self, model, adapter, cfg) -> "SlimGPTProgram":
        """The engine's block program for one run (layerprune.solvers.program)."""
        return SlimGPTProgram(self, adapter, adapter.geometry(model.config), cfg.solver_options)


class SlimGPTProgram:
    """SlimGPT on one block at a time: heads of o_proj first (its Hessian collected from the block as it is), then FFN
    channels of down_proj (Hessian re-collected through the pruned attention); the rows/columns are removed."""

    changes_shapes = True

    def __init__(self, solver: SlimGPT, adapter, geometry, options: dict):
        self.solver, self.adapter, self.geometry, self.options = solver, adapter, geometry, options

    def check(self, model) -> None:
        self.solver.check_model(model, self.adapter, self.options)

    def run(self, block, collect, targets) -> list[dict]:
        """Prune one block in place to ``targets.ratio``. Returns one record row per linear (shape after and before,
        achieved = removed fraction of the parameters before)."""
        adapter, ratio = self.adapter, targets.ratio
        o = self.solver.check_options(self.options)
        structured.check_structured(adapter)
        hd = self.geometry.head_dim
        before = {n: tuple(adapter.get_weight(m).shape) for n, m in adapter.linears(block).items()}
        nh, nkv, nch = structured.block_widths(block, adapter, hd)
        q_rm, kv_rm, ch_rm = plan_block(ratio, nh, nkv, hd, before[adapter.q][1], nch, gqa=o["gqa"],
                                        budget=o["budget"])
        errors = {}
        if o["score"] == "magnitude":
            heads, gone, chans = group_magnitude(block, adapter, hd, q_rm, kv_rm, ch_rm)
            if heads:
                structured.remove_heads(block, adapter, hd, heads, gone)
            if chans:
                structured.remove_channels(block, adapter, chans)
        else:
            heads, gone, chans = [], [], []
            if q_rm:  # attention first: OBS on the o_proj input columns, one head (or KV group) per iteration
                rep = nh // nkv
                groups = [list(range(g * rep, (g + 1) * rep)) for g in range(nkv)]
                w, st = self._weight_and_stats(block, collect, adapter.o)
                kw = dict(compensate=o["compensate"], grouped_cholesky=o["grouped_cholesky"], percdamp=o["percdamp"])
                if kv_rm:
                    new, gone = prune_kv_groups(w, st.hessian, hd, kv_rm, groups, **kw)
                    heads = [h for g in gone for h in groups[g]]
                else:
                    new, heads = prune_heads(w, st.hessian, hd, q_rm, groups=groups, **kw)
                errors[adapter.o] = relative_error(w, new, st)
                adapter.set_weight(adapter.linears(block)[adapter.o], new)
                structured.remove_heads(block, adapter, hd, heads, gone)
            if ch_rm:  # then the FFN, its Hessian collected through the pruned attention
                w, st = self._weight_and_stats(block, collect, adapter.down)
                new, chans = prune_channels(w, st.hessian, ch_rm, dynamic_group_size=o["dynamic_group_size"],
                                            fixed_group=o["fixed_group"], compensate=o["compensate"],
                                            percdamp=o["percdamp"])
                errors[adapter.down] = relative_error(w, new, st)
                adapter.set_weight(adapter.linears(block)[adapter.down], new)
                structured.remove_channels(block, adapter, chans)
        info = {adapter.o: {"heads_removed": heads, "kv_heads_removed": gone},
                adapter.down: {"channels_removed": len(chans)}}
        rows = []
        for name, m in adapter.linears(block).items():
            shape = tuple(adapter.get_weight(m).shape)
            rows.append({"name": name, "shape": list(shape), "shape_before": list(before[name]), "target": ratio,
                         "achieved": 1.0 - shape[0] * shape[1] / (before[name][0] * before[name][1]),
                         "rel_error": errors.get(name), **info.get(name, {})})
        return rows

    def _weight_and_stats(self, block, collect, name):
        w = self.adapter.get_weight(self.adapter.linears(block)[name]).detach()
        return w, collect([name], {"hessian"})[name]

    def load_block(self, block, state_dict) -> None:
        """Resume: load a pruned block's saved weights into a block of any width."""
        structured.load_block(block, self.adapter, self.geometry.head_dim, state_dict)

    def finish(self, model) -> dict:
        """After the last block: make the model's config describe the new widths."""
        return {"structure": structured.finalize(model)}
