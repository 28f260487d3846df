"""DSA search on a model: the cheap fitness proxy and the ``search-allocation`` command (tiny models, CPU)."""
import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from layerprune import prune
from layerprune.allocation.dsa import DSA, InvalidCandidate, evaluate_blocks, parse
from layerprune.search.proxy import Proxy, dense_norms
from layerprune.cli import main
from layerprune.engine import allocation_statistics
from layerprune.evaluation.perplexity import perplexity
from layerprune.models.adapters import get_adapter
from layerprune.solvers.wanda import Wanda
from layerprune.stats import LayerStats

F = parse("W:(ABSLOG)-(VAR)-(ATAN)")  # varies across the tiny model's blocks


def calib(seed=0, n=4, seqlen=32):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def make_proxy(tmp_path=None, **kw):
    ev = calib(1, 1, 400)
    opts = dict(seqlen=32, windows=4, dtype="float32", norms_path=None if tmp_path is None else tmp_path / "n.st")
    return Proxy(tiny_model("llama", layers=4), calib(), ev, 0.7, **(opts | kw))


def test_proxy_allocation_equals_full_run_allocation():
    """Same statistics and mapping as the DSA allocator of a full prune() run: identical per-block sparsities."""
    p = make_proxy()
    ref = allocation_statistics(tiny_model("llama", layers=4), calib(), {"f": DSA(F)})["f"]
    assert evaluate_blocks(F, p.cache) == ref
    rec = prune(tiny_model("llama", layers=4), calibration=calib(), sparsity=0.7, allocation=f"dsa:{F}",
                progress=False)
    s = p.allocation(F)
    assert s == rec["allocation"]["block"]
    assert sum(w * x for w, x in zip(p.weights, s)) / sum(p.weights) == pytest.approx(0.7, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16, abs=1e-12)


def test_proxy_prunes_like_the_wanda_solver_with_dense_norms():
    p = make_proxy()
    s = p.allocation(F)
    p.apply(s)
    ref = tiny_model("llama", layers=4)
    norms = dense_norms(ref, calib())
    ad = get_adapter(ref)
    total = pruned = 0
    for b, (blk, got_blk) in enumerate(zip(ad.blocks(ref), ad.blocks(p.model))):
        got = ad.linears(got_blk)
        for name, mod in ad.linears(blk).items():
            want = Wanda().prune(mod.weight.detach(), LayerStats(1, norms[f"{b}.{name}"]), s[b])
            assert torch.equal(got[name].weight, want)
            total, pruned = total + want.numel(), pruned + int((want == 0).sum())
    assert abs(pruned / total - 0.7) < 1e-3
    p.restore()  # dense again: the same perplexity as a fresh model
    fresh = perplexity(tiny_model("llama", layers=4), p.eval_ids, 32, 4, progress=False).ppl
    assert perplexity(p.model, p.eval_ids, 32, 4, progress=False).ppl == pytest.approx(fresh, rel=1e-6)


def test_proxy_fitness_cache_and_failures(tmp_path):
    p = make_proxy(tmp_path)
    assert p.stats_passes == 1
    a = p.fitness(F)
    assert a > 1 and a == a
    # a second candidate with the same pre+reduce: no dense pass, no new reduction over the scores
    misses = p.cache.misses
    b = p.fitness(parse("W:(ABSLOG)-(VAR)-(ATAN,SIN)"))
    assert p.cache.misses == misses and p.cache.hits >= 1 and p.stats_passes == 1
    assert b == b
    # another function with the same allocation (ABS after ATAN of a positive variance is the identity) is not scored
    n = p.n_evaluated
    g = parse("W:(ABSLOG)-(VAR)-(ATAN,ABS)")
    assert g.key != F.key and p.allocation(g) == p.allocation(F)
    assert p.fitness(g) == a and p.n_evaluated == n
    # constant functions are failed candidates, not crashes
    with pytest.raises(InvalidCandidate):
        p.fitness(parse("W:(NORMALIZE)-(VAR)-(ABS)"))
    # the dense norms come from the disk cache in a new proxy on the same model and calibration
    q = make_proxy(tmp_path)
    assert q.stats_passes == 0 and q.fitness(F) == a
    # a failed perplexity is a failed candidate
    with torch.no_grad():
        next(q.model.parameters()).fill_(float("nan"))
    q.scored.clear()
    with pytest.raises(InvalidCandidate, match="non-finite"):
        q.fitness(F)


