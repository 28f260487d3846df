"""Depth pruning: remove whole decoder blocks. The result is the family's stock model with fewer blocks.

Criteria (``--criterion``):
  * ``shortgpt`` (ShortGPT, Men et al. 2024): Block Influence BI_i = 1 - mean over calibration tokens of
    cos(x_i, x_{i+1}), the cosine between a block's input and output hidden states, from one dense pass; the blocks
    with the lowest BI go (one shot, no re-scoring).
  * ``sleb`` (SLEB, Song et al., ICML 2024): greedy; at each step every remaining candidate block is removed in turn
    and the calibration perplexity of the model without it measured; the one whose removal raises it least goes, and
    the rest are re-scored against the smaller model. Costs one forward over the calibration windows per candidate
    per step: the record reports the seconds and the number of forward passes.

How many: ``--drop N`` blocks, or ``--sparsity S``: the fraction of the blocks' parameters, the count whose removed
parameters come closest to S (ties to the larger count; with equal blocks, round(S x blocks)). ``--keep-first K`` /
``--keep-last K`` exclude the first / last K blocks from removal (none by default).

The program decides over the whole model (``whole_model``; the engine then runs ``run_model`` instead of the block
loop). Removal itself is the adapter's (``Adapter.keep_blocks``: the block list, the per-block config entries such as
sliding/global ``layer_types`` and ``max_window_layers``, and every module's ``layer_idx`` renumbered for the KV
cache). A model with per-block widths (a SlimGPT run) whose remaining blocks all have the same widths gets its stock
config back (``structured.finalize``).
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layerprune.errors import UserError
from layerprune.registry import Option, nonneg_int, positive_int, register_solver

CRITERIA = ("shortgpt", "sleb")


def block_sizes(model, adapter) -> list[int]:
    """Parameters of every decoder block."""
    return [sum(p.numel() for p in b.parameters()) for b in adapter.blocks(model)]


def count_for_fraction(sizes_in_order: list[int], total: int, fraction: float) -> int:
    """How many blocks, taken in this order, bring the removed parameters closest to ``fraction`` x ``total`` (ties
    to the larger count)."""
    target, removed, best, best_err = fraction * total, 0, 0, abs(fraction * total)
    for k, s in enumerate(sizes_in_order, 1):
        removed += s
        err = abs(removed - target)
        if err <= best_err + 1e-9 * total:
            best, best_err = k, err
    return best


@torch.no_grad()
def block_influence(model, adapter, calib: torch.Tensor, batch_size: int, progress: bool = False) -> list[float]:
    """ShortGPT's Block Influence of every block: 1 - the mean (over all calibration tokens) cosine similarity of the
    block's input and output hidden states, from one dense forward over ``calib`` [n, T]."""
    from layerprune.passes import block_out

    blocks = adapter.blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = [0] * len(blocks)

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = block_out(output)
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += float((1.0 - cos).double().sum())
            counts[i] += cos.numel()
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    device = next(model.parameters()).device
    try:
        for s in tqdm(range(0, calib.shape[0], batch_size), desc="depth shortgpt", disable=not progress):
            model(input_ids=calib[s:s + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [float(sums[i] / max(counts[i], 1)) for i in range(len(blocks))]


@contextmanager
def without_blocks(model, adapter, removed):
    """The model without the blocks ``removed`` (old indices) for the duration of a with-block; restored after."""
    blocks_parent = model.get_submodule(adapter.blocks_path.rsplit(".", 1)[0])
    attr = adapter.blocks_path.rsplit(".", 1)[1]
    old_blocks = getattr(blocks_parent, attr)
    old_cfg = copy.deepcopy(model.config.__dict__)
    idx = [(m, m.layer_idx) for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    try:
        adapter.keep_blocks(model, [i for i in range(len(old_blocks)) if i not in set(removed)])
        yield model
    finally:
        setattr(blocks_parent, attr, old_blocks)
        model.config.__dict__.clear()
        model.config.__dict__.update(old_cfg)
        for m, i in idx:
            m.layer_idx = i


@torch.no_grad()
def calibration_nll(model, calib: torch.Tensor, batch_size: int, adapter=None) -> float:
    """Mean next-token NLL of the model over the calibration windows (the log of their perplexity)."""
    from layerprune.evaluation.perplexity import window_nll

    device = next(model.parameters()).device
    tot = 0.0
    for s in range(0, calib.shape[0], batch_size):
        x = calib[s:s + batch_size].to(device)
        tot += float(window_nll(model, x, adapter).double().sum())
    return tot / calib.shape[0]


def sleb(model, adapter, calib, batch_size: int, candidates: list[int], n: int | None, fraction: float | None,
         sizes: list[int], progress: bool = False) -> dict:
    """SLEB's greedy removal. ``n`` blocks, or (``n`` None) until the removed parameters are closest to ``fraction``
    of all blocks'. Returns the removed blocks in removal order, every step's calibration perplexity per candidate,
    and the forward passes (full passes over the calibration windows) it took."""
    total = sum(sizes)
    removed: list[int] = []
    steps: list[dict] = []
    passes = 0
    base = calibration_nll(model, calib, batch_size, adapter)
    passes += 1
    max_steps = n if n is not None else len(candidates)
    bar = tqdm(total=max_steps, desc="depth sleb", unit="block", disable=not progress)
    while len(removed) < max_steps:
        left = [c for c in candidates if c not in removed]
        if not left:
            break
        if n is None:  # stop when one more block would move the removed fraction further from the target
            now = sum(sizes[r] for r in removed)
            if abs(now - fraction * total) <= min(abs(now + sizes[c] - fraction * total) for c in left) + 1e-9 * total:
                break
        scores = {}
        for c in left:
            with without_blocks(model, adapter, removed + [c]):
                scores[c] = calibration_nll(model, calib, batch_size, adapter)
            passes += 1
        best = min(left, key=lambda c: (scores[c], c))
        removed.append(best)
        steps.append({"removed": best, "ppl": math.exp(scores[best]),
                      "candidates": {str(c): math.exp(v) for c, v in scores.items()}})
        bar.update(1)
    bar.close()
    return {"order": removed, "steps": steps, "passes": passes, "dense_ppl": math.exp(base)}


@register_solver
class Depth:
    """Block-removal method: whole decoder blocks go, chosen by ShortGPT's Block Influence or SLEB's greedy
    calibration perplexity; the saved model is the family's stock config with fewer blocks."""

    name = "depth"
    summary = "depth: whole blocks removed, a stock config with fewer layers"
    needs = frozenset()
    block_level = True
    options = (Option("drop", positive_int, None, "depth: number of blocks to remove (default: --sparsity as the "
                      "fraction of block parameters)"),
               Option("criterion", str, "shortgpt", "depth: which blocks go: shortgpt (Block Influence, one pass) "
                      "or sleb (greedy calibration perplexity, re-scored after each removal)", choices=CRITERIA),
               Option("keep_first", nonneg_int, 0, "depth: never remove the first K blocks"),
               Option("keep_last", nonneg_int, 0, "depth: never remove the last K blocks"))

    def program(self, model, adapter, cfg) -> "DepthProgram":
        return DepthProgram(adapter, cfg)


class DepthProgram:
    """The depth method as a whole-model program (layerprune.solvers.program): ``run_model`` scores and removes."""

    changes_shapes = True
    whole_model = True

    def __init__(self, adapter, cfg):
        self.adapter, self.cfg = adapter, cfg
        o = {"criterion": "shortgpt", "keep_first": 0, "keep_last": 0, "drop": None, **cfg.solver_options}
        unknown = set(o) - {"criterion", "keep_first", "keep_last", "drop"}
        if unknown:
            raise UserError(f"depth: unknown option(s) {sorted(unknown)}; known: drop, criterion, keep_first, "
                            "keep_last")
        self.o = o

    def _candidates(self, n_blocks: int) -> list[int]:
        o = self.o
        return [i for i in range(n_blocks) if o["keep_first"] <= i < n_blocks - o["keep_last"]]

    def check(self, model) -> None:
        """Before any work: the options against the model's block count, and whether its config can be cut."""
        o, cfg = self.o, self.cfg
        if o["criterion"] not in CRITERIA:
            raise UserError(f"depth: unknown --criterion {o['criterion']!r}; use one of {', '.join(CRITERIA)}")
        if o["drop"] is not None and getattr(cfg, "sparsity_given", False):
            raise UserError("depth: give --drop N (blocks) or --sparsity S (fraction of block parameters), not both")
        if cfg.allocation.split(":")[0].strip().lower() != "uniform":
            raise UserError("depth chooses whole blocks by its --criterion: --allocation does not apply; drop it")
        if cfg.offload == "disk":
            raise UserError("depth scores blocks with forward passes of the whole model in memory: --offload disk "
                            "does not apply; use --offload none or cpu")
        n = self.adapter.num_blocks(model)
        cand = self._candidates(n)
        if o["drop"] is not None and o["drop"] >= n:
            raise UserError(f"depth: --drop {o['drop']} leaves no block of {n}: drop at most {n - 1}")
        if not cand:
            raise UserError(f"depth: --keep-first {o['keep_first']} --keep-last {o['keep_last']} protect all {n} "
                            "blocks: nothing may be removed")
        if o["drop"] is not None:
            if o["drop"] >= n:
                raise UserError(f"depth: --drop {o['drop']} leaves no block of {n}: drop at most {n - 1}")
            if o["drop"] > len(cand):
                raise UserError(f"depth: --drop {o['drop']} but only {len(cand)} of {n} blocks may go with "
                                f"--keep-first {o['keep_first']} --keep-last {o['keep_last']}")
        else:
            sizes = block_sizes(model, self.adapter)
            if min(sizes[i] for i in cand) > 2 * cfg.sparsity * sum(sizes):
                raise UserError(f"depth: --sparsity {cfg.sparsity} is below half a block's share of the parameters: "
                                "no block would go; raise it or use --drop N")
        self.adapter.check_cut(model.config)

    def _count(self, order: list[int], sizes: list[int]) -> int:
        if self.o["drop"] is not None:
            return self.o["drop"]
        k = count_for_fraction([sizes[i] for i in order], sum(sizes), self.cfg.sparsity)
        return min(k, len(sizes) - 1)

    def run_model(self, model, calib: torch.Tensor, *, device, dtype, batch_size: int, progress: bool) -> dict:
        """Score the blocks, remove the chosen ones in place; the record's ``layers`` rows (a removed block's linears
        achieve 1.0, a kept block's 0.0), ``depth`` (criterion, values, removed indices, cost) and ``sparsity``."""
        from layerprune.models import structured
        from layerprune.models.adapters import PREFIX

        adapter, o = self.adapter, self.o
        self.check(model)
        n_blocks = adapter.num_blocks(model)
        sizes = block_sizes(model, adapter)
        cand = self._candidates(n_blocks)
        param = next(p for p in model.parameters() if p.is_floating_point())
        work = model if param.dtype == dtype else copy.deepcopy(model).to(dtype)  # scoring in the compute dtype
        home = param.device
        work.to(device)
        t0 = time.perf_counter()
        try:
            if o["criterion"] == "shortgpt":
                values = block_influence(work, adapter, calib, batch_size, progress)
                order = sorted(cand, key=lambda i: (values[i], i))
                removed = order[:self._count(order, sizes)]
                cost = {"forward_passes": 1}
                info = {"values": values, "value_name": "block influence (1 - cos(input, output))"}
            else:
                n = self._count(cand, sizes) if o["drop"] is not None else None
                r = sleb(work, adapter, calib, batch_size, cand, n, self.cfg.sparsity, sizes, progress)
                removed = r["order"]
                # every block's value: the calibration perplexity without it, at the first step (dense + one block)
                first = r["steps"][0]["candidates"] if r["steps"] else {}
                values = [first.get(str(i)) for i in range(n_blocks)]
                cost = {"forward_passes": r["passes"]}
                info = {"values": values, "value_name": "calibration perplexity without the block (first step)",
                        "dense_calibration_ppl": r["dense_ppl"], "steps": r["steps"]}
        finally:
            if work is model:
                model.to(home)
            else:
                del work
        cost["seconds"] = time.perf_counter() - t0
        cost["calibration_windows"] = list(calib.shape)
        if not removed:
            raise UserError(f"depth: --sparsity {self.cfg.sparsity} is below half a block's share of the parameters: "
                            "no block would go; raise it or use --drop N")
        linears = [(i, name, list(adapter.get_weight(m).shape)) for i, b in enumerate(adapter.blocks(model))
                   for name, m in adapter.linears(b).items()]
        keep = [i for i in range(n_blocks) if i not in set(removed)]
        adapter.keep_blocks(model, keep)
        out = {}
        if str(model.config.model_type).startswith(PREFIX):  # per-block widths: stock config when they now agree
            out["structure"] = structured.finalize(model)
        rows = [{"block": i, "name": name, "shape": shape, "shape_before": shape, "target": float(i in removed),
                 "achieved": float(i in removed), "rel_error": None} for i, name, shape in linears]
        fraction = sum(sizes[i] for i in removed) / sum(sizes)
        out.update({
            "layers": rows,
            "sparsity": None if o["drop"] is not None else self.cfg.sparsity,
            "depth": {"criterion": o["criterion"], "removed": sorted(removed), "removal_order": list(removed),
                      "kept": keep, "blocks_before": n_blocks, "blocks_after": len(keep),
                      "block_params": sizes, "removed_fraction": fraction, "candidates": cand, **info,
                      "cost": cost},
        })
        return out

    def run(self, block, collect, targets) -> list[dict]:  # pragma: no cover - the engine calls run_model
        raise RuntimeError("depth decides over the whole model: the engine calls run_model")

    def load_block(self, block, state_dict) -> None:  # pragma: no cover
        raise RuntimeError("depth runs have no per-block checkpoint")

    def finish(self, model) -> dict:
        return {}
