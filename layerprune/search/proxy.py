"""The cheap fitness of a DSA candidate: perplexity on a few WikiText-2 *validation* windows after one-shot Wanda.

Once per (model, calibration):
  1. one dense pass (``passes.dense_input_norms``, the allocation pre-pass: block inputs propagated through the
     *unpruned* blocks, same batching) collects sq_norm_j = sum_t x_tj^2 for every block linear
     (cached on disk with ``norms_path``, keyed by ``checkpoint.fingerprint`` of the model, calibration ids and batch);
  2. per linear: a float32 copy of the dense weight W and the rank of every Wanda score S_ij = |W_ij| * ||X_j||_2
     (``scores``) inside its row (stable sort, the order of the Wanda solver), kept as int16/int32;
  3. the validation windows, tokenized once.
Per candidate f:
  phi(block) for every block -> DSA mapping -> per-block sparsities with parameter-weighted mean = S exactly. phi's
  pre+reduce stage is shared between candidates by one ``StageCache`` whose blocks build their scores |W| * ||X||
  on demand from the dense copy (the scores are exactly those the DSA allocator sees in a full run, so a function's
  allocation here equals its allocation there). Then every linear is pruned with Wanda at its block's sparsity:
  the per-row counts of the solver's ``row_mask`` (``row_counts``: k = round(s * numel), base = k // rows per row
  plus one more in the ``k % rows`` rows whose next score is lowest), i.e. mask = rank < count_row, written from the
  dense copy; then the perplexity.
Difference from the full protocol: the pruning is one-shot with the dense input norms (a full run re-collects the
norms of every block from the outputs of the already pruned blocks before it).

Two options bring the proxy closer to the full protocol (``bench/proxy_study.py`` measures how much):
  ``propagate=n``  prune with propagation, as a real run does, on the first n calibration windows: ``prune_fn``
                   (``engine.prune_model``, passed in since allocation/ does not import the engine) runs the proxy's
                   ``method`` (Wanda) at the candidate's per-block sparsities (``blocks_config``: a ``user``
                   allocation, forwards in the proxy dtype) and re-collects the input norms of every block from the
                   outputs of the already pruned blocks. n = 0: one-shot (above).
  ``metric="kl"``  the mean per-token KL divergence KL(p_dense || p_pruned) of the next-token distributions on the
                   validation windows (EvoPress) instead of the perplexity. The head and the final norm are never
                   pruned, so the proxy keeps only the dense model's final hidden states (``windows`` x seqlen x
                   hidden) and recomputes the dense log-probabilities from them while scoring, ``LOGIT_CHUNK`` logits
                   at a time (rounded to bfloat16, the precision they were stored in when the proxies were studied):
                   no full-vocabulary tensor is ever held.
``keep_model=True`` (``--allocation auto``): the model passed in is only read (its dense pass, its dense weights); the
proxy prunes a copy of it made directly in the proxy dtype on ``device``, where every forward of the proxy runs.
PROXIES names the settings of the proxies the library offers; ``DEFAULT_PROXY`` is the one ``search-allocation`` and
``--allocation auto`` use.
"""
from __future__ import annotations

import gc
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from layerprune.allocation.dsa.functions import AllocationFunction, InvalidCandidate, StageCache, allocate, resolve
from layerprune.scores import wanda_score
from layerprune.checkpoint import fingerprint
from layerprune.config import DTYPES, PruneConfig
from layerprune.errors import UserError
from layerprune.evaluation.perplexity import LOGIT_CHUNK, perplexity
from layerprune.models.adapters import get_adapter
from layerprune.offload import MemoryStore, release_free_memory
from layerprune.passes import capture_inputs, dense_input_norms
from layerprune.solvers.common import prune_count, row_counts, row_mask

