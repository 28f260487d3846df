"""ALPS: brute-force float64 references on small shapes, exact patterns, the PCG refit, options and the CLI."""
import itertools

import numpy as np
import pytest
import torch

from layerprune.errors import UserError
from layerprune.solvers import get_solver, relative_error
from layerprune.solvers.alps import normalized_hessian
from layerprune.stats import LayerStats
from test_solvers import correlated_x, make_stats, rand_w


def objective(W, Wp, H):
    d = (W - Wp).double()
    return float(((d @ H.double()) * d).sum())


def ls_on_support(W, H, keep):
    """Row by row in float64: the weights on ``keep`` minimizing (w - w0) H (w - w0)^T, zero elsewhere."""
    W, H = W.double(), H.double()
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        S = keep[r].nonzero().flatten()
        if len(S):
            out[r, S] = torch.linalg.solve(H[S][:, S], (W[r] @ H)[S])
    return out


def brute_optimum(W, H, n_pruned):
    """min over every zero pattern with n_pruned zeros of the least-squares objective: per row the best value for each
    support size (all 2^cols supports), then the best split of the kept count among the rows."""
    W, H = W.double(), H.double()
    rows, cols = W.shape
    best = np.full((rows, cols + 1), np.inf)
    for bits in range(1 << cols):
        keep = torch.tensor([bool(bits >> j & 1) for j in range(cols)]).expand(rows, cols)
        d = W - ls_on_support(W, H, keep)
        vals = ((d @ H) * d).sum(1)
        best[:, len(keep[0].nonzero())] = np.minimum(best[:, len(keep[0].nonzero())], vals.numpy())
    kept = rows * cols - n_pruned
    return min(sum(best[r, k] for r, k in enumerate(ks))
               for ks in itertools.product(range(cols + 1), repeat=rows) if sum(ks) == kept)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("s", [0.5, 0.7])
