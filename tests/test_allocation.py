"""Layer-wise sparsity allocation: budgets, bounds, directions and the papers' schedules."""
import json
import math

import numpy as np
import pytest
import torch

from layerprune.allocation import (ALLOCATORS, AllocationContext, LayerInfo, block_median, get_allocator,
                                   ipr_schedule, minmax_recentre, nm_per_block, outlier_ratio, rebalance)
from layerprune.allocation.atp import atp_beta_max
from layerprune.allocation.classic import lamp_scores
from layerprune.errors import UserError
from layerprune.stats import LayerStats

# DLP's released keep ratios for Llama-2-7b at sparsity 0.7, alpha 0.15 (papers.md §1.2)
LLAMA2_7B_KEEP = [0.4652, 0.4497, 0.4235, 0.4038, 0.3947, 0.3845, 0.3723, 0.3639, 0.3583, 0.3511, 0.3458, 0.3391,
                  0.3327, 0.3249, 0.3166, 0.3085, 0.2925, 0.2854, 0.2732, 0.2680, 0.2566, 0.2513, 0.2407, 0.2316,
                  0.2293, 0.2194, 0.2108, 0.1991, 0.1875, 0.1826, 0.1652, 0.1723]

LINEARS = {"self_attn.q_proj": (8, 8), "self_attn.k_proj": (4, 8), "self_attn.v_proj": (4, 8),
           "self_attn.o_proj": (8, 8), "mlp.gate_proj": (24, 8), "mlp.up_proj": (24, 8), "mlp.down_proj": (8, 24)}


def make_ctx(num_blocks=6, seed=0, uneven=False, stats=True):
    """A tiny LLaMA-like model; with uneven=True every other block has a wider MLP (unequal block sizes)."""
    g = torch.Generator().manual_seed(seed)
    layers, weights = [], {}
    for b in range(num_blocks):
        for name, (o, i) in LINEARS.items():
            if uneven and b % 2 and name.startswith("mlp"):
                o, i = (o * 2, i) if name != "mlp.down_proj" else (o, i * 2)
            layers.append(LayerInfo(b, name, o * i, (o, i)))
            weights[(b, name)] = torch.randn(o, i, generator=g)
    block_stats = torch.rand(num_blocks, generator=g).add(0.05).tolist() if stats else None
    return AllocationContext(layers, num_blocks, block_stats, lambda b, n: weights[(b, n)])


def param_mean(ctx, alloc):
    n = sum(l.numel for l in ctx.layers)
    return sum(l.numel * alloc.layer_sparsity[(l.block, l.name)] for l in ctx.layers) / n


def build(name, target, ctx, **hp):
    if name == "user":  # a random list whose parameter-weighted mean is exactly the target
        w = np.zeros(ctx.num_blocks)
        for l in ctx.layers:
            w[l.block] += l.numel
        rnd = np.random.default_rng(1).uniform(-0.1, 0.1, ctx.num_blocks)
        hp["sparsities"] = rebalance(target + rnd, target, w, hp.get("lo", 0.0), hp.get("hi", 0.99))
    return get_allocator(name, **hp)


def check_allocation(ctx, alloc, target, lo, hi):
    assert set(alloc.layer_sparsity) == {(l.block, l.name) for l in ctx.layers}
    assert len(alloc.block_sparsity) == ctx.num_blocks
    assert abs(param_mean(ctx, alloc) - target) < 1e-9
    vals = np.array(list(alloc.layer_sparsity.values()))
    assert vals.min() >= lo - 1e-12 and vals.max() <= hi + 1e-12
    for b in range(ctx.num_blocks):  # block sparsity = parameter-weighted mean of its layers
        ls = [l for l in ctx.layers if l.block == b]
        bm = sum(l.numel * alloc.layer_sparsity[(b, l.name)] for l in ls) / sum(l.numel for l in ls)
        assert abs(alloc.block_sparsity[b] - bm) < 1e-12


