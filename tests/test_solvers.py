"""Intra-layer solvers: exact budgets, brute-force references, SparseGPT numerics and edge cases."""
import math
import warnings

import numpy as np
import pytest
import torch

from layerprune.errors import UserError
from layerprune.solvers import SOLVERS, get_solver, nm_for_ratio, parse_nm, relative_error
from layerprune.solvers.nm import check_nm
from layerprune.stats import LayerStats

NAMES = ["magnitude", "wanda", "sparsegpt", "alps"]


def make_stats(X):
    X = X.float()
    return LayerStats(ntokens=X.shape[0], sq_norm=X.square().sum(0), hessian=(2 / X.shape[0]) * X.T @ X, sample=X)


def correlated_x(tokens, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / math.sqrt(width) + 0.5 * torch.eye(width)
    scale = torch.exp(torch.randn(width, generator=g))
    return (torch.randn(tokens, width, generator=g) @ mix) * scale


def rand_w(rows, cols, seed=1):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def zeros(t):
    return int((t == 0).sum())


def brute_row_mask(score, s):
    """Per-row lowest floor(s*in), extras to the rows with the lowest next candidate (numpy, row by row)."""
    score = score.numpy()
    rows, cols = score.shape
    k = round(s * rows * cols)
    base = math.floor(s * cols + 1e-9)
    orders = [np.argsort(score[r], kind="stable") for r in range(rows)]
    counts = [base] * rows
    extra = k - rows * base
    if extra:
        nxt = np.array([score[r, orders[r][base]] for r in range(rows)])
        for r in np.argsort(nxt, kind="stable")[:extra]:
            counts[r] += 1
    mask = np.zeros_like(score, dtype=bool)
    for r in range(rows):
        mask[r, orders[r][:counts[r]]] = True
    return torch.from_numpy(mask)


def ref_sparsegpt(W, H, s=None, nm=None, percdamp=0.01):
    """Unblocked SparseGPT: full-width update after every column; unstructured mask chosen once from all columns."""
    W = W.double().clone()
    H = H.double().clone()
    H += percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    d = U.diagonal()
    rows, cols = W.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if nm is None:
        score = (W.square() / d.square()).flatten()
        mask.view(-1)[torch.argsort(score)[:round(s * W.numel())]] = True
    for j in range(cols):
        if nm is not None and j % nm[1] == 0:
            score = W[:, j:j + nm[1]].square() / d[j:j + nm[1]].square()
            idx = torch.argsort(score, dim=1)[:, :nm[0]]
            mask[:, j:j + nm[1]] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
        err = W[:, j] * mask[:, j] / d[j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
        W[:, j][mask[:, j]] = 0
    return W.float()


# ---------------------------------------------------------------- registry and validation

def test_registry():
    assert set(SOLVERS) == set(NAMES)
    assert get_solver("magnitude").needs == frozenset()
    assert get_solver("wanda").needs == frozenset({"sq_norm"})
    assert get_solver("sparsegpt").needs == frozenset({"hessian"})
    for name in NAMES:
        assert get_solver(name).name == name
    with pytest.raises(UserError, match="wanda"):
        get_solver("wandaa")


def test_parse_and_check_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 4:8 ") == (4, 8)
    for bad in ["2-4", "a:b", "4:2", "4:4", "0:4", "2:4:8", "", "-1:4"]:
        with pytest.raises(UserError):
            parse_nm(bad)
    assert check_nm((2, 4), 16) == (2, 4) and check_nm("1:4", 8) == (1, 4)
    for bad in [(4, 4), (5, 4), (0, 4), (2.0, 4), (2,)]:
        with pytest.raises(UserError):
            check_nm(bad, 16)
    with pytest.raises(UserError, match="multiple"):
        check_nm((2, 4), 10)


@pytest.mark.parametrize("name", NAMES)
def test_validation_errors(name):
    W = rand_w(4, 12)
    stats = make_stats(correlated_x(32, 12))
    solver = get_solver(name)
    for bad_nm in [(4, 4), (3, 2), (2, 8)]:  # n >= m, n >= m, 8 does not divide 12
        with pytest.raises(UserError):
            solver.prune(W, stats, 0.5, nm=bad_nm)
    for bad_s in [-0.1, 1.5, float("nan")]:
        with pytest.raises(UserError):
            solver.prune(W, stats, bad_s)
    with pytest.raises(UserError, match="unknown option"):
        solver.prune(W, stats, 0.5, not_an_option=1)


def test_nm_for_ratio():
    for m in [2, 4, 8, 16]:
        for ratio in np.linspace(0, 1, 101):
            n = nm_for_ratio(float(ratio), m)
            assert 1 <= n <= m - 1
            dists = {c: abs(c / m - ratio) for c in range(1, m)}
            best = min(dists.values())
            assert dists[n] <= best + 1e-12
    assert nm_for_ratio(0.5, 4) == 2 and nm_for_ratio(0.0, 8) == 1 and nm_for_ratio(1.0, 8) == 7
    with pytest.raises(UserError):
        nm_for_ratio(1.5, 4)
    with pytest.raises(UserError):
        nm_for_ratio(0.5, 1)


# ---------------------------------------------------------------- exact budgets

SHAPES = [((8, 576), 0.7), ((16, 24), 0.5), ((7, 13), 0.33), ((5, 10), 0.0), ((3, 7), 0.9), ((12, 64), 0.123),
          ((9, 50), 0.61), ((4, 6), 1.0)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,s", SHAPES)
def test_exact_unstructured_count(name, shape, s):
    rows, cols = shape
    W = rand_w(rows, cols)
    stats = make_stats(correlated_x(4 * cols, cols))
    opts = {"blocksize": 16} if name == "sparsegpt" else {}
    out = get_solver(name).prune(W, stats, s, **opts)
    assert out.shape == W.shape
    assert zeros(out) == round(s * W.numel())
    outs = [out] if name == "wanda" else []
    if name == "magnitude":
        outs.append(get_solver(name).prune(W, stats, s, scope="row"))
    for o in outs:  # per-row groups: exact total, every row gets floor(s*in) or one more
        per_row = (o == 0).sum(1)
        base = math.floor(s * cols + 1e-9)
        assert zeros(o) == round(s * W.numel()) and ((per_row == base) | (per_row == base + 1)).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_exact_nm(name, nm):
    n, m = nm
    rows, cols = 10, 48
    W = rand_w(rows, cols)
    stats = make_stats(correlated_x(128, cols))
    opts = {"blocksize": 20} if name == "sparsegpt" else {}  # 20 is not a multiple of 8
    out = get_solver(name).prune(W, stats, 0.123, nm=nm, **opts)  # sparsity is ignored with nm
    per_group = (out == 0).reshape(rows, cols // m, m).sum(-1)
    assert (per_group == n).all()


# ---------------------------------------------------------------- brute-force references

def test_magnitude_matrix_and_row_vs_bruteforce():
    W = rand_w(6, 40) * torch.linspace(0.1, 3.0, 6)[:, None]  # rows with very different scales
    stats = LayerStats()
    s = 0.55
    k = round(s * W.numel())
    mat = get_solver("magnitude").prune(W, stats, s)
    row = get_solver("magnitude").prune(W, stats, s, scope="row")
    ref_mat = np.zeros(W.numel(), dtype=bool)
    ref_mat[np.argsort(W.abs().flatten().numpy(), kind="stable")[:k]] = True
    assert torch.equal(mat == 0, torch.from_numpy(ref_mat).reshape(W.shape))
    assert torch.equal(row == 0, brute_row_mask(W.abs(), s))
    assert not torch.equal(mat, row)
    # matrix scope: every pruned |w| <= every kept |w|; row scope: the same inside each row
    assert W.abs()[mat == 0].max() <= W.abs()[mat != 0].min()
    for r in range(W.shape[0]):
        assert W[r].abs()[row[r] == 0].max() <= W[r].abs()[row[r] != 0].min()
    assert torch.equal(mat[mat != 0], W[mat != 0]) and torch.equal(row[row != 0], W[row != 0])
    with pytest.raises(UserError, match="scope"):
        get_solver("magnitude").prune(W, stats, s, scope="layer")


@pytest.mark.parametrize("s", [0.5, 0.7, 0.37])
def test_wanda_vs_bruteforce(s):
    rows, cols = 9, 30
    W = rand_w(rows, cols)
    X = correlated_x(64, cols)
    stats = make_stats(X)
    out = get_solver("wanda").prune(W, stats, s)
    score = W.abs() * X.norm(dim=0)[None, :]
    assert torch.equal(out == 0, brute_row_mask(score, s))
    assert torch.equal(out[out != 0], W[out != 0])


def test_nm_picks_lowest_in_group():
    W = rand_w(5, 16)
    X = correlated_x(64, 16)
    score = W.abs() * X.norm(dim=0)[None, :]
    out = get_solver("wanda").prune(W, make_stats(X), 0.0, nm=(2, 4))
    mag = get_solver("magnitude").prune(W, LayerStats(), 0.0, nm=(2, 4))
    for r in range(5):
        for g in range(4):
            sl = slice(4 * g, 4 * g + 4)
            ref = set(np.argsort(score[r, sl].numpy(), kind="stable")[:2].tolist())
            assert set(torch.nonzero(out[r, sl] == 0).flatten().tolist()) == ref
            ref = set(np.argsort(W[r, sl].abs().numpy(), kind="stable")[:2].tolist())
            assert set(torch.nonzero(mag[r, sl] == 0).flatten().tolist()) == ref


def test_row_tiebreak_ties_do_not_change_counts():
    W = torch.ones(4, 10)  # all scores tie
    out = get_solver("magnitude").prune(W, LayerStats(), 0.35, scope="row")
    assert zeros(out) == 14 and sorted((out == 0).sum(1).tolist()) == [3, 3, 4, 4]
    out = get_solver("magnitude").prune(W, LayerStats(), 0.35)
    assert zeros(out) == 14


# ---------------------------------------------------------------- SparseGPT numerics

def test_sparsegpt_matches_unblocked_reference_unstructured():
    W = rand_w(12, 40)
    stats = make_stats(correlated_x(200, 40))
    out = get_solver("sparsegpt").prune(W, stats, 0.5, blocksize=40)  # one block = mask from all columns at once
    ref = ref_sparsegpt(W, stats.hessian, s=0.5)
    assert torch.equal(out == 0, ref == 0)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("blocksize", [4, 12, 128])
def test_sparsegpt_nm_matches_unblocked_reference(blocksize):
    W = rand_w(12, 48)
    stats = make_stats(correlated_x(200, 48))
    out = get_solver("sparsegpt").prune(W, stats, 0.0, nm=(2, 4), blocksize=blocksize)
    ref = ref_sparsegpt(W, stats.hessian, nm=(2, 4))
    assert torch.equal(out == 0, ref == 0)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_wanda_and_magnitude(nm):
    rows, cols = 32, 64
    W = rand_w(rows, cols)
    stats = make_stats(correlated_x(512, cols))
    errs = {n: relative_error(W, get_solver(n).prune(W, stats, 0.6, nm=nm), stats) for n in NAMES}
    assert errs["sparsegpt"] < errs["wanda"] and errs["sparsegpt"] < errs["magnitude"]
    assert all(0 < e < 2 for e in errs.values())


def test_relative_error_paths_agree():
    W = rand_w(8, 20)
    X = correlated_x(50, 20)
    pruned = get_solver("wanda").prune(W, make_stats(X), 0.5)
    e_h = relative_error(W, pruned, LayerStats(hessian=(2 / 50) * X.T @ X))
    e_x = relative_error(W, pruned, LayerStats(sample=X))
    ref = ((W - pruned) @ X.T).square().sum() / (W @ X.T).square().sum()
    assert e_h == pytest.approx(ref.item(), rel=1e-4) and e_x == pytest.approx(ref.item(), rel=1e-4)
    assert relative_error(W, W, LayerStats(sample=X)) == 0.0
    with pytest.raises(ValueError):
        relative_error(W, pruned, LayerStats())


def test_sparsegpt_dead_inputs():
    X = correlated_x(100, 32)
    X[:, [3, 17]] = 0
    stats = make_stats(X)
    assert stats.hessian[3, 3] == 0
    W = rand_w(10, 32)
    out = get_solver("sparsegpt").prune(W, stats, 0.5)
    assert torch.isfinite(out).all() and zeros(out) == 160
    assert (out[:, [3, 17]] == 0).all()  # free to prune, so pruned first
    out = get_solver("sparsegpt").prune(W, stats, 0.5, nm=(2, 4))
    assert torch.isfinite(out).all() and ((out == 0).reshape(10, 8, 4).sum(-1) == 2).all()


def test_sparsegpt_not_pd_warns_then_raises():
    W = rand_w(6, 16)
    stats = LayerStats(hessian=torch.ones(16, 16))  # rank 1: exact zero pivot without damping
    with pytest.warns(UserWarning, match="positive definite"):
        out = get_solver("sparsegpt").prune(W, stats, 0.5, percdamp=0.0)
    assert torch.isfinite(out).all() and zeros(out) == 48
    H = torch.eye(16)
    H[0, 0] = -1e6  # indefinite: no damping of mean(diag) fixes it
    with pytest.raises(UserError, match="positive definite"):
        get_solver("sparsegpt").prune(W, LayerStats(hessian=H), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy Hessian never warns
        get_solver("sparsegpt").prune(W, make_stats(correlated_x(64, 16)), 0.5)


def test_sparsegpt_sparsity_zero_and_quantizer():
    W = rand_w(8, 24)
    stats = make_stats(correlated_x(96, 24))
    sgpt = get_solver("sparsegpt")
    assert torch.equal(sgpt.prune(W, stats, 0.0), W)
    full_path = sgpt.prune(W, stats, 0.0, quantizer=lambda j, col, block, mask: col)  # identity quantizer: no shortcut
    assert torch.allclose(full_path, W, atol=1e-5)
    seen = []

    def grid(j, col, block, mask):
        seen.append(j)
        return torch.round(col * 4) / 4

    out = sgpt.prune(W, stats, 0.5, quantizer=grid)
    assert seen == list(range(24)) and zeros(out) >= 96
    assert torch.equal(out, torch.round(out * 4) / 4)


# ---------------------------------------------------------------- contract: determinism, no in-place, dtype

@pytest.mark.parametrize("name", NAMES)
def test_deterministic_not_inplace_dtype(name):
    W = rand_w(16, 96)
    stats = make_stats(correlated_x(256, 96))
    solver = get_solver(name)
    before = W.clone()
    a, b = solver.prune(W, stats, 0.7), solver.prune(W, stats, 0.7)
    assert torch.equal(a, b) and torch.equal(W, before)
    assert a.dtype == W.dtype and a.device == W.device
    Wb = W.to(torch.bfloat16)
    before = Wb.clone()
    out = solver.prune(Wb, stats, 0.7)
    assert out.dtype == torch.bfloat16 and torch.equal(Wb, before)
    assert zeros(out) == round(0.7 * W.numel()) and torch.isfinite(out.float()).all()
    out = solver.prune(W.half(), stats, 0.0, nm=(2, 4))
    assert out.dtype == torch.float16 and zeros(out) == W.numel() // 2


# ---------------------------------------------------------------- the fast paths compute the same thing

def test_kth_lowest_is_kthvalue():
    from layerprune.solvers.common import kth_lowest

    g = torch.Generator().manual_seed(3)
    s = torch.randn(7, 50, generator=g)
    s[:, 10:20] = 0.5  # ties
    for k in (1, 13, 25, 50):
        assert torch.equal(kth_lowest(s, k), torch.kthvalue(s, k, dim=1).values)
    assert torch.equal(kth_lowest(s.bfloat16(), 5), torch.kthvalue(s.bfloat16(), 5, dim=1).values)


def test_relative_error_row_subset(monkeypatch):
    from layerprune.solvers import common
    from layerprune.solvers.common import relative_error

    X = correlated_x(300, 24)
    st = make_stats(X)
    W = rand_w(600, 24)
    pruned = get_solver("wanda").prune(W, st, 0.5)
    full = relative_error(W, pruned, st, max_rows=10 ** 6)
    ref = ((W - pruned) @ X.T).square().sum() / (W @ X.T).square().sum()
    assert full == pytest.approx(ref.item(), rel=1e-4)
    assert relative_error(W, pruned, st) == pytest.approx(full, rel=1e-6)  # rows x cols^2 small: exact
    monkeypatch.setattr(common, "ERROR_EXACT", 0)  # as for a 7B-wide layer
    assert relative_error(W[:60], pruned[:60], st) == pytest.approx(
        relative_error(W[:60], pruned[:60], st, max_rows=10 ** 6), rel=1e-6)  # <= 64 rows: exact
    sub = relative_error(W, pruned, st)  # 64 of 600 rows
    assert sub != full and sub == pytest.approx(full, rel=0.2)


def test_hessian_from_upper_bands_is_exact_and_symmetric():
    from layerprune.hooks import InputCollector

    X = correlated_x(500, 37)
    c = InputCollector({"hessian"})
    for part in X.split(128):
        c.add_batch(part)
    H = c.stats().hessian
    ref = (2 / 500) * X.double().T @ X.double()
    assert torch.equal(H, H.T)
    assert torch.allclose(H.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_sparsegpt_inverse_factor_and_group_cache():
    from layerprune.solvers.sparsegpt import reversed_cholesky, upper_inverse

    H = make_stats(correlated_x(1500, 600)).hessian
    R = torch.linalg.cholesky(H.double(), upper=True)
    assert torch.allclose(upper_inverse(R, leaf=64) @ R, torch.eye(600, dtype=torch.float64), atol=1e-9)
    R = reversed_cholesky(H, 0.01).double()
    damped = H.double() + 0.01 * H.double().diagonal().mean() * torch.eye(600, dtype=torch.float64)
    assert torch.equal(R, R.triu()) and (R.diagonal() > 0).all()
    assert torch.allclose(R @ R.T, damped, rtol=1e-4, atol=1e-4 * damped.abs().max().item())
    U = torch.linalg.inv(R)  # the factor the sweep uses block by block: U^T U = damped^-1
    assert torch.allclose(U.T @ U @ damped, torch.eye(600, dtype=torch.float64), atol=1e-3)
    st = make_stats(correlated_x(200, 32))
    sgpt = get_solver("sparsegpt")
    a = sgpt.prune(rand_w(8, 32, 1), st, 0.5)
    assert len(st.derived) == 1  # the factor is kept for the group's next linear
    b = sgpt.prune(rand_w(8, 32, 2), st, 0.5)
    assert len(st.derived) == 1 and not torch.equal(a, b)
    assert torch.equal(b, sgpt.prune(rand_w(8, 32, 2), make_stats(correlated_x(200, 32)), 0.5))


def test_hessian_with_one_nan_or_inf_is_refused_and_overflowing_sums_are_not():
    from layerprune.solvers.common import all_finite
    from layerprune.solvers.slimgpt import prune_channels

    H = make_stats(correlated_x(200, 32)).hessian
    assert all_finite(H)
    big = torch.full((4, 4), 3e38)  # finite, but the fp32 sum overflows: the exact check decides
    assert all_finite(big)
    for bad in (float("nan"), float("inf")):
        for where in ((3, 5), (5, 3), (7, 7)):  # lower, upper triangle, diagonal: one entry is enough
            Hb = H.clone()
            Hb[where] = bad
            assert not all_finite(Hb)
            with pytest.raises(ValueError, match="NaN/inf"):
                get_solver("sparsegpt").prune(rand_w(8, 32, 1), LayerStats(200, None, Hb, None), 0.5)
            with pytest.raises(UserError, match="NaN/inf"):
                prune_channels(rand_w(8, 32, 1), Hb, 4)


def test_sparsegpt_blocked_factor_matches_one_call(monkeypatch):
    import layerprune.solvers.sparsegpt as sg

    st = make_stats(correlated_x(1500, 600))
    H = st.hessian
    monkeypatch.setattr(sg, "CHOL_MIN", 10 ** 6)  # blocks wider than the matrix: one LAPACK call
    monkeypatch.setattr(sg, "CHOL_BLOCK", 10 ** 6)
    one = sg.reversed_cholesky(H, 0.01)
    monkeypatch.setattr(sg, "CHOL_BLOCK", 64)  # 600 = 9 blocks of 64 and one of 24
    R = sg.reversed_cholesky(H, 0.01)
    damped = H.double() + 0.01 * H.double().diagonal().mean() * torch.eye(600, dtype=torch.float64)
    assert torch.equal(R, R.triu()) and (R.diagonal() > 0).all()
    assert torch.allclose(R.double() @ R.double().T, damped, rtol=1e-4, atol=1e-4 * damped.abs().max().item())
    assert torch.allclose(R, one, rtol=1e-3, atol=1e-5 * one.abs().max().item())
    assert torch.equal(H, st.hessian)  # not changed
    w = rand_w(16, 600, 3)
    monkeypatch.setattr(sg, "CHOL_BLOCK", 10 ** 6)
    ref = get_solver("sparsegpt").prune(w, make_stats(correlated_x(1500, 600)), 0.5)
    monkeypatch.setattr(sg, "CHOL_BLOCK", 64)
    out = get_solver("sparsegpt").prune(w, make_stats(correlated_x(1500, 600)), 0.5)
    assert ((out == 0) != (ref == 0)).float().mean() < 0.01  # rounding may flip a near tie, no more
    assert torch.allclose(out, ref, atol=1e-3 * w.abs().max().item())
    singular = torch.zeros(600, 600)
    singular[:300, :300] = H[:300, :300]  # the last 300 inputs always zero: dead, not an error
    singular[0, 0] = -1.0  # not positive definite without more damping
    with pytest.warns(UserWarning, match="not positive definite"):
        R = sg.reversed_cholesky(singular, 0.0)
    assert torch.isfinite(R).all()


@pytest.mark.parametrize("kw", [{}, {"nm": (2, 4)}, {"wbits": 4, "groupsize": 16}],
                         ids=["unstructured", "2:4", "w4g16"])
def test_sparsegpt_group_sweep_equals_one_weight_at_a_time(kw):
    """prune_group (the linears of one input, e.g. q/k/v, in one sweep) gives each weight exactly what prune gives it
    alone: each mask over its own rows and its own sparsity (0 too), dead inputs, a bf16 weight among fp32 ones."""
    X = correlated_x(400, 48)
    X[:, 5] = 0  # a dead input
    st = make_stats(X)
    ws = [rand_w(40, 48, 1), rand_w(8, 48, 2).bfloat16(), rand_w(24, 48, 3)]
    sp = [0.5, 0.3, 0.0] if "wbits" not in kw else [0.5, 0.5, 0.5]
    nm = kw.get("nm")
    opts = {k: v for k, v in kw.items() if k != "nm"}
    sg = get_solver("sparsegpt")
    group = sg.prune_group(ws, st, sp, nm, blocksize=32, **opts)
    for w, s, g in zip(ws, sp, group):
        one = sg.prune(w, st, s, nm, blocksize=32, **opts)
        assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous()
        assert torch.equal(g, one)
        if nm is None and "wbits" not in kw:
            assert zeros(g) == round(s * w.numel()) + zeros(w) * (s == 0)
    with pytest.raises(ValueError):
        sg.prune_group([rand_w(4, 48), rand_w(4, 40)], st, [0.5, 0.5])
