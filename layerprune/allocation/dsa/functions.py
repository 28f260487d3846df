"""DSA (Li et al., NeurIPS 2024): the space of allocation functions, their evaluation, and the sparsity mapping.

An allocation function is the composition  phi = post . transform . reduce . pre  applied to the element-wise scores of
one block (default: the Wanda scores |W_ij| * ||X_j||_2 of all the block's linears, flattened and concatenated):

    pre        0-2 element-wise ops on the score vector      (whole-vector statistics where an op needs them)
    reduce     1 reduction of the vector to one scalar       (per block)
    transform  1-2 scalar ops                                (on the vector of per-block scalars)
    post       1 scalar op
Everything runs in float64 (one private copy of the block's scores, 8 bytes per score, the ops work in place): fp32
round-off (~1e-7 / sqrt(n) relative) would turn functions that are constant in exact arithmetic (NORMALIZE -> VAR is 1,
NORMALIZE -> MEAN is 0) into noise that the min-max mapping blows up to a full-spread allocation; in float64 they are
caught as constant (InvalidCandidate).

Text form (the reference's graph string):  ``W:(PRE,PRE)-(REDUCE)-(TRANSFORM,TRANSFORM)[-(POST)][-(LAMBDA)]``, e.g.
``W:(ABSLOG)-(VAR)-(ATAN,ASIN)``. The 4th group is the post op (NO_OP when absent, and then not printed). The
reference appends an integer LAMBDA group such as ``-(7)``; it is accepted and ignored (the reference parses it but its
pruning path never uses it; our lambda is the mapping's ``lam``). A 4th group that is a number is that lambda group.
An empty group ``()`` means no op. Reduce ``NO_OP`` is read as MEAN (the reference averages a non-scalar result).

Reductions on a flat vector x of n scores (the reference applies some matrix ops; only those that mean something on a
vector are kept):
    MEAN  mean(x)     VAR  mean((x - mean x)^2) (population)     STD  sqrt(VAR)     FROBENIUS_NORM  ||x||_2
    L1_NORM  mean|x|  GEOMETRIC_MEAN  exp(mean(log max(|x|, 1e-30)))  (the reference's prod(x)^(1/n) under/overflows)
    ENTROPY  -sum p log p with p = softmax(x)                           GRAM  x^T x = sum x^2 (the 1x1 Gram matrix)
Dropped: SLOGDET, DETERMINANT (no square matrix), DIAGONAL (no matrix), RANK (1 for any nonzero vector: constant),
CORREF (x^T x / |x|^2 = 1: constant).

Numerics: NaN -> 0 and +-inf -> +-BIG (1e300) on the input and after every op that can produce them, so domain errors
(asin(2), log(-1)) give 0 and overflows a large finite number, never an exception.

Mapping (DSA code, ``test_prune_wanda_outlier_use_var``): v = minmax(phi); u = minmax(1 - v) * 2*lam;
keep = u - mean(u) + (1 - S); sparsity = 1 - keep  (= S + 2*lam*(v - mean v): a larger phi means MORE pruning), then
clipped to [lo, hi] and rebalanced so that the (parameter-weighted) mean is S exactly (``base.minmax_recentre``).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from layerprune.allocation.base import (Allocation, AllocationContext, BoundedAllocator, block_weights, flat_scores,
                                        from_blocks, minmax_recentre)
from layerprune.errors import UserError
from layerprune.registry import Option, register_allocator

BIG = 1e300  # +-inf -> +-BIG (float64)
TINY = 1e-30


class InvalidCandidate(Exception):
    """The function gives constant or non-finite per-block values: no allocation can be derived from it."""


# ---------------------------------------------------------------------------------------------------------------------
# the op space


# Element-wise ops and reductions work IN PLACE on the block's private float64 copy (see ``_flat``): at millions of
# scores per block a fresh allocation per op costs more than the op itself.


def _clamp(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(-BIG, BIG)  # inf -> +-BIG; the input of every op is already NaN-free


def _log(x):
    return x.masked_fill_(x <= 0, 1.0).log_()


def _abslog(x):
    return x.masked_fill_(x == 0, 1.0).abs_().log_()


def _normalize(x):
    """(x - mean) / std (population std); a constant or overflowing x gives zeros."""
    x.sub_(x.mean())
    s = float(torch.dot(x, x) / x.numel()) ** 0.5
    return x.div_(s) if 0 < s < math.inf else x.zero_()


def _mms(x):
    lo, hi = (float(v) for v in torch.aminmax(x))
    return x.sub_(lo).div_(hi - lo) if hi > lo else x.zero_()


PRE_OPS = {
    "NO_OP": lambda x: x,
    "ABS": torch.abs_,
    "LOG": _log,
    "ABSLOG": _abslog,
    "POW": lambda x: _clamp(x.mul_(x)),
    "EXP": lambda x: _clamp(x.exp_()),
    "NORMALIZE": _normalize,
    "SIGMOID": torch.sigmoid_,
    "TANH": torch.tanh_,
    "MMS": _mms,
}


def _l1(x):
    return torch.linalg.vector_norm(x, 1) / x.numel()


def _mean(x):
    """mean(x); a mean below 1e-9 * mean|x| is the round-off of an exactly-zero mean (NORMALIZE -> MEAN): 0."""
    m = x.mean()
    return torch.zeros_like(m) if m.abs() <= 1e-9 * _l1(x) < math.inf else m


def _var(x):
    return torch.var(x, correction=0)


def _entropy(x):
    """Entropy of softmax(x): H = log Z - sum_i e_i (x_i - m) / Z with e = exp(x - m), m = max x, Z = sum e."""
    d = x.sub_(x.max())
    e = d.exp()
    z = e.sum()
    return z.log() - torch.dot(e, d) / z


def _geometric_mean(x):
    return x.abs_().clamp_(min=TINY).log_().mean().exp()


REDUCE_OPS = {
    "MEAN": _mean,
    "VAR": _var,
    "STD": lambda x: _var(x).sqrt(),
    "FROBENIUS_NORM": lambda x: torch.linalg.vector_norm(x),
    "L1_NORM": _l1,
    "GEOMETRIC_MEAN": _geometric_mean,
    "ENTROPY": _entropy,
    "GRAM": lambda x: torch.dot(x, x),
}

SCALAR_OPS = {
    "NO_OP": lambda x: x,
    "SIN": torch.sin,
    "COS": torch.cos,
    "TAN": torch.tan,
    "ASIN": torch.asin,
    "ACOS": torch.acos,
    "ATAN": torch.atan,
    "EXP": torch.exp,
    "LOG": torch.log,
    "ABS": torch.abs,
    "SIGMOID": torch.sigmoid,
    "TANH": torch.tanh,
    "SOFTPLUS": F.softplus,
}
TRANSFORM_OPS = POST_OPS = SCALAR_OPS

MAX_PRE, MAX_TRANSFORM = 2, 2
IDEMPOTENT_PRE = {"ABS", "MMS"}  # f(f(x)) == f(x): a repeat is dropped by ``canonical``
IDEMPOTENT_SCALAR = {"ABS"}


def _check_ops(ops, table, slot: str, lo: int, hi: int) -> None:
    if not lo <= len(ops) <= hi:
        raise UserError(f"DSA {slot} takes {lo} to {hi} ops, got {len(ops)} ({','.join(ops)})")
    for op in ops:
        if op not in table:
            raise UserError(f"unknown DSA {slot} op {op!r}; valid {slot} ops: {', '.join(table)}")


@dataclass(frozen=True)
class AllocationFunction:
    """phi = post . transform . reduce . pre. ``str(f)`` is the graph string, ``parse(str(f)) == f``."""

    pre: tuple[str, ...] = ()
    reduce: str = "MEAN"
    transform: tuple[str, ...] = ()
    post: str = "NO_OP"

    def __post_init__(self):
        object.__setattr__(self, "pre", tuple(self.pre))
        object.__setattr__(self, "transform", tuple(self.transform))
        if self.reduce == "NO_OP":
            object.__setattr__(self, "reduce", "MEAN")
        _check_ops(self.pre, PRE_OPS, "pre", 0, MAX_PRE)
        _check_ops((self.reduce,), REDUCE_OPS, "reduce", 1, 1)
        _check_ops(self.transform, TRANSFORM_OPS, "transform", 0, MAX_TRANSFORM)
        _check_ops((self.post,), POST_OPS, "post", 1, 1)

    def __str__(self):
        s = f"W:({','.join(self.pre)})-({self.reduce})-({','.join(self.transform)})"
        return s if self.post == "NO_OP" else s + f"-({self.post})"

    def canonical(self) -> "AllocationFunction":
        """Equivalent function in normal form: NO_OPs and repeats of idempotent ops dropped; no ops -> (NO_OP,)."""
        def norm(ops, idem):
            out = []
            for op in ops:
                if op != "NO_OP" and not (out and out[-1] == op and op in idem):
                    out.append(op)
            return tuple(out) or ("NO_OP",)
        return AllocationFunction(norm(self.pre, IDEMPOTENT_PRE), self.reduce,
                                  norm(self.transform, IDEMPOTENT_SCALAR), self.post)

    @property
    def key(self) -> str:
        """Identity of the canonical form (equal for equivalent functions)."""
        return str(self.canonical())


_GROUP = re.compile(r"\(([^()]*)\)")
_STRING = re.compile(r"\([^()]*\)(-\([^()]*\))*")


def parse(text: str) -> AllocationFunction:
    """Parse ``W:(PRE,..)-(REDUCE)-(TRANSFORM,..)[-(POST)][-(LAMBDA)]`` (case-insensitive, spaces ignored)."""
    s = re.sub(r"\s+", "", str(text)).upper()
    s = s[2:] if s.startswith("W:") else s
    groups = _GROUP.findall(s)
    if len(groups) >= 4 and re.fullmatch(r"[0-9.]+", groups[-1]):  # the reference's trailing LAMBDA group: ignored
        groups = groups[:-1]
    if not _STRING.fullmatch(s) or not 3 <= len(groups) <= 4:
        raise UserError(f"cannot parse DSA function {text!r}; expected e.g. 'W:(ABSLOG)-(VAR)-(ATAN,ASIN)' "
                        "(groups: pre, reduce, transform, optional post, optional numeric lambda)")
    ops = [tuple(g.split(",")) if g else () for g in groups]
    if len(ops[1]) != 1:
        raise UserError(f"DSA function {text!r} must have exactly one reduce op, got {ops[1]}; "
                        f"valid reduce ops: {', '.join(REDUCE_OPS)}")
    post = "NO_OP"
    if len(ops) == 4:
        if len(ops[3]) != 1:
            raise UserError(f"DSA function {text!r} must have exactly one post op, got {ops[3]}; "
                            f"valid post ops: {', '.join(POST_OPS)}")
        post = ops[3][0]
    return AllocationFunction(ops[0], ops[1][0], ops[2], post)


def random_function(rng: random.Random) -> AllocationFunction:
    """A uniform draw: 0-2 pre ops, one reduce, 1-2 transform ops (NO_OP allowed), one post op; canonical form."""
    pre_ops = [op for op in PRE_OPS if op != "NO_OP"]
    pre = tuple(rng.choice(pre_ops) for _ in range(rng.randint(0, MAX_PRE)))
    transform = tuple(rng.choice(list(TRANSFORM_OPS)) for _ in range(rng.randint(1, MAX_TRANSFORM)))
    return AllocationFunction(pre, rng.choice(list(REDUCE_OPS)), transform, rng.choice(list(POST_OPS))).canonical()


PRESETS = {
    # README recipe for LLaMA-1-7B (the reference string ends with an ignored lambda group "-(7)")
    "dsa-llama1-7b": "W:(ABSLOG)-(VAR)-(ATAN,ASIN)",
    # poster: best discovered function Norm -> Var -> Abs -> No (LLaMA-1-7B, Wanda 70%: PPL 22.60). NOTE: the variance
    # of standardised scores is 1 for every block (also with the reference's unbiased std/var), so this function is
    # constant and raises InvalidCandidate here; the reference's allocation with it comes from fp round-off.
    "dsa-poster-best": "W:(NORMALIZE)-(VAR)-(ABS)-(NO_OP)",
    # poster: intermediate Exp -> Entropy -> Cos -> Log (~25)
    "dsa-poster-exp-entropy": "W:(EXP)-(ENTROPY)-(COS)-(LOG)",
    # poster: intermediate Abs -> Mean -> Exp -> Mean (~26.7). MEAN is no post op; the mean of one scalar is that
    # scalar (the reference averages any non-scalar result), so the function is Abs -> Mean -> Exp -> No.
    "dsa-poster-abs-mean-exp": "W:(ABS)-(MEAN)-(EXP)-(NO_OP)",
}


def resolve(spec: str | AllocationFunction) -> AllocationFunction:
    """A preset name, a graph string, or an AllocationFunction -> AllocationFunction."""
    if isinstance(spec, AllocationFunction):
        return spec
    return parse(PRESETS.get(str(spec).strip().lower(), spec))


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


def _flat(scores) -> torch.Tensor:
    """One block's scores (a tensor, or a list/dict of per-layer tensors) -> NaN-free float64 vector (a copy)."""
    if isinstance(scores, dict):
        scores = list(scores.values())
    if isinstance(scores, (list, tuple)):
        x = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in scores])
    else:
        x = scores.detach().reshape(-1).to(torch.float64, copy=True)
    if x.numel() == 0:
        raise UserError("DSA got an empty score vector for a block")
    return x.nan_to_num_(nan=0.0, posinf=BIG, neginf=-BIG)


