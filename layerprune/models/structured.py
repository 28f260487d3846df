"""Physically smaller models: remove attention heads and FFN channels, and save / load per-block widths.

Heads (LLaMA-style attention; query head h reads KV head h // n_rep, n_rep = heads / kv_heads, as ``repeat_kv``
lays them out): a removed query head loses its ``head_dim`` rows of q_proj and its ``head_dim`` input columns of
o_proj; a removed KV head loses its rows of k_proj and v_proj. Every KV group must keep the same number of query
heads, so grouped-query attention (GQA) allows two removal modes:

  * ``heads``     : the same number of query heads from every KV group; all KV heads stay. Finer (one head per group
                    per step), the o_proj OBS sees exactly what is removed; k/v projections and the KV cache keep
                    their size, so attention saves less per removed head.
  * ``kv-groups`` : whole KV groups (the KV head and its n_rep query heads). Also shrinks k/v and the KV cache (more
                    decode speed and memory per step), but coarser, and k/v rows are removed without OBS
                    compensation of their own (the o_proj update compensates the group's whole output).
  Multi-head attention (n_rep = 1) is the same in both modes: a head goes with its k/v rows.

FFN channels: rows of gate_proj and up_proj, input columns of down_proj.

Saving. When every block ends with the same widths the model keeps its stock config (with the new head, KV head and
channel counts and an explicit head_dim: ``Adapter.width_fields``), which stock ``AutoModelForCausalLM.from_pretrained``
loads, when the family's config accepts them (llama and gemma3 validate hidden_size % num_attention_heads; mistral,
qwen2/3 and granite do not). Otherwise the config becomes ``layerprune_<model_type>`` (registered with the
``transformers`` Auto classes by ``register()``, which ``layerprune.load_model`` calls): the stock config plus per-block
lists ``layer_heads``, ``layer_kv_heads``, ``layer_intermediate``; its model class is the stock class, which builds the
dense model and resizes each block after init (no forked modeling code).

The adapter (``models/adapters.py``) knows the family's module and config names; this module only slices weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from . import adapters as _adapters
from .adapters import PREFIX, Adapter, get_adapter

GQA_MODES = ("heads", "kv-groups")
_FIELDS = ("layer_heads", "layer_kv_heads", "layer_intermediate")
_CLASSES: dict[str, tuple[type, type, type, type]] = {}  # base model_type -> (base cfg, base model, cfg, model)


# ----------------------------------------------------------------------------- widths and slicing

def block_widths(block: nn.Module, adapter: Adapter, head_dim: int) -> tuple[int, int, int]:
    """(query heads, KV heads, FFN channels) of a block, read from its weight shapes."""
    return adapter.widths(block, head_dim)


def model_widths(model) -> list[tuple[int, int, int]]:
    adapter = get_adapter(model)
    hd = adapter.geometry(model.config).head_dim
    return [block_widths(b, adapter, hd) for b in adapter.blocks(model)]


def check_structured(adapter: Adapter) -> None:
    if not adapter.structured:
        why = adapter.not_structured or "it has fused or missing q/k/v/o or gate/up/down projections"
        raise UserError(f"structured pruning (heads/channels) is not available for the {adapter.family} family: "
                        f"{why}; use an unstructured method (magnitude, wanda, sparsegpt, --nm 2:4)")


@torch.no_grad()
def _slice(mod: nn.Linear, dim: int, keep: torch.Tensor) -> None:
    """Keep rows (dim 0: outputs) or columns (dim 1: inputs) `keep` of an nn.Linear, in place."""
    keep = keep.to(mod.weight.device)
    mod.weight = nn.Parameter(mod.weight.index_select(dim, keep).contiguous(), requires_grad=mod.weight.requires_grad)
    if dim == 0:
        if mod.bias is not None:
            mod.bias = nn.Parameter(mod.bias[keep].contiguous(), requires_grad=mod.bias.requires_grad)
        mod.out_features = len(keep)
    else:
        mod.in_features = len(keep)


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of the given units (heads) of `size` rows each."""
    u = torch.as_tensor(sorted(units), dtype=torch.long)
    return (u[:, None] * size + torch.arange(size)).reshape(-1)


