"""``--allocation auto``: choose the allocation for this model by a proxy on the WikiText-2 *validation* split.

The candidates (``CANDIDATES``) are uniform and a small grid of spreads of OWL, DLP (median), ATP and one DSA function
(the one the 70% evolution found on SmolLM2). Each candidate's per-block sparsities are computed as a real run would
compute them, from ONE dense pass (the proxy's cached dense input norms: the allocators' statistics are those of the
full run's pre-pass, which the run then skips), and scored in two steps (EvoPress's multi-step selection):
  1. screen: every candidate by ``SCREEN_PROXY`` (one-shot Wanda with the dense norms, perplexity on 2 validation
     windows in bfloat16: bench/results/proxy_study, rho 0.92 over 20 allocations at 0.37x the cost of the old proxy);
  2. the screen's best, the next ones up to ``finalists`` in all if their screen value is within ``margin`` of the best
     (only near-ties need the better proxy), and uniform, by the proxy (``search/proxy.py``, ``PROXIES[name]``; default
     ``propagate-kl-4``: Wanda with propagation on 4 calibration windows, KL to the dense model on 4 validation
     windows, rho 0.94 at 1.26x the old proxy's cost; ``propagate-kl``, 8 windows, ranks better, rho 0.96, at 1.6x).
The lowest proxy value wins; uniform is always a finalist and wins ties, so the choice is never worse than uniform *by
the proxy*. ``finalists`` >= the number of candidates skips the screen. The model passed in is only read: the proxy
prunes a copy of it made directly in bfloat16 on ``device`` (where all its forwards run), reads the dense weights
from the model itself, and keeps the dense model's final hidden states for the KL, never its full-vocabulary
log-probabilities (``dsa/proxy.py``).

Time budget (recorded in the report's ``budget``): the choice should cost no more than ``budget`` (``AUTO_BUDGET``)
times the run's estimated prune, ``PRUNE_PASSES`` dense passes over the calibration (the proxy's own dense pass,
measured first: a Wanda run passes the calibration through every block twice, other methods cost more). Everything
the choice spends counts against it, from the tokenization of the validation text (``spent``) through the dense
pass, the proxy's setup and every score, and it plans to end by ``1 - BUDGET_MARGIN`` of it (measured costs vary on a
shared machine). Each stage measures its cost on uniform, its first candidate, and then scores only what fits:
  - screen: the next candidates in ``CANDIDATES`` order (one of each family first) while their measured cost fits,
    the rest ``skipped`` (recorded);
  - final: entered only when uniform and one finalist fit at the final proxy's estimated cost (``final_cost``: the
    propagating prune on its windows at the dense pass's rate plus the KL at the screen's measured rate, from the
    screen's uniform); then uniform, then as many finalists as fit at uniform's measured cost. When the stage is not
    entered, or no finalist fits after uniform, the screen decides between uniform and its best (``decided_by``
    "screen"; uniform wins ties).
``budget=0`` lifts the limit. On large models the dense pass dominates and nothing is cut; on small or cheap runs
(a small model with a large vocabulary) fewer candidates are scored, and the report says exactly how many each stage
scored (``scored``) and which it skipped (``budget``). Memory: the proxy masks with the Wanda solver's ``row_mask``
(no per-weight ranks), and everything it allocated is released (``Proxy.release``, freed heap handed back to the
OS) before ``choose`` returns, so the run prunes on top of the memory it would have had without ``auto``.

    report = choose(model, calib_ids, valid_ids, 0.7, bos=bos, prune_fn=engine.prune_model)
    report["spec"], report["options"], report["block_stats"]   # what prune() then runs with, pre-pass skipped
"""
from __future__ import annotations

import math
import time

from layerprune.allocation.base import AllocationContext, BoundedAllocator
from layerprune.search.proxy import PROXIES, InvalidCandidate, Proxy, proxy_settings
from layerprune.allocation.plan import layer_census
from layerprune.errors import UserError
from layerprune.models.adapters import get_adapter
from layerprune.offload import release_free_memory
from layerprune.registry import ALLOCATOR_REGISTRY, Option, register_allocator
from layerprune.stats import LayerStats