@pytest.mark.parametrize("name", [n for n in ALLOCATORS if n != "auto"])  # auto: chosen by prune(), test_proxy.py
@pytest.mark.parametrize("uneven", [False, True])
def test_budget_and_bounds_every_method(name, uneven):
    for seed in range(3):
        ctx = make_ctx(num_blocks=5 + seed, seed=seed, uneven=uneven)
        for target in (0.2, 0.35, 0.5, 0.65, 0.8):
            check_allocation(ctx, build(name, target, ctx).allocate(target, ctx), target, 0.0, 0.99)
        for target in (0.3, 0.7):  # narrower custom bounds
            check_allocation(ctx, build(name, target, ctx, lo=0.25, hi=0.75).allocate(target, ctx), target, 0.25, 0.75)


def test_target_outside_bounds_is_user_error():
    ctx = make_ctx()
    with pytest.raises(UserError, match="outside"):
        get_allocator("dlp").allocate(0.995, ctx)
    with pytest.raises(UserError, match="lo"):
        get_allocator("owl", lo=0.5, hi=0.4)


# ------------------------------------------------------------------------------------------------------------ DLP / OWL

def test_dlp_spread_is_two_alpha_when_unclipped():
    ctx = make_ctx(num_blocks=12, seed=3)
    for alpha, target in [(0.15, 0.7), (0.05, 0.5), (0.2, 0.4)]:
        a = get_allocator("dlp", alpha=alpha).allocate(target, ctx)
        bs = np.array(a.block_sparsity)
        assert abs(bs.max() - bs.min() - 2 * alpha) < 1e-12
        assert abs(bs.mean() - target) < 1e-12
        assert a.stats["alpha"] == alpha


def test_dlp_alpha_table_interpolates():
    ctx = make_ctx(num_blocks=8, seed=4)
    alloc = get_allocator("dlp", alpha="0.5:0.05,0.7:0.15")
    for target, alpha in [(0.5, 0.05), (0.6, 0.10), (0.7, 0.15), (0.8, 0.15), (0.4, 0.05)]:
        bs = np.array(alloc.allocate(target, ctx).block_sparsity)
        assert abs(bs.max() - bs.min() - 2 * alpha) < 1e-12
    assert get_allocator("dlp", alpha={0.7: 0.15}).allocate(0.7, ctx).stats["alpha"] == 0.15


def test_dlp_from_weights_and_input_norms_gives_the_llama2_7b_ratios():
    """DLP's whole chain from what the pre-pass hands it: per block the Wanda scores |W| * ||X_j|| of (weight,
    LayerStats), their exact lower median, importance, sparsity. Each block is built so that its median score is the
    released Llama-2-7b sparsity of that block (papers.md: 70%, alpha 0.15), so DLP must give the released ratios back
    (to the file's 4 decimals) with mean exactly 0.7. The input norms differ per block and per column and the scores'
    mean is far from their median: ||X||^2 for ||X||, the mean for the median, a flipped direction or a wrong spread
    all give other ratios."""
    fixture = 1.0 - np.array(LLAMA2_7B_KEEP)  # sparsities 0.535 .. 0.835
    alloc = get_allocator("dlp", alpha=0.15)
    values = []
    for b, s in enumerate(fixture):
        norm = torch.tensor([1.0, 2.0 + b, 100.0, 1.0], dtype=torch.float64)  # ||X_j|| of the 4 input columns
        score = torch.tensor([s / 4, s, 2 * s, 50.0 + b], dtype=torch.float64)  # lower median (2nd of 4): s
        weight = (score / norm).float()[None, :]
        values.append(alloc.statistic({"lin": weight}, {"lin": LayerStats(8, norm.square().float())}))
    assert values == pytest.approx(fixture.tolist(), rel=1e-6)
    ctx = make_ctx(num_blocks=32, seed=5)
    ctx.block_stats = values
    out = np.array(alloc.allocate(0.7, ctx).block_sparsity)
    assert np.abs(out - fixture).max() < 0.0005
    assert abs(out.mean() - 0.7) < 1e-12 and abs(out.max() - out.min() - 0.3) < 1e-9


