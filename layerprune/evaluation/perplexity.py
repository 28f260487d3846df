"""Perplexity with the pruning papers' protocol.

Tokenize the joined corpus once; cut it into non-overlapping windows of ``seqlen`` tokens (stride =
seqlen, the tail dropped); per window the mean next-token NLL over its ``seqlen - 1`` predictions;
``PPL = exp(mean over windows of the window means)`` — exactly sparsegpt's ``llama_eval`` and wanda's
``eval_ppl_wikitext`` (they write it as ``exp(sum(loss * seqlen) / (n * seqlen))``).

For a tokenizer that starts every text with BOS (``data.bos``) each window is BOS + ``seqlen - 1`` corpus
tokens (still ``seqlen`` long, ``seqlen - 1`` predictions, none of them the BOS). The logits are never
materialised for a whole window: the model's body gives the final hidden states and the NLL is computed
``LOGIT_CHUNK // vocab`` rows at a time, so memory does not grow with the vocabulary, batch or window count.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from ..progress import tqdm

from ..data.bos import bos_id
from ..data.corpora import C4_EVAL_WINDOWS, load_text
from ..errors import UserError
from ..models.adapters import get_adapter

LOGIT_CHUNK = 1 << 24  # fp32 logits (64 MiB) computed at once


@dataclass
class PPLResult:
    dataset: str
    seqlen: int
    windows: int
    tokens: int
    ppl: float
    seconds: float
    window_nll: list[float]
    bos: bool = False  # every window started with the tokenizer's BOS

    def to_dict(self, with_windows: bool = False) -> dict:
        d = asdict(self)
        if not with_windows:
            d.pop("window_nll")
        return d


def max_seqlen(model) -> int | None:
    return get_adapter(model).max_positions(model.config)


def check_seqlen(model, seqlen: int | None, default: int = 2048) -> int:
    """The user's seqlen, or the default capped at the model's maximum. A user value above the maximum is an error."""
    limit = max_seqlen(model)
    if seqlen is None:
        return min(default, limit) if limit else default
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen} is too small: use at least 2")
    if limit and seqlen > limit:
        raise UserError(f"--seqlen {seqlen} is above this model's maximum of {limit} positions: "
                        f"use --seqlen {limit} or less")
    return seqlen


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def tokenize_corpus(tokenizer, name: str, data_dir, seqlen: int) -> torch.Tensor:
    """``[1, N]`` token ids of a corpus, tokenized once (cached per tokenizer and corpus)."""
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), name, str(data_dir))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenizer(load_text(name, data_dir), return_tensors="pt").input_ids
    ids = _TOKEN_CACHE[key]
    if name == "c4":
        ids = ids[:, : C4_EVAL_WINDOWS * seqlen]
    return ids


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def window_nll(model, x: torch.Tensor, adapter=None) -> torch.Tensor:
    """Mean next-token NLL of each row of ``x`` [B, T] (fp32 [B]), at most ``LOGIT_CHUNK`` logits at a time."""
    adapter = adapter or get_adapter(model)
    hidden = adapter.body(model)(input_ids=x, use_cache=False).last_hidden_state[:, :-1]
    hidden, target = hidden.reshape(-1, hidden.shape[-1]), x[:, 1:].reshape(-1)
    rows = max(1, LOGIT_CHUNK // adapter.lm_head(model).weight.shape[0])
    nll = torch.cat([F.cross_entropy(adapter.head_logits(model, hidden[i:i + rows]).float(), target[i:i + rows],
                                     reduction="none") for i in range(0, target.numel(), rows)])
    return nll.view(x.shape[0], -1).mean(dim=1)


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 1,
               dataset: str = "", progress: bool = True, bos: int | None = None) -> PPLResult:
    """Paper-protocol perplexity of ``model`` over ``ids`` ([1, N] or [N]).

    ``bos``: a token id to start every window with, followed by ``seqlen - 1`` tokens of ``ids`` (a BOS
    at the start of ``ids`` is dropped first); None: windows of ``seqlen`` tokens of ``ids``.
    """
    ids = ids.reshape(-1)
    if bos is not None and ids.numel() and ids[0] == bos:
        ids = ids[1:]
    body = seqlen - (bos is not None)
    n = ids.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}: lower --seqlen")
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], 1)
    device = _device_of(model)
    adapter = get_adapter(model)
    was_training = model.training
    model.eval()
    t0 = time.time()
    nll: list[float] = []
    with tqdm(total=n, desc=f"ppl {dataset}".strip(), unit="window", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):  # the bar counts windows, whatever the batch size
            nll.extend(window_nll(model, windows[start:start + batch_size].to(device), adapter).tolist())
            bar.update(min(batch_size, n - start))
    model.train(was_training)
    ppl = math.exp(sum(nll) / len(nll))
    return PPLResult(dataset, seqlen, n, n * seqlen, ppl, time.time() - t0, nll, bos is not None)


def evaluate_ppl(model, tokenizer, dataset: str = "wikitext2", seqlen: int | None = None, data_dir=None,
                 max_windows: int | None = None, batch_size: int = 1, progress: bool = True,
                 bos: bool | None = None) -> PPLResult:
    """``bos``: start every window with BOS (True), never (False), or as the tokenizer does (None, the default)."""
    from ..data.corpora import resolve_data_dir

    seqlen = check_seqlen(model, seqlen)
    data_dir = resolve_data_dir(data_dir)
    ids = tokenize_corpus(tokenizer, dataset, data_dir, seqlen)
    return perplexity(model, ids, seqlen, max_windows, batch_size, dataset=dataset, progress=progress,
                      bos=bos_id(tokenizer, bos))
