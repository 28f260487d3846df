"""Search an allocation for one model at one sparsity (``layerprune search-allocation``, ``search_allocation``).

Strategies: ``evolutionary`` and ``random`` search DSA allocation functions (``search/dsa.py``);
``evopress`` searches per-block sparsity levels directly (``search/levels.py``; writes best_allocation.json, use it
as ``--allocation user:best_allocation.json``). The fitness is the proxy of ``search/proxy.py`` (``--proxy``:
one-shot Wanda with dense statistics by default, or pruning with propagation / KL, perplexity or KL on a few
WikiText-2 *validation* windows). ``--workers N`` (N > 1) evaluates candidates on N Ray actors (a local Ray, or
``--ray-address`` to join a cluster) with the same log as the serial search for the same seed and candidate budget.
After the search the ``--rescore-top`` best candidates are scored again in float32 on
``--rescore-windows`` validation windows and the best of them is the result. Files written to ``--out``:

    settings.json             what the fitness and the search trajectory depend on (``--resume`` must match it)
    search.jsonl              one line per candidate (see search/dsa.py); search.jsonl.best.json: best so far
    dense_norms.safetensors   cached dense calibration statistics (reused by --resume / --force)
    best_function.txt         the chosen function: use it as ``--allocation dsa:"<function>"``
    summary.json              settings, result, throughput, timings, the chosen allocation, the rescored top
    curve.png                 best fitness vs candidates evaluated

``--budget-minutes`` is the search time of this invocation (model loading and the one dense pass not included). A
resumed search replays the candidates of its log without evaluating them and goes on from where it stopped.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from layerprune.search.proxy import DEFAULT_PROXY
from layerprune.errors import UserError

OWN_FILES = ("settings.json", "search.jsonl", "search.jsonl.best.json", "best_function.txt", "summary.json",
             "curve.png", "best_allocation.json")
# settings a resumed search must share with the log it continues (budgets may change)
TRAJECTORY = ("model", "sparsity", "strategy", "seed", "population", "tournament", "elitism", "crossover_prob",
              "mutation_prob", "lam", "calib", "nsamples", "seqlen", "calib_seed", "eval_windows", "eval_seqlen",
              "proxy_dtype", "proxy", "level_step", "offspring", "stages")



@dataclass
class SearchConfig:
    """The settings of one search (the flags of ``layerprune search-allocation``, which documents each)."""

    model: str = "smollm2-135m"
    sparsity: float = 0.7
    strategy: str = "evolutionary"  # evolutionary, random (DSA functions) or evopress (per-block levels)
    proxy: str = DEFAULT_PROXY
    level_step: float = 0.01
    offspring: int = 16
    stages: str = "1:4,2:2,8:1"
    start: str | None = None
    min_sparsity: float = 0.0
    max_sparsity: float = 0.99
    workers: int = 1
    ray_address: str | None = None
    budget_minutes: float = 30.0
    generations: int = 1000
    max_candidates: int | None = None
    population: int = 20
    tournament: int = 3
    elitism: int = 2
    crossover_prob: float = 0.5
    mutation_prob: float = 0.5
    seed: int = 0
    lam: float = 0.08
    calib: str = "c4"
    nsamples: int = 32
    seqlen: int = 512
    calib_seed: int = 0
    eval_windows: int = 8
    eval_seqlen: int | None = None
    proxy_dtype: str = "bfloat16"
    rescore_top: int = 5
    rescore_windows: int = 16
    batch_size: int = 8
    data_dir: str | None = None
    out: str = "runs/dsa-search"
    resume: bool = False
    force: bool = False


def _settings(cfg) -> dict:
    return {"model": cfg.model, "sparsity": cfg.sparsity, "strategy": cfg.strategy, "seed": cfg.seed,
            "population": cfg.population, "tournament": cfg.tournament, "elitism": cfg.elitism,
            "crossover_prob": cfg.crossover_prob, "mutation_prob": cfg.mutation_prob, "lam": cfg.lam,
            "calib": cfg.calib, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "calib_seed": cfg.calib_seed,
            "eval_windows": cfg.eval_windows, "eval_seqlen": cfg.eval_seqlen or cfg.seqlen,
            "proxy_dtype": cfg.proxy_dtype, "budget_minutes": cfg.budget_minutes, "generations": cfg.generations,
            "max_candidates": cfg.max_candidates, "rescore_top": cfg.rescore_top,
            "rescore_windows": cfg.rescore_windows, "proxy": cfg.proxy, "level_step": cfg.level_step,
            "offspring": cfg.offspring, "stages": cfg.stages, "workers": cfg.workers, "start": cfg.start,
            "min_sparsity": cfg.min_sparsity, "max_sparsity": cfg.max_sparsity}


def _check(cfg) -> None:
    """Everything that can be checked before loading the model."""
    if not 0.0 < cfg.sparsity < 1.0:
        raise UserError(f"--sparsity {cfg.sparsity} must lie in (0, 1), e.g. 0.7")
    if not cfg.budget_minutes > 0:
        raise UserError(f"--budget-minutes {cfg.budget_minutes} must be > 0")
    if cfg.generations < 0 or (cfg.max_candidates is not None and cfg.max_candidates < 1):
        raise UserError("--generations must be >= 0 and --max-candidates >= 1")
    if cfg.strategy == "evolutionary" and not (cfg.population >= 2 and 1 <= cfg.tournament <= cfg.population
                                                and 0 <= cfg.elitism < cfg.population):
        raise UserError(f"evolution needs --population >= 2, 1 <= --tournament <= population and "
                        f"0 <= --elitism < population (got {cfg.population}, {cfg.tournament}, {cfg.elitism})")
    if not (0 <= cfg.crossover_prob <= 1 and 0 <= cfg.mutation_prob <= 1):
        raise UserError("--crossover-prob and --mutation-prob must lie in [0, 1]")
    if cfg.lam < 0:
        raise UserError(f"--lam {cfg.lam} must be >= 0")
    if cfg.nsamples < 1 or cfg.seqlen < 2 or cfg.eval_windows < 1 or cfg.batch_size < 1:
        raise UserError("--nsamples, --eval-windows and --batch-size must be >= 1 and --seqlen >= 2")
    if cfg.rescore_top < 0 or (cfg.rescore_top and cfg.rescore_windows < 1):
        raise UserError("--rescore-top must be >= 0 and --rescore-windows >= 1")
    if cfg.resume and cfg.force:
        raise UserError("--resume continues the search in --out and --force starts it over: pass one of them")
    if cfg.workers < 1:
        raise UserError(f"--workers {cfg.workers} must be at least 1")
    if cfg.strategy == "evopress":
        stages = parse_stages(cfg.stages)
        if cfg.resume:
            raise UserError("--resume is not supported for --strategy evopress: start over with --force")
        if not 0 < cfg.level_step < 1 or cfg.offspring < 1:
            raise UserError("--level-step must lie in (0, 1) and --offspring be >= 1")
        if not 0 <= cfg.min_sparsity <= cfg.sparsity <= cfg.max_sparsity <= 1:
            raise UserError(f"--min-sparsity {cfg.min_sparsity} <= --sparsity {cfg.sparsity} <= --max-sparsity "
                            f"{cfg.max_sparsity} must hold inside [0, 1]")
        if stages[-1][0] > cfg.eval_windows:
            raise UserError(f"the last --stages step uses {stages[-1][0]} windows, more than --eval-windows "
                            f"{cfg.eval_windows}")
    elif (cfg.min_sparsity, cfg.max_sparsity) != (0.0, 0.99):
        raise UserError("--min-sparsity / --max-sparsity bound the level search: use them with --strategy evopress")


def parse_stages(text: str) -> tuple:
    """"1:4,2:2,8:1" -> ((1, 4), (2, 2), (8, 1)), checked."""
    try:
        stages = tuple(tuple(int(x) for x in part.split(":")) for part in text.split(","))
        assert all(len(st) == 2 and st[0] >= 1 and st[1] >= 1 for st in stages)
    except (ValueError, AssertionError):
        raise UserError(f"--stages {text!r}: write WINDOWS:SURVIVORS steps, e.g. 1:4,2:2,8:1")
    if stages[-1][1] != 1 or any(a[1] < b[1] or a[0] > b[0] for a, b in zip(stages, stages[1:])):
        raise UserError(f"--stages {text!r}: windows must not shrink, survivors not grow, and the last keeps 1")
    return stages


def _prepare_out(cfg, settings: dict) -> Path:
    from layerprune.outputs import check_apart

    out = Path(cfg.out)
    check_apart(out, [cfg.model])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory")
    if cfg.resume:
        s = out / "settings.json"
        if not s.is_file():
            raise UserError(f"nothing to resume in {out} (no settings.json): run without --resume")
        old = json.loads(s.read_text())
        diff = [k for k in TRAJECTORY if old.get(k) != settings[k]]
        if diff:
            raise UserError(f"--resume with other settings than the logged search ({', '.join(diff)}): use the same "
                            "values, or --force to start over")
    elif out.is_dir() and any(out.iterdir()):
        if not (out / "settings.json").is_file():
            raise UserError(f"--out {out} holds files layerprune did not write; --force only replaces a search: "
                            "choose another --out")
        if not cfg.force:
            raise UserError(f"{out} already exists: pass --resume to continue its search, --force to start over, "
                            "or another --out")
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def search_allocation(cfg: SearchConfig) -> dict:
    import torch

    from layerprune.search.proxy import Proxy, proxy_settings
    from layerprune.search.dsa import evolutionary_search, plot_curves, random_search, read_log, summarize
    from layerprune.data import calibration_set
    from layerprune.data import resolve_data_dir
    from layerprune.data.bos import bos_id
    from layerprune.engine import prune_model
    from layerprune.evaluation.perplexity import check_seqlen, tokenize_corpus
    from layerprune.models.loading import load_model

    _check(cfg)
    settings = _settings(cfg)
    data_dir = resolve_data_dir(cfg.data_dir)
    out = _prepare_out(cfg, settings)
    log_path = out / "search.jsonl"

    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, "float32")
    model.to("cpu")
    seqlen = check_seqlen(model, cfg.seqlen)
    eval_seqlen = check_seqlen(model, settings["eval_seqlen"])
    calib = calibration_set(tok, cfg.calib, cfg.nsamples, seqlen, cfg.calib_seed, data_dir).ids
    eval_ids = tokenize_corpus(tok, "wikitext2-valid", data_dir, eval_seqlen)
    t_load = time.perf_counter() - t0
    pset = {k: v for k, v in proxy_settings(cfg.proxy).items() if k != "windows"}
    pkw = dict(seqlen=eval_seqlen, windows=cfg.eval_windows, lam=cfg.lam, batch_size=cfg.batch_size,
               dtype=cfg.proxy_dtype, norms_path=out / "dense_norms.safetensors", bos=bos_id(tok),
               prune_fn=prune_model if pset["propagate"] else None, lo=cfg.min_sparsity, hi=cfg.max_sparsity,
               **pset)
    evaluator = None
    if cfg.workers > 1:  # the driver's proxy computes (and caches) the dense statistics first
        from layerprune.search.ray_search import ProxyFactory, RayEvaluator
    proxy = Proxy(model, calib, eval_ids, cfg.sparsity, **pkw)
    if cfg.workers > 1:
        evaluator = RayEvaluator(ProxyFactory(cfg.model, calib, eval_ids, cfg.sparsity, **pkw), cfg.workers,
                                 cfg.ray_address)
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    print(f"setup: load {t_load:.1f}s, dense pass {proxy.setup_seconds['dense_pass']:.1f}s"
          f"{' (cached)' if proxy.stats_passes == 0 else ''}, ranks {proxy.setup_seconds['ranks']:.1f}s; "
          f"searching for {cfg.budget_minutes:g} min")

    if cfg.strategy == "evopress":
        try:
            return _evopress(cfg, settings, out, proxy, evaluator, t_load)
        finally:
            if evaluator is not None:
                evaluator.close()
    budget = dict(time_budget_s=cfg.budget_minutes * 60, max_candidates=cfg.max_candidates, seed=cfg.seed,
                  log_path=log_path, resume=cfg.resume, progress=True, signature=proxy.signature,
                  evaluate_batch=None if evaluator is None else evaluator.dsa)
    t1 = time.perf_counter()
    try:
        if cfg.strategy == "evolutionary":
            res = evolutionary_search(proxy.fitness, population=cfg.population, generations=cfg.generations,
                                      tournament=cfg.tournament, crossover_prob=cfg.crossover_prob,
                                      mutation_prob=cfg.mutation_prob, elitism=cfg.elitism, **budget)
        else:
            res = random_search(proxy.fitness, **budget, **({} if evaluator is None else {"batch": 4 * cfg.workers}))
    finally:
        if evaluator is not None:
            evaluator.close()
    search_s = time.perf_counter() - t1
    if res.best is None:
        raise UserError(f"no candidate of the search gave a valid allocation ({res.n_evaluated} tried): "
                        "raise --budget-minutes")
    proxy_timings, n_ppl = dict(proxy.timings), proxy.n_evaluated

    # rescoring: the best candidates with distinct allocations, in float32 on more validation windows
    ok = sorted((r for r in read_log(log_path) if r["status"] == "ok"), key=lambda r: r["fitness"])
    top, sigs = [], set()
    for r in ok:
        if len(top) == cfg.rescore_top:
            break
        if (sig := proxy.signature(r["function"])) not in sigs:
            sigs.add(sig)
            top.append(r)
    t2 = time.perf_counter()
    rescored = proxy.rescore([r["function"] for r in top], cfg.rescore_windows) if top else []
    rescore_s = time.perf_counter() - t2
    rows = [{"function": r["function"], "proxy_fitness": r["fitness"], "rescore_fitness": v}
            for r, v in zip(top, rescored)]
    chosen = min(rows, key=lambda r: r["rescore_fitness"])["function"] if rows else str(res.best)
    allocation = proxy.allocation(chosen)
    proxy.restore()

    oks = [r["seconds"] for r in ok]
    summary = {
        "settings": settings,
        "best_function": chosen,
        "selected_by": f"rescore ({cfg.rescore_windows} windows, float32)" if rows else "proxy",
        "best_allocation": allocation,
        "search": {"best": str(res.best), "best_fitness": res.best_fitness, "n_evaluated": res.n_evaluated,
                   "n_new": res.n_new, "n_failed": res.n_failed, "n_equivalent_skipped": res.n_equivalent,
                   "generations": res.generations,
                   "stopped": res.stopped, "log": {k: v for k, v in summarize(log_path).items()
                                                   if k != "best_so_far"}},
        "rescored": rows,
        "throughput": {"search_seconds": search_s, "new_candidates": res.n_new,
                       "candidates_per_minute": res.n_new / search_s * 60 if search_s > 0 else None,
                       "ppl_evaluations": n_ppl,
                       "ppl_evaluations_per_minute": n_ppl / search_s * 60 if search_s > 0 else None,
                       "median_seconds_per_ok_candidate": sorted(oks)[len(oks) // 2] if oks else None,
                       "load_seconds": t_load, "setup_seconds": proxy.setup_seconds,
                       "dense_passes": proxy.stats_passes, "stage_cache": {"hits": proxy.cache.hits,
                                                                           "misses": proxy.cache.misses},
                       "proxy_timings": proxy_timings, "rescore_seconds": rescore_s},
        "threads": torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "best_function.txt").write_text(chosen + "\n")
    plot_curves({cfg.strategy: log_path}, out / "curve.png")
    tp = summary["throughput"]
    print(f"{cfg.strategy}: {res.n_evaluated} candidates ({res.n_new} new, {res.n_failed} failed, "
          f"{res.n_equivalent} equivalent ones skipped), stopped by "
          f"{res.stopped}; {tp['candidates_per_minute'] or math.nan:.1f} candidates/min")
    for r in rows:
        print(f"  {r['function']:48s} proxy {r['proxy_fitness']:10.3f}  rescored {r['rescore_fitness']:10.3f}")
    print(f"best: {chosen}  ->  layerprune prune --allocation dsa:\"{chosen}\" --sparsity {cfg.sparsity}")
    print(f"wrote {out}/summary.json, best_function.txt, search.jsonl, curve.png")
    return summary


def _evopress(cfg, settings: dict, out: Path, proxy, evaluator, t_load: float) -> dict:
    """The level search: per-block sparsities, written to best_allocation.json (``--allocation user:FILE``)."""
    import torch

    from layerprune.search.levels import LevelSpace, level_search

    from layerprune.allocation.user import parse_sparsities

    space = LevelSpace(proxy.weights, cfg.sparsity, cfg.level_step, proxy.lo, proxy.hi)
    start = space.levels_of(parse_sparsities(cfg.start)) if cfg.start else None
    log_path = out / "search.jsonl"
    t1 = time.perf_counter()
    res = level_search(proxy.evaluate_on, space, seed=cfg.seed, offspring=cfg.offspring,
                       stages=parse_stages(cfg.stages), generations=cfg.generations, start=start,
                       max_candidates=cfg.max_candidates, time_budget_s=cfg.budget_minutes * 60,
                       log_path=log_path, progress=True,
                       evaluate_batch=None if evaluator is None else evaluator.levels)
    search_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    rescored = proxy.rescore_allocation(res.best_sparsity, cfg.rescore_windows) if cfg.rescore_top else None
    rescore_s = time.perf_counter() - t2
    proxy.restore()
    bs = res.best_sparsity
    summary = {"settings": settings, "best_allocation": bs, "best_levels": res.best_levels,
               "spread": max(bs) - min(bs), "best_fitness": res.best_fitness, "rescore_fitness": rescored,
               "search": {"generations": res.generations, "n_candidates": res.n_candidates,
                          "n_evaluations": res.n_evaluations, "n_windows": res.n_windows, "stopped": res.stopped,
                          "history": res.history},
               "throughput": {"search_seconds": search_s,
                              "candidates_per_minute": res.n_candidates / search_s * 60 if search_s > 0 else None,
                              "evaluations_per_minute": res.n_evaluations / search_s * 60 if search_s > 0 else None,
                              "load_seconds": t_load, "setup_seconds": proxy.setup_seconds,
                              "rescore_seconds": rescore_s, "workers": cfg.workers,
                              "ray_setup_seconds": getattr(evaluator, "setup_seconds", None)},
               "threads": torch.get_num_threads()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "best_allocation.json").write_text(json.dumps({"block_sparsity": bs}, indent=1) + "\n")
    tp = summary["throughput"]
    print(f"evopress: {res.generations} generations, {res.n_candidates} candidates ({res.n_evaluations} evaluations, "
          f"{res.n_windows} windows), stopped by {res.stopped}; {tp['candidates_per_minute'] or math.nan:.1f} "
          f"candidates/min; best proxy {res.best_fitness:.4g}, spread {max(bs) - min(bs):.3f}")
    print(f"best: layerprune prune --allocation user:{out / 'best_allocation.json'} --sparsity {cfg.sparsity}")
    return summary
