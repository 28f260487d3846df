"""Resume state of a pruning run (``Checkpoint``) and the one fingerprint of (model, calibration, settings)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError


def fingerprint(model, calib: torch.Tensor, settings: str, weights: bool = False) -> str:
    """24 hex digits of sha256 over the model's config, the calibration ids and ``settings``; with ``weights`` also
    the first 64 values of every parameter (a cheap check that the weights are the same)."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(calib.cpu().numpy().tobytes())
    h.update(settings.encode())
    if weights:
        for p in model.parameters():
            h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


class Checkpoint:
    """Per-block resume state under ``<out>/.checkpoint``: pruned block weights, the next block's inputs, and a
    state file written last (the commit point), all by atomic rename."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint

    def load(self) -> dict | None:
        p = self.folder / "state.json"
        if not p.is_file():
            return None
        try:
            state = json.loads(p.read_text())
            if not isinstance(state, dict) or not (self.folder / state["activations"]).is_file():
                raise ValueError("incomplete")
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{p} is corrupt or incomplete, so the run cannot be resumed: rerun with --force "
                            "to start over") from None
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"{self.folder} belongs to a run with other settings (model, method, sparsity, allocation "
                            "or calibration differ): rerun with the same settings, or use --force to start over")
        return state

    def block_weights(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / f"block_{i:04d}.safetensors"))

    def activations(self, state: dict) -> torch.Tensor:
        return load_file(str(self.folder / state["activations"]))["x"]

    def extra(self, state: dict) -> dict[str, torch.Tensor]:
        """The block program's own resume tensors saved beside the inputs (``save(extra=...)``)."""
        return {k: v for k, v in load_file(str(self.folder / state["activations"])).items() if k != "x"}

    def _atomic(self, name: str, write) -> None:
        tmp = self.folder / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, self.folder / name)

    def save(self, i: int, block: nn.Module | None, acts: torch.Tensor, state: dict,
             extra: dict[str, torch.Tensor] | None = None) -> None:
        """Commit block i: its pruned weights (unless ``block`` is None: the block store keeps them), the next block's
        inputs (with ``extra``: the block program's own resume tensors), then the state file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if block is not None:
            sd = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
            self._atomic(f"block_{i:04d}.safetensors", lambda p: save_file(sd, str(p)))
        name = f"acts_{i + 1:04d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in {**(extra or {}), "x": acts}.items()}
        self._atomic(name, lambda p: save_file(tensors, str(p)))
        state = {**state, "fingerprint": self.fingerprint, "next_block": i + 1, "activations": name}
        self._atomic("state.json", lambda p: p.write_text(json.dumps(state)))
        for old in self.folder.glob("acts_*.safetensors"):  # only the latest block's inputs are needed to resume
            if old.name != name:
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