def reduce_block(pre: tuple[str, ...], reduce: str, scores) -> float:
    """pre ops then the reduction on one block's scores -> one finite float (the scores are not modified)."""
    x = _flat(scores)  # private copy: the ops below work in place
    for op in pre:
        if op != "NO_OP":
            x = PRE_OPS[op](x)
    v = float(REDUCE_OPS[reduce](x))
    return 0.0 if math.isnan(v) else max(-BIG, min(BIG, v))


def scalar_stage(f: AllocationFunction, values: torch.Tensor) -> torch.Tensor:
    """transform ops then the post op, element-wise on the per-block values; NaN -> 0, inf -> +-BIG."""
    v = values.to(torch.float64)
    for op in f.transform + (f.post,):
        v = torch.nan_to_num(SCALAR_OPS[op](v), nan=0.0, posinf=BIG, neginf=-BIG)
    return v


def evaluate(f: AllocationFunction, scores) -> float:
    """phi(scores) for one block (its flattened, concatenated scores) -> a finite float."""
    r = torch.tensor([reduce_block(f.pre, f.reduce, scores)], dtype=torch.float64)
    return float(scalar_stage(f, r)[0])


class StageCache:
    """The pre+reduce results of a fixed list of blocks, keyed by (canonical pre, reduce).

    The element-wise stage is the only expensive part (one pass per op over millions of scores); candidates that share
    it only redo the scalar stage on L numbers. ``hits``/``misses`` count lookups. A block may also be given as a
    zero-argument callable returning its scores, so that they are built only while that block is reduced.
    """

    def __init__(self, block_scores):
        self.blocks = list(block_scores)
        if not self.blocks:
            raise UserError("DSA needs the scores of at least one block")
        self.table: dict[tuple, torch.Tensor] = {}
        self.hits = self.misses = 0

    def reduced(self, f: AllocationFunction) -> torch.Tensor:
        c = f.canonical()
        k = (c.pre, c.reduce)
        if k in self.table:
            self.hits += 1
        else:
            self.misses += 1
            self.table[k] = torch.tensor([reduce_block(c.pre, c.reduce, b() if callable(b) else b)
                                          for b in self.blocks], dtype=torch.float64)
        return self.table[k]


