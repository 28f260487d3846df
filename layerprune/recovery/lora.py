"""LoRA recovery of a pruned model with the sparsity mask kept fixed (peft).

Every prunable linear W (the decoder-block linears the adapter names) gets a low-rank update, W' = W + (alpha / r) B A,
with A (r x in) and B (out x r) trained and W frozen. The masks M = (W != 0) are captured before training.
Merging densifies the update: (alpha / r) B A is a dense matrix, so it would refill the pruned positions. After merging
the mask is applied again, W_final = M * (W + (alpha / r) B A): every originally-zero weight is exactly zero again, and
an N:M pattern survives because it is part of M. The training loss is measured with the dense update (mask not yet
re-applied), so the perplexity that counts is the one measured after finetune_lora returns (masked).
"""
import time

import torch

from layerprune.errors import UserError
from layerprune.recovery.masks import apply_masks, masks_of, prunable_linears  # noqa: F401 (importable from here)


def _windows(tokenizer, data, seqlen):
    """Token windows (n, seqlen): a LongTensor / list of tensors is used as given (cut to seqlen); texts are joined
    with "\\n\\n", tokenized once, and cut into non-overlapping windows (tail dropped). A CalibrationSet gives
    its .ids."""
    data = getattr(data, "ids", data)
    if isinstance(data, torch.Tensor) or (data and isinstance(data[0], torch.Tensor)):
        ids = data if isinstance(data, torch.Tensor) else torch.cat([d.reshape(-1, d.shape[-1]) for d in data])
        return ids[:, :seqlen].long()
    ids = tokenizer("\n\n".join(data), return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seqlen
    if n == 0:
        raise UserError(f"the finetuning text has {ids.numel()} tokens, fewer than seqlen {seqlen}; "
                        "give more text or a smaller seqlen")
    return ids[: n * seqlen].view(n, seqlen)


def finetune_lora(model, tokenizer, texts_or_windows, steps, lr=1e-4, rank=8, alpha=16, target_modules=None,
                  seqlen=512, batch_size=1, seed=0, progress=True):
    """Train LoRA adapters on the pruned model with frozen base weights, merge them, re-apply the masks.

    texts_or_windows: list of strings, or token windows (LongTensor (n, L), list of (1, L) tensors, CalibrationSet).
    target_modules: peft target names (e.g. ("q_proj", "v_proj")); None = every prunable linear.
    Windows are visited in a seeded random order, batch_size per step, cycling when exhausted. AdamW, constant lr
    (the loop is ``recovery.train.train_recovery``). The model is changed in place: peft's merge_and_unload puts the
    original Linear modules back with merged weights.
    Returns {"losses" (per step), "steps", "seconds", "seconds_per_step", "trainable_params", "masked_weights",
    "max_abs_refilled" (largest |merged weight| at a masked position before re-masking), ...}.
    """
    from layerprune.recovery.train import train_recovery

    if steps < 1 or rank < 1 or batch_size < 1 or seqlen < 2:
        raise UserError(f"LoRA needs steps, rank, batch_size >= 1 and seqlen >= 2 (got {steps}, {rank}, "
                        f"{batch_size}, {seqlen})")
    windows = _windows(tokenizer, texts_or_windows, seqlen)
    t0 = time.time()
    info = train_recovery(model, windows, steps, rank=rank, alpha=alpha, target_modules=target_modules, lr=lr,
                          batch_size=batch_size, seed=seed, progress=progress)
    return {**info, "seconds": time.time() - t0}
