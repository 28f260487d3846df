"""Model layout for FedLP: which state-dict key belongs to which unit, and depth-prefix models.

Units (the granularity FedLP drops or truncates at):
- ``block.i``: every tensor of decoder block i;
- ``exit``: the final norm, plus the output head when it is *not* tied to the embeddings;
- ``embed``: the token (and position) embeddings and anything else outside the blocks. A tied output
  head is the embedding matrix, so it travels (once) with ``embed``.

Heterogeneous FedLP: client k holds the first c_k blocks and exits through the final norm and head
(an early exit). ``embed`` and blocks ``< c_k`` are shared with the server; a client with c_k < L keeps
its exit (norm, untied head) personal, a full-depth client shares it. The paper's depth law (Zhuzzq/FedLP
``init_cplx_dict``): P(c = flag) = 0.6 and the rest shared equally over the other levels, or uniform.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..models.adapters import get_adapter

P_FLAG = 0.6


@dataclass(frozen=True)
class Layout:
    """Module-name prefixes of one model family (from its adapter)."""

    blocks: str
    exit: tuple[str, ...]
    n_blocks: int

    def unit(self, key: str) -> str:
        if key.startswith(self.blocks + "."):
            return "block." + key[len(self.blocks) + 1:].split(".")[0]
        if any(key == p or key.startswith(p + ".") for p in self.exit):
            return "exit"
        return "embed"

    def units(self) -> list[str]:
        return ["embed"] + [f"block.{i}" for i in range(self.n_blocks)] + ["exit"]

    def shared_units(self, depth: int) -> list[str]:
        """Units client of depth ``depth`` exchanges with the server (hetero FedLP)."""
        return ["embed"] + [f"block.{i}" for i in range(depth)] + (["exit"] if depth >= self.n_blocks else [])


def layout_of(model: nn.Module) -> Layout:
    """The model's layout, from its family's adapter (``layerprune.models.adapters``)."""
    ad = get_adapter(model)
    exit_ = [ad.final_norm_path] if ad.final_norm(model) is not None else []
    if not tied_head(model):
        exit_.append(ad.lm_head_path)
    return Layout(ad.blocks_path, tuple(exit_), ad.num_blocks(model))


def tied_head(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without aliases (a tied output head's weight is dropped: it is the embedding)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach()
    return out


def prefix_model(config, depth: int) -> nn.Module:
    """A freshly built model of the same family with only the first ``depth`` blocks (early exit)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(get_adapter(config).truncated_config(config, depth)).float()


def depth_levels(n_blocks: int, n_levels: int = 5) -> list[int]:
    """``n_levels`` depths spread evenly up to the full depth (the paper's 5 complexities)."""
    levels = sorted({max(1, round(n_blocks * i / n_levels)) for i in range(1, n_levels + 1)})
    return levels


def depth_probs(n_levels: int, flag: int | None) -> list[float]:
    """P(level) : ``flag`` (1-based) gets 0.6 and the others share 0.4; ``None`` = uniform."""
    if flag is None or n_levels == 1:
        return [1.0 / n_levels] * n_levels
    if not 1 <= flag <= n_levels:
        raise UserError(f"--depth-flag {flag} is outside 1..{n_levels}: pick a level or 'u' for uniform")
    rest = (1.0 - P_FLAG) / (n_levels - 1)
    return [P_FLAG if i == flag - 1 else rest for i in range(n_levels)]


def draw_depths(n_clients: int, levels: list[int], flag: int | None, seed: int) -> list[int]:
    """One depth per client, drawn i.i.d. from ``depth_probs`` (seeded)."""
    rng = np.random.default_rng(seed)
    return [int(levels[i]) for i in rng.choice(len(levels), size=n_clients, p=depth_probs(len(levels), flag))]
