"""The recovery training loop shared by LM-loss and distillation finetuning: LoRA or all weights, mask kept, resumable.

LoRA (default): peft adapters on every prunable linear (or ``target_modules``), base weights frozen; merged at the end
and the masks M = (W != 0) re-applied, W_final = M * (W + (alpha / r) B A) (see ``recovery/lora.py``).
Full (``full=True``): every parameter of the model trains; after each backward pass the gradient of every masked
position is set to 0 and after each optimizer step the masks are applied again, so a pruned weight never moves
(AdamW without weight decay gives an update of exactly 0 where the gradient was always 0).

Windows are visited in a seeded random order, ``batch_size`` per step, cycling when exhausted; AdamW, constant lr.
``loss_fn(model, x) -> (loss, {name: float})`` gives the loss of a batch of token windows x (B, L).

Resume: with a ``TrainCheckpoint`` and ``checkpoint_every = N`` the trainable tensors (LoRA factors, or all weights),
the optimizer state, the window order and the sampler's generator are saved every N steps (the state file written
last, by atomic rename); a later call with the same checkpoint continues from there and gives the same weights as an
uninterrupted run.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from layerprune.progress import tqdm

from layerprune.checkpoint import commit_state, write_atomic
from layerprune.errors import UserError
from layerprune.recovery.masks import apply_masks, masks_of

STATE = "state.json"
TRAIN_GLOB = "train_" + "[0-9]" * 7 + ".pt"  # the names TrainCheckpoint.save writes: train_0000100.pt, ...


class TrainCheckpoint:
    """Resume state of a finetuning run in ``folder``: ``train_<step>.pt`` (tensors) and ``state.json`` (commit)."""

    def __init__(self, folder, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint

    def load(self) -> dict | None:
        p = self.folder / STATE
        if not p.is_file():
            return None
        try:
            state = json.loads(p.read_text())
            if state.get("kind") != "finetune" or not (self.folder / state["tensors"]).is_file():
                raise ValueError("not a finetuning checkpoint")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{p} is not a complete finetuning checkpoint, so it cannot be resumed: rerun with --force "
                            "to start over") from None
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"{self.folder} belongs to a finetuning run with other settings (run, teacher, loss, lr, "
                            "rank, batch, data or seed differ): resume with the same settings, or --force to start "
                            "over")
        return state

    def tensors(self, state: dict) -> dict:
        return torch.load(self.folder / state["tensors"], weights_only=True)

    def save(self, step: int, tensors: dict, state: dict) -> None:
        """The tensors, then the state file naming them (the commit point, ``checkpoint.commit_state``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"train_{step:07d}.pt"
        write_atomic(self.folder, name, lambda p: torch.save(tensors, p))
        state = {**state, "kind": "finetune", "fingerprint": self.fingerprint, "step": step, "tensors": name}
        commit_state(self.folder, state, name, TRAIN_GLOB)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def lm_loss(model, x):
    """The causal LM loss of the windows x (transformers' shifted cross-entropy)."""
    return model(input_ids=x, labels=x).loss, {}


def train_recovery(model, windows: torch.Tensor, steps: int, loss_fn=lm_loss, *, full: bool = False, rank: int = 8,
                   alpha: int = 16, target_modules=None, lr: float = 1e-4, batch_size: int = 1, seed: int = 0,
                   progress: bool = True, checkpoint: TrainCheckpoint | None = None, checkpoint_every: int = 0,
                   checkpoint_extra: dict | None = None, resume_state: dict | None = None, desc: str = "lora"):
    """Train the pruned ``model`` in place on ``windows`` (LongTensor (n, L)) for ``steps`` steps; see the module doc.

    ``resume_state``: a state ``checkpoint.load()`` returned (continue from it); ``checkpoint_extra``: a dict stored
    with every checkpoint (the caller's own resume data). Returns the per-step losses, timings, sizes and settings.
    """
    from peft import LoraConfig, get_peft_model

    if steps < 1 or rank < 1 or batch_size < 1 or windows.shape[1] < 2:
        raise UserError(f"finetuning needs steps, rank, batch_size >= 1 and seqlen >= 2 (got {steps}, {rank}, "
                        f"{batch_size}, {windows.shape[1]})")
    masks = masks_of(model)
    device = next(model.parameters()).device
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training

    if full:
        net = model
        for p in model.parameters():
            p.requires_grad_(True)
        sparse = {n: m.to(device) for n, m in masks.items() if not bool(m.all())}  # masks that hold a zero
        named = [(n, p) for n, p in model.named_parameters()]
    else:
        torch.manual_seed(seed)  # LoRA A init
        targets = list(target_modules) if target_modules else list(masks)
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
        net = get_peft_model(model, cfg)  # freezes every base parameter
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order, pos, start, losses, parts, done_s = torch.randperm(len(windows), generator=gen), 0, 0, [], {}, 0.0
    if resume_state is not None:
        saved = checkpoint.tensors(resume_state)
        start, pos, losses = resume_state["step"], resume_state["pos"], resume_state["losses"]
        parts, done_s = resume_state.get("parts", {}), resume_state.get("train_seconds", 0.0)
        if start > steps:
            raise UserError(f"the checkpoint is at step {start}, beyond --steps {steps}: pass --steps >= {start}")
        with torch.no_grad():
            for n, p in named:
                p.copy_(saved["params"][n])
        opt.load_state_dict(saved["optim"])
        gen.set_state(saved["generator"])
        order = saved["order"]

    def save(step):
        tensors = {"params": {n: p.detach().cpu() for n, p in named}, "optim": opt.state_dict(),
                   "generator": gen.get_state(), "order": order}
        checkpoint.save(step, tensors, {"pos": pos, "losses": losses, "parts": parts,
                                        "train_seconds": done_s + time.time() - t0, "extra": checkpoint_extra or {}})

    net.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=desc, disable=not progress, initial=start, total=steps)
    for step in bar:
        idx = []
        while len(idx) < batch_size:
            if pos == len(order):
                order, pos = torch.randperm(len(windows), generator=gen), 0
            idx.append(order[pos].item())
            pos += 1
        x = windows[idx].to(device)
        loss, extra = loss_fn(net, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if full:
            with torch.no_grad():
                for n, m in sparse.items():
                    g = model.get_submodule(n).weight.grad
                    if g is not None:
                        g.masked_fill_(~m, 0)
        opt.step()
        if full:
            apply_masks(model, sparse)
        losses.append(loss.item())
        for k, v in extra.items():
            parts.setdefault(k, []).append(v)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    train_s = done_s + time.time() - t0

    if full:
        merged, refilled = model, 0.0
    else:
        merged = net.merge_and_unload()  # the same model object, W + (alpha / r) B A, dense
        with torch.no_grad():
            refilled = max((merged.get_submodule(n).weight[~m].abs().max().item() if (~m).any() else 0.0)
                           for n, m in masks.items())
    apply_masks(merged, masks)
    for n, p in merged.named_parameters():
        p.requires_grad_(requires_grad.get(n, True))
    merged.train(was_training)
    seqlen = windows.shape[1]
    return {"losses": losses, **({"loss_parts": parts} if parts else {}), "steps": steps, "train_seconds": train_s,
            "seconds_per_step": train_s / steps, "trainable_params": sum(p.numel() for p in params),
            "masked_weights": sum(int((~m).sum()) for m in masks.values()), "max_abs_refilled": refilled,
            "full": full, **({} if full else {"rank": rank, "alpha": alpha}), "lr": lr, "seqlen": seqlen,
            "batch_size": batch_size, "windows": len(windows), "seed": seed,
            "tokens_seen": steps * batch_size * seqlen, "resumed_at_step": start if resume_state is not None else None}