def test_proxy_rescore_and_bad_settings():
    p = make_proxy(dtype="bfloat16")
    assert next(p.model.parameters()).dtype == torch.bfloat16
    r = p.rescore([F, "W:(NORMALIZE)-(VAR)-(ABS)"], windows=6)
    assert r[1] == float("inf") and r[0] == r[0] and r[0] < float("inf")
    assert next(p.model.parameters()).dtype == torch.bfloat16 and p.windows == 4
    with pytest.raises(Exception, match="fewer than"):
        make_proxy(windows=100)
    with pytest.raises(Exception, match="dtype"):
        make_proxy(dtype="int8")


@pytest.fixture
def tiny_model_dir(tmp_path):
    d = tmp_path / "tiny"
    tiny_model("llama", layers=4).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_cli_search_end_to_end_and_resume(tmp_path, tiny_model_dir, text_corpus, capsys):
    out = tmp_path / "search"
    base = ["search-allocation", "--model", str(tiny_model_dir), "--data-dir", str(text_corpus), "--sparsity", "0.7",
            "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--rescore-top", "2", "--rescore-windows",
            "3", "--proxy-dtype", "float32", "--population", "4", "--out", str(out), "--budget-minutes", "5"]
    assert main(base + ["--generations", "2"]) == 0
    printed = capsys.readouterr().out
    assert "candidates/min" in printed and "best:" in printed
    log = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    assert len(log) == 4 + 2 * 2 and {r["generation"] for r in log} == {0, 1, 2}  # elitism 2: 2 new per generation
    assert len({r["function"] for r in log}) == 8
    summary = json.loads((out / "summary.json").read_text())
    best = (out / "best_function.txt").read_text().strip()
    assert summary["best_function"] == best and best in {r["function"] for r in summary["rescored"]}
    assert len(summary["rescored"]) == 2 and summary["search"]["generations"] == 2
    assert summary["throughput"]["new_candidates"] == 8 and summary["throughput"]["dense_passes"] == 1
    alloc = summary["best_allocation"]
    assert len(alloc) == 4 and abs(sum(alloc) / 4 - 0.7) < 1e-9  # equal block sizes: plain mean
    assert (out / "curve.png").stat().st_size > 0 and parse(best).key == best

    # an existing search is not overwritten; a resume with other trajectory settings is refused
    assert main(base + ["--generations", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(base + ["--generations", "3", "--resume", "--seed", "1"]) == 2
    assert "seed" in capsys.readouterr().err
    # resume: the logged candidates are replayed, one more generation is evaluated, the norms come from the cache
    assert main(base + ["--generations", "3", "--resume"]) == 0
    log2 = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    assert log2[:8] == log and len(log2) == 10 and {r["generation"] for r in log2[8:]} == {3}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["throughput"]["new_candidates"] == 2 and summary["throughput"]["dense_passes"] == 0
    assert summary["search"]["n_evaluated"] == 10
    # --force starts over
    assert main(base + ["--generations", "0", "--force"]) == 0
    assert len((out / "search.jsonl").read_text().splitlines()) == 4


def test_cli_random_strategy_and_bad_input(tmp_path, tiny_model_dir, text_corpus, capsys):
    out = tmp_path / "rnd"
    base = ["search-allocation", "--model", str(tiny_model_dir), "--data-dir", str(text_corpus), "--nsamples", "4",
            "--seqlen", "32", "--eval-windows", "2", "--rescore-top", "0", "--proxy-dtype", "float32"]
    assert main(base + ["--strategy", "random", "--max-candidates", "5", "--out", str(out)]) == 0
    assert len((out / "search.jsonl").read_text().splitlines()) == 5
    assert json.loads((out / "summary.json").read_text())["selected_by"] == "proxy"
    capsys.readouterr()
    for extra, word in [(["--sparsity", "0"], "sparsity"), (["--budget-minutes", "0"], "budget"),
                        (["--population", "1"], "population"), (["--resume"], "nothing to resume"),
                        (["--resume", "--force"], "one of them"), (["--eval-windows", "500"], "fewer than")]:
        assert main(base + extra + ["--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert word in err and err.count("\n") == 1