METRICS = ("ppl", "kl")
# name -> Proxy settings (windows, propagate, metric); "oneshot" is the proxy the DSA search was built with
PROXIES = {
    "oneshot": {"windows": 8, "propagate": 0, "metric": "ppl"},
    "oneshot-2": {"windows": 2, "propagate": 0, "metric": "ppl"},
    "oneshot-4": {"windows": 4, "propagate": 0, "metric": "ppl"},
    "oneshot-kl": {"windows": 8, "propagate": 0, "metric": "kl"},
    "propagate": {"windows": 8, "propagate": 4, "metric": "ppl"},
    "propagate-kl": {"windows": 8, "propagate": 4, "metric": "kl"},
    "propagate-kl-4": {"windows": 4, "propagate": 4, "metric": "kl"},
}
DEFAULT_PROXY = "propagate-kl"  # bench/results/proxy_study: rho 0.959 over 20 allocations at 1.6x oneshot's cost


def proxy_settings(name: str) -> dict:
    """The settings of a named proxy (a one-line error naming the choices otherwise)."""
    if name not in PROXIES:
        raise UserError(f"proxy {name!r} is unknown: use {', '.join(PROXIES)}")
    return dict(PROXIES[name])


def eval_windows(ids: torch.Tensor, seqlen: int, n: int, bos: int | None) -> torch.Tensor:
    """The first n evaluation windows [n, seqlen] exactly as ``perplexity`` builds them."""
    ids = ids.reshape(-1)
    if bos is not None and ids.numel() and ids[0] == bos:
        ids = ids[1:]
    body = seqlen - (bos is not None)
    w = ids[: n * body].view(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=w.dtype), w], 1) if bos is not None else w


