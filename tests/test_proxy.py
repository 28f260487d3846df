"""Allocation proxies beyond one-shot Wanda: pruning with propagation, KL to the dense model (tiny models, CPU)."""
import math

import pytest
import torch
from conftest import FAMILIES, tiny_model

from layerprune import prune
from layerprune.search.proxy import (PROXIES, Proxy, dense_hidden, eval_windows, proxy_settings,
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
    assert abs(p.score()) < 1e-3  # the dense log-probabilities are rounded to bfloat16
    w = eval_windows(EV, 32, 4, None)
    nll, kl = window_scores(p.model, w, dense_hidden(p.model, w))
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
    rec = prune(model, tok, sparsity=0.7, allocation="auto", allocation_options={"budget": 0}, calibration=calib(),
                data_dir=data, progress=False)  # no time budget: a tiny model's dense pass budgets next to nothing
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

    kw = dict(seqlen=32, prune_fn=prune_model, budget=0)  # no time budget: every stage runs in full
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
    """A WikiText-2 validation file (byte-level tiny tokenizer: 8 windows need a few KB), as a data directory
    holds it."""
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


# ---------------------------------------------------------------------------------------------------------------------
# --allocation auto within budget: memory (no model copy in full precision, no full-vocabulary tensor), time, device


def test_kl_from_dense_hidden_states_equals_full_vocabulary_log_probabilities(monkeypatch):
    """The KL recomputed chunk by chunk from the dense final hidden states equals the one over the full-vocabulary
    dense log-probabilities (bfloat16, as they were stored), whatever the chunk size."""
    from layerprune.search import proxy as proxy_mod
    from layerprune.models.adapters import get_adapter

    dense = tiny_model("llama", layers=4)
    pruned = tiny_model("llama", layers=4)
    prune(pruned, calibration=calib(), sparsity=0.7, progress=False)
    w = eval_windows(EV, 32, 3, None)
    a = get_adapter(dense)
    with torch.no_grad():
        ref_nll, ref_kl = [], []
        for x in w:
            ref = torch.log_softmax(a.head_logits(dense, a.body(dense)(input_ids=x[None]).last_hidden_state[0, :-1])
                                    .float(), -1).bfloat16().float()
            lp = torch.log_softmax(pruned(input_ids=x[None]).logits[0, :-1].float(), -1)
            ref_nll.append(-lp.gather(1, x[1:, None]).mean().item())
            ref_kl.append((ref.exp() * (ref - lp)).sum(-1).mean().item())
    hidden = proxy_mod.dense_hidden(dense, w)
    assert [tuple(h.shape) for h in hidden] == [(31, 64)] * 3  # T-1 x hidden: no vocabulary axis
    for chunk in (1 << 24, 256 * 5, 256):  # one chunk, 5 rows, 1 row at a time
        monkeypatch.setattr(proxy_mod, "LOGIT_CHUNK", chunk)
        assert proxy_mod.chunk_rows(pruned) == max(1, chunk // 256)
        nll, kl = proxy_mod.window_scores(pruned, w, hidden)
        assert nll == pytest.approx(ref_nll, rel=1e-5) and kl == pytest.approx(ref_kl, rel=1e-4, abs=1e-6)


def test_auto_proxy_reads_the_model_and_prunes_a_bf16_copy_on_its_device():
    from layerprune.search.auto import choose

    model = tiny_model("llama", layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def prune_fn(*a, **k):
        seen.append((k.get("device"), {p.dtype for p in a[0].parameters()}, a[0] is model))
        return prune_model(*a, **k)

    rep = choose(model, calib(), EV, 0.7, seqlen=32, prune_fn=prune_fn, budget=0, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # only read
    assert seen and all(d == torch.device("cpu") and dt == {torch.bfloat16} and not same for d, dt, same in seen)
    assert rep["device"] == "cpu"
    p = Proxy(model, calib(), EV, 0.7, seqlen=32, windows=4, keep_model=True, metric="kl")
    assert p.model is not model and p.model.model.embed_tokens.weight is p.model.lm_head.weight  # still tied
    assert all(t.dtype == torch.bfloat16 for t in p.model.parameters())
    assert all(w.data_ptr() == mod_w.data_ptr() for (_, _, _, w, _, _), mod_w in zip(  # the dense weights: the model's
        p.layers, [m.weight for blk in model.model.layers for m in (blk.self_attn.q_proj, blk.self_attn.k_proj,
                                                                   blk.self_attn.v_proj, blk.self_attn.o_proj,
                                                                   blk.mlp.gate_proj, blk.mlp.up_proj,
                                                                   blk.mlp.down_proj)]))
    p.evaluate_allocation([0.6, 0.65, 0.75, 0.8])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_time_budget_scores_fewer_candidates_and_says_how_many():
    from layerprune.search.auto import CANDIDATES, choose, summary

    kw = dict(seqlen=32, prune_fn=prune_model)
    full = choose(tiny_model("llama", layers=4), calib(), EV, 0.7, finalists=2, margin=0.0, budget=0, **kw)
    sc = full["scored"]
    assert sc["screen"] == sc["allocations"] == sum("error" not in r for r in full["tried"]) <= len(CANDIDATES)
    assert sc["final"] == 2 == sum(r["value"] is not None for r in full["tried"])  # uniform and the screen's best
    assert full["budget"]["seconds"] is None and not full["budget"]["skipped_screen"]
    line = summary(full)
    assert f"{sc['screen']} of {sc['allocations']} candidates screened by oneshot-2, 2 scored by the " \
           "propagate-kl-4 proxy" in line and "skipped" not in line
    # a budget spent by the dense pass: the screen scores uniform (its measure) and nothing more, the final stage is
    # not entered (uniform and a finalist do not fit); the record and the summary say so
    tight = choose(tiny_model("llama", layers=4), calib(), EV, 0.7, finalists=2, margin=0.0, budget=1e-6, **kw)
    b, sc = tight["budget"], tight["scored"]
    assert 0 < b["seconds"] < 1e-3 and sc["screen"] == 1 and sc["final"] == 0 and sc["decided_by"] == "screen"
    assert len(b["skipped_screen"]) == sc["allocations"] - 1 and "uniform" not in b["skipped_screen"]
    assert b["final_stage"] is False and b["skipped_final"] == ["uniform"] and b["final_estimate_seconds"] > 0
    assert tight["chosen"] == "uniform" and [r["label"] for r in tight["tried"] if r["screen"] is not None] == [
        "uniform"]
    line = summary(tight)
    assert f"1 of {sc['allocations']} candidates screened by oneshot-2, 0 scored by the propagate-kl-4 proxy" in line
    assert "the final stage skipped for time (uniform)" in line and f"{sc['allocations'] - 1} screen skipped" in line
    with pytest.raises(UserError, match="budget"):
        choose(tiny_model("llama", layers=4), calib(), EV, 0.7, budget=-1, **kw)


def test_auto_screen_decides_when_no_finalist_fits(monkeypatch):
    """After uniform's proxy value, a finalist that does not fit the time left is skipped, and the screen decides
    between uniform and its best (recorded as decided_by 'screen'). auto's clock is made to see every final (KL)
    score take 1e9 s; the screen's cost stays real."""
    import time

    from layerprune.search import auto

    class Clock:
        extra = 0.0

        @staticmethod
        def perf_counter():
            return time.perf_counter() + Clock.extra

    real = Proxy.evaluate_allocation

    def slow_final(self, bs):
        v = real(self, bs)
        if self.metric == "kl":  # the finalists' proxy (the screen scores perplexity)
            Clock.extra += 1e9
        return v

    monkeypatch.setattr(auto, "time", Clock)
    monkeypatch.setattr(Proxy, "evaluate_allocation", slow_final)
    rep = auto.choose(tiny_model("llama", layers=4), calib(), EV, 0.7, seqlen=32, prune_fn=prune_model, budget=1e6)
    b, sc = rep["budget"], rep["scored"]
    assert sc["decided_by"] == "screen" and sc["final"] == 1 and len(b["skipped_final"]) >= 1
    assert sc["screen"] == sc["allocations"] and not b["skipped_screen"]  # the screen fitted
    uni = next(r for r in rep["tried"] if r["spec"] == "uniform")
    top = min((r for r in rep["tried"] if r["screen"] is not None and r["spec"] != "uniform"),
              key=lambda r: r["screen"])
    assert b["skipped_final"][0] == top["label"]
    assert rep["chosen"] == (top["label"] if top["screen"] < uni["screen"] else "uniform")
    assert "screen" in rep["reason"] and "time budget" in rep["reason"]


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2"])
def test_working_copy_computes_what_a_cast_deep_copy_computes(family):
    """The proxy's bf16 copy (parameters copied directly in bf16) is the old deep copy cast with ``.to``: same buffers
    (rotary frequencies stay as ``Module.to`` leaves them), same logits, bit for bit."""
    import copy

    from layerprune.search.proxy import working_copy

    model = tiny_model(family, layers=2, real=family != "gpt2")
    x = calib()[:2]
    new, old = working_copy(model, torch.bfloat16, "cpu"), copy.deepcopy(model).to(torch.bfloat16)
    for (n, a), (_, b) in zip([*new.named_parameters(), *new.named_buffers()],
                              [*old.named_parameters(), *old.named_buffers()]):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(new(input_ids=x).logits, old(input_ids=x).logits)
    assert all(p.dtype == torch.float32 for p in model.parameters())


class VirtualClock:
    """A clock that only the patched stages move: auto's budget arithmetic on fixed costs."""
    t = 0.0

    @classmethod
    def perf_counter(cls):
        return cls.t


def virtual_costs(monkeypatch, dense: float, screen: tuple, final: tuple):
    """auto's and the proxy's clock made virtual: the dense pass takes ``dense`` seconds, a screen score
    ``screen`` = (masks, perplexity) seconds, a final score ``final`` = (propagating prune, KL) seconds; all else
    takes none."""
    from layerprune.search import auto, proxy as proxy_mod

    VirtualClock.t = 0.0
    monkeypatch.setattr(auto, "time", VirtualClock)
    monkeypatch.setattr(proxy_mod, "time", VirtualClock)
    real_norms, real_apply, real_score = proxy_mod.dense_norms, Proxy.apply, Proxy.score

    def norms(*a, **k):
        VirtualClock.t += dense
        return real_norms(*a, **k)

    def apply(self, bs):
        VirtualClock.t += final[0] if self.propagate else screen[0]
        return real_apply(self, bs)

    def score(self):
        VirtualClock.t += final[1] if self.metric == "kl" else screen[1]
        return real_score(self)

    monkeypatch.setattr(proxy_mod, "dense_norms", norms)
    monkeypatch.setattr(Proxy, "apply", apply)
    monkeypatch.setattr(Proxy, "score", score)


def test_auto_budget_charges_everything_and_plans_both_stages(monkeypatch):
    """Budget arithmetic on a virtual clock: the budget is PRUNE_PASSES dense passes; the tokenization (``spent``),
    the dense pass and every score count against it; the screen scores while one more fits in (1 - BUDGET_MARGIN) of
    it; the final stage is entered only when uniform and one finalist fit at the estimated final cost, and then
    scores as many as fit at uniform's measured cost. The report and the summary count exactly what each stage
    scored."""
    from layerprune.search import auto

    kw = dict(seqlen=32, prune_fn=prune_model, finalists=2, margin=10.0)
    # cheap run: a 10 s dense pass, 1.2 s spent before, screen 1.5 s a candidate -> setup ends at 11.2 s of a 16 s
    # plan (a 20 s budget): uniform (12.7 s) and 2 more (14.2, 15.7 s); the final (prune at 2 x 10 s x 4/4 windows)
    # never fits
    assert auto.BUDGET_MARGIN == 0.2 and auto.PRUNE_PASSES == 2 and auto.KL_COST == 2.0  # the numbers below
    with monkeypatch.context() as m:
        virtual_costs(m, 10.0, (0.5, 1.0), (30.0, 2.0))
        rep = auto.choose(tiny_model("llama", layers=4), calib(), EV, 0.7, spent=1.2, **kw)
    b, sc = rep["budget"], rep["scored"]
    assert b["seconds"] == pytest.approx(20.0) and b["planned_seconds"] == pytest.approx(16.0)
    assert sc["screen"] == min(3, sc["allocations"]) and sc["final"] == 0 and sc["decided_by"] == "screen"
    assert len(b["skipped_screen"]) == sc["allocations"] - sc["screen"]
    assert b["final_stage"] is False and b["final_estimate_seconds"] == pytest.approx(0.5 + 20.0 + 1.0 / 2 * 4 * 2)
    screened = [r for r in rep["tried"] if r["screen"] is not None]
    best = min(screened[1:], key=lambda r: r["screen"])
    assert b["skipped_final"][:2] == ["uniform", best["label"]] and len(b["skipped_final"]) == 1 + min(
        2, len(screened) - 1)  # uniform and the screen's 2 best (margin 10: both)
    assert rep["chosen"] == (best["label"] if best["screen"] < screened[0]["screen"] else "uniform")
    assert rep["seconds"]["validation_text"] == 1.2 and rep["seconds"]["total"] == pytest.approx(1.2 + 10 + 3 * 1.5)
    line = auto.summary(rep)
    assert f"{sc['screen']} of {sc['allocations']} candidates screened by oneshot-2, 0 scored by the " \
           f"propagate-kl-4 proxy" in line and "the final stage skipped for time" in line
    # a dear dense pass (100 s: a 160 s plan) and 64 calibration windows: the screen scores everything (1 s each);
    # the final proxy's estimate (0.5 + 2 x 100 x 4/64 + 0.5 / 2 x 4 x 2 = 15 s) fits twice in the 50 s left; uniform
    # measures 20 s, then one finalist fits (at 20 s) and the next does not
    with monkeypatch.context() as m:
        virtual_costs(m, 100.0, (0.5, 0.5), (18.0, 2.0))
        rep = auto.choose(tiny_model("llama", layers=4), calib(n=64), EV, 0.7, **kw)
    b, sc = rep["budget"], rep["scored"]
    assert sc["screen"] == sc["allocations"] == 10 and not b["skipped_screen"]
    assert b["final_stage"] is True and b["final_estimate_seconds"] == pytest.approx(15.0)
    assert sc["final"] == 2 and sc["decided_by"] == "proxy" and len(b["skipped_final"]) == 1
    assert rep["seconds"]["total"] == pytest.approx(100 + 10 + 2 * 20) and 150 <= b["planned_seconds"]
    assert "2 scored by the propagate-kl-4 proxy; 1 final skipped for time" in auto.summary(rep)


def test_auto_holds_no_full_vocabulary_logits_and_releases_its_proxy(monkeypatch):
    """Every logit the choice computes (the screen's perplexity, the proxy's KL, the dense model's side) comes from
    the head in chunks of at most ``LOGIT_CHUNK`` values: never a [windows x seqlen x vocab] tensor. After ``choose``
    the proxy holds nothing and its bf16 copy of the model is gone before the run prunes."""
    import weakref

    from conftest import VOCAB

    from layerprune.evaluation import perplexity as ppl_mod
    from layerprune.search import auto, proxy as proxy_mod

    rows = 5
    monkeypatch.setattr(ppl_mod, "LOGIT_CHUNK", VOCAB * rows)
    monkeypatch.setattr(proxy_mod, "LOGIT_CHUNK", VOCAB * rows)
    heads = []

    def hook(mod, args, out):
        if isinstance(mod, torch.nn.Linear) and mod.out_features == VOCAB:  # the head (no other linear is this wide)
            heads.append(out.numel() // VOCAB)

    proxies = []
    real_init = Proxy.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        proxies.append((self, weakref.ref(self.model)))

    monkeypatch.setattr(Proxy, "__init__", init)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        rep = auto.choose(tiny_model("llama", layers=4), calib(), EV, 0.7, seqlen=32, prune_fn=prune_model, budget=0)
    finally:
        handle.remove()
    assert rep["scored"]["final"] >= 2 and len(heads) > 10 and max(heads) == rows  # the KL and the screen ran
    (p, copy_ref), = proxies
    assert p.model is None and p.layers is None and p.dense is None and p.cache is None
    assert copy_ref() is None  # the bf16 working copy is freed
