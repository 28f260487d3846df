"""Level search (EvoPress; Sieberling et al., ICML 2025): evolution over per-block sparsity levels.

A candidate is one integer level L_b per block. With ``unit = step * mean block size`` (parameters), block b's sparsity
is ``target + L_b * unit / size_b``, so the parameter-weighted mean is ``target + unit * sum(L) / sum(size)``: it is the
target exactly whenever sum(L) = 0 (with equal blocks, as in every LLaMA-like model, level k is target + k * step).
Levels keep every sparsity inside [lo, hi].

Mutation moves sparsity between blocks and keeps the budget: ``moves`` times (uniform in 1..max_moves), one block
goes one level up and another one level down. Generation g: ``offspring`` mutants of the parent, evaluated in
``stages`` of growing token counts: stage k scores the survivors of stage k-1 on ``windows_k`` validation windows and
keeps the ``keep_k`` best; the survivor of the last stage replaces the parent when its fitness on the last stage's
windows is lower than the parent's (elitism: the parent is scored once on those windows). Generation 0 is the start
(uniform unless given). One ``random.Random(seed)`` draws every mutation and evaluation never draws, so a search is
a deterministic function of (seed, settings, fitness values); the evaluations of one stage form a batch that
``evaluate_batch`` may run in parallel (``ray_search.RayEvaluator``) with the same log as the serial run.

Fitness is lower-is-better: ``fitness(block_sparsity, windows) -> float``. Log, one JSONL line per evaluation:
    {"i", "generation", "stage", "windows", "levels", "fitness", "status", "seconds", "parent_fitness", "time"}
(+ "error" when failed). A candidate whose fitness raises ``InvalidCandidate`` or is non-finite is logged as failed
with its error, at fitness inf; ``max_failures`` failed evaluations in a row stop the search (``SearchFailed``). Any
other exception is a bug and stops the search at once.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from layerprune.allocation.dsa.functions import InvalidCandidate
from layerprune.search.dsa import MAX_CONSECUTIVE_FAILURES, FailureStreak, note_candidate
from layerprune.errors import UserError

DEFAULT_STAGES = ((1, 4), (2, 2), (8, 1))  # (windows, survivors) per selection step; the last keeps 1


@dataclass
class LevelResult:
    best_levels: list[int]
    best_sparsity: list[float]
    best_fitness: float  # on the last stage's windows
    generations: int
    n_candidates: int  # offspring evaluated (first stage)
    n_evaluations: int  # fitness calls over all stages (the parent's included)
    n_windows: int  # validation windows scored in all
    stopped: str
    log_path: Path
    history: list[float] = field(default_factory=list)  # parent fitness after each generation


class LevelSpace:
    """Levels <-> per-block sparsities for a parameter-weighted budget that holds exactly."""

    def __init__(self, sizes, target: float, step: float = 0.01, lo: float = 0.0, hi: float = 0.99):
        self.sizes = np.asarray(sizes, dtype=np.float64)
        if self.sizes.ndim != 1 or self.sizes.size < 2 or (self.sizes <= 0).any():
            raise UserError("level search needs at least two blocks with parameters")
        if not 0 < step < 1:
            raise UserError(f"level step {step} must lie in (0, 1), e.g. 0.01")
        if not lo <= target <= hi:
            raise UserError(f"target {target} is outside [{lo}, {hi}]")
        self.target, self.step, self.lo, self.hi = float(target), float(step), float(lo), float(hi)
        self.unit = step * self.sizes.mean()
        self.per_level = self.unit / self.sizes  # sparsity change of one level, per block
        self.max_level = np.floor((hi - target) / self.per_level + 1e-9).astype(int)
        self.min_level = -np.floor((target - lo) / self.per_level + 1e-9).astype(int)

    def sparsity(self, levels) -> list[float]:
        lv = np.asarray(levels)
        if lv.sum() != 0:
            raise UserError("levels must sum to 0 (the budget)")
        return (self.target + lv * self.per_level).tolist()

    def levels_of(self, sparsity) -> list[int]:
        """The nearest levels (sum 0, inside the bounds) of per-block sparsities, e.g. DLP's or auto's allocation as
        the search's start: rounded, then the largest rounding errors corrected one level at a time."""
        s = np.asarray(sparsity, dtype=np.float64)
        if s.shape != self.sizes.shape:
            raise UserError(f"the start has {s.size} sparsities for {self.sizes.size} blocks")
        x = (s - self.target) / self.per_level
        lv = np.clip(np.round(x), self.min_level, self.max_level).astype(int)
        while lv.sum() != 0:
            d = -int(np.sign(lv.sum()))
            ok = (lv + d <= self.max_level) & (lv + d >= self.min_level)
            if not ok.any():
                raise UserError("the start cannot be put on the level grid inside the bounds")
            err = np.where(ok, (x - lv) * d, -np.inf)  # move the block that most wants to go that way
            lv[int(np.argmax(err))] += d
        return lv.tolist()

    def mutate(self, levels, rng: random.Random, max_moves: int = 3) -> list[int]:
        """``1..max_moves`` moves of one level from one block to another, inside the bounds."""
        lv = list(levels)
        n = len(lv)
        for _ in range(rng.randint(1, max_moves)):
            ups = [b for b in range(n) if lv[b] < self.max_level[b]]
            downs = [b for b in range(n) if lv[b] > self.min_level[b]]
            if not ups or not downs:
                break
            i = rng.choice(ups)
            j = rng.choice([b for b in downs if b != i] or [i])
            if i == j:
                continue
            lv[i] += 1
            lv[j] -= 1
        return lv


