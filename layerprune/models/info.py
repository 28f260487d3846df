"""What a model is made of: blocks, parameters, linear shapes, measured sparsity."""
from __future__ import annotations

import torch

from .adapters import get_adapter


@torch.no_grad()
def measure_sparsity(model) -> dict:
    """Fraction of exact zeros over the prunable linears of the decoder blocks (wanda's ``check_sparsity``)."""
    adapter = get_adapter(model)
    per_block, per_layer = [], {}
    zeros_all = numel_all = 0
    for i, block in enumerate(adapter.blocks(model)):
        zb = nb = 0
        for name, mod in adapter.linears(block).items():
            w = adapter.get_weight(mod)
            z, n = int((w == 0).sum()), w.numel()
            per_layer[f"{i}.{name}"] = z / n
            zb, nb = zb + z, nb + n
        per_block.append(zb / nb)
        zeros_all, numel_all = zeros_all + zb, numel_all + nb
    return {"overall": zeros_all / numel_all, "per_block": per_block, "per_layer": per_layer,
            "prunable_params": numel_all}


def model_info(model) -> dict:
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    geo = adapter.geometry(model.config)
    shapes = {name: list(adapter.get_weight(mod).shape) for name, mod in adapter.linears(blocks[0]).items()}
    sp = measure_sparsity(model)
    return {
        "architecture": type(model).__name__,
        "family": adapter.family,
        "blocks": len(blocks),
        "hidden_size": model.config.hidden_size,
        "heads": geo.num_heads, "kv_heads": geo.num_kv_heads, "head_dim": geo.head_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prunable_parameters": sp["prunable_params"],
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "block_linear_shapes": shapes,
        "sparsity": sp["overall"],
        "block_sparsity": sp["per_block"],
    }
