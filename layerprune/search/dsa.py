"""DSA search over allocation functions: evolution (the paper's method) and random search (its baseline).

Fitness is lower-is-better (DSA: WikiText-2 perplexity of the model pruned with the candidate's allocation). Both
searches write one JSONL line per evaluated candidate to ``log_path``:
    {"i", "generation", "function", "fitness", "status", "seconds", "best_so_far", "time"}  (+ "error" when failed)
with ``fitness``/``best_so_far`` null for a failed candidate / before the first success, ``time`` the unix time, and
the best function so far in ``<log_path>.best.json``.

Determinism and resume: a search is a deterministic function of (seed, settings, fitness values): one
``random.Random(seed)`` drives every draw. ``resume=True`` loads the log as a fitness cache and re-runs the search from
the start; a candidate found in the log is *replayed* (its logged fitness is used, the fitness function is not called
and no line is written), so the resumed run walks the same trajectory and, once past the log, continues exactly as an
uninterrupted run with the same seed and budgets would (use ``max_candidates``, not a time budget, for exact equality).
A candidate is identified by its canonical form (``AllocationFunction.key``) and is evaluated at most once. With a
``signature`` (e.g. the candidate's allocation, ``Proxy.signature``), a candidate whose signature equals that of one
already evaluated in this run is an equivalent candidate: it is skipped before evaluation (not logged, counted in
``n_equivalent``), so that clones of one allocation do not fill the population. A signature that raises
``InvalidCandidate`` (a constant function) does not skip: the candidate is evaluated and logged as failed; any other
error of the signature propagates.

Evolution: generation 0 is ``population`` distinct random functions. Each next generation keeps the ``elitism`` best
and fills up with children: two parents by tournament (``tournament`` random members, lowest fitness wins), uniform
crossover of the four slots (pre, reduce, transform, post) with probability ``crossover_prob``, then a mutation with
probability ``mutation_prob`` (replace an op of one slot, or add/remove a pre/transform op within the allowed counts);
a child already evaluated in this run is mutated again until it is new.

Failures: a candidate whose fitness raises ``InvalidCandidate`` (it gives no allocation, or a non-finite metric) or is
non-finite is logged as failed, with its error, at fitness inf, and the search goes on; after ``max_failures``
(``MAX_CONSECUTIVE_FAILURES``) failed candidates in a row the search stops with a ``SearchFailed`` error naming the last
one. Any other exception is a bug, not a bad candidate: it stops the search at once, the candidate named in its note.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from layerprune.progress import tqdm

from layerprune.allocation.dsa.functions import (MAX_PRE, MAX_TRANSFORM, POST_OPS, PRE_OPS, REDUCE_OPS, TRANSFORM_OPS,
                                                 AllocationFunction, InvalidCandidate, StageCache, allocate, parse,
                                                 random_function)
from layerprune.errors import UserError

Fitness = Callable[[AllocationFunction], float]
MAX_CONSECUTIVE_FAILURES = 20  # failed candidates in a row that stop a search (random DSA functions: 1 in 3 fail)


class SearchFailed(UserError):
    """``max_failures`` candidates in a row failed: the proxy, not the candidates, is likely at fault."""


class FailureStreak:
    """Counts failed candidates in a row (in log order) and stops the search at ``limit``."""

    def __init__(self, limit: int, log_path):
        if int(limit) < 1:
            raise UserError(f"max_failures must be at least 1, got {limit}")
        self.limit, self.log_path, self.n = int(limit), log_path, 0

    def __call__(self, error: str | None) -> None:
        self.n = self.n + 1 if error else 0
        if self.n >= self.limit:
            raise SearchFailed(f"the search stopped: {self.n} candidates in a row failed (the last: {error}); every "
                               f"candidate is in {self.log_path}")


def note_candidate(e: BaseException, what: str, log_path) -> None:
    """Name the candidate an unexpected error came from (shown under its traceback)."""
    e.add_note(f"while evaluating {what} of the search logged in {log_path}")


@dataclass
class SearchResult:
    best: AllocationFunction | None
    best_fitness: float
    n_evaluated: int  # candidates in this search's trajectory (replayed from the log + new)
    n_new: int  # fitness calls made by this call
    n_failed: int
    n_equivalent: int  # candidates skipped because an evaluated one had the same signature
    generations: int  # generations completed (evolution; 0 for random search)
    stopped: str  # "generations" | "max_candidates" | "time_budget" | "exhausted"
    log_path: Path
    population: list[tuple[str, float]] = field(default_factory=list)  # final population, best first


def best_path(log_path) -> Path:
    return Path(str(log_path) + ".best.json")


def read_log(log_path, repair: bool = False) -> list[dict]:
    """The records of a search log. A last line without its newline (cut off by a crash, or being written) is
    skipped; ``repair=True`` (resume) also removes it from the file so that appending continues on a clean line."""
    path = Path(log_path)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    if lines[-1] != "":
        if repair:
            path.write_text("".join(line + "\n" for line in lines[:-1]))
        lines = lines[:-1]
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"search log {path} line {n} is not JSON; fix or delete the log")
    return records


class _Run:
    """What both searches share: the log (and its cache of fitness values), the budgets, the best, the progress line."""

    def __init__(self, fitness: Fitness, kind: str, seed: int, log_path, resume: bool, time_budget_s, max_candidates,
                 progress: bool, callback, signature=None, evaluate_batch=None,
                 max_failures: int = MAX_CONSECUTIVE_FAILURES):
        self.fitness, self.kind, self.seed, self.callback = fitness, kind, seed, callback
        # batched mode (evaluate_batch: [function key] -> [(fitness, error or None, seconds)], e.g. on Ray workers):
        # candidates are reserved (``pending``) as they are drawn and evaluated together; the draws see the same
        # "already seen" sets as the serial run, so the trajectory and the log are the same
        self.evaluate_batch, self.pending = evaluate_batch, {}
        self.signature, self.signatures, self.sigs, self.n_equivalent = signature, {}, set(), 0
        self.log_path = Path(log_path)
        self.streak = FailureStreak(max_failures, self.log_path)
        if time_budget_s is not None and time_budget_s < 0 or max_candidates is not None and max_candidates < 0:
            raise UserError("time_budget_s and max_candidates must be >= 0")
        self.time_budget_s, self.max_candidates = time_budget_s, max_candidates
        if self.log_path.exists() and self.log_path.stat().st_size > 0 and not resume:
            raise UserError(f"search log {self.log_path} already exists; pass resume=True to continue it or delete it")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.logged: dict[str, dict] = {}
        records = read_log(self.log_path, repair=True) if resume else []
        for r in records:
            self.logged.setdefault(parse(r["function"]).key, r)
        self.n_lines = len(records)
        self.seen: dict[str, float] = {}  # this trajectory: key -> fitness
        self.best, self.best_fitness = None, math.inf
        self.n_new = self.n_failed = 0
        self.start = time.monotonic()
        self.bar = tqdm(total=max_candidates, disable=not progress, unit="cand", desc=f"dsa {kind}", dynamic_ncols=True)

    def stop_reason(self) -> str | None:
        if self.max_candidates is not None and len(self.seen) + len(self.pending) >= self.max_candidates:
            return "max_candidates"
        if self.time_budget_s is not None and time.monotonic() - self.start >= self.time_budget_s:
            return "time_budget"
        return None

    def _signature(self, f: AllocationFunction):
        """The signature of f (cached by key); None without a signature function or when f gives no allocation."""
        if self.signature is None:
            return None
        if f.key not in self.signatures:
            try:
                self.signatures[f.key] = self.signature(f)
            except InvalidCandidate:  # a constant function: evaluated, and logged as failed
                self.signatures[f.key] = None
        return self.signatures[f.key]

    def novel(self, make: Callable[[], AllocationFunction], rng: random.Random) -> AllocationFunction | None:
        """``make()`` until a candidate new to this trajectory (and not equivalent to an evaluated one) comes out;
        after 100 misses, random functions."""
        for tries in range(10_000):
            f = make() if tries < 100 else random_function(rng)
            if f.key in self.seen or f.key in self.pending:
                continue
            sig = self._signature(f)
            if sig is not None and sig in self.sigs:
                self.n_equivalent += 1
                continue
            return f
        return None

    def reserve(self, f: AllocationFunction, generation: int) -> AllocationFunction:
        """Batched mode: hold f for the next ``flush`` (it counts as seen, its signature as evaluated)."""
        f = f.canonical()
        self.pending[f.key] = (f, generation)
        sig = self._signature(f)
        if sig is not None:
            self.sigs.add(sig)
        return f

    def flush(self) -> dict[str, float]:
        """Evaluate the reserved candidates as one batch, then log them in the order they were drawn."""
        todo = [k for k in self.pending if k not in self.logged]
        try:
            results = dict(zip(todo, self.evaluate_batch(todo))) if todo else {}
        except Exception as e:  # not a bad candidate: a bug or a failed worker, re-raised with the batch named
            note_candidate(e, f"one of the batch {todo}", self.log_path)
            raise
        out = {}
        for key, (f, generation) in list(self.pending.items()):
            out[key] = self.evaluate(f, generation, results.get(key))
        self.pending.clear()
        return out

    def evaluate(self, f: AllocationFunction, generation: int, result=None) -> float:
        f = f.canonical()
        key = f.key
        rec = self.logged.get(key)
        if rec is not None:  # replay: never evaluate a logged candidate again
            fit = math.inf if rec["fitness"] is None else float(rec["fitness"])
            self.n_failed += rec["status"] != "ok"
        else:
            t0, error = time.monotonic(), None
            if result is not None:  # evaluated in a batch
                fit, error, secs = result
                t0 = time.monotonic() - secs
            else:
                try:
                    fit = float(self.fitness(f))
                    if not math.isfinite(fit):
                        error = f"non-finite fitness {fit}"
                except InvalidCandidate as e:  # a bad candidate: logged as failed, the search goes on
                    error = f"{type(e).__name__}: {e}"
                except Exception as e:  # a bug: re-raised with the candidate named
                    note_candidate(e, f"candidate {key}", self.log_path)
                    raise
            if error is not None:
                fit = math.inf
                self.n_failed += 1
            self.n_new += 1
        self.seen[key] = fit
        sig = self._signature(f)
        if sig is not None:
            self.sigs.add(sig)
        if fit < self.best_fitness:
            self.best, self.best_fitness = f, fit
            self._write_best(generation)
        if rec is None:
            rec = {"i": self.n_lines, "generation": generation, "function": key,
                   "fitness": None if error else fit, "status": "failed" if error else "ok",
                   "seconds": round(time.monotonic() - t0, 6),
                   "best_so_far": None if self.best is None else self.best_fitness, "time": round(time.time(), 3)}
            if error:
                rec["error"] = error
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            self.n_lines += 1
            if self.callback is not None:
                self.callback(rec)
        self._progress(generation)
        self.streak(None if rec["status"] == "ok" else rec.get("error", "failed"))
        return fit

    def _write_best(self, generation: int) -> None:
        info = {"function": str(self.best), "fitness": self.best_fitness, "generation": generation,
                "n_evaluated": len(self.seen), "search": self.kind, "seed": self.seed}
        tmp = best_path(self.log_path).with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, best_path(self.log_path))

    def _progress(self, generation: int) -> None:
        minutes = (time.monotonic() - self.start) / 60
        self.bar.set_postfix(gen=generation, best=f"{self.best_fitness:.4g}", new=self.n_new,
                             per_min=f"{self.n_new / minutes:.1f}" if minutes > 0 else "-", refresh=False)
        self.bar.update(1)  # after the postfix, so that the line it draws is current

    def result(self, stopped: str, generations: int, population=()) -> SearchResult:
        self.bar.close()
        return SearchResult(self.best, self.best_fitness, len(self.seen), self.n_new, self.n_failed, self.n_equivalent,
                            generations,
                            stopped, self.log_path, [(f.key, fit) for fit, f in population])


# ---------------------------------------------------------------------------------------------------------------------
# variation operators


def tournament_select(ranked: list, k: int, rng: random.Random) -> AllocationFunction:
    """``ranked`` is sorted best first: the winner of k random members is the one with the lowest index."""
    return ranked[min(rng.sample(range(len(ranked)), min(k, len(ranked))))][1]


def crossover(a: AllocationFunction, b: AllocationFunction, rng: random.Random) -> AllocationFunction:
    """Uniform crossover of the four slots."""
    pick = [rng.random() < 0.5 for _ in range(4)]
    return AllocationFunction((a if pick[0] else b).pre, (a if pick[1] else b).reduce,
                              (a if pick[2] else b).transform, (a if pick[3] else b).post).canonical()


def _mutate_ops(ops: tuple, pool: list, hi: int, rng: random.Random) -> tuple:
    ops = [op for op in ops if op != "NO_OP"]
    actions = (["replace", "remove"] if ops else []) + (["add"] if len(ops) < hi else [])
    action = rng.choice(actions)
    if action == "replace":
        i = rng.randrange(len(ops))
        ops[i] = rng.choice([op for op in pool if op != ops[i]])
    elif action == "remove":
        ops.pop(rng.randrange(len(ops)))
    else:
        ops.insert(rng.randint(0, len(ops)), rng.choice(pool))
    return tuple(ops)


def mutate(f: AllocationFunction, rng: random.Random) -> AllocationFunction:
    """Change one slot: replace its op, or add/remove a pre/transform op within the allowed counts."""
    pre, reduce, transform, post = f.pre, f.reduce, f.transform, f.post
    slot = rng.choice(["pre", "reduce", "transform", "post"])
    if slot == "pre":
        pre = _mutate_ops(pre, [op for op in PRE_OPS if op != "NO_OP"], MAX_PRE, rng)
    elif slot == "transform":
        transform = _mutate_ops(transform, [op for op in TRANSFORM_OPS if op != "NO_OP"], MAX_TRANSFORM, rng)
    elif slot == "reduce":
        reduce = rng.choice([op for op in REDUCE_OPS if op != reduce])
    else:
        post = rng.choice([op for op in POST_OPS if op != post])
    return AllocationFunction(pre, reduce, transform, post).canonical()


# ---------------------------------------------------------------------------------------------------------------------
# searches


def evolutionary_search(fitness: Fitness, *, seed: int = 0, population: int = 20, generations: int = 100,
                        time_budget_s: float | None = None, max_candidates: int | None = None, tournament: int = 3,
                        crossover_prob: float = 0.5, mutation_prob: float = 0.5, elitism: int = 2,
                        log_path, resume: bool = False, progress: bool = True,
                        callback: Callable[[dict], None] | None = None, signature=None,
                        evaluate_batch=None, max_failures: int = MAX_CONSECUTIVE_FAILURES) -> SearchResult:
    """Evolve allocation functions; lower fitness is better. ``generations`` counts generations after the initial
    random population (generation 0). Stops at the first of: generations done, ``max_candidates`` evaluated, time.
    ``signature``: f -> hashable; candidates equivalent to an evaluated one are skipped (see the module doc).
    ``evaluate_batch``: [function key] -> [(fitness, error or None, seconds)]: a generation's candidates are drawn
    first and evaluated together (e.g. on Ray workers, ``ray_search``), with the same log as the serial search.
    ``max_failures``: failed candidates in a row that stop the search (``SearchFailed``; module doc)."""
    if population < 2 or not 1 <= tournament <= population or not 0 <= elitism < population or generations < 0:
        raise UserError("evolution needs population >= 2, 1 <= tournament <= population, "
                        f"0 <= elitism < population, generations >= 0 (got {population}, {tournament}, {elitism}, "
                        f"{generations})")
    if not (0 <= crossover_prob <= 1 and 0 <= mutation_prob <= 1):
        raise UserError("crossover_prob and mutation_prob must lie in [0, 1]")
    rng = random.Random(seed)
    run = _Run(fitness, "evolution", seed, log_path, resume, time_budget_s, max_candidates, progress, callback,
               signature, evaluate_batch, max_failures)
    batched = evaluate_batch is not None

    def add(members, f, g):  # serial: evaluate now; batched: reserve, the fitness comes with the flush
        if batched:
            members.append([None, run.reserve(f, g)])
        else:
            members.append([run.evaluate(f, g), f])

    def settle(members):
        if batched and run.pending:
            fits = run.flush()
            for m in members:
                if m[0] is None:
                    m[0] = fits[m[1].key]
        return [(m[0], m[1]) for m in members]

    pop: list = []
    while len(pop) < population:
        if (why := run.stop_reason()) is not None:
            return run.result(why, 0, sorted(settle(pop), key=lambda p: p[0]))
        f = run.novel(lambda: random_function(rng), rng)
        if f is None:
            return run.result("exhausted", 0, sorted(settle(pop), key=lambda p: p[0]))
        add(pop, f, 0)
    pop = settle(pop)

    def child(ranked):
        a = tournament_select(ranked, tournament, rng)
        c = crossover(a, tournament_select(ranked, tournament, rng), rng) if rng.random() < crossover_prob else a
        if rng.random() < mutation_prob or c.key in run.seen or c.key in run.pending:
            c = mutate(c, rng)
        return c

    for g in range(1, generations + 1):
        ranked = sorted(pop, key=lambda p: p[0])  # stable: ties keep their order
        nxt = [list(p) for p in ranked[:elitism]]
        while len(nxt) < population:
            if (why := run.stop_reason()) is not None:
                return run.result(why, g - 1, sorted(settle(nxt) + ranked[elitism:], key=lambda p: p[0])[:population])
            f = run.novel(lambda: child(ranked), rng)
            if f is None:
                settle(nxt)
                return run.result("exhausted", g - 1, ranked)
            add(nxt, f, g)
        pop = settle(nxt)
    return run.result("generations", generations, sorted(pop, key=lambda p: p[0]))


def random_search(fitness: Fitness, *, seed: int = 0, time_budget_s: float | None = None,
                  max_candidates: int | None = None, log_path, resume: bool = False, progress: bool = True,
                  callback: Callable[[dict], None] | None = None, signature=None, evaluate_batch=None,
                  batch: int = 8, max_failures: int = MAX_CONSECUTIVE_FAILURES) -> SearchResult:
    """The baseline: distinct uniform random functions until ``max_candidates`` or the time budget is used up
    (``signature``, ``evaluate_batch``, ``max_failures``: as in ``evolutionary_search``; batched, ``batch`` candidates
    at a time)."""
    if time_budget_s is None and max_candidates is None:
        raise UserError("random search needs a budget: set time_budget_s and/or max_candidates")
    rng = random.Random(seed)
    run = _Run(fitness, "random", seed, log_path, resume, time_budget_s, max_candidates, progress, callback,
               signature, evaluate_batch, max_failures)
    while (why := run.stop_reason()) is None:
        f = run.novel(lambda: random_function(rng), rng)
        if f is None:
            why = "exhausted"
            break
        if evaluate_batch is None:
            run.evaluate(f, 0)
        else:
            run.reserve(f, 0)
            if len(run.pending) >= batch:
                run.flush()
    if run.pending:
        run.flush()
    return run.result(why, 0)


def allocation_fitness(block_scores, target: float, evaluate_allocation: Callable[[list[float]], float],
                       lam: float = 0.08, weights=None, lo: float = 0.0, hi: float = 0.99) -> Fitness:
    """fitness(f) = evaluate_allocation(per-block sparsities of f) (e.g. the perplexity after pruning with them).

    The pre+reduce stage is shared through one StageCache (``fitness.cache``), and allocations equal to 1e-9 (from
    functions that differ by an affine map, e.g.) are scored once. A constant function raises InvalidCandidate.
    ``fitness.signature(f)`` is that rounded allocation (pass it as the searches' ``signature``).
    """
    cache = StageCache(block_scores)
    scored: dict[tuple, float] = {}

    def signature(f: AllocationFunction) -> tuple:
        return tuple(round(x, 9) for x in allocate(f, cache, target, lam, weights, lo, hi))

    def fitness(f: AllocationFunction) -> float:
        s = allocate(f, cache, target, lam, weights, lo, hi)
        k = tuple(round(x, 9) for x in s)
        if k not in scored:
            scored[k] = float(evaluate_allocation(s))
        return scored[k]

    fitness.cache, fitness.signature = cache, signature
    return fitness


# ---------------------------------------------------------------------------------------------------------------------
# reading logs


def summarize(log_path) -> dict:
    """n candidates, n failed, the best, and the best-so-far curve (None before the first success)."""
    records = read_log(log_path)
    best, curve = None, []
    for r in records:
        if r["status"] == "ok" and (best is None or r["fitness"] < best["fitness"]):
            best = {"function": r["function"], "fitness": r["fitness"], "i": r["i"], "generation": r["generation"]}
        curve.append(None if best is None else best["fitness"])
    return {"n": len(records), "n_failed": sum(r["status"] != "ok" for r in records), "best": best,
            "best_so_far": curve}


def plot_curves(logs: dict, out_png, title: str | None = None) -> Path:
    """Best fitness vs candidates evaluated, one line per log ({"evolution": log1, "random": log2}). Left: the whole
    run, log y axis; right: a zoom on the best region, with every candidate's fitness as a faint dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4))
    lows = []
    for k, (name, path) in enumerate(logs.items()):
        ok = [(r["i"] + 1, r["fitness"]) for r in read_log(path) if r["status"] == "ok"]
        if not ok:
            continue
        pts = list(zip([x for x, _ in ok], itertools.accumulate([y for _, y in ok], min)))
        color = f"C{k}"
        for a in (ax, zoom):
            a.plot(*zip(*pts), label=name, drawstyle="steps-post", color=color)
        zoom.scatter(*zip(*ok), s=4, alpha=0.25, color=color, linewidths=0)
        lows.append(pts[-1][1])
    ax.set_yscale("log")
    if lows:
        zoom.set_ylim(0.98 * min(lows), 1.25 * max(lows))
    for a in (ax, zoom):
        a.set_xlabel("candidates evaluated")
        a.grid(alpha=0.3, which="both")
    ax.set_ylabel("best fitness so far (proxy PPL)")
    zoom.set_title("zoom; dots: every candidate", fontsize=9)
    ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, metadata={"Software": "layerprune"})
    plt.close(fig)
    return out