AUTO_PROXY = "propagate-kl-4"  # the finalists' proxy: bench/results/proxy_study, rho 0.938 over 20 allocations
SCREEN_PROXY = "oneshot-2"  # every candidate's first score: rho 0.916 at 0.37x the old proxy's cost
FINALISTS = 2  # at most this many of the screen's best go on to the proxy (with uniform) ...
MARGIN = 0.10  # ... those within this fraction of the screen's best value (a clear winner goes alone)
AUTO_BUDGET = 1.0  # the choice may take this many times the run's estimated prune ...
PRUNE_PASSES = 2  # ... estimated as this many dense passes over the calibration (budget 0: no limit) ...
BUDGET_MARGIN = 0.2  # ... and plans to end by (1 - this) of it: measured costs vary (a shared CPU, a busy GPU)
KL_COST = 2.0  # a KL score costs at most this many perplexity scores of as many windows (two heads, two softmaxes)
SPREAD_OPTIONS = ("lam", "alpha", "beta_frac")  # change the map from statistic to sparsity, not the statistic
DSA_FUNCTION = "W:(EXP,TANH)-(GRAM)-(ATAN,SIGMOID)-(SIGMOID)"  # README, DSA: found by evolution at 70% on SmolLM2

# (label, allocation spec, options); uniform first: it wins ties. One candidate of each family first, so that a screen
# cut short by the time budget still sees every family.
CANDIDATES = (
    ("uniform", "uniform", {}),
    ("dsa lam 0.15", f"dsa:{DSA_FUNCTION}", {"lam": 0.15}),
    ("dlp alpha 0.15", "dlp", {"stat": "median", "alpha": 0.15}),
    ("atp beta_frac 0.3", "atp", {"beta_frac": 0.3}),
    ("owl lam 0.08", "owl", {"lam": 0.08}),
    ("dsa lam 0.08", f"dsa:{DSA_FUNCTION}", {"lam": 0.08}),
    ("dlp alpha 0.10", "dlp", {"stat": "median", "alpha": 0.10}),
    ("atp beta_frac 0.6", "atp", {"beta_frac": 0.6}),
    ("owl lam 0.04", "owl", {"lam": 0.04}),
    ("dlp alpha 0.05", "dlp", {"stat": "median", "alpha": 0.05}),
)


