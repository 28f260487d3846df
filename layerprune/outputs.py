"""Where layerprune writes, and the one rule for it: nothing the user owns is ever deleted or overwritten.

- A directory may be written when it is absent or empty. ``--force`` replaces it only when layerprune wrote it
  (it holds a ``layerprune.json`` run record or a ``.checkpoint``); any other directory is refused, force or not.
- A forced run is written *beside* the old one (``.NAME.layerprune-new``) and swapped in by ``finish_dir`` at the
  end, so a failed or killed run leaves the old one intact; ``--resume`` continues that staging folder.
- A file may be replaced with ``--force`` only when layerprune wrote it (a JSON record carrying ``MARK``, a PNG
  carrying it in its metadata).
- An output may not be the input, lie inside it, or contain it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import UserError

RECORD_NAME = "layerprune.json"
CHECKPOINT_NAME = ".checkpoint"
MARK = "layerprune"  # files carry {"written_by": MARK} (JSON), Software=MARK (PNG) or GGUF_MARK_KEY=MARK (GGUF)
GGUF_MARK_KEY = "layerprune.written_by"  # a string key written right after general.architecture (export/gguf.py)
STAGING_SUFFIX = ".layerprune-new"


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def is_run_dir(d: Path) -> bool:
    """A directory layerprune wrote: a run record or a resume checkpoint."""
    return (d / RECORD_NAME).is_file() or (d / CHECKPOINT_NAME).is_dir()


def remove_ours(d: Path) -> None:
    """Delete a leftover folder of ours (a run, a checkpoint, activation buffers, or nothing); refuse anything else."""
    if d.exists():
        if not (is_run_dir(d) or all(p.name.startswith("layerprune-acts-") for p in d.iterdir())):
            raise UserError(f"{d} holds files layerprune did not write: move it away and rerun")
        shutil.rmtree(d)


def _listing(d: Path, n: int = 3) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in d.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_apart(out: Path, inputs, flag: str = "--out") -> None:
    """Refuse an output equal to, inside, or containing any of the local input paths."""
    o = Path(out).expanduser().resolve()
    for src in inputs:
        if src is None or not Path(src).expanduser().exists():
            continue
        s = Path(src).expanduser().resolve()
        if o == s or s in o.parents or o in s.parents:
            rel = "is" if o == s else ("is inside" if s in o.parents else "contains")
            raise UserError(f"{flag} {out} {rel} the input {src}: write the output to a separate directory")


def prepare_dir(out, force: bool = False, resume: bool = False, inputs=(), flag: str = "--out",
                create: bool = True) -> Path:
    """Check ``out`` and return the folder to write into (``out`` or its staging twin), created when ``create``.

    Raises a one-line UserError, and touches nothing, when the directory may not be written. Call it once with
    ``create=False`` before any expensive work, and again when the work is about to write."""
    out = Path(out).expanduser()
    check_apart(out, inputs, flag)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} exists and is a file: choose a directory path")
    stage = staging_dir(out)
    if resume:
        for d in (stage, out):
            if (d / CHECKPOINT_NAME / "state.json").is_file():
                return d
        if (out / RECORD_NAME).is_file():
            raise UserError(f"{out} holds a finished run, nothing to resume: use another {flag}, or --force to redo it")
        raise UserError(f"{out} has no checkpoint to resume: drop --resume, or use another {flag}")
    if out.is_dir() and any(out.iterdir()):
        if not is_run_dir(out):
            raise UserError(f"{flag} {out} holds files layerprune did not write ({_listing(out)}); --force only "
                            f"replaces a layerprune run: choose another {flag}")
        if not force:
            raise UserError(f"{flag} {out} already holds a layerprune run: choose another {flag}, pass --resume "
                            "to continue an interrupted run, or --force to replace it")
        if create:
            remove_ours(stage)  # our own leftover from an earlier forced attempt
            stage.mkdir(parents=True)
        return stage
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def finish_dir(work: Path, out: Path) -> None:
    """Swap a staged run in: the old run is moved aside, the new one renamed into place, then the old one removed."""
    work, out = Path(work), Path(out).expanduser()
    if work == out:
        return
    old = out.parent / f".{out.name}.layerprune-old"
    remove_ours(old)
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    remove_ours(old)  # the replaced run, checked as ours by prepare_dir


def written_by_us(p: Path) -> bool:
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            return isinstance(data, dict) and data.get("written_by") == MARK
        with open(p, "rb") as f:
            head = f.read(4096)
        if head[:4] == b"GGUF":  # key: u64 length + bytes; value: type 8 (string) as u32, u64 length + bytes
            key, val = GGUF_MARK_KEY.encode(), MARK.encode()
            return (len(key).to_bytes(8, "little") + key + (8).to_bytes(4, "little") + len(val).to_bytes(8, "little")
                    + val) in head
        return b"Software\x00" + MARK.encode() in head
    except (OSError, ValueError):
        return False


def prepare_file(path, force: bool = False, inputs=(), flag: str = "--out") -> Path | None:
    """Check an output file before the work: absent, or written by layerprune and ``force`` given."""
    if not path:
        return None
    p = Path(path).expanduser()
    check_apart(p, inputs, flag)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a directory: give a file path")
    if p.exists():
        if not written_by_us(p):
            raise UserError(f"{flag} {p} exists and layerprune did not write it; --force only replaces layerprune's "
                            f"own files: choose another {flag}")
        if not force:
            raise UserError(f"{flag} {p} already exists: choose another path or pass --force to replace it")
    return p  # its folder is made by the writer (``write_json``), so a run that fails before writing leaves none


def user_mode(folder: Path, pattern: str = "*.safetensors") -> None:
    """Give the files of ``folder`` matching ``pattern`` the mode the user's umask asks for (safetensors writes its
    files 0600 through a private temporary file, whatever the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in Path(folder).glob(pattern):
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def write_json(path: Path | None, data: dict) -> None:
    """Write a JSON result (marked as ours) atomically; ``path`` must have passed ``prepare_file``."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps({"written_by": MARK, **data}, indent=1, default=str))
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically into a folder that passed ``prepare_dir`` (e.g. a run's ``recipe.yaml``)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse, with the numbers, when the file system of ``folder`` has less than ``need`` bytes free."""
    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        gib = 2 ** 30
        raise UserError(f"not enough disk space in {probe}: {what} needs about {need / gib:.2f} GiB and "
                        f"{free / gib:.2f} GiB are free; free some space or choose another --out")
