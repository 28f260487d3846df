"""DSA: the allocation-function space, its evaluation, the sparsity mapping, and the searches (fast, CPU only)."""
import json
import math
import random

import numpy as np
import pytest
import torch

from layerprune.allocation.base import AllocationContext, LayerInfo
from layerprune.allocation.dsa import (DSA, PRESETS, AllocationFunction, InvalidCandidate, StageCache, allocate,
                                       dsa_mapping, evaluate, evaluate_blocks, parse, random_function)
from layerprune.search.dsa import allocation_fitness, evolutionary_search, plot_curves, random_search, summarize
from layerprune.allocation.dsa.functions import PRE_OPS, REDUCE_OPS, SCALAR_OPS, scalar_stage
from layerprune.search.dsa import best_path, crossover, mutate
from layerprune.errors import UserError


def blocks(seed=0, n_blocks=6, n=400):
    """Wanda-like positive scores whose scale and spread change with depth."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) ** (1 + 0.3 * i) * (1 + 0.2 * i) for i in range(n_blocks)]


# ---------------------------------------------------------------------------------------------------------------------
# text form


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    f = parse(PRESETS[name])
    assert parse(str(f)) == f
    assert f.canonical() == f


def test_random_functions_round_trip_and_canonical():
    rng = random.Random(0)
    for _ in range(200):
        f = random_function(rng)
        assert parse(str(f)) == f
        assert f.canonical() == f  # random_function returns the canonical form
        assert 1 <= len(f.pre) <= 2 and 1 <= len(f.transform) <= 2
        raw = AllocationFunction(tuple(rng.sample(list(PRE_OPS), 2)), f.reduce, ("NO_OP",) + f.transform[:1], f.post)
        assert parse(str(raw)) == raw  # non-canonical forms round-trip too


def test_parse_forms():
    ref = AllocationFunction(("ABSLOG",), "VAR", ("ATAN", "ASIN"), "NO_OP")
    assert parse("W:(ABSLOG)-(VAR)-(ATAN,ASIN)") == ref
    assert parse("W:(ABSLOG)-(VAR)-(ATAN,ASIN)-(7)") == ref  # the reference's lambda group is ignored
    assert parse("W:(ABSLOG)-(VAR)-(ATAN,ASIN)-(NO_OP)-(7)") == ref
    assert parse(" w:(abslog)-(var)-(atan, asin) ") == ref
    assert str(ref) == "W:(ABSLOG)-(VAR)-(ATAN,ASIN)"
    assert str(parse("W:(EXP)-(ENTROPY)-(COS)-(LOG)")) == "W:(EXP)-(ENTROPY)-(COS)-(LOG)"
    assert parse("W:()-(NO_OP)-()").reduce == "MEAN"  # the reference averages an unreduced tensor
    # NO_OPs and repeats of idempotent ops do not make a new candidate
    assert parse("W:(NO_OP,ABS)-(VAR)-(ABS,ABS)").key == parse("W:(ABS)-(VAR)-(ABS)-(NO_OP)").key
    assert parse("W:()-(VAR)-()").key == parse("W:(NO_OP,NO_OP)-(VAR)-(NO_OP)").key
    assert parse("W:(ABS)-(VAR)-(SIN)").key != parse("W:(ABS)-(VAR)-(COS)").key


@pytest.mark.parametrize("text, word", [
    ("W:(FOO)-(VAR)-(ABS)", "ABSLOG"),            # unknown pre op: the message lists the valid ones
    ("W:(ABS)-(MEDIAN)-(ABS)", "ENTROPY"),
    ("W:(ABS)-(VAR)-(ABS)-(MEAN)", "SOFTPLUS"),
    ("W:(ABS)-(VAR)-(NORMALIZE)", "SOFTPLUS"),
    ("W:(ABS,LOG,EXP)-(VAR)-(ABS)", "0 to 2"),
    ("W:(ABS)-(VAR,MEAN)-(ABS)", "one reduce"),
    ("W:(ABS)-(VAR)", "cannot parse"),
    ("W:(ABS)-(VAR)-(9)", "unknown"),               # the reference's broken 3-group string
    ("ABS-VAR-SIN", "cannot parse"),
])
def test_parse_errors(text, word):
    with pytest.raises(UserError, match=word):
        parse(text)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


EDGE = {
    "zeros": torch.zeros(7),
    "negatives": -torch.arange(1.0, 8.0),
    "huge": torch.full((5,), 1e30),
    "huge_mixed": torch.tensor([1e30, -1e30, 3e38, 1.0]),
    "tiny": torch.full((5,), 1e-30),
    "single": torch.tensor([0.37]),
    "nan": torch.tensor([1.0, float("nan"), 2.0, 3.0]),
    "inf": torch.tensor([1.0, float("inf"), -float("inf"), 0.5]),
    "fp16": torch.tensor([0.1, 2.0, 65504.0], dtype=torch.float16),
    "fp64": torch.tensor([0.5, -2.0, 0.0, 3.0], dtype=torch.float64),  # the ops work in place: on a copy
}


@pytest.mark.parametrize("name", sorted(EDGE))
def test_every_op_is_finite_on_edge_inputs(name):
    x = EDGE[name]
    before = x.clone()
    for pre in PRE_OPS:
        for red in REDUCE_OPS:
            for pres in ((pre,), (pre, pre), (pre, "EXP"), ("POW", pre)):
                v = evaluate(AllocationFunction(pres, red, ("NO_OP",), "NO_OP"), x)
                assert isinstance(v, float) and math.isfinite(v), (pres, red, v)
    for op in SCALAR_OPS:  # transform and post ops after a reduction that lands anywhere
        for red in REDUCE_OPS:
            v = evaluate(AllocationFunction(("EXP",), red, (op, op), op), x)
            assert math.isfinite(v), (op, red, v)
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())  # not modified


def test_scalar_ops_domain_errors_give_zero_not_exceptions():
    v = torch.tensor([2.0, -3.0, 0.0, float("inf"), float("nan"), 1e300], dtype=torch.float64)
    for a in SCALAR_OPS:
        for b in SCALAR_OPS:
            out = scalar_stage(AllocationFunction((), "MEAN", (a,), b), v)
            assert torch.isfinite(out).all(), (a, b, out)
    assert scalar_stage(parse("W:()-(MEAN)-(ASIN)"), torch.tensor([2.0])).item() == 0.0  # NaN -> 0
    assert scalar_stage(parse("W:()-(MEAN)-(LOG)"), torch.tensor([-1.0])).item() == 0.0


def test_evaluate_matches_numpy_reference():
    x = blocks(3)[2].numpy().astype(np.float64)
    x[::7] = 0.0
    t = torch.from_numpy(x).float()
    x = t.double().numpy()
    la = np.log(np.abs(np.where(x == 0, 1.0, x)))
    assert np.arctan(la.var()) > 1  # asin is out of its domain: NaN -> 0
    assert evaluate(parse("W:(ABSLOG)-(VAR)-(ATAN,ASIN)"), t) == 0.0
    assert evaluate(parse("W:(ABSLOG)-(VAR)-(ATAN,SIN)"), t) == pytest.approx(np.sin(np.arctan(la.var())), rel=1e-12)
    assert evaluate(parse("W:(ABS)-(VAR)-(ATAN,ASIN)"), t) == pytest.approx(np.arcsin(np.arctan(x.var())), rel=1e-12)
    z = (x - x.mean()) / x.std()
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    ent = -(p * np.log(p)).sum()
    assert evaluate(parse("W:(NORMALIZE)-(ENTROPY)-(COS)-(SOFTPLUS)"), t) == pytest.approx(
        np.log1p(np.exp(np.cos(ent))), rel=1e-12)
    gm = np.exp(np.log(np.maximum(np.abs(x), 1e-30)).mean())
    assert evaluate(parse("W:()-(GEOMETRIC_MEAN)-(TANH)-(SIGMOID)"), t) == pytest.approx(
        1 / (1 + np.exp(-np.tanh(gm))), rel=1e-12)
    mms = (x - x.min()) / (x.max() - x.min())
    assert evaluate(parse("W:(MMS,POW)-(GRAM)-(LOG)"), t) == pytest.approx(np.log((mms ** 4).sum()), rel=1e-12)
    assert evaluate(parse("W:(LOG)-(L1_NORM)-()"), t) == pytest.approx(
        np.abs(np.log(np.where(x <= 0, 1.0, x))).mean(), rel=1e-12)
    assert evaluate(parse("W:(SIGMOID,TANH)-(STD)-(EXP)"), t) == pytest.approx(
        np.exp(np.tanh(1 / (1 + np.exp(-x))).std()), rel=1e-12)
    assert evaluate(parse("W:()-(FROBENIUS_NORM)-()"), [t[:100], t[100:]]) == pytest.approx(
        np.linalg.norm(x), rel=1e-12)  # a block given as its per-layer tensors is concatenated


def test_evaluate_blocks_and_stage_cache():
    bs = blocks(1)
    cache = StageCache(bs)
    f1, f2, f3 = parse("W:(ABSLOG)-(VAR)-(ATAN)"), parse("W:(ABSLOG,NO_OP)-(VAR)-(SIN,TANH)-(EXP)"), parse(
        "W:(ABS)-(VAR)-(SIN)")
    for f in (f1, f2, f3):
        assert evaluate_blocks(f, cache) == pytest.approx([evaluate(f, b) for b in bs], rel=1e-12, abs=1e-300)
        assert evaluate_blocks(f, bs) == evaluate_blocks(f, cache)
    assert (cache.misses, cache.hits) == (2, 4)  # 6 lookups; f1 and f2 share (pre, reduce) after canonicalisation


# ---------------------------------------------------------------------------------------------------------------------
# mapping


def reference_mapping(phi, target, lam):
    """The DSA code's formula, written out (no clipping)."""
    v = np.asarray(phi, dtype=np.float64)
    v = (v - v.min()) / (v.max() - v.min())
    u = 1 - v
    u = (u - u.min()) / (u.max() - u.min()) * 2 * lam
    keep = u - u.mean() + (1 - target)
    return 1 - keep


