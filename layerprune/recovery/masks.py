"""The prunable linears of a model and their masks (weight != 0): what recovery keeps fixed while it trains."""
from __future__ import annotations

import torch

from layerprune.errors import UserError
from layerprune.models.adapters import get_adapter


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
            raise UserError(f"mask for {name} has shape {tuple(mask.shape)} but the weight is {tuple(w.shape)}; "
                            "recompute the masks")
        w.masked_fill_(~mask.to(w.device), 0)