def serial_batch(fitness):
    """evaluate_batch for one process: [(block_sparsity, windows)] -> [(fitness or inf, error or None, seconds)]."""
    def run(jobs):
        out = []
        for bs, windows in jobs:
            t0 = time.monotonic()
            try:
                v = float(fitness(bs, windows))
                err = None if math.isfinite(v) else f"non-finite fitness {v}"
            except InvalidCandidate as e:  # a bad candidate: logged as failed, the search goes on
                v, err = math.inf, f"{type(e).__name__}: {e}"
            out.append((v if err is None else math.inf, err, time.monotonic() - t0))
        return out
    return run


def level_search(fitness: Callable[[list[float], int], float] | None, space: LevelSpace, *, seed: int = 0,
                 offspring: int = 16, stages=DEFAULT_STAGES, generations: int = 1000,
                 max_candidates: int | None = None, time_budget_s: float | None = None, max_moves: int = 3,
                 start=None, log_path, progress: bool = False, evaluate_batch=None,
                 max_failures: int = MAX_CONSECUTIVE_FAILURES) -> LevelResult:
    """EvoPress-style search (module doc). ``max_candidates`` bounds the offspring evaluated (first stage);
    ``evaluate_batch`` replaces the serial evaluation of a batch (same results, e.g. on Ray workers);
    ``max_failures``: failed evaluations in a row that stop the search."""
    stages = tuple((int(w), int(k)) for w, k in stages)
    if offspring < 1 or not stages or any(w < 1 or k < 1 for w, k in stages) or stages[-1][1] != 1:
        raise UserError("level search needs offspring >= 1 and stages of (windows >= 1, survivors >= 1) ending with "
                        "1 survivor")
    if any(stages[i][1] < stages[i + 1][1] for i in range(len(stages) - 1)) or stages[0][1] > offspring:
        raise UserError("stage survivors must not grow and the first must not exceed the offspring")
    if max_candidates is None and time_budget_s is None and generations is None:
        raise UserError("level search needs a budget")
    log_path = Path(log_path)
    if log_path.exists() and log_path.stat().st_size > 0:
        raise UserError(f"search log {log_path} already exists: delete it or choose another")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    streak = FailureStreak(max_failures, log_path)
    evaluate_batch = evaluate_batch or serial_batch(fitness)
    rng = random.Random(seed)
    n = space.sizes.size
    parent = [0] * n if start is None else list(start)
    if len(parent) != n or sum(parent) != 0:
        raise UserError(f"start levels must have {n} integers summing to 0")
    final_w = stages[-1][0]
    t_start = time.monotonic()
    counters = {"i": 0, "evaluations": 0, "windows": 0, "candidates": 0}
    seen: set[tuple] = {tuple(parent)}

    def log(levels, g, stage, windows, res, parent_fit):
        v, err, secs = res
        rec = {"i": counters["i"], "generation": g, "stage": stage, "windows": windows, "levels": list(levels),
               "fitness": None if err else v, "status": "failed" if err else "ok", "seconds": round(secs, 6),
               "parent_fitness": None if not math.isfinite(parent_fit) else parent_fit, "time": round(time.time(), 3)}
        if err:
            rec["error"] = err
        with open(log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        counters["i"] += 1
        counters["evaluations"] += 1
        counters["windows"] += windows
        streak(err)

    def batch(cands, windows):
        try:
            return evaluate_batch([(space.sparsity(c), windows) for c in cands])
        except Exception as e:  # not a bad candidate: a bug or a failed worker, re-raised with the batch named
            note_candidate(e, f"levels {cands} on {windows} windows", log_path)
            raise

    parent_fit = batch([parent], final_w)[0]
    log(parent, 0, len(stages) - 1, final_w, parent_fit, math.inf)
    parent_fit = parent_fit[0]
    history, stopped, done = [parent_fit], "generations", 0
    for g in range(1, generations + 1):
        if max_candidates is not None and counters["candidates"] >= max_candidates:
            stopped = "max_candidates"
            break
        if time_budget_s is not None and time.monotonic() - t_start >= time_budget_s:
            stopped = "time_budget"
            break
        size = offspring if max_candidates is None else min(offspring, max_candidates - counters["candidates"])
        kids = []
        for _ in range(100 * size):
            if len(kids) == size:
                break
            c = space.mutate(parent, rng, max_moves)
            if tuple(c) not in seen:
                seen.add(tuple(c))
                kids.append(c)
        if not kids:
            stopped = "exhausted"
            break
        counters["candidates"] += len(kids)
        pool = kids
        for k, (windows, keep) in enumerate(stages):
            res = batch(pool, windows)
            for c, r in zip(pool, res):
                log(c, g, k, windows, r, parent_fit)
            order = sorted(range(len(pool)), key=lambda t: res[t][0])  # stable: ties keep the mutation order
            pool = [pool[t] for t in order[:keep]]
            fits = [res[t][0] for t in order[:keep]]
        if fits[0] < parent_fit:
            parent, parent_fit = pool[0], fits[0]
        history.append(parent_fit)
        done = g
        if progress:
            minutes = (time.monotonic() - t_start) / 60
            print(f"evopress gen {g}: best {parent_fit:.4g}, {counters['candidates']} candidates, "
                  f"{counters['candidates'] / max(minutes, 1e-9):.1f}/min", flush=True)
    return LevelResult(list(parent), space.sparsity(parent), parent_fit, done,
                       counters["candidates"], counters["evaluations"], counters["windows"], stopped, log_path,
                       history)