def test_mapping_matches_reference_formula():
    phi = [0.3, 1.7, -2.0, 0.9, 5.0]
    s = dsa_mapping(phi, 0.6, 0.08)
    assert s == pytest.approx(reference_mapping(phi, 0.6, 0.08), abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16, abs=1e-12)
    assert np.argmax(s) == 4 and np.argmin(s) == 2  # larger phi -> pruned more


def test_mapping_holds_budget_for_random_functions():
    n_valid = 0
    for seed in range(60):
        rng = random.Random(seed)
        f = random_function(rng)
        bs = blocks(seed, n_blocks=rng.randint(2, 12), n=rng.randint(1, 300))
        target, lam = rng.uniform(0.0, 0.95), rng.uniform(0.0, 0.6)
        try:
            s = np.array(allocate(f, bs, target, lam))
        except InvalidCandidate:
            continue
        n_valid += 1
        assert abs(s.mean() - target) < 1e-9
        assert s.min() >= 0.0 and s.max() <= 0.99
        phi = np.array(evaluate_blocks(f, bs))
        ref = reference_mapping(phi, target, lam)
        if ref.min() >= 0 and ref.max() <= 0.99:  # nothing clipped: exactly the reference formula
            assert np.abs(s - ref).max() < 1e-12
        assert (np.diff(s[np.argsort(phi, kind="stable")]) >= -1e-12).all()  # clipping keeps the order
    assert n_valid >= 30


