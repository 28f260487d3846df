"""One adapter per architecture family: the only place that knows module names and config keys.

An adapter tells the rest of the code where the decoder blocks, embeddings, final norm and lm_head
are, which linear layers a block has (and which of them read the same input), the attention geometry
(heads, KV heads, head dim) and the MLP projections. Weights are always exposed as ``[out, in]``
(GPT-2's ``Conv1D`` stores ``[in, out]``; the adapter transposes). It also does what needs the family's
names: the widths of a block and the config fields that describe them (structured pruning,
``models/structured.py``), keeping only the first N blocks (FedLP), the maximum number of positions
(evaluation) and the block call arguments that hold a KV cache.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int


# A structurally pruned run with per-block widths saves its config as ``layerprune_<model_type>``
# (models/structured.py registers those types); it is the family of its base type.
PREFIX = "layerprune_"


def _get(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def _parent(dotted: str) -> str:
    return dotted.rsplit(".", 1)[0]


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
    # Block call arguments that hold a KV cache; the engine clears them (blocks run without a cache while pruning).
    cache_kwargs: tuple[str, ...] = ("past_key_values", "past_key_value", "layer_past")

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

    # --- widths of a block and the config fields that describe them (structured pruning) ----------
    def widths(self, block: nn.Module, head_dim: int) -> tuple[int, int, int]:
        """(query heads, KV heads, FFN channels) of a block, read from its weight shapes."""
        lin = self.linears(block)
        rows = lambda role: self.get_weight(lin[role]).shape[0]  # noqa: E731
        return rows(self.q) // head_dim, rows(self.k) // head_dim, rows(self.up)

    def set_attention_widths(self, block: nn.Module, heads: int, kv_heads: int) -> None:
        """Tell the attention module its new head counts (after its projections were resized)."""
        attn = _get(block, _parent(self.o))
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = heads // kv_heads
        for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    def set_mlp_width(self, block: nn.Module, channels: int) -> None:
        """Tell the MLP module its new number of channels (after its projections were resized)."""
        mlp = _get(block, _parent(self.down))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = channels

    def width_fields(self, head_dim: int, heads: int | None = None, kv_heads: int | None = None,
                     channels: int | None = None) -> dict:
        """Config fields for blocks of these widths: an explicit head_dim, and the head / KV head / channel counts
        when given (every block the same)."""
        fields = {"head_dim": head_dim}
        if heads is not None:
            fields.update(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=channels)
        return fields

    # --- depth: the first N blocks (FedLP) --------------------------------------------------------
    def truncate_config(self, config, n: int) -> None:
        """Make ``config`` (in place) describe only its first ``n`` blocks."""
        config.num_hidden_layers = n
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:n]

    def truncated_config(self, config, n: int):
        """A copy of ``config`` for a model of its first ``n`` blocks."""
        config = copy.deepcopy(config)
        self.truncate_config(config, n)
        return config

    def truncate(self, model: nn.Module, n: int) -> None:
        """Keep the model's first ``n`` blocks, in place (its config follows)."""
        setattr(_get(model, _parent(self.blocks_path)), self.blocks_path.rsplit(".", 1)[1],
                nn.ModuleList(list(self.blocks(model))[:n]))
        self.truncate_config(model.config, n)

    # --- evaluation -------------------------------------------------------------------------------
    def max_positions(self, config) -> int | None:
        """The longest sequence the model's positions allow, or None when its config sets no limit."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            v = getattr(config, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None


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
    """The adapter for a model (or its config), chosen by ``config.model_type`` (``layerprune_<type>``: its type's)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    base_type = model_type.removeprefix(PREFIX) if isinstance(model_type, str) else model_type
    for cls in ADAPTERS:
        if base_type in cls.model_types:
            return cls()
    raise UserError(f"architecture {model_type!r} is not supported yet; supported families: {', '.join(supported())}")
