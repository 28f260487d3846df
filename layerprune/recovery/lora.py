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
from layerprune.models.adapters import get_adapter
from layerprune.progress import tqdm


def prunable_linears(model):
    """{full module name: module} of the linears in the decoder blocks (lm_head and embeddings excluded)."""
    adapter = get_adapter(model)
    return {f"{adapter.blocks_path}.{i}.{name}": mod
            for i, block in enumerate(adapter.blocks(model))
            for name, mod in adapter.linears(block).items()}


@torch.no_grad()
def masks_of(model):
    """{full module name: bool tensor (weight != 0)} for every prunable linear, in the module's weight layout."""
    return {name: mod.weight != 0 for name, mod in prunable_linears(model).items()}


@torch.no_grad()
def apply_masks(model, masks):
    """Set every weight where the mask is False to exactly 0 (masked_fill, so NaN or inf cannot survive)."""
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        if w.shape != mask.shape:
            raise UserError(f"mask for {name} has shape {tuple(mask.shape)} but the weight is {tuple(w.shape)}; recompute the masks")
        w.masked_fill_(~mask.to(w.device), 0)


def _windows(tokenizer, data, seqlen):
    """Token windows (n, seqlen): a LongTensor / list of tensors is used as given (cut to seqlen); texts are joined
    with "\\n\\n", tokenized once, and cut into non-overlapping windows (tail dropped). A CalibrationSet gives its .ids."""
    data = getattr(data, "ids", data)
    if isinstance(data, torch.Tensor) or (data and isinstance(data[0], torch.Tensor)):
        ids = data if isinstance(data, torch.Tensor) else torch.cat([d.reshape(-1, d.shape[-1]) for d in data])
        return ids[:, :seqlen].long()
    ids = tokenizer("\n\n".join(data), return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seqlen
    if n == 0:
        raise UserError(f"the finetuning text has {ids.numel()} tokens, fewer than seqlen {seqlen}; give more text or a smaller seqlen")
    return ids[: n * seqlen].view(n, seqlen)


def finetune_lora(model, tokenizer, texts_or_windows, steps, lr=1e-4, rank=8, alpha=16, target_modules=None,
                  seqlen=512, batch_size=1, seed=0, progress=True):
    """Train LoRA adapters on the pruned model with frozen base weights, merge them, re-apply the masks.

    texts_or_windows: list of strings, or token windows (LongTensor (n, L), list of (1, L) tensors, CalibrationSet).
    target_modules: peft target names (e.g. ("q_proj", "v_proj")); None = every prunable linear.
    Windows are visited in a seeded random order, batch_size per step, cycling when exhausted. AdamW, constant lr.
    The model is changed in place: peft's merge_and_unload puts the original Linear modules back with merged weights.
    Returns {"losses" (per step), "steps", "seconds", "seconds_per_step", "trainable_params", "masked_weights",
    "max_abs_refilled" (largest |merged weight| at a masked position before re-masking), ...}.
    """
    from peft import LoraConfig, get_peft_model

    if steps < 1 or rank < 1 or batch_size < 1 or seqlen < 2:
        raise UserError(f"LoRA needs steps, rank, batch_size >= 1 and seqlen >= 2 (got {steps}, {rank}, {batch_size}, {seqlen})")
    masks = masks_of(model)
    targets = list(target_modules) if target_modules else list(masks)
    windows = _windows(tokenizer, texts_or_windows, seqlen)
    device = next(model.parameters()).device
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training

    torch.manual_seed(seed)  # LoRA A init
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, cfg)  # freezes every base parameter
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(windows), generator=gen), 0
    losses = []
    peft_model.train()
    t0 = time.time()
    bar = tqdm(range(steps), desc="lora", disable=not progress)
    for _ in bar:
        idx = []
        while len(idx) < batch_size:
            if pos == len(order):
                order, pos = torch.randperm(len(windows), generator=gen), 0
            idx.append(order[pos].item())
            pos += 1
        x = windows[idx].to(device)
        loss = peft_model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_s = time.time() - t0

    merged = peft_model.merge_and_unload()  # the same model object, W + (alpha / r) B A, dense
    with torch.no_grad():
        refilled = max((merged.get_submodule(n).weight[~m].abs().max().item() if (~m).any() else 0.0)
                       for n, m in masks.items())
    apply_masks(merged, masks)
    for n, p in merged.named_parameters():
        p.requires_grad_(requires_grad.get(n, True))
    merged.train(was_training)
    return {"losses": losses, "steps": steps, "seconds": time.time() - t0, "train_seconds": train_s,
            "seconds_per_step": train_s / steps, "trainable_params": sum(p.numel() for p in params),
            "masked_weights": sum(int((~m).sum()) for m in masks.values()), "max_abs_refilled": refilled,
            "rank": rank, "alpha": alpha, "lr": lr, "seqlen": windows.shape[1], "batch_size": batch_size,
            "windows": len(windows), "seed": seed}