def test_mapping_weighted_budget_and_clipping():
    phi = np.linspace(0, 1, 8) ** 3
    w = np.array([1, 2, 3, 4, 4, 3, 2, 1], dtype=float)
    s = np.array(dsa_mapping(phi, 0.95, 0.3, weights=w))  # 0.95 + 0.3 spread: the top must clip at 0.99
    assert abs((s * w).sum() / w.sum() - 0.95) < 1e-9
    assert s.max() == pytest.approx(0.99) and s.min() >= 0


@pytest.mark.parametrize("values", [[3.0, 3.0, 3.0], [0.0, 0.0], [1.0], [1.0, float("nan")], [1.0, float("inf")]])
def test_constant_or_nonfinite_values_are_invalid(values):
    with pytest.raises(InvalidCandidate):
        dsa_mapping(values, 0.5)


def test_degenerate_functions_are_invalid():
    bs = blocks(2)
    # NORMALIZE -> VAR is 1 and NORMALIZE -> MEAN is 0 for any input: no allocation, not a noise-driven one
    for text in [PRESETS["dsa-poster-best"], "W:(NORMALIZE)-(MEAN)-()", "W:(NORMALIZE)-(STD)-(SIN)"]:
        with pytest.raises(InvalidCandidate):
            allocate(text, bs, 0.7)
    with pytest.raises(InvalidCandidate):  # a candidate that maps every block to NaN -> 0
        allocate("W:()-(MEAN)-(ACOS,ASIN)-(LOG)", [b + 5 for b in bs], 0.7)


