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

    # --- depth: any blocks (depth pruning) ----------------------------------------------------------
    # Config fields with one entry per block, cut like the blocks (sliding/global layer types; the per-block widths of
    # a ``layerprune_<type>`` config). ``cut_config`` refuses a config with another such list it does not know.
    per_layer_fields: tuple[str, ...] = ("layer_types", "layer_heads", "layer_kv_heads", "layer_intermediate")
    _not_per_layer = ("architectures", "bad_words_ids", "begin_suppress_tokens", "suppress_tokens", "eos_token_id")

    def check_cut(self, config) -> None:
        """Refuse (UserError) a config whose blocks cannot be removed with a stock config describing the rest."""
        n = config.num_hidden_layers
        unknown = [k for k, v in config.to_dict().items() if isinstance(v, (list, tuple)) and len(v) == n > 1
                   and k not in self.per_layer_fields and k not in self._not_per_layer]
        if unknown:
            raise UserError(f"the {self.family} config field(s) {', '.join(unknown)} have one entry per block and "
                            "layerprune does not know how to cut them: removing blocks is not supported for it")

    def cut_config(self, config, keep: list[int]) -> None:
        """Make ``config`` (in place) describe only the blocks ``keep`` (old indices, ascending) of its blocks: the
        block count, every per-block list, and ``max_window_layers`` (the first N blocks use full attention, so N
        becomes the number of kept blocks below it)."""
        self.check_cut(config)
        n = config.num_hidden_layers
        for key in self.per_layer_fields:
            v = getattr(config, key, None)
            if isinstance(v, (list, tuple)):
                if len(v) != n:
                    raise UserError(f"config {key} has {len(v)} entries for {n} blocks: the model's config is "
                                    "inconsistent")
                setattr(config, key, [v[i] for i in keep])
        mwl = getattr(config, "max_window_layers", None)
        if isinstance(mwl, int):
            config.max_window_layers = sum(i < mwl for i in keep)
        config.num_hidden_layers = len(keep)

    def keep_blocks(self, model: nn.Module, keep: list[int]) -> None:
        """Keep only the blocks ``keep`` (old indices), in place: the block list, the config (``cut_config``), and
        every module's ``layer_idx`` renumbered 0..len(keep)-1 so the KV cache and per-layer lookups match."""
        keep = sorted(set(keep))
        blocks = list(self.blocks(model))
        if not keep or any(not 0 <= i < len(blocks) for i in keep):
            raise UserError(f"blocks to keep {keep} must be a non-empty subset of 0..{len(blocks) - 1}")
        self.cut_config(model.config, keep)
        kept = [blocks[i] for i in keep]
        for new, block in enumerate(kept):
            for m in block.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new
        setattr(_get(model, _parent(self.blocks_path)), self.blocks_path.rsplit(".", 1)[1], nn.ModuleList(kept))

    # --- evaluation -------------------------------------------------------------------------------
    def max_positions(self, config) -> int | None:
        """The longest sequence the model's positions allow, or None when its config sets no limit."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            v = getattr(config, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    # --- GGUF export for llama.cpp (export/gguf.py writes the file; the family facts are here) ------------
    gguf_arch: str | None = None  # llama.cpp's architecture for this family (None: llama.cpp has none)
    gguf_no_arch = ""  # why not, when gguf_arch is None
    gguf_arch_per_block: str | None = None  # an architecture reading per-layer head / FFN widths, or None
    gguf_no_per_block = "llama.cpp has no architecture with per-layer widths for it"
    gguf_interleaved_rope = False  # llama.cpp rotates adjacent pairs for gguf_arch (HF rotates the two halves)
    gguf_rope_freqs = False  # llama.cpp takes llama3-style rope scaling as a rope_freqs tensor for gguf_arch

    def gguf_target(self, config, per_block: bool) -> tuple[str, bool]:
        """(llama.cpp architecture, whether q/k rows are permuted to adjacent-pair rotary), or a UserError."""
        if self.gguf_arch is None:
            raise UserError(f"GGUF export is not available for the {self.family} family: {self.gguf_no_arch}; "
                            "load the run with transformers instead")
        self.gguf_check(config)
        if per_block:
            if self.gguf_arch_per_block is None:
                raise UserError(f"this run has per-block widths and {self.gguf_no_per_block} ({self.family}); "
                                "export a run with uniform widths (e.g. --allocation uniform)")
            return self.gguf_arch_per_block, True  # deci: LLaMA blocks with adjacent-pair rotary
        return self.gguf_arch, self.gguf_interleaved_rope

    def gguf_check(self, config) -> None:
        """Refuse (UserError) what llama.cpp cannot run for this family's config."""
        rope_type = self._rope(config)[0].get("rope_type", "default")
        if rope_type not in ("default", "linear") and not (rope_type == "llama3" and self.gguf_rope_freqs):
            raise UserError(f"rope scaling {rope_type!r} is not exported to GGUF for the {self.family} family; "
                            "use the run directory with transformers")
        window, limit = getattr(config, "sliding_window", None), self.max_positions(config)
        types = getattr(config, "layer_types", None)
        used = bool(window) and ("sliding_attention" in types if types else bool(limit) and window < limit)
        if used and not self._gguf_swa:
            raise UserError(f"sliding-window attention ({window} of {limit} positions) is not exported to GGUF for "
                            f"the {self.family} family; use the run directory with transformers")

    _gguf_swa = False  # the family's llama.cpp architecture reads a sliding window

    @staticmethod
    def _rope(config) -> tuple[dict, dict | None]:
        """(global rope parameters, sliding-window layers' parameters or None) from the config."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        if "full_attention" in params:
            return dict(params["full_attention"]), params.get("sliding_attention")
        if not params and getattr(config, "rope_theta", None):
            params = {"rope_type": "default", "rope_theta": config.rope_theta}
        return params, None

    def gguf_hparams(self, config, widths: list[tuple[int, int, int]] | None = None) -> dict:
        """Metadata keys (gguf.Keys templates with ``{arch}``) -> values. ``widths``: per-block (heads, KV heads,
        FFN channels) written as per-layer arrays (as single values when all equal); None: the config's widths."""
        from gguf import Keys

        g = self.geometry(config)
        if widths is None:
            heads, kv, ff = g.num_heads, g.num_kv_heads, config.intermediate_size
        elif len(set(widths)) == 1:  # equal widths that only a per-block config could hold: plain values
            heads, kv, ff = widths[0]
        else:
            heads, kv, ff = ([w[j] for w in widths] for j in range(3))
        rope, _ = self._rope(config)
        rot = int(g.head_dim * rope.get("partial_rotary_factor", 1.0))
        d = {Keys.LLM.BLOCK_COUNT: config.num_hidden_layers, Keys.LLM.CONTEXT_LENGTH: self.max_positions(config),
             Keys.LLM.EMBEDDING_LENGTH: config.hidden_size, Keys.LLM.FEED_FORWARD_LENGTH: ff,
             Keys.LLM.VOCAB_SIZE: config.vocab_size, Keys.Attention.HEAD_COUNT: heads,
             Keys.Attention.HEAD_COUNT_KV: kv, Keys.Attention.KEY_LENGTH: g.head_dim,
             Keys.Attention.VALUE_LENGTH: g.head_dim, Keys.Attention.LAYERNORM_RMS_EPS: float(config.rms_norm_eps),
             Keys.Rope.DIMENSION_COUNT: rot}
        if rope.get("rope_theta") is not None:
            d[Keys.Rope.FREQ_BASE] = float(rope["rope_theta"])
        if rope.get("rope_type") == "linear":
            d[Keys.Rope.SCALING_TYPE] = "linear"
            d[Keys.Rope.SCALING_FACTOR] = float(rope["factor"])
        return d

    def gguf_extra_tensors(self, config) -> dict:
        """Tensors llama.cpp needs beyond the model's own (GGUF name -> float32 tensor): llama3 rope factors."""
        rope, _ = self._rope(config)
        if rope.get("rope_type") != "llama3":
            return {}
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hd = self.geometry(config).head_dim
        plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        return {"rope_freqs.weight": (plain / scaled.float()).float()}

    def gguf_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor's value as llama.cpp's architecture reads it (``name``: the HF state-dict name)."""
        return tensor


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama",)
    gguf_arch, gguf_arch_per_block, gguf_interleaved_rope, gguf_rope_freqs = "llama", "deci", True, True


class MistralAdapter(Adapter):
    family = "mistral"
    model_types = ("mistral",)
    gguf_arch, gguf_arch_per_block, gguf_interleaved_rope = "llama", "deci", True  # llama.cpp runs it as llama


class Qwen2Adapter(Adapter):
    family = "qwen2"
    model_types = ("qwen2",)
    gguf_arch, gguf_arch_per_block = "qwen2", "deci"  # deci: LLaMA blocks, q/k/v biases optional

    def gguf_check(self, config) -> None:
        super().gguf_check(config)
        if getattr(config, "use_sliding_window", False):
            raise UserError("sliding-window attention (use_sliding_window) is not exported to GGUF for qwen2; use "
                            "the run directory with transformers")


class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
    gguf_arch = "gemma3"
    gguf_no_per_block = "llama.cpp's per-layer-width architecture (deci) has no q/k norms or post-norms"
    _gguf_swa = True

    def gguf_check(self, config) -> None:
        super().gguf_check(config)
        hd = self.geometry(config).head_dim
        if getattr(config, "query_pre_attn_scalar", hd) != hd:  # llama.cpp scales queries by 1/sqrt(head_dim)
            raise UserError(f"query_pre_attn_scalar {config.query_pre_attn_scalar} differs from head_dim {hd}, "
                            "which llama.cpp's gemma3 assumes; use the run directory with transformers")
        if getattr(config, "attn_logit_softcapping", None):
            raise UserError("attention logit soft-capping is not in llama.cpp's gemma3; use transformers")

    def gguf_hparams(self, config, widths=None) -> dict:
        from gguf import Keys

        d = super().gguf_hparams(config, widths)
        _, swa = self._rope(config)
        types = getattr(config, "layer_types", None) or []
        if config.sliding_window and "sliding_attention" in types:
            d[Keys.Attention.SLIDING_WINDOW] = config.sliding_window
            d[Keys.Attention.SLIDING_WINDOW_PATTERN] = [t == "sliding_attention" for t in types]
            if swa and swa.get("rope_theta") is not None:
                d[Keys.Rope.FREQ_BASE_SWA] = float(swa["rope_theta"])
        if getattr(config, "final_logit_softcapping", None):
            d[Keys.LLM.FINAL_LOGIT_SOFTCAPPING] = float(config.final_logit_softcapping)
        return d

    def gguf_tensor(self, name, tensor):
        return tensor + 1 if name.endswith("norm.weight") else tensor  # Gemma3RMSNorm scales by (1 + weight)


class Qwen3Adapter(Adapter):
    family = "qwen3"
    model_types = ("qwen3",)
    gguf_arch = "qwen3"
    gguf_no_per_block = "llama.cpp's per-layer-width architecture (deci) has no per-head q/k norms"


class GraniteAdapter(Adapter):
    family = "granite"
    model_types = ("granite",)
    gguf_arch, gguf_interleaved_rope = "granite", True
    gguf_no_per_block = "llama.cpp's per-layer-width architecture (deci) has no granite multipliers"

    def gguf_hparams(self, config, widths=None) -> dict:
        from gguf import Keys

        return {**super().gguf_hparams(config, widths), Keys.Attention.SCALE: float(config.attention_multiplier),
                Keys.LLM.EMBEDDING_SCALE: float(config.embedding_multiplier),
                Keys.LLM.RESIDUAL_SCALE: float(config.residual_multiplier),
                Keys.LLM.LOGIT_SCALE: float(config.logits_scaling)}


class Olmo2Adapter(Adapter):
    family = "olmo2"
    model_types = ("olmo2",)
    gguf_arch = "olmo2"
    not_structured = "its q_norm/k_norm normalise all heads together (removing heads would need them resized)"


class Phi3Adapter(Adapter):
    family = "phi3"
    model_types = ("phi3",)
    input_groups = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))
    q = k = v = gate = None  # fused into qkv_proj / gate_up_proj
    up = "mlp.gate_up_proj"
    not_structured = "q/k/v are fused in self_attn.qkv_proj and gate/up in mlp.gate_up_proj (no fused-row removal)"
    gguf_arch = "phi3"  # fused qkv_proj and gate_up_proj as they are

    def gguf_hparams(self, config, widths=None) -> dict:
        from gguf import Keys

        d = super().gguf_hparams(config, widths)
        if getattr(config, "original_max_position_embeddings", None):
            d[Keys.Rope.SCALING_ORIG_CTX_LEN] = config.original_max_position_embeddings
        return d

    def gguf_check(self, config) -> None:
        super().gguf_check(config)
        window = getattr(config, "sliding_window", None)
        if window and window < (self.max_positions(config) or 0):
            raise UserError("phi3 sliding-window attention is not exported to GGUF; use transformers")


class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)
    not_structured = "its MLP is not gated (fc1/fc2)"
    gguf_no_arch = "llama.cpp has no OPT architecture"
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
    gguf_arch = "gpt2"  # Conv1D weights leave transposed to [out, in] (get_weight)

    def geometry(self, config) -> AttentionGeometry:
        return AttentionGeometry(config.n_head, config.n_head, config.n_embd // config.n_head)

    def check_cut(self, config) -> None:
        super().check_cut(config)
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise UserError("this GPT-2 scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx): "
                            "renumbered blocks would compute differently, so blocks cannot be removed")

    def gguf_check(self, config) -> None:
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn",
                                                                                  False):
            raise UserError("GPT-2 attention options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are "
                            "not in llama.cpp; use transformers")

    def gguf_hparams(self, config, widths=None) -> dict:
        from gguf import Keys

        return {Keys.LLM.BLOCK_COUNT: config.n_layer, Keys.LLM.CONTEXT_LENGTH: config.n_positions,
                Keys.LLM.EMBEDDING_LENGTH: config.n_embd, Keys.LLM.VOCAB_SIZE: config.vocab_size,
                Keys.LLM.FEED_FORWARD_LENGTH: config.n_inner or 4 * config.n_embd,
                Keys.Attention.HEAD_COUNT: config.n_head,
                Keys.Attention.LAYERNORM_EPS: float(config.layer_norm_epsilon)}


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