def chunk_rows(model, adapter=None) -> int:
    """Rows of logits computed at once: at most ``LOGIT_CHUNK`` values (the perplexity's own bound)."""
    adapter = adapter or get_adapter(model)
    return max(1, LOGIT_CHUNK // adapter.lm_head(model).weight.shape[0])


@torch.no_grad()
def final_hidden(model, x: torch.Tensor, adapter=None) -> torch.Tensor:
    """The final hidden states (final norm applied) of window ``x`` [T] that predict its tokens 1..T-1:
    [T-1, hidden]."""
    adapter = adapter or get_adapter(model)
    device = next(model.parameters()).device
    return adapter.body(model)(input_ids=x[None].to(device), use_cache=False).last_hidden_state[0, :-1]


@torch.no_grad()
def dense_hidden(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """What the KL metric keeps of the dense model: the final hidden states of every window ([T-1, hidden] each)."""
    adapter = get_adapter(model)
    return [final_hidden(model, x, adapter) for x in windows]


@torch.no_grad()
def window_scores(model, windows: torch.Tensor, dense: list | None = None) -> tuple[list[float], list[float]]:
    """Per window: mean next-token NLL, and mean KL(p_dense || p_model) when ``dense`` (the dense model's final hidden
    states, ``dense_hidden``) is given (else an empty list). ``model``'s head is the dense one (the proxy never prunes
    it): the dense log-probabilities are recomputed from ``dense``, ``chunk_rows`` rows at a time, in fp32 and rounded
    to bfloat16."""
    adapter = get_adapter(model)
    rows = chunk_rows(model, adapter)
    nll, kl = [], []
    for w, x in enumerate(windows):
        hidden = final_hidden(model, x, adapter)
        target = x[1:].to(hidden.device)
        tot_nll = tot_kl = 0.0
        for i in range(0, target.numel(), rows):
            logp = torch.log_softmax(adapter.head_logits(model, hidden[i:i + rows]).float(), dim=-1)
            tot_nll -= logp.gather(1, target[i:i + rows, None]).sum().item()
            if dense is not None:
                ref = torch.log_softmax(adapter.head_logits(model, dense[w][i:i + rows]).float(), dim=-1)
                ref = ref.bfloat16().float()
                logp.neg_().add_(ref)  # ref - logp, in place
                tot_kl += torch.dot(ref.exp_().view(-1), logp.view(-1)).item()  # sum p_dense * (ref - logp)
            del logp
        nll.append(tot_nll / (windows.shape[1] - 1))
        if dense is not None:
            kl.append(tot_kl / (windows.shape[1] - 1))
    return nll, kl


def working_copy(model, dtype: torch.dtype, device) -> torch.nn.Module:
    """``copy.deepcopy(model).to(device, dtype)`` without a full-precision copy first: every parameter is copied
    directly in ``dtype`` on ``device`` (tied weights stay tied); the buffers are copied as they are and then follow
    ``Module.to`` (e.g. a model that keeps its rotary frequencies in fp32 keeps them). ``model`` is not changed."""
    import copy

    memo = {}
    for t in model.parameters():
        if id(t) not in memo:
            new = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
            memo[id(t)] = torch.nn.Parameter(new, requires_grad=False)
    return copy.deepcopy(model, memo).to(device=device, dtype=dtype)


@torch.no_grad()
def dense_norms(model, calib: torch.Tensor, batch_size: int = 8, device=None) -> dict[str, torch.Tensor]:
    """{"<block>.<linear>": sq_norm [in] fp32} from one dense pass over the calibration windows ``calib``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    adapter = get_adapter(model)
    dtype = next(model.parameters()).dtype
    hidden, kwargs = capture_inputs(model, adapter, calib, device, dtype, batch_size)
    norms = {}
    for i, _, cols in dense_input_norms(model, adapter, hidden, kwargs, batch_size, device, dtype, MemoryStore(),
                                        set()):
        norms.update((f"{i}.{n}", c.sq_norm.float().cpu()) for n, c in cols.items())
        # each kept norm splits a freed activation-sized hole of the heap, which the next block's activations then
        # no longer fit: without this the resident set grows by the block's activations every block (SmolLM2-135M,
        # 32 x 512: +1.4 GB over the pass, all of it free heap)
        release_free_memory()
    return norms


PROXY_METHOD = "wanda"  # the proxy's solver: the one-shot masks above are Wanda's, and so is a propagating proxy's run


def blocks_config(model, block_sparsity, compute_dtype: str = "float32", method: str = PROXY_METHOD) -> PruneConfig:
    """The run that prunes ``model`` with ``method`` at the given per-block sparsities: a ``user`` allocation whose
    parameter-weighted mean is the target."""
    bs = [float(s) for s in block_sparsity]
    adapter = get_adapter(model)
    sizes = [sum(adapter.get_weight(m).numel() for m in adapter.linears(b).values()) for b in adapter.blocks(model)]
    mean = sum(w * s for w, s in zip(sizes, bs)) / sum(sizes)
    return PruneConfig(method=method, sparsity=mean, allocation="user",
                       allocation_options={"sparsities": bs, "lo": 0.0, "hi": 1.0}, compute_dtype=compute_dtype)


class Proxy:
    """fitness(f) = perplexity on ``eval_ids``'s first ``windows`` windows of the model pruned by f's allocation.

    ``model`` is taken over: its weights are rewritten for every candidate and it is cast to ``dtype`` for the
    perplexity passes (``restore()`` puts the dense weights back); with ``keep_model`` it is only read and the proxy
    prunes a ``working_copy`` in ``dtype`` instead. ``device``: where the proxy's forwards run (default: the model's
    device). ``calib``: [n, seqlen] calibration ids. ``eval_ids``: [1, N] ids of the validation text. ``norms_path``:
    a .safetensors file caching the dense pass.
    """

    def __init__(self, model, calib: torch.Tensor, eval_ids: torch.Tensor, target: float, *, seqlen: int = 512,
                 windows: int = 8, lam: float = 0.08, lo: float = 0.0, hi: float = 0.99, batch_size: int = 8,
                 eval_batch_size: int = 4, dtype: str = "bfloat16", norms_path=None, bos: int | None = None,
                 propagate: int = 0, metric: str = "ppl", prune_fn=None, ranks: bool = True, device=None,
                 keep_model: bool = False):
        if metric not in METRICS:
            raise UserError(f"proxy metric {metric!r} is unknown: use {', '.join(METRICS)}")
        if not 0 <= propagate <= calib.shape[0]:
            raise UserError(f"the proxy propagates through {propagate} calibration windows but there are "
                            f"{calib.shape[0]}: use 0 to {calib.shape[0]}")
        if propagate and prune_fn is None:
            raise UserError("a proxy that propagates needs prune_fn (layerprune.engine.prune_model)")
        if dtype not in DTYPES:
            raise UserError(f"proxy dtype {dtype!r} is unknown: use {', '.join(DTYPES)}")
        if not 0.0 < target < 1.0:
            raise UserError(f"target sparsity {target} must lie in (0, 1), e.g. 0.7")
        if windows < 1 or eval_ids.numel() < windows * seqlen:
            raise UserError(f"the validation text has {eval_ids.numel()} tokens, fewer than {windows} windows of "
                            f"{seqlen}: lower the number of windows or the window length")
        self.model, self.target, self.lam, self.lo, self.hi = model, float(target), float(lam), lo, hi
        self.eval_ids, self.seqlen, self.windows = eval_ids.reshape(-1), seqlen, windows
        self.eval_batch_size, self.bos = eval_batch_size, bos  # bos: an id starting every window (data.bos)
        self.metric, self.propagate, self.dtype = metric, int(propagate), dtype
        self.max_windows = windows if metric == "kl" else eval_ids.numel() // seqlen
        self.prop_calib = calib[:propagate].clone() if propagate else None
        self.prune_fn = prune_fn
        self.adapter = get_adapter(model)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.stats_passes = 0  # dense calibration passes run by this proxy (0 when the norms came from the cache)
        t0 = time.perf_counter()
        self.norms = self._norms(calib, batch_size, norms_path)
        t1 = time.perf_counter()
        dense = model
        if keep_model:  # the model stays as it is; the proxy prunes its own copy, made in the proxy dtype
            self.model = working_copy(model, DTYPES[dtype], self.device)
        # the dense weights (fp32; read from a kept model, else copied), the per-row ranks of their Wanda scores, the
        # parameter count per block
        self.layers = []  # (block, name, module, dense fp32 [out, in], sq_norm fp32 [in], rank [out, in])
        self.block_layers: list[list[int]] = []
        work_blocks = self.adapter.blocks(self.model)
        for b, block in enumerate(self.adapter.blocks(dense)):
            self.block_layers.append([])
            work = self.adapter.linears(work_blocks[b])
            for name, dense_mod in self.adapter.linears(block).items():
                mod = work[name]
                w = self.adapter.get_weight(dense_mod).detach().float()  # a kept model's fp32 weight itself
                if not keep_model:
                    w = w.clone()  # the model's own weight, which the proxy rewrites
                sq_norm = self.norms[f"{b}.{name}"]
                rank = None  # ranks=False (a few candidates, e.g. --allocation auto): masks by row_mask per candidate
                if ranks:
                    order = torch.sort(wanda_score(w, sq_norm), dim=1, stable=True).indices
                    rank_dtype = torch.int16 if w.shape[1] < 2 ** 15 else torch.int32  # counts <= cols fit
                    rank = torch.empty(w.shape, dtype=rank_dtype)
                    rank.scatter_(1, order, torch.arange(w.shape[1], dtype=rank_dtype).expand_as(order).contiguous())
                    del order
                self.block_layers[-1].append(len(self.layers))
                self.layers.append((b, name, mod, w, sq_norm, rank))
        self.weights = [sum(self.layers[j][3].numel() for j in js) for js in self.block_layers]
        self.cache = StageCache([self._block_scores(js) for js in self.block_layers])
        if not keep_model:
            self.model.to(DTYPES[dtype])
            if device is not None:
                self.model.to(self.device)
        t2 = time.perf_counter()
        self.dense = None  # KL: the dense model's final hidden states on the validation windows
        if metric == "kl":
            self.dense = dense_hidden(self.model, eval_windows(self.eval_ids, seqlen, windows, bos))
        self.setup_seconds = {"dense_pass": t1 - t0, "ranks": t2 - t1, "dense_hidden": time.perf_counter() - t2}
        self.timings = {"allocate": 0.0, "apply": 0.0, "ppl": 0.0}
        self.n_evaluated = 0  # perplexity evaluations
        self.scored: dict[tuple, float] = {}  # pruned counts -> perplexity: equal ones are scored once

    def _norms(self, calib, batch_size, path) -> dict[str, torch.Tensor]:
        path = Path(path) if path is not None else None
        fp = fingerprint(self.model, calib, str(batch_size), weights=True) if path is not None else None
        if path is not None and path.is_file():
            try:
                norms = load_file(str(path))
                if norms.pop("__fingerprint__").numpy().tobytes().decode() == fp:
                    return norms
            except (KeyError, OSError, ValueError):
                pass
        norms = dense_norms(self.model, calib, batch_size, self.device)
        self.stats_passes += 1
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tag = torch.frombuffer(bytearray(fp.encode()), dtype=torch.uint8)
            save_file({**norms, "__fingerprint__": tag}, str(path))
        return norms

    def _block_scores(self, layer_ids):
        def scores():  # |W| * ||X_j|| of the block, as the allocator sees them
            return [wanda_score(self.layers[j][3], self.layers[j][4]) for j in layer_ids]
        return scores

    def allocation(self, f: AllocationFunction | str) -> list[float]:
        """Per-block sparsities of ``f`` (raises InvalidCandidate for a constant function)."""
        return allocate(resolve(f), self.cache, self.target, self.lam, self.weights, self.lo, self.hi)

    @torch.no_grad()
    def apply(self, block_sparsity) -> None:
        """Write every linear pruned with Wanda at its block's sparsity, from the dense copy: one-shot with the dense
        norms, or (``propagate``) block by block with propagation on the first calibration windows."""
        if len(block_sparsity) != len(self.block_layers):
            raise UserError(f"got {len(block_sparsity)} block sparsities for {len(self.block_layers)} blocks")
        if self.propagate:
            return self._apply_propagated(block_sparsity)
        for b, name, mod, w, sq_norm, rank in self.layers:
            s = float(block_sparsity[b])
            if not (math.isfinite(s) and 0.0 <= s <= 1.0):
                raise InvalidCandidate(f"block {b} sparsity {s} is not in [0, 1]")
            if rank is None:  # the Wanda solver's own mask (same entries as the ranks below)
                self.adapter.set_weight(mod, w.masked_fill(row_mask(wanda_score(w, sq_norm), s), 0.0))
                continue

            def next_lowest(base, w=w, sq_norm=sq_norm, rank=rank):  # each row's score ranked `base`
                idx = (rank == base).nonzero()[:, 1]
                return wanda_score(w.gather(1, idx[:, None]).T, sq_norm[idx])[0]

            counts, _, _ = row_counts(prune_count(s, w.numel()), w.shape[0], next_lowest)
            self.adapter.set_weight(mod, w.masked_fill(rank < counts[:, None].to(rank.dtype), 0.0))

    def _apply_propagated(self, block_sparsity) -> None:
        for s in block_sparsity:
            if not (math.isfinite(float(s)) and 0.0 <= float(s) <= 1.0):
                raise InvalidCandidate(f"block sparsity {s} is not in [0, 1]")
        self.restore()
        dtype = next(n for n, d in DTYPES.items() if d == next(self.model.parameters()).dtype)
        self.prune_fn(self.model, self.prop_calib, blocks_config(self.model, block_sparsity, dtype), progress=False,
                      device=self.device)

    def score(self) -> float:
        """The metric of the model as it is now: perplexity or mean KL to the dense model on the windows."""
        if self.metric == "ppl":
            return perplexity(self.model, self.eval_ids, self.seqlen, self.windows, self.eval_batch_size,
                              progress=False, bos=self.bos).ppl
        windows = eval_windows(self.eval_ids, self.seqlen, self.windows, self.bos)
        _, kl = window_scores(self.model, windows, self.dense[:self.windows])
        return sum(kl) / len(kl)

    def release(self) -> None:
        """Drop everything the proxy holds (its copy of the model, the dense weights' references, norms, ranks, dense
        hidden states, stage cache) and hand the freed heap back to the OS: what runs next (``--allocation auto``'s
        prune) starts from the memory it would have had without the proxy. The proxy cannot score after this."""
        self.model = self.layers = self.cache = self.dense = self.norms = self.prop_calib = None
        self.block_layers, self.scored = [], {}
        gc.collect()  # the stage cache's closures refer back to the proxy: a cycle
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def restore(self) -> None:
        """Put the dense weights back."""
        for b, name, mod, w, sq_norm, rank in self.layers:
            self.adapter.set_weight(mod, w)

    def evaluate_allocation(self, block_sparsity) -> float:
        """The metric (perplexity, or KL to dense) of the model pruned with ``block_sparsity``; a non-finite one raises
        InvalidCandidate."""
        t0 = time.perf_counter()
        self.apply(block_sparsity)
        t1 = time.perf_counter()
        ppl = self.score()
        self.timings["apply"] += t1 - t0
        self.timings["ppl"] += time.perf_counter() - t1
        self.n_evaluated += 1
        if not math.isfinite(ppl):
            raise InvalidCandidate(f"non-finite perplexity {ppl}")
        return ppl

    def evaluate_as(self, block_sparsity, windows: int, propagate: int, metric: str) -> float:
        """``evaluate_allocation`` with other settings (``--allocation auto``'s cheap screen before the proxy): fewer
        or as many windows, no more propagation windows than this proxy holds, KL only where it holds the dense
        log-probabilities."""
        if metric not in METRICS or not 1 <= windows <= (self.windows if metric == "kl" else self.max_windows) \
                or not 0 <= propagate <= (0 if self.prop_calib is None else len(self.prop_calib)) \
                or (metric == "kl" and self.dense is None):
            raise UserError(f"this proxy cannot score with windows={windows}, propagate={propagate}, metric={metric}")
        old = self.windows, self.propagate, self.metric, self.prop_calib
        self.windows, self.propagate, self.metric = windows, propagate, metric
        if propagate:
            self.prop_calib = self.prop_calib[:propagate]
        try:
            return self.evaluate_allocation(block_sparsity)
        finally:
            self.windows, self.propagate, self.metric, self.prop_calib = old

    def evaluate_on(self, block_sparsity, windows: int) -> float:
        """``evaluate_allocation`` on the first ``windows`` validation windows (the level search's growing stages)."""
        if not 1 <= windows <= self.max_windows:
            raise UserError(f"the proxy holds {self.max_windows} validation windows, {windows} were asked for")
        return self.evaluate_as(block_sparsity, windows, self.propagate, self.metric)

    def counts(self, block_sparsity) -> tuple[int, ...]:
        """Weights pruned per linear, round(s * numel): equal counts give the same pruned model."""
        return tuple(prune_count(float(block_sparsity[b]), w.numel()) for b, _, _, w, _, _ in self.layers)

    def signature(self, f: AllocationFunction | str) -> tuple[int, ...]:
        """The pruned-weight counts of f's allocation: functions with equal signatures are equivalent candidates."""
        return self.counts(self.allocation(f))

    def fitness(self, f: AllocationFunction | str) -> float:
        """The proxy perplexity of ``f`` (raises InvalidCandidate when ``f`` gives no allocation or a NaN PPL)."""
        t0 = time.perf_counter()
        s = self.allocation(f)
        self.timings["allocate"] += time.perf_counter() - t0
        key = self.counts(s)  # = self.signature(f)
        if key not in self.scored:
            self.scored[key] = self.evaluate_allocation(s)
        return self.scored[key]

    def rescore_allocation(self, block_sparsity, windows: int, dtype: str = "float32") -> float:
        """``rescore`` of one per-block allocation."""
        return self.rescore([list(block_sparsity)], windows, dtype, allocations=True)[0]

    def rescore(self, functions, windows: int, dtype: str = "float32", allocations: bool = False) -> list[float]:
        """Perplexity of each function on the first ``windows`` validation windows with the model in ``dtype`` (a
        closer look at the best candidates: more windows, full precision; always perplexity, also for a KL proxy);
        inf where a function gives no allocation."""
        if windows < 1 or self.eval_ids.numel() < windows * self.seqlen:
            raise UserError(f"the validation text has {self.eval_ids.numel()} tokens, fewer than {windows} windows "
                            f"of {self.seqlen}: lower the number of rescoring windows")
        old_windows, old_dtype, old_metric = self.windows, next(self.model.parameters()).dtype, self.metric
        self.windows, self.metric = windows, "ppl"
        self.model.to(DTYPES[dtype])
        try:
            out = []
            for f in functions:
                try:
                    out.append(self.evaluate_allocation(f if allocations else self.allocation(f)))
                except InvalidCandidate:
                    out.append(math.inf)
            return out
        finally:
            self.windows, self.metric = old_windows, old_metric
            self.model.to(old_dtype)