def test_mapping_rejects_bad_settings():
    with pytest.raises(UserError):
        dsa_mapping([1.0, 2.0], 1.2)
    with pytest.raises(UserError):
        dsa_mapping([1.0, 2.0], 0.5, lam=-0.1)


def test_dsa_allocator():
    bs = blocks(4, n_blocks=4)
    names = ["self_attn.q_proj", "mlp.down_proj"]
    layers = [LayerInfo(b, n, 200, (10, 20)) for b in range(4) for n in names]
    alloc = DSA("dsa-llama1-7b", lam=0.1)
    stats = [alloc.block_statistic({names[0]: b[:200].reshape(10, 20), names[1]: b[200:].reshape(10, 20)}) for b in bs]
    assert stats == pytest.approx(evaluate_blocks(alloc.function, bs), rel=1e-12)
    out = alloc.allocate(0.6, AllocationContext(layers, 4, block_stats=stats))
    assert abs(np.mean(out.block_sparsity) - 0.6) < 1e-9
    assert out.layer_sparsity[(2, names[1])] == out.block_sparsity[2]
    with pytest.raises(UserError):
        DSA("dsa-poster-best").allocate(0.6, AllocationContext(layers, 4, block_stats=[1.0] * 4))


# ---------------------------------------------------------------------------------------------------------------------
# variation operators


def test_mutation_and_crossover_stay_valid():
    rng = random.Random(1)
    for _ in range(300):
        a, b = random_function(rng), random_function(rng)
        m = mutate(a, rng)
        assert m.key != a.key and m.canonical() == m and parse(str(m)) == m
        c = crossover(a, b, rng)
        for slot in ("pre", "reduce", "transform", "post"):
            assert getattr(c, slot) in (getattr(a, slot), getattr(b, slot))


# ---------------------------------------------------------------------------------------------------------------------
# search


TARGET = AllocationFunction(("ABSLOG",), "VAR", ("ATAN", "SIN"), "SOFTPLUS")


def slot_distance(f):
    """A fitness that prefers one function: 1 + number of differing slot entries (min 1 at TARGET)."""
    d = (f.reduce != TARGET.reduce) + (f.post != TARGET.post)
    for a, b in ((f.pre, TARGET.pre), (f.transform, TARGET.transform)):
        d += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    return 1.0 + d


class Counter:
    def __init__(self, fn, crash_at=None):
        self.fn, self.calls, self.crash_at = fn, [], crash_at

    def __call__(self, f):
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            raise KeyboardInterrupt  # a killed job: not caught by the search
        self.calls.append(f.key)
        return self.fn(f)


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_evolution_improves_and_never_repeats(tmp_path):
    log = tmp_path / "evo.jsonl"
    fit = Counter(slot_distance)
    res = evolutionary_search(fit, seed=0, population=12, generations=30, log_path=log, progress=False)
    recs = lines(log)
    assert len(recs) == len(fit.calls) == res.n_evaluated == res.n_new
    keys = [r["function"] for r in recs]
    assert len(set(keys)) == len(keys) and keys == fit.calls
    assert [r["i"] for r in recs] == list(range(len(recs)))
    gen0 = min(r["fitness"] for r in recs if r["generation"] == 0)
    assert res.best_fitness < gen0 and res.best_fitness == min(r["fitness"] for r in recs)
    assert res.best_fitness == 1.0 and res.best == TARGET  # found the preferred function
    assert res.stopped == "generations" and res.generations == 30
    best = json.loads(best_path(log).read_text())
    assert parse(best["function"]) == res.best and best["fitness"] == res.best_fitness
    curve = [r["best_so_far"] for r in recs]
    assert all(a >= b for a, b in zip(curve, curve[1:])) and curve[-1] == res.best_fitness
    for r in recs:
        assert set(r) >= {"i", "generation", "function", "fitness", "status", "seconds", "best_so_far", "time"}


