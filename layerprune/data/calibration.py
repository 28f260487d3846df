"""Calibration windows drawn exactly like the reference code's ``get_c4`` (SparseGPT / Wanda / OWL / DLP).

``random.seed(seed)``; for each sample: draw ``i = random.randint(0, len(pool) - 1)`` until document i
tokenizes to more than ``seqlen`` tokens; then ``j = random.randint(0, n_tokens - seqlen - 1)`` and take
``ids[j : j + seqlen]``. Same seed, same tokenizer, same pool -> the same windows as the reference.
With a BOS per window (``data.bos``) the same draws run with ``seqlen - 1`` text tokens (documents without
the BOS the tokenizer put in front) and each window is BOS + those tokens: still ``seqlen`` long.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import UserError
from .bos import bos_id, strip_bos


@dataclass
class CalibrationSet:
    ids: torch.Tensor  # [nsamples, seqlen] int64
    draws: list[tuple[int, int]]  # (pool document index, token offset) per sample
    seed: int
    pool_size: int
    bos: bool = False  # every window starts with the tokenizer's BOS
    source: str | None = None  # the pool's name (c4, wikitext2-valid, ptb-valid or a file), when known

    @property
    def nsamples(self) -> int:
        return self.ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.ids.shape[1]


def tokenize_docs(tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids per document, tokenized one document at a time as the reference does."""
    return [tokenizer(d)["input_ids"] for d in docs]


def sample_windows(token_docs: list[list[int]], nsamples: int, seqlen: int, seed: int,
                   bos: int | None = None) -> CalibrationSet:
    """``bos``: an id to start every window with (then ``seqlen - 1`` tokens are drawn per window)."""
    if nsamples < 1 or seqlen < 2:
        raise UserError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    head = [] if bos is None else [bos]
    seqlen -= len(head)
    eligible = [len(t) for t in token_docs if len(t) > seqlen]
    if not eligible:
        longest = max((len(t) for t in token_docs), default=0)
        raise UserError(f"no calibration document has more than {seqlen} tokens (the longest has {longest}): "
                        "lower --seqlen or use a pool with longer documents")
    total = sum(len(t) for t in token_docs)
    if nsamples * seqlen > total:
        raise UserError(f"{nsamples} x {seqlen} = {nsamples * seqlen} calibration tokens requested but the pool holds "
                        f"only {total} tokens: lower --nsamples or --seqlen")
    rng = random.Random(seed)  # same stream as random.seed(seed) + module-level random.randint
    rows, draws = [], []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(token_docs) - 1)
            if len(token_docs[i]) > seqlen:
                break
        j = rng.randint(0, len(token_docs[i]) - seqlen - 1)
        rows.append(head + token_docs[i][j:j + seqlen])
        draws.append((i, j))
    return CalibrationSet(torch.tensor(rows, dtype=torch.long), draws, seed, len(token_docs), bos is not None)


def get_calibration(tokenizer, pool: list[str], nsamples: int, seqlen: int, seed: int = 0,
                    bos: bool | None = None) -> CalibrationSet:
    """``bos``: start every window with BOS (True), never (False), or as the tokenizer does (None)."""
    b = bos_id(tokenizer, bos)
    return sample_windows([strip_bos(t, b) for t in tokenize_docs(tokenizer, pool)], nsamples, seqlen, seed, b)