@register_allocator
class Auto(BoundedAllocator):
    """A placeholder in the registry (flags, checks): ``prune()`` replaces it by the candidate ``choose`` picks."""

    name = "auto"
    options = (Option("proxy", str, None, f"auto: the proxy that ranks the finalists (default {AUTO_PROXY})",
                      choices=tuple(PROXIES), flag="--auto-proxy"),
               Option("finalists", int, None, f"auto: at most this many candidates go from the {SCREEN_PROXY} screen "
                      f"to the proxy, besides uniform (default {FINALISTS}; {len(CANDIDATES)} or more: no screen)",
                      flag="--auto-finalists"),
               Option("margin", float, None, f"auto: after the screen's best, the proxy also scores those within this "
                      f"fraction of its screen value (default {MARGIN})", flag="--auto-margin"),
               Option("budget", float, None, f"auto: its choice may take this many times the run's estimated prune "
                      f"({PRUNE_PASSES} dense passes); fewer candidates are scored past it (default {AUTO_BUDGET}; 0: "
                      "no limit)", flag="--auto-budget"),
               *BoundedAllocator.options)

    def __init__(self, proxy: str = AUTO_PROXY, finalists: int = FINALISTS, margin: float = MARGIN,
                 budget: float = AUTO_BUDGET, lo: float = 0.0, hi: float = 0.99):
        super().__init__(lo, hi)
        proxy_settings(proxy)
        if int(finalists) < 1 or not float(margin) >= 0 or not float(budget) >= 0:
            raise UserError(f"--auto-finalists must be at least 1, --auto-margin and --auto-budget >= 0, got "
                            f"{finalists}, {margin}, {budget}")
        self.proxy, self.finalists, self.margin, self.budget = proxy, int(finalists), float(margin), float(budget)

    def allocate(self, target, ctx):
        raise UserError("allocation 'auto' is chosen by prune() before pruning (layerprune.search.auto.choose); "
                        "pass it to prune(), not to the plan")

    # An allocator with ``choose_for_run`` is asked by ``prune()`` for the allocation the run then uses.
    def check_run(self, cfg, has_tokenizer: bool) -> None:
        """What a run with auto needs, checked before any work."""
        if not has_tokenizer:
            raise UserError("allocation 'auto' scores candidates on WikiText-2 validation text: pass the tokenizer")
        if cfg.nm is not None:
            raise UserError("allocation 'auto' chooses per-block sparsities; it does not combine with N:M: pick an "
                            "allocation yourself for --nm")
        if cfg.skip:
            raise UserError("allocation 'auto' prunes every linear in its proxy; it does not combine with --skip")
        if cfg.offload == "disk":
            raise UserError("allocation 'auto' scores candidates on a copy of the model in memory; it does not "
                            "combine with --offload disk")
        if not 0.0 < cfg.sparsity < 1.0:
            raise UserError(f"allocation 'auto' needs a sparsity in (0, 1), got {cfg.sparsity}")

    def choose_for_run(self, model, tokenizer, ids, cfg, *, data_dir, progress: bool, prune_fn, device=None) -> dict:
        """``choose``'s report for this run, with ``run_options``: the chosen allocation's options (lo/hi kept)."""
        from layerprune.data import resolve_data_dir
        from layerprune.data.bos import bos_id
        from layerprune.evaluation.perplexity import check_seqlen, tokenize_corpus

        t0 = time.perf_counter()
        seqlen = check_seqlen(model, None, default=512)  # the search's windows, capped at the model's maximum
        valid = tokenize_corpus(tokenizer, "wikitext2-valid", resolve_data_dir(data_dir), seqlen)
        release_free_memory()  # the tokenizer's temporaries
        opts = cfg.allocation_options
        named = {k: opts[k] for k in ("proxy", "finalists", "margin", "budget") if opts.get(k) is not None}  # else
        # the defaults
        report = choose(model, ids, valid, cfg.sparsity, **named, lo=opts.get("lo", 0.0), hi=opts.get("hi", 0.99),
                        seqlen=seqlen, batch_size=cfg.batch_size, bos=bos_id(tokenizer), progress=progress,
                        prune_fn=prune_fn, device=device, spent=time.perf_counter() - t0)
        report["run_options"] = {**report["options"], **{k: v for k, v in opts.items() if k in ("lo", "hi")}}
        return report


def _build(spec: str, opts: dict, lo: float, hi: float):
    """The allocator of a candidate spec ("dsa:FUNC" fills the class's ``spec_arg``)."""
    name, _, arg = spec.partition(":")
    cls = ALLOCATOR_REGISTRY.get(name)
    return cls(**({cls.spec_arg: arg} if arg else {}), **opts, lo=lo, hi=hi)


def block_statistics_from_norms(proxy: Proxy, allocator) -> list[float] | None:
    """The allocator's per-block statistic from the proxy's dense weights and dense input norms (the numbers the full
    run's dense pre-pass gives), or None when it needs none."""
    if not allocator.needs:
        return None
    out = []
    for layer_ids in proxy.block_layers:
        weights = {proxy.layers[j][1]: proxy.layers[j][3] for j in layer_ids}
        stats = {proxy.layers[j][1]: LayerStats(sq_norm=proxy.layers[j][4]) for j in layer_ids}
        out.append(float(allocator.statistic(weights, stats)))
    return out


