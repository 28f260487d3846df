"""Level search (EvoPress) and the Ray path of the allocation searches (tiny models, CPU)."""
import json
import random

import numpy as np
import pytest
import torch
from conftest import tiny_model

from layerprune.search.proxy import Proxy
from layerprune.search.dsa import evolutionary_search, random_search
from layerprune.search.levels import LevelSpace, level_search
from layerprune.errors import UserError


def test_levels_keep_the_weighted_budget_and_the_bounds():
    sizes = [100, 300, 200, 200, 50]
    sp = LevelSpace(sizes, 0.7, step=0.02, lo=0.5, hi=0.9)
    rng = random.Random(0)
    lv = [0] * 5
    for _ in range(300):
        lv = sp.mutate(lv, rng, max_moves=3)
        s = np.array(sp.sparsity(lv))
        assert sum(lv) == 0
        assert (s >= 0.5 - 1e-12).all() and (s <= 0.9 + 1e-12).all()
        assert float((s * sizes).sum() / sum(sizes)) == pytest.approx(0.7, abs=1e-12)
    assert len({tuple(sp.mutate([0] * 5, rng)) for _ in range(50)}) > 5  # it moves
    with pytest.raises(UserError):
        sp.sparsity([1, 0, 0, 0, 0])


def _quadratic(goal):
    """A fitness with a known optimum: squared distance to ``goal`` (windows add a little noise-free weight)."""
    def f(bs, windows):
        return float(((np.array(bs) - goal) ** 2).sum()) * (1 + 0.01 / windows)
    return f


def test_level_search_moves_towards_the_optimum_and_is_deterministic(tmp_path):
    sp = LevelSpace([10] * 6, 0.7, step=0.02)
    goal = np.array(sp.sparsity([3, 2, 1, -1, -2, -3]))
    runs = []
    for k in range(2):
        r = level_search(_quadratic(goal), sp, seed=3, offspring=6, stages=((1, 3), (4, 1)), max_candidates=240,
                         log_path=tmp_path / f"l{k}.jsonl")
        runs.append(r)
    r = runs[0]
    assert r.history[0] > r.best_fitness and r.history == sorted(r.history, reverse=True)  # elitist: never worse
    assert r.best_fitness < 0.1 * r.history[0]
    assert r.n_candidates == 240 and r.stopped == "max_candidates"
    logs = [[(x["levels"], x["fitness"])
             for x in map(json.loads, (tmp_path / f"l{k}.jsonl").read_text().split("\n")[:-1])]
            for k in range(2)]
    assert logs[0] == logs[1]
    with pytest.raises(UserError, match="survivor"):
        level_search(_quadratic(goal), sp, stages=((1, 3), (4, 2)), max_candidates=5, log_path=tmp_path / "x.jsonl")


def _calib(seed=0, n=4, seqlen=32):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_level_search_on_the_proxy_keeps_the_budget(tmp_path):
    p = Proxy(tiny_model("llama", layers=4), _calib(), _calib(1, 1, 400), 0.7, seqlen=32, windows=4, dtype="float32")
    sp = LevelSpace(p.weights, 0.7, step=0.05)
    r = level_search(p.evaluate_on, sp, seed=0, offspring=4, stages=((1, 2), (4, 1)), max_candidates=8,
                     log_path=tmp_path / "l.jsonl")
    assert r.best_fitness <= r.history[0]
    s = r.best_sparsity
    assert sum(w * x for w, x in zip(p.weights, s)) / sum(p.weights) == pytest.approx(0.7, abs=1e-12)


def _records(path, key="function"):
    return [(r[key], r.get("windows"), r["status"]) for r in map(json.loads, path.read_text().split("\n")[:-1])]


def _fitness(path):
    return [r["fitness"] if r["fitness"] is not None else float("inf")
            for r in map(json.loads, path.read_text().split("\n")[:-1])]


