"""Resume state of a pruning run (``Checkpoint``) and the one fingerprint of (model, calibration, settings)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CHECKPOINT_MODES  # noqa: F401 (the modes, also importable from here)
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




def checkpoint_mode(mode: str | None, device) -> str:
    """``--checkpoint``: what a run with an output folder writes after each block so that it can be resumed.

    full     the pruned block and the next block's inputs (one [nsamples, seqlen, hidden] tensor, rewritten per
             block): resuming continues at once. The default on the CPU, where the inputs are small next to the
             time a block takes.
    weights  the pruned block only: resuming first runs the finished (pruned) blocks again over the calibration
             windows to rebuild the next block's inputs. The default on a GPU, where writing the inputs of every
             block (4.3 GB a block for a 7B model at 128 x 2048 in fp32) would cost more than pruning it.
    none     nothing: the run cannot be resumed.
    """
    if mode is None:
        return "weights" if torch.device(device if device is not None else "cpu").type == "cuda" else "full"
    if mode not in CHECKPOINT_MODES:
        raise UserError(f"--checkpoint {mode!r} is unknown: use one of {', '.join(CHECKPOINT_MODES)}")
    return mode


ACTS_GLOB = "acts_" + "[0-9]" * 4 + ".safetensors"  # the names Checkpoint.commit writes: acts_0001.safetensors, ...


def write_atomic(folder: Path, name: str, write) -> None:
    """``write(tmp)`` to a temporary file in ``folder``, then rename it to ``name``: a reader (a resume after a kill)
    sees the old file or the whole new one."""
    tmp = folder / f".{name}.tmp"
    write(tmp)
    os.replace(tmp, folder / name)


def commit_state(folder: Path, state: dict, current: str | None, pattern: str) -> None:
    """Write ``state.json`` (the commit point: the files it names are on disk before it), then remove the older
    generations, the files of ``pattern`` other than ``current``. ``pattern`` matches only names this package
    writes there (``ACTS_GLOB``, ``recovery.train.TRAIN_GLOB``), so nothing else in the folder is removed."""
    write_atomic(folder, "state.json", lambda p: p.write_text(json.dumps(state)))
    for old in folder.glob(pattern):
        if old.name != current:
            old.unlink(missing_ok=True)


class Checkpoint:
    """Per-block resume state under ``<out>/.checkpoint``: pruned block weights, the next block's inputs (unless
    ``activations`` is False: a resume recomputes them), and a state file written last (the commit point), all by
    atomic rename."""

    def __init__(self, folder: Path, fingerprint: str, activations: bool = True, background: bool = False):
        self.folder, self.fingerprint, self.keep_activations = folder, fingerprint, activations
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="layerprune-checkpoint") if background else None
        self._pending = None  # the write in flight (background)

    def load(self) -> dict | None:
        p = self.folder / "state.json"
        if not p.is_file():
            return None
        try:
            state = json.loads(p.read_text())
            if not isinstance(state, dict) or (state["activations"] is not None
                                               and not (self.folder / state["activations"]).is_file()):
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

    def activations(self, state: dict) -> torch.Tensor | None:
        """The next block's inputs, or None when the run kept none (``--checkpoint weights``)."""
        if state["activations"] is None:
            return None
        return load_file(str(self.folder / state["activations"])).get("x")

    def extra(self, state: dict) -> dict[str, torch.Tensor]:
        """The block program's own resume tensors saved beside the inputs (``save(extra=...)``)."""
        if state["activations"] is None:
            return {}
        return {k: v for k, v in load_file(str(self.folder / state["activations"])).items() if k != "x"}

    def save(self, i: int, blocks: dict[int, nn.Module], acts, state: dict,
             extra: dict[str, torch.Tensor] | None = None) -> None:
        """Commit the run up to block i: the pruned weights of ``blocks`` (index -> block: those pruned since the last
        commit; none when the block store keeps them), the next block's inputs (when this checkpoint keeps them;
        with ``extra``: the block program's own resume tensors, kept in every mode but none), then the state file.
        ``acts`` is a tensor, or an object whose ``result()`` gives it (``distributed.World.gather_rows_async``: the
        rows still arriving from the other ranks).

        With ``background`` the files are written by one writer thread while the next block is pruned: ``save``
        returns once the previous block's commit is on disk (one write in flight), and re-raises its error, if any.
        The tensors handed over must stay unchanged until the next ``save`` or ``flush`` returns (the engine's
        activations are double-buffered: the buffer saved at block i is next written by block i+2's propagation)."""
        sds = {j: {k: v.detach().to("cpu").contiguous() for k, v in b.state_dict().items()} for j, b in blocks.items()}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in (extra or {}).items()}
        if isinstance(acts, torch.Tensor):
            acts = acts.detach().to("cpu")
        job = lambda: self.commit(i, sds, acts, state, tensors)  # noqa: E731
        if self._writer is None:
            return job()
        self.flush()
        self._pending = self._writer.submit(job)

    def flush(self) -> None:
        """Wait for the write in flight (background); its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the write in flight and stop the writer thread."""
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)

    def commit(self, i: int, block_sds: dict[int, dict[str, torch.Tensor]], acts, state: dict,
               tensors: dict[str, torch.Tensor]) -> None:
        """The files of ``save``, written now (atomic renames; the state file last: the commit point)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for j, sd in block_sds.items():
            write_atomic(self.folder, f"block_{j:04d}.safetensors", lambda p, sd=sd: save_file(sd, str(p)))
        if acts is not None and not isinstance(acts, torch.Tensor):
            acts = acts.result()
        if self.keep_activations:
            tensors = {**tensors, "x": acts.contiguous()}
        name = f"acts_{i + 1:04d}.safetensors" if tensors else None
        if name is not None:
            write_atomic(self.folder, name, lambda p: save_file(tensors, str(p)))
        state = {**state, "fingerprint": self.fingerprint, "next_block": i + 1, "activations": name}
        commit_state(self.folder, state, name, ACTS_GLOB)  # only the latest block's inputs are needed to resume

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