def final_cost(settings: dict, screen: dict, dense_pass: float, n_calib: int, apply_s: float,
               score_s: float) -> float:
    """The estimated seconds of one score by the final proxy (``settings``), from what the screen (``screen``)
    measured on its first candidate: the prune (propagating: Wanda on ``propagate`` calibration windows,
    ``PRUNE_PASSES`` passes at the dense pass's rate per window plus a solve at the cost of the one-shot masks,
    ``apply_s``; else the one-shot masks) and the metric on its windows at the screen's rate per window (``score_s``
    over the screen's windows; KL: ``KL_COST`` times that)."""
    prune = apply_s + (PRUNE_PASSES * dense_pass * settings["propagate"] / n_calib if settings["propagate"] else 0.0)
    metric = score_s / screen["windows"] * settings["windows"] * (KL_COST if settings["metric"] == "kl" else 1.0)
    return prune + metric


def choose(model, calib, eval_ids, target: float, *, proxy: str = AUTO_PROXY, finalists: int = FINALISTS,
           margin: float = MARGIN, budget: float = AUTO_BUDGET, lo: float = 0.0, hi: float = 0.99, seqlen: int = 512,
           batch_size: int = 8, bos: int | None = None, candidates=CANDIDATES, progress: bool = False, prune_fn=None,
           device=None, spent: float = 0.0) -> dict:
    """Screen the candidate allocations, score the finalists with the proxy, within the time ``budget`` (module doc);
    the report of what was tried, what each stage scored, and what was chosen (and why). ``prune_fn``: for a proxy
    that propagates (``engine.prune_model``). ``device``: where the proxy's forwards run (the run's device).
    ``spent``: seconds the choice already took before this call (the validation text's tokenization), charged
    against the budget and counted in ``seconds.total``."""
    settings = proxy_settings(proxy)
    settings["propagate"] = min(settings["propagate"], int(calib.shape[0]))  # a short calibration: all of it
    screen = proxy_settings(SCREEN_PROXY)
    screen["windows"] = min(screen["windows"], settings["windows"])
    if not float(budget) >= 0:
        raise UserError(f"--auto-budget must be >= 0, got {budget}")
    t0 = time.perf_counter() - float(spent)  # the choice's start: everything since counts against its budget
    p = Proxy(model, calib, eval_ids, target, seqlen=seqlen, lo=lo, hi=hi, batch_size=batch_size, bos=bos,
              prune_fn=prune_fn, ranks=False, device=device, keep_model=True, **settings)
    try:  # the proxy's memory (its bf16 copy, dense hidden states) is released before the run prunes
        return _choose(p, model, target, settings, screen, finalists, margin, budget, lo, hi, candidates, progress,
                       t0, float(spent), int(calib.shape[0]), proxy)
    finally:
        p.release()


