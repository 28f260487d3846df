"""FedLP over LoRA adapters (peft): the base model stays frozen on every client and is never sent.

What travels is the LoRA factors of every decoder-block linear (the linears ``recovery.lora.prunable_linears``
names): for module m, ``A_m`` (r x in) and ``B_m`` (out x r), named as peft's ``get_peft_model_state_dict`` names them
(``base_model.model.<module>.lora_A.weight``). A unit ``block.i`` is every adapter tensor of block i, so FedLP's
layer dropping (homo), depth prefixes (hetero) and the per-key aggregation of ``strategy.FedLPStrategy`` act on the
adapters unchanged; FedAvg over A and B separately is FedAvg-LoRA (what Flower's FlowerTune baseline does).

The global model is the merged one: every adapted linear W becomes

    W' = W + M * (s B A),    s = alpha / r,    M = (W != 0) of the starting model, or all-ones for a dense model,

so a pruned model keeps its exact zero pattern (the dense update would refill the pruned positions). Clients train
with the dense update (as ``layerprune finetune`` does); the mask is applied where the weights are merged: on the
server's evaluation model and on the saved result.

A client of depth c (hetero) runs the first c blocks and trains and exchanges the adapters of blocks < c only
(``depth_view``). Without a personal head it exits through the base model's final norm and head, both frozen. With one
(``PersonalExit``, the paper's local head: never sent, never aggregated, kept per partition) it exits through
``norm_k(h + W_k h + b_k)``: an affine translator of the block-c hidden state (zero-initialised, so it starts as the
identity) and its own copy of the final norm, before the frozen shared head. On its first round a partition fits its
translator alone for ``head_steps`` steps (the adapters frozen: only the exit is differentiated), then trains both.
"""
from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..models.adapters import get_adapter
from ..offload import peak_rss_mb
from ..recovery.lora import masks_of, prunable_linears
from .depth import Layout

PEFT_PREFIX = "base_model.model."  # peft's names of the wrapped model's modules


def default_alpha(rank: int, alpha: float | None) -> float:
    return float(2 * rank if alpha is None else alpha)


def lora_layout(model: nn.Module) -> Layout:
    """Units of the adapter tensors: ``block.i`` by the (peft-prefixed) block path; no embed or exit tensors."""
    ad = get_adapter(model)
    return Layout(PEFT_PREFIX + ad.blocks_path, (), ad.num_blocks(model))


def _is_conv1d(mod: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, Conv1D)  # GPT-2 style: weight is (in, out), peft sets fan_in_fan_out


def attach(model: nn.Module, rank: int, alpha: float, seed: int = 0):
    """``model`` wrapped by peft with LoRA (rank, alpha, no dropout) on every block linear; base frozen."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise UserError(f"--lora-rank {rank} must be at least 1")
    targets = list(prunable_linears(model))
    fan = any(_is_conv1d(model.get_submodule(t)) for t in targets)
    torch.manual_seed(seed)  # peft's A initialisation
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                     fan_in_fan_out=fan)
    return get_peft_model(model, cfg)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA tensors (float32 copies), peft's names without the adapter name."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapters(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Load (some of) the adapter tensors; a name the model does not have is refused."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    known = get_peft_model_state_dict(peft_model)
    bad = [k for k in state if k not in known or tuple(known[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ValueError(f"received adapter tensors do not fit this model: {bad[:3]}")
    set_peft_model_state_dict(peft_model, state)


def initial_adapters(model: nn.Module, rank: int, alpha: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Round-0 adapters (peft's init: A random, B = 0, so the merged model is the base); ``model`` is left as it was."""
    pm = attach(model, rank, alpha, seed)
    state = adapter_state(pm)
    pm.unload()  # removes the LoRA layers, puts the original linears back
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)
    return state


