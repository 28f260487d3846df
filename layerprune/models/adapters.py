"""One adapter per architecture family: the only place that knows module names.

An adapter tells the rest of the code where the decoder blocks, embeddings, final norm and lm_head
are, which linear layers a block has (and which of them read the same input), the attention geometry
(heads, KV heads, head dim) and the MLP projections. Weights are always exposed as ``[out, in]``
(GPT-2's ``Conv1D`` stores ``[in, out]``; the adapter transposes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _get(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


class Adapter:
    """Base adapter. Subclasses fill in the module paths (dotted names relative to the model / block)."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    blocks_path = "model.layers"
    embedding_paths: tuple[str, ...] = ("model.embed_tokens",)
    final_norm_path = "model.norm"
    lm_head_path = "lm_head"
    # Linear layers of a block in execution order, grouped by the input they read.
    input_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    # Attention / MLP roles (None where the family has no such separate projection).
    q, k, v, o = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
    gate, up, down = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
    transposed = False  # True for Conv1D weights stored [in, out]

    # --- where things are -------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.blocks_path)

    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        return [_get(model, p) for p in self.embedding_paths]

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        return _get(model, self.final_norm_path) if self.final_norm_path else None

    def lm_head(self, model: nn.Module) -> nn.Module:
        return _get(model, self.lm_head_path)

    def body(self, model: nn.Module) -> nn.Module:
        """The module holding the blocks; it returns the final hidden states the lm_head reads (norm applied)."""
        return _get(model, self.blocks_path.rsplit(".", 1)[0])

    def head_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states, as the model's own forward computes them after its body."""
        logits = self.lm_head(model)(hidden)
        cfg = model.config
        if getattr(cfg, "logits_scaling", None):  # granite
            logits = logits / cfg.logits_scaling
        if getattr(cfg, "final_logit_softcapping", None):  # gemma 2/3
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return logits

    def linear_names(self) -> list[str]:
        return [n for g in self.input_groups for n in g]

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {n: _get(block, n) for n in self.linear_names()}

    def attention_linears(self) -> list[str]:
        """Linears of the attention sub-block (the first stage of "true sequential" order)."""
        return [n for n in self.linear_names() if n.split(".")[0] == self.o.split(".")[0]]

    def stages(self, true_sequential: bool) -> list[list[tuple[str, ...]]]:
        """Groups of input-groups pruned together; with true_sequential each group is its own stage."""
        if true_sequential:
            return [[g] for g in self.input_groups]
        return [list(self.input_groups)]

    def geometry(self, config) -> AttentionGeometry:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return AttentionGeometry(heads, kv, head_dim)

    # Why heads/channels cannot be removed (structured pruning) from this family; "" when they can.
    not_structured = ""

    @property
    def structured(self) -> bool:
        """Whether heads/channels can be removed (separate q/k/v/o and gated MLP)."""
        return not self.not_structured and all((self.q, self.k, self.v, self.o, self.gate, self.up, self.down))

    # --- weights, always [out, in] --------------------------------------------------------
    def get_weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.t() if self.transposed else module.weight

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.get_weight(module).copy_(weight)

    def num_blocks(self, model: nn.Module) -> int:
        return len(self.blocks(model))


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama",)


class MistralAdapter(Adapter):
    family = "mistral"
    model_types = ("mistral",)


class Qwen2Adapter(Adapter):
    family = "qwen2"
    model_types = ("qwen2",)


class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_types = ("gemma3_text",)


class Qwen3Adapter(Adapter):
    family = "qwen3"
    model_types = ("qwen3",)


class GraniteAdapter(Adapter):
    family = "granite"
    model_types = ("granite",)


class Olmo2Adapter(Adapter):
    family = "olmo2"
    model_types = ("olmo2",)
    not_structured = "its q_norm/k_norm normalise all heads together (removing heads would need them resized)"


class Phi3Adapter(Adapter):
    family = "phi3"
    model_types = ("phi3",)
    input_groups = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))
    q = k = v = gate = None  # fused into qkv_proj / gate_up_proj
    up = "mlp.gate_up_proj"
    not_structured = "q/k/v are fused in self_attn.qkv_proj and gate/up in mlp.gate_up_proj (no fused-row removal)"


class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)
    not_structured = "its MLP is not gated (fc1/fc2)"
    blocks_path = "model.decoder.layers"
    embedding_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions")
    final_norm_path = "model.decoder.final_layer_norm"
    input_groups = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    )
    o = "self_attn.out_proj"
    gate, up, down = None, "fc1", "fc2"

    def final_norm(self, model):
        # OPT-350m applies no final layer norm (do_layer_norm_before=False)
        return getattr(model.model.decoder, "final_layer_norm", None)


class GPT2Adapter(Adapter):
    family = "gpt2"
    model_types = ("gpt2",)
    blocks_path = "transformer.h"
    embedding_paths = ("transformer.wte", "transformer.wpe")
    final_norm_path = "transformer.ln_f"
    input_groups = (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))
    q = k = v = None  # fused into c_attn
    o = "attn.c_proj"
    gate, up, down = None, "mlp.c_fc", "mlp.c_proj"
    transposed = True
    not_structured = "q/k/v are fused in attn.c_attn and its MLP is not gated"

    def geometry(self, config) -> AttentionGeometry:
        return AttentionGeometry(config.n_head, config.n_head, config.n_embd // config.n_head)


ADAPTERS: list[type[Adapter]] = [LlamaAdapter, MistralAdapter, Qwen2Adapter, Gemma3Adapter, OPTAdapter, GPT2Adapter,
                                 Qwen3Adapter, Phi3Adapter, GraniteAdapter, Olmo2Adapter]


def supported() -> list[str]:
    return [a.family for a in ADAPTERS]


def get_adapter(model_or_config) -> Adapter:
    """The adapter for a model (or its config), chosen by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    raise UserError(f"architecture {model_type!r} is not supported yet; supported families: {', '.join(supported())}")
