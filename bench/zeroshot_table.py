"""Zero-shot accuracy of SmolLM2-135M: dense, Wanda 50% uniform, Wanda 50% + DLP, SparseGPT 50% (issue 8).

    python -m bench.zeroshot_table --limit 100   # -> bench/results/zeroshot_50.{json,md}

lm-eval 0.4.13 on the in-memory model, 0-shot, the six tasks with local data (boolq, rte, arc_easy, arc_challenge,
openbookqa, piqa), the first --limit examples of each (the full sets take hours on 2 CPU cores).
Calibration: 32 x 512 tokens from the C4 pool (bench/common.py), seed 0. DLP alpha 0.15, median.
The pruned weights are cached (``common.cached_prune``: state dicts under $LP_BENCH_CACHE, default
/tmp/layerprune-bench-cache) so the other bench scripts reuse the same SparseGPT 50% model.
"""
from __future__ import annotations

import argparse
import json
import time

from layerprune import load_model, measure_sparsity
from layerprune.data.corpora import resolve_data_dir
from layerprune.evaluation.zeroshot import LOCAL_TASKS, zeroshot

from .common import MODEL, RESULTS, cached_prune, calibration, code_line, write_json

OUT = RESULTS
RUNS = {  # label -> prune() keyword arguments (sparsity 0.5, calibration added by cached_prune)
    "wanda 50% uniform": {"method": "wanda"},
    "wanda 50% + DLP": {"method": "wanda", "allocation": "dlp",
                        "allocation_options": {"alpha": 0.15, "stat": "median"}},
    "sparsegpt 50%": {"method": "sparsegpt"},
}


def key_of(label):
    return label.replace(" ", "_").replace("%", "").replace("+", "plus")


def write(rows, tasks, limit, total_s):
    cmd = f"python -m bench.zeroshot_table --limit {limit}"
    write_json(OUT / "zeroshot_50.json", {"command": cmd, "limit": limit, "tasks": tasks, "rows": rows,
                                          "total_seconds": total_s})
    head = "| model | sparsity | " + " | ".join(tasks) + " | mean acc | mean acc_norm* | eval s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = []
        for t in tasks:
            x = r["zeroshot"]["tasks"].get(t)
            cells.append("-" if x is None else f"{x['acc']:.3f}"
                         + (f" / {x['acc_norm']:.3f}" if "acc_norm" in x else ""))
        zs = r["zeroshot"]
        lines.append(f"| {r['model']} | {r['sparsity']:.4f} | " + " | ".join(cells)
                     + f" | {zs['mean_acc']:.3f} | {zs['mean_acc_norm']:.3f} | {zs['seconds']:.0f} |")
    n = rows[0]["zeroshot"]["tasks"] if rows else {}
    text = (f"Command: `{cmd}` (SmolLM2-135M fp32, lm-eval {rows[0]['zeroshot']['lm_eval_version'] if rows else ''}, "
            f"0-shot, calibration 32 x 512 C4 pool seed 0, DLP alpha 0.15 median)\n\n"
            f"**Limited run:** the first {limit} examples of each task (n per task: "
            + ", ".join(f"{t} {x['n']}" for t, x in n.items())
            + f"), so each accuracy has a standard error of about 0.05. Cells are acc / acc_norm (acc_norm where the "
            f"task defines it). *mean acc_norm: acc_norm where reported, else acc. "
            f"Total run time {total_s / 60:.1f} min "
            f"on 2 CPU cores (eval s: zero-shot time per model). {code_line()}\n\n" + "\n".join(lines) + "\n")
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
    model, tok = load_model(MODEL)
    calib = calibration(tok)
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