def module_of(key: str) -> tuple[str, str]:
    """(module name in the base model, 'A' or 'B') of an adapter tensor name."""
    if not key.startswith(PEFT_PREFIX) or ".lora_" not in key:
        raise ValueError(f"{key!r} is not a LoRA adapter tensor name")
    module, rest = key[len(PEFT_PREFIX):].rsplit(".lora_", 1)
    return module, rest[0]


def adapter_pairs(adapters: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) as float32 tensors (numpy arrays accepted)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in adapters.items():
        module, which = module_of(k)
        parts.setdefault(module, {})[which] = torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).float()
    missing = [m for m, p in parts.items() if set(p) != {"A", "B"}]
    if missing:
        raise ValueError(f"adapters of {missing[:3]} lack their A or B factor")
    return {m: (p["A"], p["B"]) for m, p in parts.items()}


def delta(A: torch.Tensor, B: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
          transpose: bool = False) -> torch.Tensor:
    """M * (s B A) in the weight's layout (``transpose`` for Conv1D weights, stored (in, out))."""
    d = scale * (B @ A)
    if transpose:
        d = d.T
    if mask is not None:
        d = d.masked_fill(~mask, 0.0)
    return d


@torch.no_grad()
def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the adapted linears' weights (what merging starts from every time)."""
    return {name: mod.weight.detach().clone() for name, mod in prunable_linears(model).items()}


@torch.no_grad()
def merge_adapters(model: nn.Module, base: dict[str, torch.Tensor], adapters: dict, scale: float,
                   masks: dict[str, torch.Tensor] | None = None) -> None:
    """Set every adapted linear (in place) to W + M * (s B A) from the base weights ``base``.

    ``masks`` (module -> bool, True = kept): the pruned positions stay exactly zero whatever the adapters hold.
    A linear without adapters gets its base weight back.
    """
    pairs = adapter_pairs(adapters)
    unknown = [m for m in pairs if m not in base]
    if unknown:
        raise ValueError(f"adapters for modules the model does not adapt: {unknown[:3]}")
    for name, w in base.items():
        mod = model.get_submodule(name)
        if name not in pairs:
            mod.weight.copy_(w)
            continue
        A, B = pairs[name]
        m = masks.get(name) if masks else None
        merged = w + delta(A, B, scale, None, _is_conv1d(mod)).to(w.dtype)
        if m is not None:
            merged.masked_fill_(~m, 0.0)
        mod.weight.copy_(merged)


def masks_if_sparse(model: nn.Module, mode: str = "auto", min_sparsity: float = 0.01) -> dict[str, torch.Tensor] | None:
    """Kept-masks (W != 0) of the adapted linears: always (``on``), never (``off``), or when >= 1% of them is zero."""
    if mode == "off":
        return None
    masks = masks_of(model)
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    if mode == "auto" and (not total or zeros / total < min_sparsity):
        return None
    return masks


@torch.no_grad()
def zero_pattern_check(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict:
    """Pruned positions now nonzero (must be 0), kept positions now exactly 0, and the sparsity of those linears."""
    refilled = kept_zero = zeros = total = 0
    for name, m in masks.items():
        w = model.get_submodule(name).weight
        refilled += int((w[~m] != 0).sum())
        kept_zero += int((w[m] == 0).sum())
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"pruned_now_nonzero": refilled, "kept_now_zero": kept_zero, "sparsity": zeros / max(1, total)}


@contextlib.contextmanager
def depth_view(model: nn.Module, depth: int):
    """Within the block, ``model`` (a plain or peft-wrapped causal LM) runs only its first ``depth`` blocks and
    exits through its own final norm and head; the block list and config are restored afterwards."""
    from peft import PeftModel

    inner = model.base_model.model if isinstance(model, PeftModel) else model
    ad = get_adapter(inner)
    blocks = ad.blocks(inner)
    if depth >= len(blocks):
        yield model
        return
    parent_path, attr = ad.blocks_path.rsplit(".", 1) if "." in ad.blocks_path else ("", ad.blocks_path)
    parent = inner.get_submodule(parent_path)
    cfg = inner.config
    saved = {k: getattr(cfg, k) for k in ("num_hidden_layers", "layer_types") if hasattr(cfg, k)}
    setattr(parent, attr, nn.ModuleList(list(blocks)[:depth]))
    ad.truncate_config(cfg, depth)
    try:
        yield model
    finally:
        setattr(parent, attr, blocks)
        for k, v in saved.items():
            setattr(cfg, k, v)