def test_alps_between_brute_force_optimum_and_sparsegpt(seed, s):
    W = rand_w(3, 10, seed=seed)
    stats = make_stats(correlated_x(64, 10, seed=seed))
    H = stats.hessian  # undamped (percdamp 0): both solvers minimize exactly the objective compared here
    a = get_solver("alps").prune(W, stats, s, percdamp=0.0)
    g = get_solver("sparsegpt").prune(W, stats, s, percdamp=0.0)
    assert int((a == 0).sum()) == round(s * 30)
    opt = brute_optimum(W, H, round(s * 30))
    assert opt <= objective(W, a, H) * (1 + 1e-6)
    assert objective(W, a, H) <= objective(W, g, H)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_alps_beats_sparsegpt_and_counts_are_exact(nm):
    W = rand_w(48, 96)
    stats = make_stats(correlated_x(512, 96))
    a = get_solver("alps").prune(W, stats, 0.6, nm=nm)
    g = get_solver("sparsegpt").prune(W, stats, 0.6, nm=nm)
    assert relative_error(W, a, stats) < relative_error(W, g, stats)
    if nm is None:
        assert int((a == 0).sum()) == round(0.6 * W.numel())
    else:
        n, m = nm
        assert ((a == 0).reshape(48, 96 // m, m).sum(-1) == n).all()  # exactly n of every m, in every row
    assert a.dtype == W.dtype and torch.isfinite(a).all()
    assert not torch.signbit(a[a == 0]).any()  # +0.0 only


def test_refit_is_the_least_squares_solution_on_its_support():
    W = rand_w(16, 24)
    stats = make_stats(correlated_x(128, 24))
    Hd = stats.hessian.double().clone()
    Hd.diagonal().add_(0.01 * Hd.diagonal().mean())  # the damped Hessian ALPS solves with
    for nm in (None, (2, 4)):
        a = get_solver("alps").prune(W, stats, 0.7, nm=nm, pcg_iters=100)
        ref = ls_on_support(W, Hd, a != 0)
        # PCG stops at a residual of 1e-4 of the right-hand side: the optimum's value to ~1e-7, its weights to ~1e-3
        assert objective(W, a, Hd) <= objective(W, ref, Hd) * (1 + 1e-6)
        assert torch.allclose(a.double(), ref, atol=1e-2)
        short = get_solver("alps").prune(W, stats, 0.7, nm=nm, pcg_iters=0)  # no refit: ADMM's own iterate
        assert torch.equal(short == 0, a == 0)
        assert objective(W, a, Hd) <= objective(W, short, Hd)


def test_normalized_hessian_and_dead_inputs():
    X = correlated_x(100, 32)
    X[:, [3, 17]] = 0
    stats = make_stats(X)
    Hn, s, dead = normalized_hessian(stats.hessian, 0.01, "cpu")
    assert torch.allclose(Hn.diagonal(), torch.ones(32))
    assert torch.allclose(Hn, Hn.T) and bool(torch.isfinite(Hn).all()) and dead.nonzero().flatten().tolist() == [3, 17]
    W = rand_w(10, 32)
    out = get_solver("alps").prune(W, stats, 0.5)
    assert torch.isfinite(out).all() and int((out == 0).sum()) == 160
    assert (out[:, [3, 17]] == 0).all()  # a dead input's weight does nothing: pruned first


def test_group_equals_one_at_a_time_and_deterministic():
    X = correlated_x(256, 40)
    ws = [rand_w(12, 40, seed=1), rand_w(20, 40, seed=2)]
    stats = make_stats(X)
    group = get_solver("alps").prune_group(ws, stats, [0.5, 0.7])
    single = [get_solver("alps").prune(w, make_stats(X), s) for w, s in zip(ws, [0.5, 0.7])]
    assert all(torch.equal(a, b) for a, b in zip(group, single))
    assert torch.equal(get_solver("alps").prune(ws[0], make_stats(X), 0.5), single[0])


def test_bad_options():
    W, stats = rand_w(4, 8), make_stats(correlated_x(32, 8))
    for kw, msg in [({"admm_iters": 0}, "admm_iters"), ({"rho": 0.0}, "rho"), ({"pcg_iters": -1}, "pcg_iters"),
                    ({"percdamp": -1.0}, "percdamp"), ({"blocksize": 4}, "unknown option")]:
        with pytest.raises(UserError, match=msg):
            get_solver("alps").prune(W, stats, 0.5, **kw)
    with pytest.raises(ValueError, match="hessian"):
        get_solver("alps").prune(W, LayerStats(), 0.5)


def test_cli_flags():
    from layerprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    prune = sub.choices["prune"]
    groups = {g.title: [a.option_strings[0] for a in g._group_actions] for g in prune._action_groups}
    assert groups["alps options"] == ["--admm-iters", "--rho", "--pcg-iters"]
    assert groups["sparsegpt, slimgpt, alps options"] == ["--percdamp"]
    from layerprune.cli.common import _method_options
    from layerprune.solvers import SOLVER_REGISTRY

    args = prune.parse_args(["--out", "x", "--method", "alps", "--admm-iters", "50", "--rho", "0.3", "--pcg-iters",
                             "0", "--percdamp", "0.05"])
    assert _method_options(SOLVER_REGISTRY, "--method", "alps", args) == {"admm_iters": 50, "rho": 0.3,
                                                                          "pcg_iters": 0, "percdamp": 0.05}
    args = prune.parse_args(["--out", "x", "--method", "wanda", "--rho", "0.3"])
    with pytest.raises(UserError, match="--rho needs --method alps"):
        _method_options(SOLVER_REGISTRY, "--method", "wanda", args)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3"])
def test_engine_every_family_exact(family):
    from conftest import tiny_model
    from layerprune import prune
    from test_engine import calib

    model = tiny_model(family, real=True)
    from layerprune.models.adapters import get_adapter

    rec = prune(model, calibration=calib(), method="alps", sparsity=0.6, progress=False)
    assert all(r["rel_error"] > 0 for r in rec["layers"])
    a = get_adapter(model)
    for block in a.blocks(model):
        for mod in a.linears(block).values():
            w = a.get_weight(mod)
            assert int((w == 0).sum()) == round(0.6 * w.numel())
    model = tiny_model(family, real=True)
    prune(model, calibration=calib(), method="alps", nm="2:4", progress=False)
    for block in a.blocks(model):
        for mod in a.linears(block).values():
            w = a.get_weight(mod)
            assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2)


# ---------------------------------------------------------------- massive-activation inputs (issue #30, item 3)
def massive_x(width, mag, tokens=4096, seqlen=512, seed=0):
    """Layer inputs like a down projection's in Qwen / LLaMA: on the first token of every window two inputs reach
    ``mag`` (and the other inputs are unusual there too), everywhere else they are ordinary; 4 inputs are dead."""
    g = torch.Generator().manual_seed(seed)
    X = correlated_x(tokens, width, seed) * 0.1
    first = torch.arange(0, tokens, seqlen)
    for c in (5, 12):
        X[first, c] = mag * (1 + 0.1 * torch.randn(len(first), generator=g))
    X[first] += 3 * torch.randn(len(first), width, generator=g)
    X[:, width - 4:] = 0
    return X


def err64(W, Wp, X):
    X, dW = X.double(), W.double() - Wp.double()
    return float((X @ dW.T).square().sum() / (X @ W.double().T).square().sum())


@pytest.mark.parametrize("width, mag", [(256, 1e3), (256, 1e4), (768, 1e4)])
def test_massive_inputs_sparsegpt_and_alps_not_worse_than_wanda(width, mag):
    from test_solvers import ref_sparsegpt

    X = massive_x(width, mag)
    stats = make_stats(X)
    W = rand_w(64, width) * 0.05
    wanda = err64(W, get_solver("wanda").prune(W, stats, 0.5), X)
    if mag >= 1e4:  # the reproduction: damping by the plain mean of diag H (the reference code's) loses to Wanda
        H = (2 / X.shape[0]) * X.double().T @ X.double()
        H[H.diagonal() == 0, H.diagonal() == 0] = 1
        assert err64(W, ref_sparsegpt(W, H.float(), s=0.5), X) > 1.5 * wanda
    for name in ("sparsegpt", "alps"):
        assert err64(W, get_solver(name).prune(W, stats, 0.5), X) < wanda, name


def test_damping_scale_is_the_mean_without_massive_inputs():
    from layerprune.solvers.common import damping_scale

    d = torch.exp(torch.randn(512, generator=torch.Generator().manual_seed(0)))  # spread 1e-3 .. 1e3: no cap
    assert damping_scale(d) == d.mean()
    d[:2] = 1e7
    assert damping_scale(d) < 1e-3 * d.mean()  # two massive inputs no longer set the damping (each counts <= 1000x)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[100:400] = True
    assert damping_scale(d, dead) == d.clamp(max=1000 * d[~dead].median()).mean()


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (4, 8), (2, 3)])
@pytest.mark.parametrize("ties", [False, True])
def test_nm_keep_is_the_complement_of_nm_mask(n, m, ties):
    """The float keep mask ALPS projects with (a min/max network for m = 4, sorted values else) is exactly
    ``~nm_mask``, ties included (integer scores tie often: then the sort decides, earliest pruned first)."""
    from layerprune.solvers.nm import nm_keep, nm_mask

    g = torch.Generator().manual_seed(n * 10 + m)
    score = torch.randint(0, 3, (16, 24), generator=g).float() if ties else torch.rand(16, 24, generator=g)
    keep = nm_keep(score, n, m)
    assert keep.dtype == score.dtype and torch.equal(keep.bool(), ~nm_mask(score, n, m))