def test_evolution_beats_initial_population_on_allocation_target(tmp_path):
    bs = blocks(5, n_blocks=8, n=300)
    hidden = np.array(allocate("W:(ABSLOG)-(STD)-(ATAN,COS)", bs, 0.7, 0.1))
    fit = allocation_fitness(bs, 0.7, lambda s: float(np.abs(np.array(s) - hidden).mean()), lam=0.1)
    res = evolutionary_search(fit, seed=3, population=10, max_candidates=120, log_path=tmp_path / "e.jsonl",
                              progress=False)
    recs = lines(tmp_path / "e.jsonl")
    gen0 = min(r["fitness"] for r in recs if r["generation"] == 0 and r["status"] == "ok")
    assert res.best_fitness < gen0
    assert res.stopped == "max_candidates" and len(recs) == 120
    assert fit.cache.hits > 0  # candidates shared the pre+reduce stage
    assert len(fit.cache.table) == fit.cache.misses


@pytest.mark.parametrize("crash_at", [7, 33])  # inside generation 0 and inside a later generation
def test_resume_equals_uninterrupted_run(tmp_path, crash_at):
    kw = dict(seed=5, population=8, generations=50, max_candidates=60, progress=False)
    full = evolutionary_search(Counter(slot_distance), log_path=tmp_path / "full.jsonl", **kw)

    log = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evolutionary_search(Counter(slot_distance, crash_at=crash_at), log_path=log, **kw)
    assert len(lines(log)) == crash_at
    fit = Counter(slot_distance)
    res = evolutionary_search(fit, log_path=log, resume=True, **kw)
    assert len(fit.calls) == 60 - crash_at and res.n_new == 60 - crash_at  # nothing logged is evaluated again
    assert not set(fit.calls) & {r["function"] for r in lines(log)[:crash_at]}
    strip = lambda rs: [(r["i"], r["generation"], r["function"], r["fitness"], r["best_so_far"]) for r in rs]
    assert strip(lines(log)) == strip(lines(tmp_path / "full.jsonl"))
    for a in ("best", "best_fitness", "n_evaluated", "n_failed", "generations", "stopped", "population"):
        assert getattr(res, a) == getattr(full, a), a

    again = Counter(slot_distance)  # resuming a finished run evaluates nothing
    res2 = evolutionary_search(again, log_path=log, resume=True, **kw)
    assert again.calls == [] and res2.population == full.population and len(lines(log)) == 60


def test_resume_with_larger_budget_continues(tmp_path):
    log = tmp_path / "r.jsonl"
    kw = dict(seed=2, population=6, generations=100, progress=False)
    evolutionary_search(Counter(slot_distance), log_path=log, max_candidates=20, **kw)
    fit = Counter(slot_distance)
    res = evolutionary_search(fit, log_path=log, resume=True, max_candidates=45, **kw)
    full = evolutionary_search(Counter(slot_distance), log_path=tmp_path / "f.jsonl", max_candidates=45, **kw)
    assert len(fit.calls) == 25 and res.population == full.population
    assert [r["function"] for r in lines(log)] == [r["function"] for r in lines(tmp_path / "f.jsonl")]


def test_truncated_log_line_is_dropped_on_resume(tmp_path):
    log = tmp_path / "t.jsonl"
    kw = dict(seed=1, population=5, generations=10, max_candidates=12, progress=False)
    evolutionary_search(Counter(slot_distance), log_path=log, **kw)
    text = log.read_text()
    log.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + '{"i": 11, "gener')  # crash while writing line 12
    before = log.read_text()
    assert summarize(log)["n"] == 11 and log.read_text() == before  # reading never edits a log being written
    fit = Counter(slot_distance)
    evolutionary_search(fit, log_path=log, resume=True, **kw)
    assert len(fit.calls) == 1 and len(lines(log)) == 12


def test_existing_log_needs_resume(tmp_path):
    log = tmp_path / "x.jsonl"
    random_search(slot_distance, seed=0, max_candidates=3, log_path=log, progress=False)
    with pytest.raises(UserError, match="resume"):
        random_search(slot_distance, seed=0, max_candidates=3, log_path=log, progress=False)