def _same(a, b):
    """The same logged candidates, and the same fitness (to float noise between processes)."""
    assert _records(a) == _records(b)
    assert _fitness(a) == pytest.approx(_fitness(b), rel=1e-3)  # kernels of another process: summation order


def test_ray_searches_log_the_same_candidates_and_fitness_as_serial(tmp_path):
    pytest.importorskip("ray")
    from layerprune.search.ray_search import ProxyFactory, RayEvaluator

    torch.set_num_threads(1)  # the Ray workers run with one thread: the same arithmetic
    model, calib, ev = tiny_model("llama", layers=4), _calib(), _calib(1, 1, 400)
    kw = dict(seqlen=32, windows=4, dtype="float32")
    serial = Proxy(model, calib, ev, 0.7, **kw)
    evaluator = RayEvaluator(ProxyFactory(tiny_model("llama", layers=4), calib, ev, 0.7, **kw), workers=2)
    try:
        common = dict(seed=5, max_candidates=14, progress=False, signature=serial.signature)
        evolutionary_search(serial.fitness, population=6, log_path=tmp_path / "s.jsonl", **common)
        evolutionary_search(serial.fitness, population=6, log_path=tmp_path / "r.jsonl", evaluate_batch=evaluator.dsa,
                            **common)
        assert len(_records(tmp_path / "s.jsonl")) == 14
        _same(tmp_path / "s.jsonl", tmp_path / "r.jsonl")
        random_search(serial.fitness, log_path=tmp_path / "rs.jsonl", **common)
        random_search(serial.fitness, log_path=tmp_path / "rr.jsonl", evaluate_batch=evaluator.dsa, batch=4, **common)
        _same(tmp_path / "rs.jsonl", tmp_path / "rr.jsonl")
        sp = LevelSpace(serial.weights, 0.7, step=0.05)
        lk = dict(seed=2, offspring=4, stages=((1, 2), (4, 1)), max_candidates=8)
        level_search(serial.evaluate_on, sp, log_path=tmp_path / "ls.jsonl", **lk)
        level_search(None, sp, log_path=tmp_path / "lr.jsonl", evaluate_batch=evaluator.levels, **lk)
        assert _records(tmp_path / "ls.jsonl", "levels") == _records(tmp_path / "lr.jsonl", "levels")
        assert _fitness(tmp_path / "ls.jsonl") == pytest.approx(_fitness(tmp_path / "lr.jsonl"), rel=1e-3)
    finally:
        evaluator.close()


def test_cli_evopress_writes_a_usable_allocation(tmp_path, text_corpus, capsys):
    from conftest import tiny_tokenizer

    from layerprune import prune
    from layerprune.cli import main

    d = tmp_path / "tiny"
    tiny_model("llama", layers=4).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    out = tmp_path / "evo"
    base = ["search-allocation", "--model", str(d), "--data-dir", str(text_corpus), "--sparsity", "0.7",
            "--nsamples", "4", "--seqlen", "32", "--eval-windows", "3", "--rescore-windows", "3",
            "--proxy-dtype", "float32", "--strategy", "evopress", "--level-step", "0.05", "--offspring", "4",
            "--stages", "1:2,3:1", "--max-candidates", "8", "--out", str(out)]
    assert main(base) == 0
    assert "candidates/min" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    bs = json.loads((out / "best_allocation.json").read_text())["block_sparsity"]
    assert s["search"]["n_candidates"] == 8 and abs(sum(bs) / 4 - 0.7) < 1e-12 and s["rescore_fitness"] > 0
    log = [json.loads(x) for x in (out / "search.jsonl").read_text().splitlines()]
    assert len(log) == 1 + 2 * (4 + 2) and {r["windows"] for r in log} == {1, 3}  # parent; 2 generations: 4, then 2
    rec = prune(tiny_model("llama", layers=4), sparsity=0.7, allocation=f"user:{out / 'best_allocation.json'}",
                calibration=_calib(), progress=False)
    assert rec["allocation"]["block"] == pytest.approx(bs, abs=1e-12)
    for extra, word in [(["--stages", "1:2,3:2"], "last keeps 1"), (["--stages", "9:1"], "eval-windows"),
                        (["--workers", "0"], "workers"), (["--min-sparsity", "0.75"], "min-sparsity")]:
        assert main(base + extra + ["--force"]) == 2
        err = capsys.readouterr().err
        assert word in err and err.count("\n") == 1


