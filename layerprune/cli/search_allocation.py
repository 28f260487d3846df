"""``layerprune search-allocation``: search an allocation for one model at one sparsity.

Strategies: ``evolutionary`` and ``random`` search DSA allocation functions (``allocation/dsa/search.py``);
``evopress`` searches per-block sparsity levels directly (``allocation/levels.py``; writes best_allocation.json, use it
as ``--allocation user:best_allocation.json``). The fitness is the proxy of ``allocation/dsa/proxy.py`` (``--proxy``:
one-shot Wanda with dense statistics by default, or pruning with propagation / KL, perplexity or KL on a few
WikiText-2 *validation* windows). ``--workers N`` (N > 1) evaluates candidates on N Ray actors (a local Ray, or
``--ray-address`` to join a cluster) with the same log as the serial search for the same seed and candidate budget. After the search the ``--rescore-top`` best candidates are scored again in float32 on
``--rescore-windows`` validation windows and the best of them is the result. Files written to ``--out``:

    settings.json             what the fitness and the search trajectory depend on (``--resume`` must match it)
    search.jsonl              one line per candidate (see dsa/search.py); search.jsonl.best.json: best so far
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
from pathlib import Path

from layerprune.allocation.dsa.proxy import DEFAULT_PROXY, PROXIES
from layerprune.cli.common import DTYPES, _examples
from layerprune.errors import UserError

OWN_FILES = ("settings.json", "search.jsonl", "search.jsonl.best.json", "best_function.txt", "summary.json",
             "curve.png", "best_allocation.json")
# settings a resumed search must share with the log it continues (budgets may change)
TRAJECTORY = ("model", "sparsity", "strategy", "seed", "population", "tournament", "elitism", "crossover_prob",
              "mutation_prob", "lam", "calib", "nsamples", "seqlen", "calib_seed", "eval_windows", "eval_seqlen",
              "proxy_dtype", "proxy", "level_step", "offspring", "stages")


def add_parser(sub) -> None:
    p = sub.add_parser("search-allocation", help="DSA: search an allocation function (evolutionary or random)",
                       epilog=_examples("layerprune search-allocation --sparsity 0.7 --budget-minutes 20 "
                                        "--out runs/dsa70"))
    p.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub id")
    p.add_argument("--sparsity", type=float, default=0.7, help="global target sparsity in (0, 1)")
    p.add_argument("--strategy", default="evolutionary", choices=["evolutionary", "random", "evopress"],
                   help="DSA functions by evolution or random search (the baseline), or per-block levels (EvoPress)")
    p.add_argument("--proxy", default=DEFAULT_PROXY, choices=list(PROXIES),
                   help="fitness: oneshot (Wanda with dense norms), propagate (Wanda with propagation on 4 "
                        "calibration windows); -kl: KL to the dense model instead of perplexity (default "
                        f"{DEFAULT_PROXY}: bench/results/proxy_study)")
    p.add_argument("--level-step", type=float, default=0.01, help="evopress: sparsity of one level")
    p.add_argument("--offspring", type=int, default=16, help="evopress: mutants per generation")
    p.add_argument("--stages", default="1:4,2:2,8:1",
                   help="evopress: selection steps WINDOWS:SURVIVORS, growing windows, the last keeps 1")
    p.add_argument("--start", default=None,
                   help="evopress: start from these per-block sparsities (a JSON list or {\"block_sparsity\": [...]}, "
                        "e.g. a run's allocation) instead of uniform")
    p.add_argument("--min-sparsity", type=float, default=0.0,
                   help="evopress: lowest per-block sparsity a candidate may have (with --max-sparsity: the spread "
                        "stays under their difference, e.g. a start's own range)")
    p.add_argument("--max-sparsity", type=float, default=0.99, help="evopress: highest per-block sparsity")
    p.add_argument("--workers", type=int, default=1, help="evaluate candidates on this many Ray actors (1: serial)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local Ray")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="search time of this run (setup excluded)")
    p.add_argument("--generations", type=int, default=1000, help="evolution: generations after the random first one")
    p.add_argument("--max-candidates", type=int, default=None, help="stop after this many candidates")
    p.add_argument("--population", type=int, default=20, help="evolution: population size")
    p.add_argument("--tournament", type=int, default=3, help="evolution: tournament size")
    p.add_argument("--elitism", type=int, default=2, help="evolution: best candidates kept as they are")
    p.add_argument("--crossover-prob", type=float, default=0.5, help="evolution: probability of crossover")
    p.add_argument("--mutation-prob", type=float, default=0.5, help="evolution: probability of mutation")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--lam", type=float, default=0.08, help="DSA lambda: per-block sparsity spread 2*lambda")
    p.add_argument("--calib", default="c4", help="calibration source (c4 pool, wikitext2-valid, ptb-valid, file)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--calib-seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--eval-windows", type=int, default=8, help="WikiText-2 validation windows per candidate")
    p.add_argument("--eval-seqlen", type=int, default=None, help="validation window length (default: --seqlen)")
    p.add_argument("--proxy-dtype", default="bfloat16", choices=DTYPES,
                   help="dtype of the candidates' perplexity passes")
    p.add_argument("--rescore-top", type=int, default=5, help="rescore this many best candidates at the end (0: no)")
    p.add_argument("--rescore-windows", type=int, default=16, help="validation windows of the float32 rescoring")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--data-dir", default=None, help="data directory (default: $LAYERPRUNE_DATA or ../shared/data)")
    p.add_argument("--out", default="runs/dsa-search", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the search logged in --out")
    p.add_argument("--force", action="store_true", help="start over in an existing --out")
    p.set_defaults(func=run)


def _settings(args) -> dict:
    return {"model": args.model, "sparsity": args.sparsity, "strategy": args.strategy, "seed": args.seed,
            "population": args.population, "tournament": args.tournament, "elitism": args.elitism,
            "crossover_prob": args.crossover_prob, "mutation_prob": args.mutation_prob, "lam": args.lam,
            "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "calib_seed": args.calib_seed,
            "eval_windows": args.eval_windows, "eval_seqlen": args.eval_seqlen or args.seqlen,
            "proxy_dtype": args.proxy_dtype, "budget_minutes": args.budget_minutes, "generations": args.generations,
            "max_candidates": args.max_candidates, "rescore_top": args.rescore_top,
            "rescore_windows": args.rescore_windows, "proxy": args.proxy, "level_step": args.level_step,
            "offspring": args.offspring, "stages": args.stages, "workers": args.workers, "start": args.start,
            "min_sparsity": args.min_sparsity, "max_sparsity": args.max_sparsity}


def _check(args) -> None:
    """Everything that can be checked before loading the model."""
    if not 0.0 < args.sparsity < 1.0:
        raise UserError(f"--sparsity {args.sparsity} must lie in (0, 1), e.g. 0.7")
    if not args.budget_minutes > 0:
        raise UserError(f"--budget-minutes {args.budget_minutes} must be > 0")
    if args.generations < 0 or (args.max_candidates is not None and args.max_candidates < 1):
        raise UserError("--generations must be >= 0 and --max-candidates >= 1")
    if args.strategy == "evolutionary" and not (args.population >= 2 and 1 <= args.tournament <= args.population
                                                and 0 <= args.elitism < args.population):
        raise UserError(f"evolution needs --population >= 2, 1 <= --tournament <= population and "
                        f"0 <= --elitism < population (got {args.population}, {args.tournament}, {args.elitism})")
    if not (0 <= args.crossover_prob <= 1 and 0 <= args.mutation_prob <= 1):
        raise UserError("--crossover-prob and --mutation-prob must lie in [0, 1]")
    if args.lam < 0:
        raise UserError(f"--lam {args.lam} must be >= 0")
    if args.nsamples < 1 or args.seqlen < 2 or args.eval_windows < 1 or args.batch_size < 1:
        raise UserError("--nsamples, --eval-windows and --batch-size must be >= 1 and --seqlen >= 2")
    if args.rescore_top < 0 or (args.rescore_top and args.rescore_windows < 1):
        raise UserError("--rescore-top must be >= 0 and --rescore-windows >= 1")
    if args.resume and args.force:
        raise UserError("--resume continues the search in --out and --force starts it over: pass one of them")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1")
    if args.strategy == "evopress":
        stages = parse_stages(args.stages)
        if args.resume:
            raise UserError("--resume is not supported for --strategy evopress: start over with --force")
        if not 0 < args.level_step < 1 or args.offspring < 1:
            raise UserError("--level-step must lie in (0, 1) and --offspring be >= 1")
        if not 0 <= args.min_sparsity <= args.sparsity <= args.max_sparsity <= 1:
            raise UserError(f"--min-sparsity {args.min_sparsity} <= --sparsity {args.sparsity} <= --max-sparsity "
                            f"{args.max_sparsity} must hold inside [0, 1]")
        if stages[-1][0] > args.eval_windows:
            raise UserError(f"the last --stages step uses {stages[-1][0]} windows, more than --eval-windows "
                            f"{args.eval_windows}")
    elif (args.min_sparsity, args.max_sparsity) != (0.0, 0.99):
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


def _prepare_out(args, settings: dict) -> Path:
    from layerprune.outputs import check_apart

    out = Path(args.out)
    check_apart(out, [args.model])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory")
    if args.resume:
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
        if not args.force:
            raise UserError(f"{out} already exists: pass --resume to continue its search, --force to start over, "
                            "or another --out")
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(args) -> int:
    import torch

    from layerprune.allocation.dsa.proxy import Proxy, proxy_settings
    from layerprune.allocation.dsa.search import evolutionary_search, plot_curves, random_search, read_log, summarize
    from layerprune.api import calibration_set
    from layerprune.data import resolve_data_dir
    from layerprune.data.bos import bos_id
    from layerprune.engine import prune_model
    from layerprune.evaluation.perplexity import check_seqlen, tokenize_corpus
    from layerprune.models.loading import load_model

    _check(args)
    settings = _settings(args)
    data_dir = resolve_data_dir(args.data_dir)
    out = _prepare_out(args, settings)
    log_path = out / "search.jsonl"

    t0 = time.perf_counter()
    model, tok = load_model(args.model, "float32")
    model.to("cpu")
    seqlen = check_seqlen(model, args.seqlen)
    eval_seqlen = check_seqlen(model, settings["eval_seqlen"])
    calib = calibration_set(tok, args.calib, args.nsamples, seqlen, args.calib_seed, data_dir).ids
    eval_ids = tokenize_corpus(tok, "wikitext2-valid", data_dir, eval_seqlen)
    t_load = time.perf_counter() - t0
    pset = {k: v for k, v in proxy_settings(args.proxy).items() if k != "windows"}
    pkw = dict(seqlen=eval_seqlen, windows=args.eval_windows, lam=args.lam, batch_size=args.batch_size,
               dtype=args.proxy_dtype, norms_path=out / "dense_norms.safetensors", bos=bos_id(tok),
               prune_fn=prune_model if pset["propagate"] else None, lo=args.min_sparsity, hi=args.max_sparsity,
               **pset)
    evaluator = None
    if args.workers > 1:  # the driver's proxy computes (and caches) the dense statistics first
        from layerprune.allocation.ray_search import ProxyFactory, RayEvaluator
    proxy = Proxy(model, calib, eval_ids, args.sparsity, **pkw)
    if args.workers > 1:
        evaluator = RayEvaluator(ProxyFactory(args.model, calib, eval_ids, args.sparsity, **pkw), args.workers,
                                 args.ray_address)
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    print(f"setup: load {t_load:.1f}s, dense pass {proxy.setup_seconds['dense_pass']:.1f}s"
          f"{' (cached)' if proxy.stats_passes == 0 else ''}, ranks {proxy.setup_seconds['ranks']:.1f}s; "
          f"searching for {args.budget_minutes:g} min")

    if args.strategy == "evopress":
        try:
            return _evopress(args, settings, out, proxy, evaluator, t_load)
        finally:
            if evaluator is not None:
                evaluator.close()
    budget = dict(time_budget_s=args.budget_minutes * 60, max_candidates=args.max_candidates, seed=args.seed,
                  log_path=log_path, resume=args.resume, progress=True, signature=proxy.signature,
                  evaluate_batch=None if evaluator is None else evaluator.dsa)
    t1 = time.perf_counter()
    try:
        if args.strategy == "evolutionary":
            res = evolutionary_search(proxy.fitness, population=args.population, generations=args.generations,
                                      tournament=args.tournament, crossover_prob=args.crossover_prob,
                                      mutation_prob=args.mutation_prob, elitism=args.elitism, **budget)
        else:
            res = random_search(proxy.fitness, **budget, **({} if evaluator is None else {"batch": 4 * args.workers}))
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
        if len(top) == args.rescore_top:
            break
        if (sig := proxy.signature(r["function"])) not in sigs:
            sigs.add(sig)
            top.append(r)
    t2 = time.perf_counter()
    rescored = proxy.rescore([r["function"] for r in top], args.rescore_windows) if top else []
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
        "selected_by": f"rescore ({args.rescore_windows} windows, float32)" if rows else "proxy",
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
    plot_curves({args.strategy: log_path}, out / "curve.png")
    tp = summary["throughput"]
    print(f"{args.strategy}: {res.n_evaluated} candidates ({res.n_new} new, {res.n_failed} failed, "
          f"{res.n_equivalent} equivalent ones skipped), stopped by "
          f"{res.stopped}; {tp['candidates_per_minute'] or math.nan:.1f} candidates/min")
    for r in rows:
        print(f"  {r['function']:48s} proxy {r['proxy_fitness']:10.3f}  rescored {r['rescore_fitness']:10.3f}")
    print(f"best: {chosen}  ->  layerprune prune --allocation dsa:\"{chosen}\" --sparsity {args.sparsity}")
    print(f"wrote {out}/summary.json, best_function.txt, search.jsonl, curve.png")
    return 0


def _evopress(args, settings: dict, out: Path, proxy, evaluator, t_load: float) -> int:
    """The level search: per-block sparsities, written to best_allocation.json (``--allocation user:FILE``)."""
    import torch

    from layerprune.allocation.levels import LevelSpace, level_search

    from layerprune.allocation.user import parse_sparsities

    space = LevelSpace(proxy.weights, args.sparsity, args.level_step, proxy.lo, proxy.hi)
    start = space.levels_of(parse_sparsities(args.start)) if args.start else None
    log_path = out / "search.jsonl"
    t1 = time.perf_counter()
    res = level_search(proxy.evaluate_on, space, seed=args.seed, offspring=args.offspring,
                       stages=parse_stages(args.stages), generations=args.generations, start=start,
                       max_candidates=args.max_candidates, time_budget_s=args.budget_minutes * 60,
                       log_path=log_path, progress=True,
                       evaluate_batch=None if evaluator is None else evaluator.levels)
    search_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    rescored = proxy.rescore_allocation(res.best_sparsity, args.rescore_windows) if args.rescore_top else None
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
                              "rescore_seconds": rescore_s, "workers": args.workers,
                              "ray_setup_seconds": getattr(evaluator, "setup_seconds", None)},
               "threads": torch.get_num_threads()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "best_allocation.json").write_text(json.dumps({"block_sparsity": bs}, indent=1) + "\n")
    tp = summary["throughput"]
    print(f"evopress: {res.generations} generations, {res.n_candidates} candidates ({res.n_evaluations} evaluations, "
          f"{res.n_windows} windows), stopped by {res.stopped}; {tp['candidates_per_minute'] or math.nan:.1f} "
          f"candidates/min; best proxy {res.best_fitness:.4g}, spread {max(bs) - min(bs):.3f}")
    print(f"best: layerprune prune --allocation user:{out / 'best_allocation.json'} --sparsity {args.sparsity}")
    return 0