PERSONAL_HEADS = ("translator", "head-lora")


class PersonalExit(nn.Module):
    """A shallow client's personal exit, in one of two forms (``kind``), both starting as the model's own exit:

    - ``translator``: ``head(norm_k(h + W h + b))``, W (d x d) and b zero at the start, ``norm_k`` a trainable copy of
      the final norm; the head is the shared, frozen one;
    - ``head-lora``: ``head(n) + s B A n`` with ``n = norm_k(h)``: a rank-r LoRA on the frozen output head (A random,
      B zero at the start, s = alpha / r) and the copy of the final norm.

    ``install(inner)`` puts it in the model (in place of the final norm; head-lora also wraps the head) and returns
    the way to put the model back."""

    def __init__(self, norm: nn.Module, hidden: int, kind: str = "translator", vocab: int = 0, rank: int = 8,
                 alpha: float = 16.0, seed: int = 0):
        super().__init__()
        if kind not in PERSONAL_HEADS:
            raise UserError(f"--personal-head {kind!r}: use one of {', '.join(PERSONAL_HEADS)}")
        self.kind = kind
        w = next(norm.parameters(), None)
        dt = w.dtype if w is not None else torch.float32
        if kind == "translator":
            self.translator = nn.Linear(hidden, hidden, dtype=dt)
            nn.init.zeros_(self.translator.weight)
            nn.init.zeros_(self.translator.bias)
        else:
            g = torch.Generator().manual_seed(seed)
            bound = 1.0 / hidden ** 0.5  # peft's kaiming_uniform(a=sqrt(5)) bound for A
            self.A = nn.Parameter((torch.rand(rank, hidden, generator=g, dtype=dt) * 2 - 1) * bound)
            self.B = nn.Parameter(torch.zeros(vocab, rank, dtype=dt))
            self.scale = float(alpha) / rank
        self.norm = copy.deepcopy(norm)
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, hidden_states, *args, **kwargs):
        if self.kind == "translator":
            hidden_states = hidden_states + self.translator(hidden_states)
        return self.norm(hidden_states, *args, **kwargs)

    def head_delta(self, x):
        return self.scale * (x @ self.A.T) @ self.B.T

    def install(self, inner: nn.Module):
        ad = get_adapter(inner)
        undo = [_swap(inner, ad.final_norm_path, self)]
        if self.kind == "head-lora":
            undo.append(_swap(inner, ad.lm_head_path, _LoRAHead(inner.get_submodule(ad.lm_head_path), self)))
        return lambda: [u() for u in reversed(undo)]


class _LoRAHead(nn.Module):
    def __init__(self, head: nn.Module, exit_: PersonalExit):
        super().__init__()
        self.head, self.exit = head, exit_

    def forward(self, x):
        return self.head(x) + self.exit.head_delta(x)


def _swap(model: nn.Module, path: str, new: nn.Module):
    parent_path, attr = path.rsplit(".", 1) if "." in path else ("", path)
    parent = model.get_submodule(parent_path)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return lambda: setattr(parent, attr, old)


def personal_params(model: nn.Module, kind: str = "translator", rank: int = 8) -> int:
    """Parameters of one personal exit for ``model``: translator (d x d + d) or head LoRA (r (d + V)), + the final
    norm's parameters."""
    norm = get_adapter(model).final_norm(model)
    if norm is None:
        raise UserError(f"personal heads need a final norm, and {type(model).__name__} has none: use "
                        "--no-personal-heads")
    d, v = int(model.config.hidden_size), int(model.get_output_embeddings().weight.shape[0])
    own = d * d + d if kind == "translator" else rank * (d + v)
    return own + sum(p.numel() for p in norm.parameters())