def _choose(p: Proxy, model, target, settings, screen, finalists, margin, budget, lo, hi, candidates, progress, t0,
            spent, n_calib, proxy) -> dict:
    t_setup = time.perf_counter() - t0 - spent
    dense_pass = p.setup_seconds["dense_pass"]
    limit = budget * PRUNE_PASSES * dense_pass if budget > 0 else math.inf  # seconds the whole choice may take
    plan = (1 - BUDGET_MARGIN) * limit  # ... and those it plans with
    left = lambda: plan - (time.perf_counter() - t0)  # noqa: E731
    infos = layer_census(model, get_adapter(model))
    num_blocks = len(p.block_layers)
    rows, stat_cache = [], {}
    for label, spec, opts in candidates:  # every candidate's allocation (the statistics shared across spreads)
        t1 = time.perf_counter()
        row = {"label": label, "spec": spec, "options": dict(opts), "screen": None, "value": None}
        try:
            alloc = _build(spec, opts, lo, hi)
            key = (spec, tuple(sorted((k, v) for k, v in opts.items() if k not in SPREAD_OPTIONS)))
            if key not in stat_cache:
                stat_cache[key] = block_statistics_from_norms(p, alloc)
            stats = stat_cache[key]
            bs = alloc.allocate(target, AllocationContext(infos, num_blocks, block_stats=stats)).block_sparsity
            row.update(spread=max(bs) - min(bs), block_sparsity=bs, block_stats=stats, counts=p.counts(bs))
        except (UserError, InvalidCandidate) as e:  # e.g. a DSA function that is constant on this model
            row["error"] = str(e)
        row["seconds"] = time.perf_counter() - t1
        rows.append(row)
    ok = [r for r in rows if "error" not in r]
    if not ok:
        raise UserError("allocation 'auto': no candidate gave an allocation on this model; pick one yourself")

    def score(rows_, field, evaluate, budgeted: bool = False) -> list[dict]:
        """Score ``rows_`` in order; ``budgeted``: after the first, only while one more at the first's measured cost
        fits in the time left. Returns the rows skipped for time."""
        done, cost, skipped = {}, None, []
        for r in rows_:
            if budgeted and cost is not None and cost > left():
                skipped.append(r)
                continue
            t1 = time.perf_counter()
            try:
                if r["counts"] not in done:  # equal pruned counts: the same pruned model
                    done[r["counts"]] = evaluate(r["block_sparsity"])
                r[field] = done[r["counts"]]
            except InvalidCandidate as e:
                r["error"] = str(e)
            r["seconds"] += time.perf_counter() - t1
            cost = cost if cost is not None else time.perf_counter() - t1
            if progress:
                v = r[field]
                print(f"auto ({field}): {r['label']:20s} {v if v is None else round(v, 4)}  ({r['seconds']:.1f}s)",
                      flush=True)
        return skipped

    measured = {}  # the screen's first score: what the final proxy's cost is estimated from

    def screen_eval(bs):
        before = dict(p.timings)
        try:
            return p.evaluate_as(bs, **screen)
        finally:
            if not measured:
                measured.update(apply=p.timings["apply"] - before["apply"], score=p.timings["ppl"] - before["ppl"])

    t1 = time.perf_counter()
    screened = finalists < len(ok)
    skipped_screen, skipped_final, decided_by, estimate = [], [], "proxy", None
    uniform = [r for r in ok if r["spec"] == "uniform"]
    if screened:  # uniform first: its cost is the stage's measure
        skipped_screen = score(uniform + [r for r in ok if r["spec"] != "uniform"], "screen", screen_eval,
                               budgeted=True)
        ranked = sorted((r for r in ok if r["screen"] is not None and math.isfinite(r["screen"])),
                        key=lambda r: r["screen"])
        top = [r for r in ranked if r["spec"] != "uniform"][:finalists]
        final = uniform + [r for r in top if r is top[0] or r["screen"] <= (1 + margin) * top[0]["screen"]]
    else:
        final = uniform + [r for r in ok if r["spec"] != "uniform"]
    t_screen = time.perf_counter() - t1
    if screened and measured:
        estimate = final_cost(settings, screen, dense_pass, n_calib, measured["apply"], measured["score"])
    enter = not (screened and estimate is not None and min(len(final), 2) * estimate > left())
    if enter:  # the final stage: uniform (its measure) and then the finalists that fit
        skipped_final = score(final, "value", p.evaluate_allocation, budgeted=screened)
    else:  # uniform and one finalist do not fit: the screen decides
        skipped_final = list(final)
    t_final = time.perf_counter() - t1 - t_screen
    scored = [r for r in rows if r["value"] is not None and math.isfinite(r["value"])]
    if not enter or (skipped_final and len(scored) == 1 and scored[0]["spec"] == "uniform"):
        decided_by = "screen"  # between uniform and its best (uniform first: it wins ties)
        best = min(final[:2], key=lambda r: r["screen"] if r["screen"] is not None and math.isfinite(r["screen"])
                   else math.inf)
    elif not scored:
        raise UserError("allocation 'auto': no candidate gave a finite proxy value on this model; pick one yourself")
    else:
        best = min(scored, key=lambda r: r["value"])  # the first of equals: uniform (first) wins ties
    uni = next((r for r in scored if r["spec"] == "uniform"), None)
    names = ", ".join(r["label"] for r in scored)
    if decided_by == "screen":
        why = (f"{best['label']} has the lower {SCREEN_PROXY} screen value of uniform and the screen's best "
               f"({final[1]['label']})" if len(final) > 1 else
               f"{best['label']} is the only candidate the {SCREEN_PROXY} screen scored")
        why += (": no finalist fitted the time budget after uniform's proxy value" if enter else
                f": the {proxy} proxy's stage did not fit the time budget (uniform and a finalist at an estimated "
                f"{estimate:.1f}s each)")
    elif best["spec"] == "uniform":
        why = f"uniform has the lowest proxy value of the finalists ({names})"
    else:
        why = (f"lowest proxy value ({best['value']:.4g}) of the finalists ({names}); uniform's is "
               + (f"{uni['value']:.4g} ({(best['value'] / uni['value'] - 1) * 100:+.1f}%)" if uni else
                  "not available"))
    if screened:
        why += (f"; finalists: uniform and the lowest of the {len(ok) - len(skipped_screen)} screened candidates by "
                f"the {SCREEN_PROXY} screen, with the next ones within {margin:.0%} of it, {finalists} at most")
    n_screen = sum(r["screen"] is not None for r in rows)
    n_final = sum(r["value"] is not None for r in rows)
    return {"chosen": best["label"], "spec": best["spec"], "options": best["options"],
            "block_stats": best["block_stats"], "block_sparsity": best["block_sparsity"], "reason": why,
            "proxy": {"name": proxy, **settings, "split": "wikitext2 validation"},
            "screen": {"name": SCREEN_PROXY, **screen, "finalists": finalists, "margin": margin} if screened else None,
            "scored": {"candidates": len(rows), "allocations": len(ok), "screen": n_screen, "final": n_final,
                       "decided_by": decided_by},
            "budget": {"factor": budget, "prune_passes": PRUNE_PASSES,
                       "seconds": None if math.isinf(limit) else limit,
                       "planned_seconds": None if math.isinf(plan) else plan,
                       "final_estimate_seconds": estimate, "final_stage": enter,
                       "skipped_screen": [r["label"] for r in skipped_screen],
                       "skipped_final": [r["label"] for r in skipped_final]},
            "device": str(p.device),
            "tried": [{k: v for k, v in r.items() if k not in ("block_stats", "counts")} for r in rows],
            "seconds": {"validation_text": spent, "setup": t_setup, "dense_pass": dense_pass, "screen": t_screen,
                        "final": t_final, "total": time.perf_counter() - t0}}


def summary(report: dict) -> str:
    """One line on what ``choose`` did: the choice, why, and exactly how many candidates each stage scored."""
    sc, b = report["scored"], report["budget"]
    stages = (f"{sc['screen']} of {sc['allocations']} candidates screened by {report['screen']['name']}, "
              if report.get("screen") else "")
    cut = [f"{len(b[k])} {k.split('_')[1]} skipped for time ({', '.join(b[k])})" for k in ("skipped_screen",
                                                                                            "skipped_final") if b[k]]
    if b["skipped_final"] and not b.get("final_stage", True):
        cut[-1] = f"the final stage skipped for time ({', '.join(b['skipped_final'])})"
    return (f"chose {report['chosen']} ({report['reason']}); {stages}{sc['final']} scored by the "
            f"{report['proxy']['name']} proxy" + (f"; {'; '.join(cut)}" if cut else "")
            + f"; {report['seconds']['total']:.1f}s" + (f" of a {b['seconds']:.1f}s budget" if b["seconds"] else "")
            + f" on {report['device']}")