def evaluate_blocks(f: AllocationFunction, block_scores) -> list[float]:
    """phi for every block. ``block_scores``: a list of per-block score tensors, or a StageCache built on them."""
    cache = block_scores if isinstance(block_scores, StageCache) else StageCache(block_scores)
    return scalar_stage(f, cache.reduced(f)).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# mapping


def dsa_mapping(values, target: float, lam: float = 0.08, weights=None, lo: float = 0.0,
                hi: float = 0.99) -> list[float]:
    """Per-block phi values -> per-block sparsities: s = S + 2*lam*(v - mean v) with v = minmax(phi), then clipped to
    [lo, hi] and rebalanced so the (weighted) mean is S exactly. Constant or non-finite values -> InvalidCandidate."""
    if not 0.0 <= lo <= target <= hi:
        raise UserError(f"DSA target sparsity {target} must lie in [{lo}, {hi}]")
    if lam < 0:
        raise UserError(f"DSA lambda must be >= 0, got {lam}")
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise UserError("DSA needs at least one block value")
    if not np.isfinite(v).all():
        raise InvalidCandidate(f"non-finite per-block values: {v.tolist()}")
    if not v.max() - v.min() > 1e-9 * np.abs(v).max():
        raise InvalidCandidate(f"constant per-block values ({v[0]:.6g}): no allocation can be derived")
    return minmax_recentre(v, target, 2 * lam, invert=False, weights=weights, lo=lo, hi=hi)


