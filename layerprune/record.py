"""The run record (``layerprune.json``) and the saved run directory."""
from __future__ import annotations

import functools
import json
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from .errors import UserError
from .record_rows import block_sparsity, layer_size  # noqa: F401 (importable from here)
from .outputs import CHECKPOINT_NAME, RECORD_NAME, user_mode


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("layerprune", "torch", "transformers", "accelerate", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["layerprune_commit"] = source_commit()
    return out


@functools.cache
def source_commit() -> dict | None:
    """The git commit of the layerprune source in use (and whether it had uncommitted changes), when the package runs
    from its own git checkout (an editable install); None otherwise."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # installed inside some other repository's tree
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "layerprune"))}
    except (OSError, subprocess.SubprocessError):
        return None


def save_dtype(model, dtype=None):
    """The dtype a run is saved in: ``dtype`` when asked, else the input checkpoint's (a bf16 checkpoint computed in
    fp32 is saved in bf16 again), else the model's."""
    import torch

    from .models.loading import parse_dtype

    if dtype is not None and dtype != "auto":
        return parse_dtype(dtype)
    return getattr(model, "layerprune_source_dtype", None) or next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _cast_state(model, dtype) -> dict:
    """The state dict in ``dtype``; tensors that share storage (tied weights) stay shared."""
    done: dict = {}
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.dtype != dtype:
            key = (v.data_ptr(), v.shape)
            v = done.setdefault(key, v.to(dtype))
        out[k] = v
    return out


def save_run(model, tokenizer, out: Path, record: dict, store=None, dtype=None) -> None:
    """Weights (safetensors, loadable by stock ``from_pretrained``), tokenizer, and the run record (written last:
    a directory with a record is complete). The config keeps the model's own ``use_cache``. Weights are saved in
    ``save_dtype(model, dtype)``, which the record states."""
    target = save_dtype(model, dtype)
    current = next((p.dtype for p in model.parameters() if p.is_floating_point()), target)
    use_cache = model.config.use_cache
    model.config.use_cache = getattr(model, "layerprune_use_cache", True)
    try:
        if store is not None:
            store.save_pretrained(model, out, dtype=target)
        elif target != current:
            model.save_pretrained(out, state_dict=_cast_state(model, target))
        else:
            model.save_pretrained(out)
    finally:
        model.config.use_cache = use_cache
    user_mode(out)  # the weights as readable as the user's other files
    name = str(target).removeprefix("torch.")
    cfg_path = Path(out) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    from .models import remote_code

    code = remote_code.write(out, model.config, cfg)  # per-block widths: model code + auto_map (no layerprune needed)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    src = getattr(model, "layerprune_source_dtype", None)
    record["saved"] = {"dtype": name, "compute_weights_dtype": str(current).removeprefix("torch."),
                       "source_dtype": str(src).removeprefix("torch.") if src is not None else None}
    if code:
        record["saved"]["remote_code"] = code  # the files that let transformers load it without layerprune
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_record(out, record)
    shutil.rmtree(out / CHECKPOINT_NAME, ignore_errors=True)


_PARENT_KEYS = ("model", "method", "sparsity", "nm", "solver_options", "params", "depth", "structure", "calibration",
                "eval", "command_line", "parent")


def parent_summary(record: dict, run_dir: Path) -> dict:
    """What a chained run records of the run it pruned further: where it was, its method, settings, sizes, removed
    blocks or widths, evaluation, and its own parent (so the whole chain is in the last record)."""
    out = {"path": str(Path(run_dir).expanduser().resolve())}
    out.update({k: record[k] for k in _PARENT_KEYS if k in record})
    if isinstance(record.get("allocation"), dict):
        out["allocation"] = record["allocation"].get("name")
    if isinstance(out.get("depth"), dict):  # the per-step candidate tables stay in the parent's own record
        out["depth"] = {k: v for k, v in out["depth"].items() if k != "steps"}
    commit = (record.get("versions") or {}).get("layerprune_commit")
    if commit:
        out["layerprune_commit"] = commit
    return out


def write_record(out: Path, record: dict) -> None:
    """Write the run record; in a saved run directory (one with a config.json) the model card follows it."""
    tmp = out / f".{RECORD_NAME}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(out / RECORD_NAME)
    if (Path(out) / "config.json").is_file():
        from .card import write_card

        write_card(out, json.loads(json.dumps(record, default=str)))


def read_record(run_dir: Path) -> dict:
    p = Path(run_dir) / RECORD_NAME
    if not p.is_file():
        from .models.loading import check_complete

        check_complete(Path(run_dir))
        raise UserError(f"{run_dir} is not a layerprune run directory (no {RECORD_NAME}): "
                        "pass the --out of a prune run")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"{p} is corrupt ({e}): rerun the run that wrote it") from None