@contextlib.contextmanager
def personal_exit(model: nn.Module, state: dict[str, torch.Tensor] | None = None, kind: str = "translator",
                  rank: int = 8, alpha: float = 16.0, seed: int = 0):
    """Within the block, ``model`` (plain or peft-wrapped) exits through a ``PersonalExit`` (from ``state`` if given,
    else fresh); yields it. The model's own final norm (and head) are put back afterwards."""
    from peft import PeftModel

    inner = model.base_model.model if isinstance(model, PeftModel) else model
    norm = get_adapter(inner).final_norm(inner)
    if norm is None:
        raise UserError(f"personal heads need a final norm, and {type(inner).__name__} has none: use "
                        "--no-personal-heads")
    pe = PersonalExit(norm, int(inner.config.hidden_size), kind, int(inner.get_output_embeddings().weight.shape[0]),
                      rank, alpha, seed)
    if state is not None:
        pe.load_state_dict(state)
    undo = pe.install(inner)
    try:
        yield pe
    finally:
        undo()


# --- clients -----------------------------------------------------------------------------------------------------
_PEFT: dict[tuple, nn.Module] = {}  # per process: (base key, rank, alpha) -> peft-wrapped frozen base


def cached_peft(key: str, load_fn, rank: int, alpha: float) -> nn.Module:
    """The client's frozen base wrapped with LoRA, loaded once per process (``load_fn() -> model``)."""
    k = (key, int(rank), float(alpha))
    if k not in _PEFT:
        _PEFT.clear()  # one base per process
        base = load_fn().float().eval()
        _PEFT[k] = attach(base, int(rank), float(alpha))
    return _PEFT[k]


def load_saved(path: str) -> nn.Module:
    """A base model written by ``save_pretrained`` (the simulation's hand-off of the frozen base to its clients)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def client_round(content, peft_model, ids: torch.Tensor, train: dict, partition: int, state=None):
    """One client's LoRA round: load the received adapters, train those of its first ``depth`` blocks for
    ``local_steps`` AdamW steps, reply with them (homo: each block's adapters with probability ``keep-prob``).

    ``personal-exit`` in the round's config: the client trains through its personal exit, kept in ``state`` (its
    ``context.state``) as ``personal-head`` (tensors) and ``personal-meta`` (depth, rounds trained); on the first
    round the exit is fitted alone for ``train["head_steps"]`` steps first. Nothing of it is sent."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from .train import local_train

    cfg = content["config"]
    depth, rnd = int(cfg["depth"]), int(cfg["server-round"])
    inner = peft_model.base_model.model
    layout = lora_layout(inner)
    received = content["arrays"].to_torch_state_dict()
    load_adapters(peft_model, received)
    shared = {f"block.{i}" for i in range(depth)}
    missing = [k for k in adapter_state(peft_model) if layout.unit(k) in shared and k not in received]
    if missing:
        raise ValueError(f"a depth-{depth} client did not receive {missing[:3]}")
    seed = int(train.get("seed", 0)) * 1_000_003 + rnd * 1009 + partition
    personal = bool(cfg.get("personal-exit", False))
    if personal and state is None:
        raise ValueError("a personal-head round needs the client's state")
    head, done = None, 0
    if personal and "personal-head" in state.array_records:
        meta = state["personal-meta"]
        if int(meta["depth"]) != depth:
            raise ValueError(f"this partition's personal head was trained at depth {int(meta['depth'])}, not {depth}")
        head, done = state["personal-head"].to_torch_state_dict(), int(meta["rounds"])
    steps, bs, sl, lr = int(train["local_steps"]), int(train["batch_size"]), int(train["seqlen"]), float(train["lr"])
    t0 = time.time()
    kind, rank = str(train.get("personal_head") or "translator"), int(train["lora_rank"])
    with depth_view(peft_model, depth), (personal_exit(peft_model, head, kind, rank, float(train["lora_alpha"]),
                                                       partition) if personal else contextlib.nullcontext()) as pe:
        if personal and head is None and int(train.get("head_steps") or 0):
            local_train(peft_model, ids, int(train["head_steps"]), bs, sl, lr, seed + 500_009, only=pe)
        loss = local_train(peft_model, ids, steps, bs, sl, lr, seed)
        if personal:
            state["personal-head"] = ArrayRecord({k: v.detach().clone() for k, v in pe.state_dict().items()})
            state["personal-meta"] = MetricRecord({"depth": depth, "rounds": done + 1})
    seconds = time.time() - t0
    units = [u for u in layout.units() if u in shared]
    if cfg["scheme"] == "homo":
        rng = np.random.default_rng(seed)
        units = [u for u in units if rng.random() < float(cfg["keep-prob"])]
    keep = set(units)
    send = {k: v for k, v in adapter_state(peft_model).items() if layout.unit(k) in keep}
    metrics = MetricRecord({"num-examples": int(ids.numel()), "train-loss": loss if np.isfinite(loss) else -1.0,
                            "units-sent": len(units), "depth": depth, "train-seconds": float(seconds),
                            "peak-rss-mib": float(peak_rss_mb())})
    if personal:
        metrics["personal-params"] = sum(p.numel() for p in pe.parameters())
        metrics["personal-rounds"] = done + 1
    return RecordDict({"arrays": ArrayRecord(send), "metrics": metrics})


