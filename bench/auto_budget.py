"""What ``--allocation auto`` costs against the run it serves: peak RSS and seconds of ``layerprune prune`` with
``--allocation auto`` and with ``--allocation uniform``, each in its own process (peak RSS from ``/usr/bin/time -v``),
and auto's choice (``timings.auto_choice``: everything it spends, the validation text's tokenization included; a row's
``pruning_seconds`` is the run's ``timings.total`` without it). Rows are keyed by model and allocation; a rerun
replaces its own rows and keeps the others (each with its own ``code``).

    OMP_NUM_THREADS=2 python -m bench.auto_budget --model DIR --nsamples 32 --out-json bench/results/auto_budget.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS, carried_row, provenance, read_json, write_json


def run_prune(model: str, allocation: str, method: str, sparsity: float, nsamples: int, seqlen: int,
              device: str | None) -> dict:
    """One ``layerprune prune`` in a child process: its peak RSS, wall seconds and record fields."""
    with tempfile.TemporaryDirectory(prefix="auto_budget_") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "layerprune", "prune", "--model", model, "--method", method, "--sparsity",
               str(sparsity), "--allocation", allocation, "--nsamples", str(nsamples), "--seqlen", str(seqlen),
               "--eval", "", "--out", str(out)] + (["--device", device] if device else [])
        t = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
        rec = json.loads((out / "layerprune.json").read_text())
    t = rec["timings"]
    row = {"model": model, "allocation": allocation, "method": method, "sparsity": sparsity,
           "calibration": f"{nsamples} x {seqlen}", "device": device or "default",
           "peak_rss_gb": round(rss_kb * 1024 / 1e9, 3), "wall_seconds": round(wall, 1),
           "pruning_seconds": round(t["total"] - (t.get("auto_choice") or 0.0), 1),  # the prune alone
           "total_seconds": round(t["total"], 1), "auto_choice_seconds": t.get("auto_choice"),
           "layerprune_commit": rec["versions"].get("layerprune_commit")}
    auto = rec.get("allocation_auto")
    if auto:
        row.update(chosen=auto["chosen"], reason=auto["reason"], proxy=auto["proxy"],
                   scored={k: auto[k] for k in ("scored", "budget") if k in auto},
                   auto_seconds=auto["seconds"],
                   tried=[{k: r.get(k) for k in ("label", "screen", "value", "error")} for r in auto["tried"]])
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default=None)
    ap.add_argument("--allocations", default="uniform,auto")
    ap.add_argument("--out-json", default=str(RESULTS / "auto_budget.json"))
    args = ap.parse_args()
    provenance()  # taken now, before the work
    path = Path(args.out_json)
    rows = [carried_row(r) for r in read_json(path, {"rows": []})["rows"]]
    new = [run_prune(args.model, a, args.method, args.sparsity, args.nsamples, args.seqlen, args.device)
           for a in args.allocations.split(",")]
    keys = {(r["model"], r["allocation"], r["method"], r["sparsity"], r["calibration"]) for r in new}
    rows = [r for r in rows if (r["model"], r["allocation"], r["method"], r["sparsity"], r["calibration"]) not in keys]
    by = {r["allocation"]: r for r in new}
    if "auto" in by and "uniform" in by:
        u, a = by["uniform"], by["auto"]
        a["vs_uniform"] = {"peak_rss": round(a["peak_rss_gb"] / u["peak_rss_gb"], 3),
                           "auto_choice_vs_prune": round(a["auto_choice_seconds"] / u["pruning_seconds"], 3),
                           "wall": round(a["wall_seconds"] / u["wall_seconds"], 3)}
    write_json(path, {"threads_env": os.environ.get("OMP_NUM_THREADS"), "rows": rows + new})
    for r in new:
        print(json.dumps({k: r.get(k) for k in ("model", "allocation", "peak_rss_gb", "wall_seconds", "pruning_seconds",
                                                 "auto_choice_seconds", "chosen", "scored", "vs_uniform")}))


if __name__ == "__main__":
    main()