def test_failing_fitness_is_logged_and_search_continues(tmp_path):
    def fitness(f):
        if f.reduce == "STD":
            return float("nan")
        if f.reduce == "GRAM":
            raise InvalidCandidate("constant")
        return slot_distance(f)

    log = tmp_path / "f.jsonl"
    res = evolutionary_search(fitness, seed=0, population=10, max_candidates=80, log_path=log, progress=False)
    recs = lines(log)
    assert len(recs) == 80 and res.stopped == "max_candidates"
    failed = [r for r in recs if r["status"] == "failed"]
    assert failed and res.n_failed == len(failed)
    for r in recs:
        bad = parse(r["function"]).reduce in ("STD", "GRAM")
        assert (r["status"] == "failed") == bad and (r["fitness"] is None) == bad
    assert any("InvalidCandidate: constant" in r["error"] for r in failed)
    assert any("non-finite" in r["error"] for r in failed)
    assert res.best.reduce not in ("STD", "GRAM")
    s = summarize(log)
    assert s["n"] == 80 and s["n_failed"] == len(failed) and s["best"]["fitness"] == res.best_fitness


def test_a_fitness_bug_stops_the_search_with_the_candidate_named(tmp_path):
    """An error other than InvalidCandidate is a bug, not a bad candidate: it is not logged as fitness inf."""
    def fitness(f):
        if f.reduce == "VAR":
            raise ValueError("boom")
        return slot_distance(f)

    log = tmp_path / "v.jsonl"
    with pytest.raises(ValueError, match="boom") as e:
        evolutionary_search(fitness, seed=0, population=10, max_candidates=80, log_path=log, progress=False)
    recs = lines(log)
    assert all(r["status"] == "ok" for r in recs) and len(recs) < 80
    assert any("VAR" in n and str(log) in n for n in e.value.__notes__)


def test_consecutive_failures_stop_the_search(tmp_path):
    from layerprune.search.dsa import MAX_CONSECUTIVE_FAILURES, SearchFailed

    def always(f):
        raise InvalidCandidate("no allocation")

    log = tmp_path / "a.jsonl"
    with pytest.raises(SearchFailed, match=f"{MAX_CONSECUTIVE_FAILURES} candidates in a row failed .*no allocation"):
        random_search(always, seed=0, max_candidates=500, log_path=log, progress=False)
    assert len(lines(log)) == MAX_CONSECUTIVE_FAILURES and issubclass(SearchFailed, UserError)
    flaky = Counter(lambda f: (_ for _ in ()).throw(InvalidCandidate("odd")) if len(f.key) % 2 else 1.0)
    res = random_search(flaky, seed=0, max_candidates=60, log_path=tmp_path / "b.jsonl", progress=False,
                        max_failures=8)  # failures that are not in a row: the search runs to its budget
    assert res.stopped == "max_candidates" and res.n_failed > 8
    with pytest.raises(SearchFailed, match="3 candidates in a row"):
        evolutionary_search(always, seed=0, population=6, max_candidates=60, log_path=tmp_path / "c.jsonl",
                            progress=False, max_failures=3)


def test_a_failing_signature_propagates(tmp_path):
    """Only InvalidCandidate (a constant function) means 'no signature'; another error never turns duplicate
    detection off."""
    def sig(f):
        raise RuntimeError("signature bug")

    with pytest.raises(RuntimeError, match="signature bug"):
        random_search(slot_distance, seed=0, max_candidates=5, log_path=tmp_path / "s.jsonl", progress=False,
                      signature=sig)


