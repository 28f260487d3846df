"""Perplexity with the pruning papers' protocol.

Tokenize the joined corpus once; cut it into non-overlapping windows of ``seqlen`` tokens (stride =
seqlen, the tail dropped); per window the mean next-token NLL over its ``seqlen - 1`` predictions;
``PPL = exp(mean over windows of the window means)`` — exactly sparsegpt's ``llama_eval`` and wanda's
``eval_ppl_wikitext`` (they write it as ``exp(sum(loss * seqlen) / (n * seqlen))``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.corpora import C4_EVAL_WINDOWS, load_text
from ..errors import UserError


@dataclass
class PPLResult:
    dataset: str
    seqlen: int
    windows: int
    tokens: int
    ppl: float
    seconds: float
    window_nll: list[float]

    def to_dict(self, with_windows: bool = False) -> dict:
        d = asdict(self)
        if not with_windows:
            d.pop("window_nll")
        return d


def max_seqlen(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seqlen(model, seqlen: int | None, default: int = 2048) -> int:
    """The user's seqlen, or the default capped at the model's maximum. A user value above the maximum is an error."""
    limit = max_seqlen(model)
    if seqlen is None:
        return min(default, limit) if limit else default
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen} is too small: use at least 2")
    if limit and seqlen > limit:
        raise UserError(f"--seqlen {seqlen} is above this model's maximum of {limit} positions: use --seqlen {limit} or less")
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


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 1,
               dataset: str = "", progress: bool = True) -> PPLResult:
    """Paper-protocol perplexity of ``model`` over ``ids`` ([1, N] or [N])."""
    ids = ids.reshape(-1)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}: lower --seqlen")
    windows = ids[: n * seqlen].view(n, seqlen)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    t0 = time.time()
    nll: list[float] = []
    for start in tqdm(range(0, n, batch_size), desc=f"ppl {dataset}".strip(), disable=not progress, leave=False):
        x = windows[start:start + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        nll.extend(loss.view(x.shape[0], -1).mean(dim=1).tolist())
    model.train(was_training)
    ppl = math.exp(sum(nll) / len(nll))
    return PPLResult(dataset, seqlen, n, n * seqlen, ppl, time.time() - t0, nll)


def evaluate_ppl(model, tokenizer, dataset: str = "wikitext2", seqlen: int | None = None, data_dir=None,
                 max_windows: int | None = None, batch_size: int = 1, progress: bool = True) -> PPLResult:
    from ..data.corpora import resolve_data_dir

    seqlen = check_seqlen(model, seqlen)
    data_dir = resolve_data_dir(data_dir)
    ids = tokenize_corpus(tokenizer, dataset, data_dir, seqlen)
    return perplexity(model, ids, seqlen, max_windows, batch_size, dataset=dataset, progress=progress)
