"""The run record (``layerprune.json``) and the saved run directory."""
from __future__ import annotations

import json
import platform
import shutil
from importlib import metadata
from pathlib import Path

from .errors import UserError

RECORD_NAME = "layerprune.json"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("layerprune", "torch", "transformers", "accelerate", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def prepare_out_dir(out: Path, force: bool, resume: bool) -> None:
    """Refuse to overwrite a non-empty directory unless --force (start over) or --resume (continue its checkpoint)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is a file: choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        if resume:
            if not (out / ".checkpoint" / "state.json").is_file():
                if (out / RECORD_NAME).is_file():
                    raise UserError(f"{out} holds a finished run, nothing to resume: use another --out or --force")
                raise UserError(f"{out} has no checkpoint to resume: use another --out or --force")
            return
        if not force:
            raise UserError(f"output directory {out} already exists: choose another --out, "
                            "pass --resume to continue an interrupted run, or --force to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def save_run(model, tokenizer, out: Path, record: dict, store=None) -> None:
    """Weights (safetensors, loadable by stock ``from_pretrained``), tokenizer, and the run record."""
    if store is not None:
        store.save_pretrained(model, out)
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_record(out, record)
    shutil.rmtree(out / ".checkpoint", ignore_errors=True)


def write_record(out: Path, record: dict) -> None:
    tmp = out / f".{RECORD_NAME}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(out / RECORD_NAME)


def read_record(run_dir: Path) -> dict:
    p = Path(run_dir) / RECORD_NAME
    if not p.is_file():
        raise UserError(f"{run_dir} is not a layerprune run directory (no {RECORD_NAME}): pass the --out of a prune run")
    return json.loads(p.read_text())