def test_random_search_budget_and_summary(tmp_path):
    fit = Counter(slot_distance)
    log = tmp_path / "rnd.jsonl"
    res = random_search(fit, seed=4, max_candidates=37, log_path=log, progress=False)
    recs = lines(log)
    assert len(fit.calls) == len(recs) == res.n_evaluated == 37 and res.stopped == "max_candidates"
    assert len({r["function"] for r in recs}) == 37
    s = summarize(log)
    assert s["n"] == 37 and s["best"]["fitness"] == res.best_fitness == min(fit.fn(parse(k)) for k in fit.calls)
    assert len(s["best_so_far"]) == 37 and s["best_so_far"][-1] == res.best_fitness
    with pytest.raises(UserError, match="budget"):
        random_search(slot_distance, seed=0, log_path=tmp_path / "y.jsonl", progress=False)
    zero = random_search(slot_distance, seed=0, time_budget_s=0, log_path=tmp_path / "z.jsonl", progress=False)
    assert zero.n_evaluated == 0 and zero.stopped == "time_budget" and zero.best is None

    evolutionary_search(slot_distance, seed=4, population=6, max_candidates=37, log_path=tmp_path / "e.jsonl",
                        progress=False)
    out = plot_curves({"evolution": tmp_path / "e.jsonl", "random": log}, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_signature_skips_equivalent_candidates(tmp_path):
    """Candidates whose signature equals an evaluated one's are skipped; a raising signature never skips."""
    fit = Counter(slot_distance)
    res = random_search(fit, seed=0, max_candidates=30, log_path=tmp_path / "r.jsonl", progress=False,
                        signature=lambda f: f.reduce)
    recs = lines(tmp_path / "r.jsonl")
    assert res.stopped == "exhausted" and res.n_equivalent > 0
    assert sorted(parse(r["function"]).reduce for r in recs) == sorted(REDUCE_OPS) == sorted(set(
        parse(k).reduce for k in fit.calls))

    def sig(f):
        if f.reduce == "VAR":
            raise InvalidCandidate("constant")
        return f.reduce, f.post
    kw = dict(seed=3, population=6, generations=40, max_candidates=40, progress=False, signature=sig)
    full = evolutionary_search(Counter(slot_distance), log_path=tmp_path / "a.jsonl", **kw)
    recs = lines(tmp_path / "a.jsonl")
    fs = [parse(r["function"]) for r in recs]
    sigs = [(f.reduce, f.post) for f in fs if f.reduce != "VAR"]
    assert len(recs) == 40 and len(set(sigs)) == len(sigs)
    assert sum(f.reduce == "VAR" for f in fs) >= 2  # not skipped: their signature raised
    # resume from a cut log replays the same trajectory, skipping the same candidates
    cut = tmp_path / "b.jsonl"
    cut.write_text("".join(l + "\n" for l in (tmp_path / "a.jsonl").read_text().splitlines()[:15]))
    res = evolutionary_search(Counter(slot_distance), log_path=cut, resume=True, **kw)
    assert [r["function"] for r in lines(cut)] == [r["function"] for r in recs]
    assert res.n_equivalent == full.n_equivalent and res.best_fitness == full.best_fitness


def test_allocation_fitness_scores_equal_allocations_once():
    bs = [b + 0.1 for b in blocks(6)]  # positive: ABS is the identity on them
    seen = []
    fit = allocation_fitness(bs, 0.5, lambda s: seen.append(s) or float(sum(s)))
    a = fit(parse("W:()-(MEAN)-(ATAN)"))
    b = fit(parse("W:(ABS)-(MEAN)-(ATAN)"))
    assert a == b and len(seen) == 1
    assert fit.signature(parse("W:()-(MEAN)-(ATAN)")) == fit.signature(parse("W:(ABS)-(MEAN)-(ATAN)"))
    assert fit.signature(parse("W:()-(MEAN)-(ATAN)")) != fit.signature(parse("W:()-(VAR)-(ATAN)"))


def test_evolution_beats_random_search_on_average(tmp_path):
    evo, rnd = [], []
    for seed in range(4):
        e = evolutionary_search(slot_distance, seed=seed, population=12, generations=20, log_path=tmp_path / f"e{seed}",
                                progress=False)
        r = random_search(slot_distance, seed=seed, max_candidates=e.n_evaluated, log_path=tmp_path / f"r{seed}",
                          progress=False)
        evo.append(e.best_fitness)
        rnd.append(r.best_fitness)
    assert sum(evo) < sum(rnd)


def test_progress_line_and_callback(tmp_path, capsys):
    got = []
    res = evolutionary_search(slot_distance, seed=0, population=4, max_candidates=9, log_path=tmp_path / "p.jsonl",
                              progress=True, callback=got.append)
    assert got == lines(tmp_path / "p.jsonl") and res.n_evaluated == 9
    err = capsys.readouterr().err
    assert "gen=" in err and "best=" in err and "per_min=" in err
