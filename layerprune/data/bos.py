"""Whether every evaluation and calibration window starts with BOS: the tokenizer decides.

A tokenizer that puts its BOS token in front of every text (Gemma, Llama-2/3, OPT) describes how its
model was trained: such a model sees BOS at position 0, so each window is BOS + ``seqlen - 1`` text tokens.
Tokenizers that add nothing (SmolLM2, GPT-2, Qwen2) get plain windows of ``seqlen`` text tokens.
"""
from __future__ import annotations

from ..errors import UserError


def needs_bos(tokenizer) -> bool:
    """True when ``tokenizer`` starts a text with its BOS token (``add_bos_token`` or its post-processor)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 1 and ids[0] == bos


def bos_id(tokenizer, bos: bool | None = None) -> int | None:
    """The id to put at the start of every window, or None for plain windows. ``bos=None``: ask the tokenizer."""
    if bos is None:
        bos = needs_bos(tokenizer)
    if not bos:
        return None
    if getattr(tokenizer, "bos_token_id", None) is None:
        raise UserError("a BOS per window was asked for but the tokenizer has no BOS token")
    return tokenizer.bos_token_id


def strip_bos(ids: list[int], bos: int | None) -> list[int]:
    """``ids`` without the BOS the tokenizer put in front (the window adds its own)."""
    return ids[1:] if bos is not None and ids[:1] == [bos] else ids