# --- accounting ----------------------------------------------------------------------------------------------------
def client_cost(model: nn.Module, depth: int, rank: int, tokens_per_round: int, personal: bool = False,
                head_tokens: int = 0, kind: str = "translator") -> dict:
    """Per client per round at depth ``depth``: parameter memory and an estimate of training FLOPs.

    Forward FLOPs per token ~ 2 x (weights of the block linears run + output head); with the base frozen the backward
    pass needs input gradients only (about one forward more) plus the small adapter gradients, so training ~ 2 x
    forward. Memory: the base weights the client runs (fp32) + adapters x 4 (weights, gradients, two AdamW moments).
    Attention-score FLOPs (seqlen-dependent) are left out. ``personal``: a personal exit adds its own FLOPs
    (translator 2 d^2 forward per token, head-lora 2 r (d + V)), x 3 to train it (its weight gradients too), and
    4 x its parameters of memory; its fit alone on a partition's first round (``head_tokens`` tokens: the prefix
    forward without gradients, then the exit forward and backward) is ``head_fit_flops``, once per partition.
    """
    ad = get_adapter(model)
    lin = prunable_linears(model)
    blocks = set(range(depth))
    prefix = ad.blocks_path + "."
    run_lin = sum(m.weight.numel() for n, m in lin.items() if int(n[len(prefix):].split(".")[0]) in blocks)
    adapters = sum(rank * sum(m.weight.shape) for n, m in lin.items() if int(n[len(prefix):].split(".")[0]) in blocks)
    head = model.get_output_embeddings().weight.numel()
    seen, base_params = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) not in blocks:
            continue
        base_params += p.numel()
    fwd = 2 * (run_lin + head)
    pers = personal_params(model, kind, rank) if personal else 0
    d = int(model.config.hidden_size)
    tr = (2 * d * d if kind == "translator" else 2 * rank * (d + head // d)) if personal else 0
    train = 2 * fwd * tokens_per_round + 3 * tr * tokens_per_round
    return {"depth": depth, "forward_flops_per_token": fwd + tr, "train_flops_per_round": train,
            "base_param_bytes": 4 * base_params, "adapter_params": adapters, "personal_params": pers,
            "head_fit_flops": (2 * run_lin + 4 * head + 2 * tr) * head_tokens if personal else 0,
            "adapter_train_bytes": 4 * 4 * adapters, "param_memory_bytes": 4 * base_params + 16 * (adapters + pers)}
