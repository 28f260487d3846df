"""Evaluation corpora and calibration pools, read from a data directory or the Hugging Face hub.

Data directory: ``--data-dir``, else ``$LAYERPRUNE_DATA``, else ``../shared/data`` beside the repository
(or the current directory) when it exists; otherwise the hub (today's ``datasets`` API: no script
datasets; C4 through ``data_files=``).

Joining follows the papers' protocol (sparsegpt / wanda ``datautils``):
- WikiText-2: the rows of the raw split (``""`` for a blank line, else ``line + "\\n"``), joined with ``"\\n\\n"``.
- PTB: the sentences (the file's lines, leading space kept, as in HF ``ptb_text_only``) joined with ``" "``.
- C4 evaluation: the documents joined with ``" "``, tokenized, truncated to ``256 * seqlen`` tokens.
Local C4 convention: documents 0-999 of the validation sample are the evaluation set, 1000-1999 the
calibration pool (the papers calibrate on the train shard, not available offline).
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

C4_EVAL_DOCS = range(0, 1000)
C4_POOL_DOCS = range(1000, 2000)
C4_EVAL_WINDOWS = 256  # the papers truncate the C4 evaluation text to 256 * seqlen tokens


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    local: str | None  # path inside the data directory
    joiner: str


CORPORA = {
    "wikitext2": Corpus("wikitext2", "WikiText-2 raw, test split", "wikitext-2-raw/wiki.test.raw", "\n\n"),
    "wikitext2-valid": Corpus("wikitext2-valid", "WikiText-2 (tokenized release), validation split: for tuning",
                              "wikitext-2/wiki.valid.tokens", "\n\n"),
    "ptb": Corpus("ptb", "Penn Treebank (Mikolov), test split", "ptb/ptb.test.txt", " "),
    "ptb-valid": Corpus("ptb-valid", "Penn Treebank (Mikolov), validation split", "ptb/ptb.valid.txt", " "),
    "c4": Corpus("c4", "C4 en validation sample, documents 0-999", "c4/c4-validation-sample.json.gz", " "),
}


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory to read from, or None to use the hub."""
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise UserError(f"data directory {p} does not exist: pass an existing --data-dir "
                            "(or leave it out to use ../shared/data or the Hugging Face hub)")
        return p
    env = os.environ.get("LAYERPRUNE_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise UserError(f"LAYERPRUNE_DATA={env} is not a directory: fix or unset it")
        return p
    for cand in (_repo_root().parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def _wikitext_rows(text: str) -> list[str]:
    """Rows as the HF ``wikitext`` dataset has them: blank lines -> "", others -> line + "\\n"."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the file's final newline ends the last row; it is not a row of its own
    return ["" if not line.strip() else line + "\n" for line in lines]


def _read_c4_docs(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@lru_cache(maxsize=4)
def c4_documents(data_dir: Path | None) -> tuple[str, ...]:
    """All local C4 validation-sample documents (eval = 0-999, pool = 1000-1999)."""
    if data_dir is None:
        raise UserError("no local C4 sample: pass --data-dir (the hub C4 path needs internet)")
    path = data_dir / CORPORA["c4"].local
    if not path.is_file():
        raise UserError(f"{path} is missing: the data directory must hold c4/c4-validation-sample.json.gz")
    return tuple(_read_c4_docs(path))


def _hub(fn, what: str):
    try:
        return fn()
    except Exception as e:  # datasets raises many types when offline
        raise UserError(f"{what} is not in the data directory and the hub failed ({type(e).__name__}); "
                        "pass --data-dir with the local copy (see ../shared/data/README.md)") from None


def _hub_rows(name: str) -> list[str]:
    from datasets import load_dataset

    if name == "wikitext2":
        return _hub(lambda: load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")["text"], name)
    if name == "wikitext2-valid":
        return _hub(lambda: load_dataset("Salesforce/wikitext", "wikitext-2-v1", split="validation")["text"], name)
    if name in ("ptb", "ptb-valid"):
        split = "test" if name == "ptb" else "validation"
        return _hub(lambda: load_dataset("ptb-text-only/ptb_text_only", split=split)["sentence"], name)
    if name == "c4":
        files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        return _hub(lambda: load_dataset("allenai/c4", data_files=files, split="validation")[:1100]["text"], name)
    raise KeyError(name)


def hub_c4_pool() -> list[str]:
    from datasets import load_dataset

    files = {"train": "en/c4-train.00000-of-01024.json.gz"}
    return _hub(lambda: load_dataset("allenai/c4", data_files=files, split="train")["text"], "the C4 calibration pool")


def _user_file_docs(path: Path) -> list[str]:
    try:
        return _read_user_file(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}): convert it to UTF-8, "
                        "e.g. with iconv") from None
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path} ({e}): pass a readable .txt, .jsonl or .jsonl.gz file") from None


def _read_user_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        opener = gzip.open if path.suffix == ".gz" else open
        docs = []
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{path}:{n} is not a JSON object with a \"text\" field") from None
        return docs
    return [path.read_text(encoding="utf-8")]


def corpus_rows(name: str, data_dir: Path | None) -> tuple[list[str], str]:
    """The corpus as a list of rows plus the joiner the protocol uses for it."""
    path = Path(name).expanduser()
    if name not in CORPORA:
        if path.is_file():
            return _user_file_docs(path), "\n\n"
        raise UserError(f"unknown dataset {name!r}: use one of {', '.join(CORPORA)} or a path to a .txt/.jsonl file")
    corpus = CORPORA[name]
    local = data_dir / corpus.local if data_dir is not None else None
    if local is not None and not local.is_file():  # a data directory in use is never silently replaced by the hub
        raise UserError(f"{local} is missing from the data directory {data_dir}: copy it there, or point --data-dir "
                        "(or LAYERPRUNE_DATA) to a directory that has it")
    if name == "c4":
        if local is not None:
            docs = c4_documents(data_dir)
            return [docs[i] for i in C4_EVAL_DOCS], corpus.joiner
        return _hub_rows(name), corpus.joiner
    if local is not None:
        text = local.read_text(encoding="utf-8")
        if name.startswith("wikitext2"):
            return _wikitext_rows(text), corpus.joiner
        return [line for line in text.split("\n") if line], corpus.joiner  # PTB sentences as the HF rows
    return _hub_rows(name), corpus.joiner


def load_text(name: str, data_dir: Path | None) -> str:
    rows, joiner = corpus_rows(name, data_dir)
    return joiner.join(rows)


def calibration_pool(source: str, data_dir: Path | None) -> list[str]:
    """Documents to draw calibration windows from. Never a test split."""
    if source == "c4":
        if data_dir is not None:  # c4_documents names the missing file; no silent switch to the hub's pool
            docs = c4_documents(data_dir)
            return [docs[i] for i in C4_POOL_DOCS]
        return hub_c4_pool()
    if source in ("wikitext2-valid", "ptb-valid"):
        return [load_text(source, data_dir)]  # one long document, windows drawn from anywhere in it
    if source in CORPORA:
        raise UserError(f"calibration from {source!r} would use a test split: "
                        "use c4, wikitext2-valid, ptb-valid or a file")
    path = Path(source).expanduser()
    if path.is_file():
        return _user_file_docs(path)
    raise UserError(f"unknown calibration source {source!r}: use c4, wikitext2-valid, ptb-valid or a .txt/.jsonl file")