def remove_heads(block: nn.Module, adapter: Adapter, head_dim: int, heads: list[int], kv_heads: list[int] = ()) -> None:
    """Remove query heads `heads` (q_proj rows, o_proj columns) and KV heads `kv_heads` (k/v rows) from a block.

    The result must still be valid GQA: every kept KV head keeps the same number of query heads, and the query heads
    of a removed KV head are all removed."""
    check_structured(adapter)
    nh, nkv, _ = block_widths(block, adapter, head_dim)
    heads, kv_heads = sorted(set(heads)), sorted(set(kv_heads))
    if any(not 0 <= h < nh for h in heads) or any(not 0 <= g < nkv for g in kv_heads):
        raise UserError(f"head indices out of range: the block has {nh} query heads and {nkv} KV heads")
    rep = nh // nkv
    left = [sum(h // rep == g and h not in heads for h in range(nh)) for g in range(nkv)]
    kept = [left[g] for g in range(nkv) if g not in kv_heads]
    if any(left[g] for g in kv_heads) or not kept or len(set(kept)) != 1 or kept[0] == 0:
        raise UserError(f"removing query heads {heads} and KV heads {kv_heads} leaves an invalid GQA layout "
                        f"(query heads left per KV group: {left}); remove the same number from every kept group and "
                        "all query heads of a removed group")
    lin = adapter.linears(block)
    keep_q = _rows([h for h in range(nh) if h not in heads], head_dim)
    keep_kv = _rows([g for g in range(nkv) if g not in kv_heads], head_dim)
    _slice(lin[adapter.q], 0, keep_q)
    _slice(lin[adapter.o], 1, keep_q)
    _slice(lin[adapter.k], 0, keep_kv)
    _slice(lin[adapter.v], 0, keep_kv)
    adapter.set_attention_widths(block, nh - len(heads), nkv - len(kv_heads))


def remove_channels(block: nn.Module, adapter: Adapter, channels: list[int]) -> None:
    """Remove FFN channels: gate/up rows and down_proj input columns."""
    check_structured(adapter)
    lin = adapter.linears(block)
    n = adapter.get_weight(lin[adapter.up]).shape[0]
    drop = set(channels)
    if any(not 0 <= c < n for c in drop) or len(drop) >= n:
        raise UserError(f"cannot remove channels {sorted(drop)[:8]}... from an FFN of {n}: keep at least one, "
                        "indices in range")
    keep = torch.as_tensor([c for c in range(n) if c not in drop], dtype=torch.long)
    _slice(lin[adapter.gate], 0, keep)
    _slice(lin[adapter.up], 0, keep)
    _slice(lin[adapter.down], 1, keep)
    adapter.set_mlp_width(block, len(keep))


@torch.no_grad()
def resize_block(block: nn.Module, adapter: Adapter, head_dim: int, heads: int, kv_heads: int, channels: int) -> None:
    """Give a block the given widths with uninitialised weights (to be loaded next); keeps device and dtype."""
    check_structured(adapter)
    lin = adapter.linears(block)

    def resize(role, out, inp):
        m = lin[role]
        w = m.weight
        m.weight = nn.Parameter(torch.empty(out, inp, device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
        if m.bias is not None:
            b = m.bias
            m.bias = nn.Parameter(torch.empty(out, device=b.device, dtype=b.dtype), requires_grad=b.requires_grad) \
                if out != b.shape[0] else b
        m.out_features, m.in_features = out, inp

    hidden = lin[adapter.q].in_features
    resize(adapter.q, heads * head_dim, hidden)
    resize(adapter.k, kv_heads * head_dim, hidden)
    resize(adapter.v, kv_heads * head_dim, hidden)
    resize(adapter.o, hidden, heads * head_dim)
    resize(adapter.gate, channels, hidden)
    resize(adapter.up, channels, hidden)
    resize(adapter.down, hidden, channels)
    adapter.set_attention_widths(block, heads, kv_heads)
    adapter.set_mlp_width(block, channels)


def load_block(block: nn.Module, adapter: Adapter, head_dim: int, state_dict: dict) -> None:
    """Load a (possibly pruned) block's state dict into a block of any width (resume of a structured run)."""
    lin = adapter.linears(block)
    heads = state_dict[f"{adapter.q}.weight"].shape[0] // head_dim
    kv = state_dict[f"{adapter.k}.weight"].shape[0] // head_dim
    ch = state_dict[f"{adapter.up}.weight"].shape[0]
    if block_widths(block, adapter, head_dim) != (heads, kv, ch) or lin[adapter.q].weight.is_meta:
        resize_block(block, adapter, head_dim, heads, kv, ch)
    block.load_state_dict(state_dict)


def count_params(model) -> int:
    """Parameters of the model (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- config / model registration

def _make_classes(base_cfg: type, base_model: type) -> tuple[type, type]:
    cfg_name = "Layerprune" + base_cfg.__name__
    ann = {f: list[int] | None for f in _FIELDS}
    cfg_cls = type(cfg_name, (base_cfg,), {"model_type": PREFIX + base_cfg.model_type, "__annotations__": ann,
                                          "__module__": __name__, **{f: None for f in _FIELDS}})

    def __init__(self, config):
        base_model.__init__(self, config)
        apply_widths(self, config)

    model_cls = type("Layerprune" + base_model.__name__, (base_model,),
                     {"config_class": cfg_cls, "__init__": __init__, "__module__": __name__})
    return cfg_cls, model_cls


def register() -> None:
    """Register ``layerprune_<type>`` configs/models with AutoConfig / AutoModelForCausalLM for every family whose
    adapter supports structured pruning (idempotent). ``get_adapter`` maps ``layerprune_<type>`` to ``<type>``'s
    adapter by itself."""
    if _CLASSES:
        return
    import transformers as T
    from transformers.models.auto import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    for a in _adapters.ADAPTERS:
        if not a().structured:
            continue
        for base_type in [t for t in a.model_types if t in CONFIG_MAPPING]:
            bc = CONFIG_MAPPING[base_type]
            cfg_cls, model_cls = _make_classes(bc, MODEL_FOR_CAUSAL_LM_MAPPING[bc])
            T.AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
            T.AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
            _CLASSES[base_type] = (bc, MODEL_FOR_CAUSAL_LM_MAPPING[bc], cfg_cls, model_cls)


def _base_type(model_type: str) -> str:
    return model_type.removeprefix(PREFIX)


def apply_widths(model, config) -> None:
    """Resize the blocks of a freshly built model to the per-block widths of a ``layerprune_*`` config."""
    lists = [getattr(config, f, None) for f in _FIELDS]
    if all(v is None for v in lists):
        return
    adapter = get_adapter(config)
    blocks = adapter.blocks(model)
    hd = adapter.geometry(config).head_dim
    if any(v is None or len(v) != len(blocks) for v in lists):
        raise UserError(f"config lists {', '.join(_FIELDS)} must each have one entry per block ({len(blocks)})")
    for block, h, kv, ch in zip(blocks, *lists):
        resize_block(block, adapter, hd, h, kv, ch)


def _config(cls, old, **fields):
    """A config of class `cls`: `old`'s settings, an explicit head_dim, and `fields`; None when the class's validators
    refuse the widths (transformers validates e.g. hidden_size % num_attention_heads, raising a strict-dataclass
    validation error). Any other error is a bug and propagates: it never switches the save format."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    adapter = get_adapter(old)
    d = {k: v for k, v in old.to_dict().items() if k not in ("model_type", "transformers_version", "architectures",
                                                             *_FIELDS)}
    d.update(adapter.width_fields(adapter.geometry(old).head_dim))
    try:
        return cls(**{**d, **fields})
    except StrictDataclassClassValidationError:
        return None


def _classes(config) -> tuple[type, type, type, type]:
    register()
    base_type = _base_type(config.model_type)
    if base_type not in _CLASSES:
        raise UserError(f"saving pruned widths is supported for {', '.join(_CLASSES)}, not {config.model_type!r}")
    return _CLASSES[base_type]


def _per_block(config, widths):
    cfg_cls = _classes(config)[2]
    return _config(cfg_cls, config, **{f: [w[j] for w in widths] for j, f in enumerate(_FIELDS)})


def check_expressible(model) -> None:
    """Before any work: the model's heads/channels can be removed and any resulting widths saved as a config (the
    per-block ``layerprune_<type>`` form is built here from the current widths; it holds every outcome). Needs only
    the structure (a meta skeleton will do)."""
    adapter = get_adapter(model)
    check_structured(adapter)
    if _per_block(model.config, model_widths(model)) is None:
        raise UserError(f"the {model.config.model_type} config cannot describe per-block widths; structured pruning "
                        "of this model is not supported")


def finalize(model) -> dict:
    """Make the model's config describe its (pruned) blocks; returns the widths written.

    Equal widths everywhere: the stock config (and class) with the new sizes and an explicit head_dim, when the
    stock config accepts them. Otherwise (unequal widths, or e.g. a head count that does not divide hidden_size where
    the family validates that) the registered ``layerprune_<type>`` config and class with per-block lists. Works in
    both directions."""
    old = model.config
    base_cfg, base_model, cfg_cls, model_cls = _classes(old)
    widths = model_widths(model)
    new, cls, refused = None, base_model, None
    if len(set(widths)) == 1:
        h, kv, ch = widths[0]
        adapter = get_adapter(old)
        fields = adapter.width_fields(adapter.geometry(old).head_dim, h, kv, ch)
        new = _config(base_cfg, old, **fields)
        if new is None:
            refused = _refusal(base_cfg, old, fields)
    if new is None:
        new, cls = _per_block(old, widths), model_cls
    if new is None:  # check_expressible() refuses such models before any work
        raise UserError(f"the {old.model_type} config cannot describe the pruned widths {widths}")
    new._attn_implementation = old._attn_implementation
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = new
    model.__class__ = cls
    out = {"uniform": cls is base_model, "model_type": new.model_type,
           "heads": [w[0] for w in widths], "kv_heads": [w[1] for w in widths],
           "intermediate": [w[2] for w in widths]}
    if refused:  # equal widths the stock config refuses: per-block config (remote code), stock GGUF architecture
        out["equal_widths"] = True
        out["stock_config_refused"] = refused
    return out


def _refusal(cls, old, fields) -> str:
    """Why the stock config class refuses these widths (its validator's first line)."""
    from huggingface_hub.errors import StrictDataclassError

    d = {k: v for k, v in old.to_dict().items() if k not in ("model_type", "transformers_version", "architectures",
                                                             *_FIELDS)}
    try:
        cls(**{**d, **fields})
    except (ValueError, TypeError, StrictDataclassError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return lines[-1] if lines else type(e).__name__
    return ""
