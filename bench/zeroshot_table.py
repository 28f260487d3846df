"""Zero-shot accuracy of SmolLM2-135M: dense, Wanda 50% uniform, Wanda 50% + DLP, SparseGPT 50% (issue 8).

    python bench/zeroshot_table.py --limit 100   # -> bench/results/zeroshot_50.{json,md}

lm-eval 0.4.13 on the in-memory model, 0-shot, the six tasks with local data (boolq, rte, arc_easy, arc_challenge,
openbookqa, piqa), the first --limit examples of each (the full sets take hours on 2 CPU cores).
Calibration: 32 x 512 tokens from the C4 pool (documents 1000-1999 of the local sample), seed 0. DLP alpha 0.15, median.
The pruned weights are cached (state dicts under $LP_BENCH_CACHE, default /tmp/layerprune-bench-cache) so the
other bench scripts reuse the same SparseGPT 50% model.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from layerprune import load_model, measure_sparsity, prune
from layerprune.api import calibration_set
from layerprune.data.corpora import resolve_data_dir
from layerprune.evaluation.zeroshot import LOCAL_TASKS, zeroshot

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("LP_BENCH_CACHE", "/tmp/layerprune-bench-cache"))
RUNS = {  # label -> prune() keyword arguments (sparsity 0.5, calibration added by cached_prune)
    "wanda 50% uniform": {"method": "wanda"},
    "wanda 50% + DLP": {"method": "wanda", "allocation": "dlp", "allocation_options": {"alpha": 0.15, "stat": "median"}},
    "sparsegpt 50%": {"method": "sparsegpt"},
}


def cached_prune(model, tok, key, calib=None, **kw):
    """A pruned copy of `model` (prune(**kw) on calibration 32 x 512 C4 pool seed 0), cached by `key` as a state dict.
    Returns (model, prune seconds or None when loaded from the cache)."""
    m = copy.deepcopy(model)
    path = CACHE / f"{key}.pt"
    if path.is_file():
        m.load_state_dict(torch.load(path, weights_only=True))
        return m, None
    calib = calib if calib is not None else calibration_set(tok, "c4", 32, 512, 0)
    t0 = time.time()
    prune(m, tok, calibration=calib, progress=False, **kw)
    secs = time.time() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(m.state_dict(), path)
    return m, secs


def key_of(label):
    return label.replace(" ", "_").replace("%", "").replace("+", "plus")


def write(rows, tasks, limit, total_s):
    OUT.mkdir(parents=True, exist_ok=True)
    cmd = f"python bench/zeroshot_table.py --limit {limit}"
    (OUT / "zeroshot_50.json").write_text(json.dumps({"command": cmd, "limit": limit, "tasks": tasks, "rows": rows,
                                                      "total_seconds": total_s}, indent=1))
    head = "| model | sparsity | " + " | ".join(tasks) + " | mean acc | mean acc_norm* | eval s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = []
        for t in tasks:
            x = r["zeroshot"]["tasks"].get(t)
            cells.append("-" if x is None else f"{x['acc']:.3f}" + (f" / {x['acc_norm']:.3f}" if "acc_norm" in x else ""))
        zs = r["zeroshot"]
        lines.append(f"| {r['model']} | {r['sparsity']:.4f} | " + " | ".join(cells)
                     + f" | {zs['mean_acc']:.3f} | {zs['mean_acc_norm']:.3f} | {zs['seconds']:.0f} |")
    n = rows[0]["zeroshot"]["tasks"] if rows else {}
    text = (f"Command: `{cmd}` (SmolLM2-135M fp32, lm-eval {rows[0]['zeroshot']['lm_eval_version'] if rows else ''}, "
            f"0-shot, calibration 32 x 512 C4 pool seed 0, DLP alpha 0.15 median)\n\n"
            f"**Limited run:** the first {limit} examples of each task (n per task: "
            + ", ".join(f"{t} {x['n']}" for t, x in n.items())
            + f"), so each accuracy has a standard error of about 0.05. Cells are acc / acc_norm (acc_norm where the "
            f"task defines it). *mean acc_norm: acc_norm where reported, else acc. Total run time {total_s / 60:.1f} min "
            f"on 2 CPU cores (eval s: zero-shot time per model).\n\n" + "\n".join(lines) + "\n")
    (OUT / "zeroshot_50.md").write_text(text)
    print(text, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--tasks", default=",".join(LOCAL_TASKS))
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    t0 = time.time()
    data_dir = resolve_data_dir()
    model, tok = load_model("smollm2-135m")
    calib = calibration_set(tok, "c4", 32, 512, 0)
    rows = []
    for label, kw in [("dense", None), *RUNS.items()]:
        m, secs = (model, None) if kw is None else cached_prune(model, tok, key_of(label), calib, sparsity=0.5, **kw)
        zs = zeroshot(m, tok, tasks, data_dir, limit=args.limit, batch_size=8, offline=True)
        rows.append({"model": label, "sparsity": measure_sparsity(m)["overall"], "prune_seconds": secs, "zeroshot": zs})
        print(label, json.dumps({t: (r["acc"], r.get("acc_norm")) for t, r in zs["tasks"].items()}),
              f"{zs['seconds']:.0f}s", flush=True)
        write(rows, tasks, args.limit, time.time() - t0)
        if m is not model:
            del m


if __name__ == "__main__":
    main()