def allocate(f: AllocationFunction | str, block_scores, target: float, lam: float = 0.08, weights=None,
             lo: float = 0.0, hi: float = 0.99) -> list[float]:
    """phi on every block, then ``dsa_mapping``. ``block_scores``: list of tensors or a StageCache."""
    return dsa_mapping(evaluate_blocks(resolve(f), block_scores), target, lam, weights, lo, hi)


@register_allocator
class DSA(BoundedAllocator):
    """The ``Allocator`` of a fixed (preset or searched) DSA function; ``block_statistic`` is phi of the block."""

    name = "dsa"
    needs_scores = True
    spec_arg, usage = "function", "dsa[:FUNC]"  # --allocation dsa:FUNC fills `function`
    options = (Option("lam", float, None, "OWL/DSA lambda (spread 2*lambda)"), *BoundedAllocator.options)

    def __init__(self, function: str | AllocationFunction = "dsa-llama1-7b", lam: float = 0.08,
                 lo: float = 0.0, hi: float = 0.99):
        super().__init__(lo, hi)
        self.function, self.lam = resolve(function), float(lam)
        if self.lam < 0:
            raise UserError(f"DSA lambda must be >= 0, got {self.lam}")

    def block_statistic(self, scores_by_layer: dict[str, torch.Tensor]) -> float:
        return evaluate(self.function, flat_scores(scores_by_layer))

    def allocate(self, target: float, ctx: AllocationContext) -> Allocation:
        target = self.check_target(target, ctx)
        if ctx.block_stats is None or len(ctx.block_stats) != ctx.num_blocks:
            raise UserError("DSA needs one function value per block (ctx.block_stats); run the calibration pass first")
        try:
            bs = dsa_mapping(ctx.block_stats, target, self.lam, block_weights(ctx), self.lo, self.hi)
        except InvalidCandidate as e:
            raise UserError(f"DSA function {self.function} is unusable on this model ({e}); pick another function")
        return from_blocks(ctx, bs, {"method": self.name, "target": target, "function": str(self.function),
                                     "values": [float(v) for v in ctx.block_stats], "lam": self.lam})