@pytest.mark.parametrize("ties", [False, True])
def test_alps_projection_is_the_complement_of_lowest_k(ties):
    from layerprune.solvers.alps import _projector
    from layerprune.solvers.common import lowest_k, prune_count

    g = torch.Generator().manual_seed(3)
    Z = torch.randint(-3, 4, (12, 20), generator=g).float() if ties else torch.randn(12, 20, generator=g)
    for s in (0.3, 0.5, 0.7):
        keep = _projector(Z.shape, s, None)(Z)
        assert torch.equal(keep.bool(), ~lowest_k(Z.abs(), prune_count(s, Z.numel())))


@pytest.mark.parametrize("rows", [8, 40])  # fewer rows than inputs: triangular solves; more: the explicit inverse
def test_ridge_solve_both_paths(rows):
    from layerprune.solvers.alps import _Ridge

    X = correlated_x(200, 24, seed=rows)
    Hn, _, _ = normalized_hessian(X.T @ X, 0.01, "cpu")
    R = torch.randn(rows, 24, generator=torch.Generator().manual_seed(rows))
    ridge = _Ridge(Hn, rows)
    assert ridge.direct == (rows <= 24)
    for rho in (0.1, 3.0):
        ridge.set(rho)
        ref = torch.linalg.solve((Hn.double() + rho * torch.eye(24, dtype=torch.float64)), R.double().T).T
        assert torch.allclose(ridge(R).double(), ref, rtol=1e-4, atol=1e-5)


def test_record_rows_say_what_the_iterations_did():
    """Every ALPS row of the run record carries the ADMM iterations run, the last rho and the refit's iterations;
    with --admm-iters 2 (under the first rho check) exactly 2, with --pcg-iters 0 none."""
    from conftest import tiny_model
    from layerprune import prune
    from test_engine import calib

    rec = prune(tiny_model("llama"), calibration=calib(), method="alps", sparsity=0.6, progress=False)
    rows = rec["layers"]
    assert rows and all(1 <= r["admm_iters"] <= 300 and r["rho"] > 0 and 0 <= r["pcg_iters"] <= 10 for r in rows)
    assert any(r["admm_iters"] > 3 for r in rows) and any(r["pcg_iters"] > 0 for r in rows)
    rec = prune(tiny_model("llama"), calibration=calib(), method="alps", sparsity=0.6, progress=False,
                solver_options={"admm_iters": 2, "pcg_iters": 0})
    assert all(r["admm_iters"] == 2 and r["rho"] == 0.1 and r["pcg_iters"] == 0 for r in rec["layers"])
    rec = prune(tiny_model("llama"), calibration=calib(), method="sparsegpt", sparsity=0.6, progress=False)
    assert not any("admm_iters" in r for r in rec["layers"])  # another solver's rows are as before
