"""``--allocation auto``: choose the allocation for this model by a proxy on the WikiText-2 *validation* split.

The candidates (``CANDIDATES``) are uniform and a small grid of spreads of OWL, DLP (median), ATP and one DSA function
(the one the 70% evolution found on SmolLM2). Each candidate's per-block sparsities are computed as a real run would
compute them, from ONE dense pass (the proxy's cached dense input norms: the allocators' statistics are those of the
full run's pre-pass), then scored by the proxy (``dsa/proxy.py``, ``PROXIES[name]``: default one-shot Wanda, perplexity
on 4 validation windows in bfloat16; the masks come from the Wanda solver's ``row_mask`` per candidate instead of a
sort of every weight, cheaper for a few candidates). The lowest value wins; uniform is a candidate and wins ties, so the choice is
never worse than uniform *by the proxy*. The proxy works on a copy of the model (the model passed in is not changed).

    report = choose(model, calib_ids, valid_ids, 0.7, bos=bos)
    report["spec"], report["options"], report["block_stats"]   # what prune() then runs with, pre-pass skipped
"""
from __future__ import annotations

import copy
import math
import time

from layerprune.allocation.base import AllocationContext, BoundedAllocator
from layerprune.allocation.dsa.proxy import PROXIES, InvalidCandidate, Proxy, proxy_settings
from layerprune.allocation.plan import layer_census
from layerprune.errors import UserError
from layerprune.models.adapters import get_adapter
from layerprune.registry import ALLOCATOR_REGISTRY, Option, register_allocator
from layerprune.stats import LayerStats

AUTO_PROXY = "oneshot-4"  # bench/proxy_study.md: ranks as well as 8 windows (rho 0.80), at half the cost
DSA_FUNCTION = "W:(EXP,TANH)-(GRAM)-(ATAN,SIGMOID)-(SIGMOID)"  # README, DSA: found by evolution at 70% on SmolLM2

# (label, allocation spec, options); uniform first: it wins ties
CANDIDATES = (
    ("uniform", "uniform", {}),
    ("owl lam 0.04", "owl", {"lam": 0.04}),
    ("owl lam 0.08", "owl", {"lam": 0.08}),
    ("dlp alpha 0.05", "dlp", {"stat": "median", "alpha": 0.05}),
    ("dlp alpha 0.10", "dlp", {"stat": "median", "alpha": 0.10}),
    ("dlp alpha 0.15", "dlp", {"stat": "median", "alpha": 0.15}),
    ("atp beta_frac 0.3", "atp", {"beta_frac": 0.3}),
    ("atp beta_frac 0.6", "atp", {"beta_frac": 0.6}),
    ("dsa lam 0.08", f"dsa:{DSA_FUNCTION}", {"lam": 0.08}),
    ("dsa lam 0.15", f"dsa:{DSA_FUNCTION}", {"lam": 0.15}),
)


@register_allocator
class Auto(BoundedAllocator):
    """A placeholder in the registry (flags, checks): ``prune()`` replaces it by the candidate ``choose`` picks."""

    name = "auto"
    options = (Option("proxy", str, None, f"auto: the proxy that ranks the candidates (default {AUTO_PROXY})",
                      choices=tuple(PROXIES), flag="--auto-proxy"), *BoundedAllocator.options)

    def __init__(self, proxy: str = AUTO_PROXY, lo: float = 0.0, hi: float = 0.99):
        super().__init__(lo, hi)
        proxy_settings(proxy)
        self.proxy = proxy

    def allocate(self, target, ctx):
        raise UserError("allocation 'auto' is chosen by prune() before pruning (layerprune.allocation.auto.choose); "
                        "pass it to prune(), not to the plan")


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


def choose(model, calib, eval_ids, target: float, *, proxy: str = AUTO_PROXY, lo: float = 0.0, hi: float = 0.99,
           seqlen: int = 512, batch_size: int = 8, bos: int | None = None, candidates=CANDIDATES,
           progress: bool = False, prune_fn=None) -> dict:
    """Score every candidate allocation with the proxy; the report of what was tried and what was chosen (and why).
    ``prune_fn``: for a proxy that propagates (``engine.prune_to_blocks``)."""
    settings = proxy_settings(proxy)
    t0 = time.perf_counter()
    p = Proxy(copy.deepcopy(model), calib, eval_ids, target, seqlen=seqlen, lo=lo, hi=hi, batch_size=batch_size,
              bos=bos, prune_fn=prune_fn, ranks=False, **settings)  # a few candidates: no sort of every weight
    t_setup = time.perf_counter() - t0
    infos = layer_census(model, get_adapter(model))
    num_blocks = len(p.block_layers)
    rows, scored = [], {}
    for label, spec, opts in candidates:
        t1 = time.perf_counter()
        row = {"label": label, "spec": spec, "options": dict(opts)}
        try:
            alloc = _build(spec, opts, lo, hi)
            stats = block_statistics_from_norms(p, alloc)
            bs = alloc.allocate(target, AllocationContext(infos, num_blocks, block_stats=stats)).block_sparsity
            key = p.counts(bs)
            if key not in scored:
                scored[key] = p.evaluate_allocation(bs)
            row.update(value=scored[key], spread=max(bs) - min(bs), block_sparsity=bs, block_stats=stats)
        except (UserError, InvalidCandidate) as e:  # e.g. a DSA function that is constant on this model
            row.update(value=None, error=str(e))
        row["seconds"] = time.perf_counter() - t1
        rows.append(row)
        if progress:
            v = row["value"]
            print(f"auto: {label:20s} proxy {v if v is None else round(v, 4)}  ({row['seconds']:.1f}s)", flush=True)
    ok = [r for r in rows if r["value"] is not None and math.isfinite(r["value"])]
    if not ok:
        raise UserError("allocation 'auto': no candidate gave a finite proxy value on this model; pick one yourself")
    best = min(ok, key=lambda r: r["value"])  # the first of equals: uniform wins ties
    uni = next((r["value"] for r in ok if r["spec"] == "uniform"), None)
    if best["spec"] == "uniform":
        why = "uniform has the lowest proxy value of all candidates"
    else:
        why = (f"lowest proxy value ({best['value']:.4g}) of {len(ok)} candidates; uniform's is "
               + (f"{uni:.4g} ({(best['value'] / uni - 1) * 100:+.1f}%)" if uni else "not available"))
    del p  # its model is a copy: nothing to restore
    return {"chosen": best["label"], "spec": best["spec"], "options": best["options"],
            "block_stats": best["block_stats"], "block_sparsity": best["block_sparsity"], "reason": why,
            "proxy": {"name": proxy, **settings, "split": "wikitext2 validation"},
            "tried": [{k: v for k, v in r.items() if k not in ("block_stats",)} for r in rows],
            "seconds": {"setup": t_setup, "candidates": sum(r["seconds"] for r in rows),
                        "total": time.perf_counter() - t0}}
