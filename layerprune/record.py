"""The run record (``layerprune.json``) and the saved run directory."""
from __future__ import annotations

import json
import platform
import shutil
from importlib import metadata
from pathlib import Path

from .errors import UserError
from .outputs import CHECKPOINT_NAME, RECORD_NAME


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("layerprune", "torch", "transformers", "accelerate", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def save_run(model, tokenizer, out: Path, record: dict, store=None) -> None:
    """Weights (safetensors, loadable by stock ``from_pretrained``), tokenizer, and the run record (written last:
    a directory with a record is complete). The config keeps the model's own ``use_cache``."""
    use_cache = model.config.use_cache
    model.config.use_cache = getattr(model, "layerprune_use_cache", True)
    try:
        if store is not None:
            store.save_pretrained(model, out)
        else:
            model.save_pretrained(out)
    finally:
        model.config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_record(out, record)
    shutil.rmtree(out / CHECKPOINT_NAME, ignore_errors=True)


def write_record(out: Path, record: dict) -> None:
    tmp = out / f".{RECORD_NAME}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(out / RECORD_NAME)


def read_record(run_dir: Path) -> dict:
    p = Path(run_dir) / RECORD_NAME
    if not p.is_file():
        from .models.loading import check_complete

        check_complete(Path(run_dir))
        raise UserError(f"{run_dir} is not a layerprune run directory (no {RECORD_NAME}): pass the --out of a prune run")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"{p} is corrupt ({e}): rerun the run that wrote it") from None
