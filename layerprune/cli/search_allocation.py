"""``layerprune search-allocation``: search an allocation for one model at one sparsity; the search itself is
``layerprune.search.search_allocation`` (its docstring lists the strategies and the files written).
"""
from __future__ import annotations

from dataclasses import fields

from layerprune.search.proxy import DEFAULT_PROXY, PROXIES
from layerprune.cli.common import DTYPES, _examples, calibration_args


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
    calibration_args(p, nsamples=32, seqlen=512, seed_flag="--calib-seed")
    p.set_defaults(func=run)


def run(args) -> int:
    from layerprune.search import SearchConfig, search_allocation

    search_allocation(SearchConfig(**{f.name: getattr(args, f.name) for f in fields(SearchConfig)}))
    return 0