def test_a_start_allocation_goes_on_the_grid_with_the_budget():
    sp = LevelSpace([100, 300, 200, 200, 50], 0.7, step=0.01)
    want = [0.6, 0.75, 0.68, 0.72, 0.69]
    w = np.array(sp.sizes)
    want = list(np.array(want) - ((np.array(want) * w).sum() / w.sum() - 0.7))  # exact budget
    lv = sp.levels_of(want)
    assert sum(lv) == 0
    assert np.abs(np.array(sp.sparsity(lv)) - want).max() < 2 * sp.per_level.max()
    with pytest.raises(UserError):
        sp.levels_of([0.7] * 3)


def test_level_search_failures_are_logged_bugs_stop_it_and_streaks_stop_it(tmp_path):
    from layerprune.allocation.dsa.functions import InvalidCandidate
    from layerprune.search.dsa import SearchFailed

    sp = LevelSpace([10] * 6, 0.7, step=0.02)
    good = _quadratic(np.linspace(0.6, 0.8, 6))

    def some_bad(bs, windows):  # a bad candidate: logged as failed, the search goes on
        if bs[0] < 0.7 - 1e-9:
            raise InvalidCandidate("block 0 too dense")
        return good(bs, windows)

    res = level_search(some_bad, sp, seed=0, offspring=6, stages=((1, 2), (4, 1)), max_candidates=36,
                       log_path=tmp_path / "a.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    failed = [r for r in recs if r["status"] == "failed"]
    assert failed and all(r["error"] == "InvalidCandidate: block 0 too dense" and r["fitness"] is None
                          for r in failed)
    assert len(failed) < len(recs) and res.stopped == "max_candidates" and res.best_sparsity[0] >= 0.7 - 1e-9

    def bug(bs, windows):
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug") as e:
        level_search(bug, sp, seed=0, offspring=4, stages=((1, 1),), max_candidates=8, log_path=tmp_path / "b.jsonl")
    assert any("levels [[0, 0, 0, 0, 0, 0]]" in n for n in e.value.__notes__)
    assert not (tmp_path / "b.jsonl").exists() or not (tmp_path / "b.jsonl").read_text()  # never logged as inf

    def never(bs, windows):
        raise InvalidCandidate("nan perplexity")

    with pytest.raises(SearchFailed, match="5 candidates in a row failed"):
        level_search(never, sp, seed=0, offspring=4, stages=((1, 1),), max_candidates=80, max_failures=5,
                     log_path=tmp_path / "c.jsonl")
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 5


def test_ray_worker_logs_bad_candidates_and_raises_bugs():
    """The Ray actor's evaluation (run in-process here): InvalidCandidate -> (inf, error); anything else raises."""
    from layerprune.allocation.dsa.functions import InvalidCandidate
    from layerprune.search.ray_search import _Worker

    class Fake:
        def evaluate_on(self, bs, windows):
            if windows == 1:
                raise InvalidCandidate("bad")
            if windows == 2:
                raise RuntimeError("bug")
            return sum(bs)

    threads = torch.get_num_threads()
    try:
        w = _Worker(lambda: Fake())
    finally:
        torch.set_num_threads(threads)
    assert w.run("levels", ([0.5, 0.25], 4))[:2] == (0.75, None)
    v, err, _ = w.run("levels", ([0.5], 1))
    assert v == float("inf") and err == "InvalidCandidate: bad"
    with pytest.raises(RuntimeError, match="bug"):
        w.run("levels", ([0.5], 2))
