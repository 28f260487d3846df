"""Allocation proxies beyond one-shot Wanda: pruning with propagation, KL to the dense model (tiny models, CPU)."""
import math

import pytest
import torch
from conftest import FAMILIES, tiny_model

from layerprune import prune
from layerprune.search.proxy import (PROXIES, Proxy, dense_logprobs, eval_windows, proxy_settings,
                                             window_scores)
from layerprune.engine import prune_model
from layerprune.errors import UserError
from layerprune.evaluation.perplexity import perplexity


def calib(seed=0, n=4, seqlen=32):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


EV = calib(1, 1, 400)


def make_proxy(**kw):
    return Proxy(tiny_model("llama", layers=4), calib(), EV, 0.7, **(dict(seqlen=32, windows=4, dtype="float32") | kw))


def test_propagated_proxy_prunes_like_a_full_run_on_its_windows():
    """propagate=n: the weights equal those of prune() on the first n calibration windows with the same allocation."""
    s = [0.6, 0.65, 0.75, 0.8]
    p = make_proxy(propagate=2, prune_fn=prune_model)
    p.apply(s)
    ref = tiny_model("llama", layers=4)
    prune(ref, calibration=calib()[:2], sparsity=0.7, allocation="user:" + ",".join(map(str, s)), progress=False)
    for (n, a), (_, b) in zip(p.model.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    one = make_proxy()  # one-shot with dense norms differs from it
    one.apply(s)
    assert any(not torch.equal(a, b) for a, b in zip(one.model.parameters(), p.model.parameters()))
    # the next candidate starts again from the dense weights: same result twice
    v1 = p.evaluate_allocation(s)
    p.evaluate_allocation([0.7] * 4)
    assert p.evaluate_allocation(s) == v1


def test_kl_metric_is_zero_for_the_dense_model_and_matches_nll():
    p = make_proxy(metric="kl")
    p.restore()
    assert abs(p.score()) < 1e-3  # the dense log-probabilities are stored in bfloat16
    w = eval_windows(EV, 32, 4, None)
    nll, kl = window_scores(p.model, w, dense_logprobs(p.model, w))
    ppl = perplexity(p.model, EV, 32, 4, progress=False).ppl
    assert math.exp(sum(nll) / len(nll)) == pytest.approx(ppl, rel=1e-5)
    assert p.evaluate_allocation([0.7] * 4) > 1e-3  # pruning moves the distributions away


def test_proxy_settings_are_checked():
    assert proxy_settings("oneshot") == PROXIES["oneshot"]
    with pytest.raises(UserError, match="unknown"):
        proxy_settings("nope")
    with pytest.raises(UserError, match="metric"):
        make_proxy(metric="acc")
    with pytest.raises(UserError, match="calibration windows"):
        make_proxy(propagate=9, prune_fn=prune_model)
    with pytest.raises(UserError, match="prune_fn"):
        make_proxy(propagate=2)


# ---------------------------------------------------------------------------------------------------------------------
# --allocation auto

@pytest.mark.parametrize("family", FAMILIES)
def test_auto_chooses_the_lowest_proxy_and_prunes_with_it(tmp_path, family):
    from conftest import tiny_tokenizer

    from layerprune.search.auto import CANDIDATES

    tok = tiny_tokenizer()
    data = tmp_path / "data"
    _tiny_wikitext(data)
    model = tiny_model(family, layers=4)
    rec = prune(model, tok, sparsity=0.7, allocation="auto", calibration=calib(), data_dir=data, progress=False)
    a = rec["allocation_auto"]
    tried = [r for r in a["tried"] if r["value"] is not None]
    assert len(a["tried"]) == len(CANDIDATES) and tried
    best = min(tried, key=lambda r: r["value"])
    assert a["chosen"] == best["label"]
    uni = next(r for r in tried if r["spec"] == "uniform")
    assert best["value"] <= uni["value"]  # never worse than uniform by the proxy
    assert rec["allocation"]["block"] == pytest.approx(best["block_sparsity"], abs=1e-12)
    assert rec["allocation"]["name"] == best["spec"]
    # the same pruned weights as a run with the chosen allocation given by hand (its pre-pass computed by the engine)
    ref = tiny_model(family, layers=4)
    prune(ref, tok, sparsity=0.7, allocation=best["spec"], allocation_options=best["options"], calibration=calib(),
          progress=False)
    for x, y in zip(model.parameters(), ref.parameters()):
        assert torch.equal(x, y)
    assert "auto_choice" in rec["timings"] and a["reason"]


def test_auto_screens_every_candidate_then_scores_uniform_and_the_best_with_the_proxy():
    from layerprune.search.auto import CANDIDATES, SCREEN_PROXY, choose

    kw = dict(seqlen=32, prune_fn=prune_model)
    rep = choose(tiny_model("llama", layers=4), calib(), EV, 0.7, finalists=2, margin=10.0, **kw)
    tried = [r for r in rep["tried"] if "error" not in r]
    assert len(tried) >= 4 and all(r["screen"] is not None for r in tried)
    final = [r for r in tried if r["value"] is not None]
    others = sorted((r for r in tried if r["spec"] != "uniform"), key=lambda r: r["screen"])
    assert [r["label"] for r in final if r["spec"] != "uniform"] == sorted(
        (r["label"] for r in others[:2]), key=[r["label"] for r in tried].index)
    alone = choose(tiny_model("llama", layers=4), calib(), EV, 0.7, finalists=2, margin=0.0, **kw)
    final0 = [r["label"] for r in alone["tried"] if r["value"] is not None]  # no margin: the screen's best alone
    assert len(final0) == 2 and others[0]["label"] in final0
    assert any(r["spec"] == "uniform" for r in final)  # always a finalist: never worse than uniform by the proxy
    assert rep["chosen"] == min(final, key=lambda r: r["value"])["label"]
    assert rep["screen"]["name"] == SCREEN_PROXY and rep["proxy"]["propagate"] == 4
    # no screen: every candidate scored by the proxy, the finalists' values unchanged (the model is not touched)
    full = choose(tiny_model("llama", layers=4), calib(), EV, 0.7, finalists=len(CANDIDATES), **kw)
    assert full["screen"] is None and all(r["value"] is not None for r in full["tried"] if "error" not in r)
    by_label = {r["label"]: r["value"] for r in full["tried"]}
    for r in final:
        assert r["value"] == pytest.approx(by_label[r["label"]], rel=1e-6)
    assert full["chosen"] == min((r for r in full["tried"] if r["value"] is not None), key=lambda r: r["value"])[
        "label"]


def test_auto_is_refused_where_it_cannot_run():
    with pytest.raises(UserError, match="tokenizer"):
        prune(tiny_model("llama"), None, sparsity=0.7, allocation="auto", calibration=calib(), progress=False)
    from conftest import tiny_tokenizer
    with pytest.raises(UserError, match="N:M"):
        prune(tiny_model("llama"), tiny_tokenizer(), nm="2:4", allocation="auto", calibration=calib(), progress=False)
    with pytest.raises(UserError, match="unknown"):
        from layerprune.allocation import get_allocator
        get_allocator("auto", proxy="nope")


def _tiny_wikitext(data):
    """A WikiText-2 validation file (byte-level tiny tokenizer: 8 windows need a few KB), as a data directory holds it."""
    import random

    rng = random.Random(0)
    words = "the of and to in a is was for on as with by he at from his an were are which this".split()
    (data / "wikitext-2").mkdir(parents=True)
    (data / "wikitext-2" / "wiki.valid.tokens").write_text(
        "\n".join(" " + " ".join(rng.choice(words) for _ in range(40)) + " ." for _ in range(120)) + "\n")


def test_proxy_without_ranks_prunes_the_same_weights():
    """ranks=False (auto: a few candidates) masks with the Wanda solver's row_mask: the same weights as the ranks."""
    a, b = make_proxy(), make_proxy(ranks=False)
    for s in ([0.6, 0.65, 0.75, 0.8], [0.7] * 4, [0.1, 0.9, 0.33, 0.87]):
        a.apply(s)
        b.apply(s)
        for x, y in zip(a.model.parameters(), b.model.parameters()):
            assert torch.equal(x, y)