def test_dlp_direction_small_median_means_low_sparsity():
    ctx = make_ctx(num_blocks=10, seed=6)
    a = get_allocator("dlp").allocate(0.6, ctx)
    s, r = np.array(ctx.block_stats), np.array(a.block_sparsity)
    assert (np.argsort(s) == np.argsort(r)).all()  # sparsity increases with the statistic
    # end to end from scores: block 0 has smaller scores (more important) than block 1
    alloc = get_allocator("dlp")
    g = torch.Generator().manual_seed(0)
    small = {"q": torch.rand(16, 16, generator=g), "down": torch.rand(16, 32, generator=g)}
    large = {k: v * 3 for k, v in small.items()}
    ctx = make_ctx(num_blocks=2, seed=7)
    ctx.block_stats = [alloc.block_statistic(small), alloc.block_statistic(large)]
    bs = alloc.allocate(0.5, ctx).block_sparsity
    assert bs[0] < bs[1]


def test_dlp_mean_statistic_is_exact_mean():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(7, 9, generator=g), "b": torch.rand(3, 5, generator=g)}
    ref = torch.cat([t.reshape(-1) for t in scores.values()]).double().mean().item()
    assert abs(get_allocator("dlp", stat="mean").block_statistic(scores) - ref) < 1e-12
    with pytest.raises(UserError, match="median"):
        get_allocator("dlp", stat="max")


def test_owl_outlier_ratio_and_direction():
    g = torch.Generator().manual_seed(0)
    blocks = []
    for n_out in (5, 40, 15):  # number of planted outliers per block
        q, d = torch.rand(32, 32, generator=g), torch.rand(32, 64, generator=g)
        d.view(-1)[:n_out] = 200.0
        blocks.append({"self_attn.q_proj": q, "mlp.down_proj": d})
    alloc = get_allocator("owl")
    stats = [alloc.block_statistic(b) for b in blocks]
    for b, st in zip(blocks, stats):  # brute force on the concatenation
        cat = torch.cat([t.reshape(-1) for t in b.values()]).double()
        assert st == (cat > 5 * cat.mean()).double().mean().item()
    assert stats[0] < stats[2] < stats[1]
    ctx = make_ctx(num_blocks=3)
    ctx.block_stats = stats
    bs = alloc.allocate(0.7, ctx).block_sparsity
    assert bs[1] < bs[2] < bs[0]  # more outliers -> lower sparsity
    assert abs(max(bs) - min(bs) - 0.16) < 1e-12  # 2 * lambda
    assert outlier_ratio(blocks[0], 1e9) == 0.0


def test_missing_block_stats_is_user_error():
    ctx = make_ctx(stats=False)
    for name in ("owl", "dlp"):
        assert get_allocator(name).needs_scores
        with pytest.raises(UserError, match="block_stats"):
            get_allocator(name).allocate(0.5, ctx)


