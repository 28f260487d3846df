"""Readers for the local zero-shot files (layout of /work/shared/data/zeroshot).

Each reader turns the upstream file into the column layout of the Hugging Face dataset that lm-eval's standard task
reads, so the prompts in the sibling YAMLs are the standard ones and numbers stay comparable. lm-eval calls them as
`custom_dataset(**metadata)`; `data_dir` arrives through the TaskManager metadata. Nothing is written to disk.
"""
import csv
import json
import re
from pathlib import Path

import datasets

# task -> files it needs, relative to the data dir (the first one is the main file)
FILES = {
    "boolq": ["boolq/val.jsonl"],
    "rte": ["rte/val.jsonl"],
    "arc_easy": ["arc/ARC-Easy-Test.jsonl"],
    "arc_challenge": ["arc/ARC-Challenge-Test.jsonl"],
    "openbookqa": ["openbookqa/test.tsv"],
    "piqa": ["piqa/dev.jsonl", "piqa/dev-labels.lst"],
}


def _file(data_dir, task, k=0):
    """A task file under `data_dir`: the project data dir (its zeroshot/ subfolder) or that subfolder itself."""
    root = Path(data_dir).expanduser()
    if (root / "zeroshot").is_dir():
        root = root / "zeroshot"
    path = root / FILES[task][k]
    if not path.is_file():
        raise FileNotFoundError(f"{task}: {path} is missing; "
                                f"pass the data directory that holds zeroshot/{FILES[task][k]}")
    return path


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _split(name, rows):
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows)})


def load_boolq(data_dir, **kwargs):
    """SuperGLUE BoolQ validation -> {passage, question, label: 0 no / 1 yes} (label is a bool or "true"/"false")."""
    rows = [{"passage": r["passage"], "question": r["question"], "label": int(str(r["label"]).lower() == "true")}
            for r in _jsonl(_file(data_dir, "boolq"))]
    return _split("validation", rows)


def load_rte(data_dir, **kwargs):
    """SuperGLUE RTE validation -> GLUE layout {sentence1, sentence2, label: 0 entailment / 1 not_entailment}."""
    rows = [{"sentence1": r["premise"], "sentence2": r["hypothesis"],
             "label": 0 if r["label"] in ("entailment", 0) else 1}
            for r in _jsonl(_file(data_dir, "rte"))]
    return _split("validation", rows)


def _arc(path):
    """AI2 ARC JSONL -> allenai/ai2_arc layout {question, choices: {text, label}, answerKey}."""
    rows = []
    for r in _jsonl(path):
        ch = r["question"]["choices"]
        rows.append({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                     "choices": {"text": [c["text"] for c in ch], "label": [c["label"] for c in ch]}})
    return _split("test", rows)


def load_arc_easy(data_dir, **kwargs):
    return _arc(_file(data_dir, "arc_easy"))


def load_arc_challenge(data_dir, **kwargs):
    return _arc(_file(data_dir, "arc_challenge"))


def load_openbookqa(data_dir, **kwargs):
    """OpenBookQA Main TSV (ID, stem, "(A) .. (B) ..", complete question, key) -> allenai/openbookqa layout."""
    rows = []
    with open(_file(data_dir, "openbookqa"), encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)  # header
        for rid, stem, choices, _, key in reader:
            pairs = re.findall(r"\(([A-Z])\) (.*?)(?= \([A-Z]\) |$)", choices.strip())
            rows.append({"id": rid, "question_stem": stem, "answerKey": key.strip(),
                         "choices": {"text": [t for _, t in pairs], "label": [k for k, _ in pairs]}})
    return _split("test", rows)


def load_piqa(data_dir, **kwargs):
    """PIQA dev.jsonl + dev-labels.lst (one 0/1 per line) -> {goal, sol1, sol2, label}."""
    data, labels = _file(data_dir, "piqa"), _file(data_dir, "piqa", 1)
    docs = _jsonl(data)
    labs = [int(x) for x in labels.read_text().split()]
    if len(docs) != len(labs):
        raise ValueError(f"piqa: {len(docs)} examples but {len(labs)} labels in {labels}")
    rows = [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labs)]
    return _split("validation", rows)