def test_exact_median_above_quantile_limit():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(4096, 2048, generator=g), "b": torch.rand(2048, 4096, generator=g) ** 2,
              "c": torch.tensor([[0.3]])}  # 16,777,217 scores: above torch.quantile's limit, odd count
    flat = torch.cat([t.reshape(-1) for t in scores.values()]).numpy()
    n = flat.size
    assert n == 16_777_217
    got = block_median(scores)
    assert got == float(np.median(flat)) == float(np.partition(flat, (n - 1) // 2)[(n - 1) // 2])
    assert got == get_allocator("dlp").block_statistic(scores)
    # even count: the LOWER median, as torch.median (numpy.median would give 2.5 here)
    assert block_median({"x": torch.tensor([4.0, 1.0]), "y": torch.tensor([3.0, 2.0])}) == 2.0
    assert torch.tensor([1.0, 2.0, 3.0, 4.0]).median() == 2.0
    one = torch.tensor([[5.0, 1.0, 4.0], [2.0, 3.0, 0.0]])
    assert block_median({"w": one}) == 2.0 and torch.equal(one, torch.tensor([[5.0, 1.0, 4.0], [2.0, 3.0, 0.0]]))
    half = torch.tensor([3.0, 1.0, 2.0]).half()
    assert block_median({"w": half}) == 2.0 and half.tolist() == [3.0, 1.0, 2.0]  # partitioned a copy, not the input


# ------------------------------------------------------------------------------------------------------------- helpers

def test_minmax_recentre_directions_and_constant():
    v = [0.1, 0.4, 0.2, 0.9]
    up = np.array(minmax_recentre(v, 0.5, 0.2, invert=False))
    down = np.array(minmax_recentre(v, 0.5, 0.2, invert=True))
    assert (np.argsort(up) == np.argsort(v)).all() and (np.argsort(-down) == np.argsort(v)).all()
    assert abs(up.mean() - 0.5) < 1e-12 and abs(up.max() - up.min() - 0.2) < 1e-12
    assert np.allclose(up + down, 1.0, atol=1e-12)  # mirror images around the target
    assert minmax_recentre([3.0, 3.0, 3.0], 0.6, 0.3) == [0.6, 0.6, 0.6]


def test_clip_and_rebalance_when_naive_map_leaves_range():
    ctx = make_ctx(num_blocks=8, seed=8)
    ctx.block_stats = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0]  # one far outlier
    for target, alpha in [(0.9, 0.3), (0.1, 0.3)]:
        s = np.array(ctx.block_stats)
        imp = 1 - s / s.sum()
        d = (imp - imp.min()) / (imp.max() - imp.min()) * 2 * alpha
        naive = target + d.mean() - d
        assert naive.max() > 0.99 or naive.min() < 0.0
        out = np.array(get_allocator("dlp", alpha=alpha).allocate(target, ctx).block_sparsity)
        assert abs(out.mean() - target) < 1e-12 and out.min() >= 0 and out.max() <= 0.99
        free = (out > 1e-12) & (out < 0.99 - 1e-12)
        assert free.sum() >= 2 and np.ptp(out[free] - naive[free]) < 1e-12  # free blocks moved by one common shift
        clipped = ~free
        assert clipped.any()
    # a hand-checked case: [0.5, 1.5] at target 0.8 -> [0.61, 0.99] (0.5 + c with c solving (0.5 + c + 0.99) / 2 = 0.8)
    assert np.allclose(rebalance([0.5, 1.5], 0.8), [0.61, 0.99], atol=1e-12)
    with pytest.raises(UserError):
        rebalance([0.1, 0.2], 0.995)


def test_nm_per_block():
    for m, n in [(4, 2), (8, 5), (8, 4)]:
        for seed in range(5):
            x = np.random.default_rng(seed).uniform(-1.5, 1.5, 16)
            s = np.array(rebalance(n / m + x / m, n / m, lo=0.0, hi=1.0))  # mean exactly n/m
            got = np.array(nm_per_block(s.tolist(), m, n))
            assert got.sum() == n * len(s) and got.min() >= 1 and got.max() <= m - 1
            inside = (s * m >= 1) & (s * m <= m - 1)
            assert (np.abs(got - s * m)[inside] < 1 + 1e-9).all()
        assert nm_per_block([n / m] * 7, m, n) == [n] * 7
    assert nm_per_block([0.0, 0.0, 1.0, 1.0], 4, 2) == [1, 1, 3, 3]
    with pytest.raises(UserError):
        nm_per_block([0.5], 4, 4)


# --------------------------------------------------------------------------------------------------------- IPR and ATP

def test_ipr_slimgpt_20_percent_recipe():
    r = ipr_schedule("log", 32, 0.0625, 0.25)
    for got, ref in zip(r, [0.0625, 0.100, 0.122, 0.138, 0.150]):  # papers.md §2.3
        assert abs(got - ref) <= 5e-4 + 1e-12  # the reference is rounded to 3 decimals
    assert abs(r[30] - 0.2483) < 5e-5 and r[31] == 0.25
    assert abs(np.mean(r) - 0.2004) < 5e-5


@pytest.mark.parametrize("L", [30, 32])
def test_ipr_matches_eq6_point_by_point(L):
    r0, r1 = 0.1, 0.4
    eq6 = [r0 + (r1 - r0) * math.log(i + 1) / math.log(L) for i in range(L)]
    lin = [r0 + (r1 - r0) * i / (L - 1) for i in range(L)]
    assert np.allclose(ipr_schedule("log", L, r0, r1), eq6, atol=1e-15, rtol=0)
    assert np.allclose(ipr_schedule("log-dec", L, r0, r1), eq6[::-1], atol=1e-15, rtol=0)
    assert np.allclose(ipr_schedule("lin", L, r0, r1), lin, atol=1e-15, rtol=0)
    assert np.allclose(ipr_schedule("lin-dec", L, r0, r1), lin[::-1], atol=1e-15, rtol=0)
    # explicit ends whose mean is the target: the allocator returns eq. 6 unchanged
    ctx = make_ctx(num_blocks=L, seed=9)
    out = get_allocator("ipr-log", r0=r0, r_end=r1).allocate(float(np.mean(eq6)), ctx).block_sparsity
    assert np.allclose(out, eq6, atol=1e-12, rtol=0)
    # explicit ends, other target: shifted by one constant
    out = np.array(get_allocator("ipr-log", r0=r0, r_end=r1).allocate(0.5, ctx).block_sparsity)
    assert abs(out.mean() - 0.5) < 1e-12 and np.ptp(out - np.array(eq6)) < 1e-12


@pytest.mark.parametrize("name", ["ipr-log", "ipr-log-dec", "ipr-lin", "ipr-lin-dec"])
def test_ipr_default_ends_and_monotone(name):
    ctx = make_ctx(num_blocks=30, seed=10)
    for target in (0.2, 0.5):
        a = get_allocator(name).allocate(target, ctx)
        bs = np.array(a.block_sparsity)
        assert abs(bs.mean() - target) < 1e-12
        first, last = (bs[0], bs[-1]) if not name.endswith("dec") else (bs[-1], bs[0])
        assert abs(first - last / 4) < 1e-12  # r0 = r_end / 4, unshifted
        diffs = np.diff(bs)
        assert (diffs > 0).all() if not name.endswith("dec") else (diffs < 0).all()
    # 20% at L=32: the derived ends sit next to the recipe's (0.0625, 0.25), whose mean is 0.2004
    a = get_allocator("ipr-log").allocate(0.2, make_ctx(num_blocks=32))
    assert abs(a.stats["r_end"] - 0.25) < 1e-3 and abs(a.stats["r0"] - 0.0625) < 3e-4
    with pytest.raises(UserError, match="both"):
        get_allocator("ipr-log", r0=0.1)


def test_atp_arithmetic_progression():
    ctx = make_ctx(num_blocks=32, seed=11)
    for target in (0.3, 0.7):
        a = get_allocator("atp").allocate(target, ctx)
        bs = np.array(a.block_sparsity)
        beta = 0.3 * min(2 * target, 2 * (1 - target)) / 31
        assert a.stats["beta"] == pytest.approx(beta, abs=1e-15) and atp_beta_max(target, 32) * 0.3 == a.stats["beta"]
        assert np.allclose(np.diff(bs), beta, atol=1e-12, rtol=0)
        assert abs(bs.mean() - target) < 1e-12
        assert abs(bs[0] - (target - beta * 31 / 2)) < 1e-12
    bs = np.array(get_allocator("atp", beta=0.01).allocate(0.5, ctx).block_sparsity)
    assert np.allclose(np.diff(bs), 0.01, atol=1e-12, rtol=0)
    # beta far beyond beta_max: clipped at both ends, budget and bounds still hold
    bs = np.array(get_allocator("atp", beta=0.1).allocate(0.5, ctx).block_sparsity)
    assert bs.min() == 0.0 and bs.max() == 0.99 and abs(bs.mean() - 0.5) < 1e-12


# ------------------------------------------------------------------------------------------------------------ classics

def mixed_ctx(seed=0):
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    g = torch.Generator().manual_seed(seed)
    layers, weights = [], {}
    for b in range(2):
        for j, (o, i) in enumerate(shapes):
            layers.append(LayerInfo(b, f"l{j}", o * i, (o, i)))
            weights[(b, f"l{j}")] = torch.randn(o, i, generator=g) * (1 + j)
    return AllocationContext(layers, 2, None, lambda b, n: weights[(b, n)])


@pytest.mark.parametrize("name", ["er", "erk"])
def test_er_erk_budget_on_mixed_shapes(name):
    ctx = mixed_ctx()
    for target in (0.2, 0.5, 0.8):
        a = get_allocator(name).allocate(target, ctx)
        check_allocation(ctx, a, target, 0.0, 0.99)
        dens = np.array([1 - a.layer_sparsity[(l.block, l.name)] for l in ctx.layers])
        raw = np.array([(l.shape[0] + l.shape[1]) / (l.shape[0] * l.shape[1]) for l in ctx.layers])
        free = (dens > 0.01 + 1e-12) & (dens < 1 - 1e-12)
        assert np.ptp(dens[free] / raw[free]) < 1e-12  # density proportional to (n_in + n_out) / (n_in * n_out)
    # at 20% the small 192x576 layer would need density > 1: it is clipped dense and the rest rebalanced
    a = get_allocator("er").allocate(0.2, ctx)
    assert a.layer_sparsity[(0, "l1")] == 0.0
    # ERK with power 2: density ~ raw**2 (checked on two unclipped layers)
    raw = {n: (o + i) / (o * i) for n, (o, i) in [("l0", (576, 576)), ("l2", (1536, 576))]}
    e2 = get_allocator("erk", erk_power=2.0).allocate(0.8, ctx)
    d0, d2 = 1 - e2.layer_sparsity[(0, "l0")], 1 - e2.layer_sparsity[(0, "l2")]
    assert abs(d0 / d2 - (raw["l0"] / raw["l2"]) ** 2) < 1e-9
    check_allocation(ctx, e2, 0.8, 0.0, 0.99)


def brute_counts(ctx, scores, k):
    """Counts per layer of the k globally smallest scores."""
    cat = torch.cat(scores)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    chosen = owner[cat.argsort()[:k]]
    return torch.bincount(chosen, minlength=len(scores)).tolist()


def test_global_exact_counts():
    ctx = make_ctx(num_blocks=3, seed=12, uneven=True)
    n = sum(l.numel for l in ctx.layers)
    scores = [ctx.weights(l.block, l.name).abs().reshape(-1) for l in ctx.layers]
    for k in (n // 5, n // 2, 7 * n // 10, n - n // 8):
        a = get_allocator("global", hi=1.0).allocate(k / n, ctx)
        got = [round(a.layer_sparsity[(l.block, l.name)] * l.numel, 6) for l in ctx.layers]
        assert got == brute_counts(ctx, scores, k)
    # a fractional budget is still met exactly (the remainder goes to the layer holding the next weight)
    a = get_allocator("global").allocate(0.4321, ctx)
    assert abs(param_mean(ctx, a) - 0.4321) < 1e-12


def test_lamp_scores_and_exact_counts():
    w = torch.tensor([[0.5, -2.0], [1.0, -0.25]])
    sq = [0.0625, 0.25, 1.0, 4.0]  # squares ascending
    ref = [sq[u] / sum(sq[u:]) for u in range(4)]
    assert torch.allclose(lamp_scores(w), torch.tensor(ref, dtype=torch.float64), atol=1e-15)
    ctx = make_ctx(num_blocks=2, seed=13, uneven=True)
    n = sum(l.numel for l in ctx.layers)
    # brute-force LAMP: for each weight, w^2 / (sum of w_v^2 over the same layer with |w_v| >= |w|)
    scores = []
    for l in ctx.layers:
        s = ctx.weights(l.block, l.name).double().reshape(-1) ** 2
        scores.append(s / (s[None, :] * (s[None, :] >= s[:, None])).sum(1))
    for k in (n // 4, n // 2, 4 * n // 5):
        a = get_allocator("lamp", hi=1.0).allocate(k / n, ctx)
        got = [round(a.layer_sparsity[(l.block, l.name)] * l.numel, 6) for l in ctx.layers]
        assert got == brute_counts(ctx, scores, k)
        assert abs(param_mean(ctx, a) - k / n) < 1e-12


def test_global_needs_weights_and_respects_hi():
    ctx = make_ctx(num_blocks=2, seed=14)
    ctx.weights = None
    with pytest.raises(UserError, match="weights"):
        get_allocator("global").allocate(0.5, ctx)
    ctx = make_ctx(num_blocks=2, seed=14)
    w0 = {(l.block, l.name): ctx.weights(l.block, l.name) for l in ctx.layers}
    w0[(0, "mlp.up_proj")] = w0[(0, "mlp.up_proj")] * 1e-3  # a tiny layer global magnitude would prune entirely
    ctx.weights = lambda b, nm: w0[(b, nm)]
    assert get_allocator("global", hi=1.0).allocate(0.5, ctx).layer_sparsity[(0, "mlp.up_proj")] == 1.0
    a = get_allocator("global", hi=0.9).allocate(0.5, ctx)
    assert a.layer_sparsity[(0, "mlp.up_proj")] == pytest.approx(0.9, abs=1e-12)
    check_allocation(ctx, a, 0.5, 0.0, 0.9)


# -------------------------------------------------------------------------------------------------------- user/registry

def test_user_list_file_and_errors(tmp_path):
    ctx = make_ctx(num_blocks=4)
    a = get_allocator("user:0.4,0.5,0.6,0.7").allocate(0.55, ctx)
    assert np.allclose(a.block_sparsity, [0.4, 0.5, 0.6, 0.7], atol=1e-12)
    a = get_allocator("user:0.4,0.5,0.6,0.7").allocate(0.5505, ctx)  # within 1e-3: shifted to hold the budget
    assert abs(np.mean(a.block_sparsity) - 0.5505) < 1e-12
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"block_sparsity": [0.5, 0.5, 0.6, 0.6]}))
    assert get_allocator(f"user:{p}").allocate(0.55, ctx).block_sparsity == pytest.approx([0.5, 0.5, 0.6, 0.6])
    p.write_text(json.dumps([0.5, 0.5, 0.6, 0.6]))
    assert get_allocator("user", sparsities=str(p)).allocate(0.55, ctx).block_sparsity == pytest.approx(
        [0.5, 0.5, 0.6, 0.6])
    with pytest.raises(UserError, match="give exactly 4"):
        get_allocator("user:0.5,0.5,0.5").allocate(0.5, ctx)
    with pytest.raises(UserError, match=r"0\.550000.*0\.600000"):
        get_allocator("user:0.4,0.5,0.6,0.7").allocate(0.6, ctx)
    with pytest.raises(UserError, match="numbers"):
        get_allocator("user:0.4,abc").allocate(0.6, ctx)
    with pytest.raises(UserError, match="outside"):
        get_allocator("user:0.1,0.1,1.0,1.0").allocate(0.55, ctx)
    with pytest.raises(UserError, match="needs sparsities"):
        get_allocator("user")


def test_registry_errors():
    with pytest.raises(UserError, match="known: uniform, owl, dlp"):
        get_allocator("nope")
    with pytest.raises(UserError, match="does not take alpha"):
        get_allocator("owl", alpha=0.1)
    assert get_allocator("owl", alpha=None, lam=0.1).lam == 0.1  # None hparams are ignored
    with pytest.raises(UserError, match="only 'dsa' and 'user' take an argument"):
        get_allocator("dlp:0.3")
