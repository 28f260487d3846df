"""SmolLM2 at high sparsity: ALPS against SparseGPT, and block reconstruction after any solver (issue #30).

    python -m bench.alps_table                       # every row -> bench/results/alps.{json,md}
    python -m bench.alps_table --only "alps 70%,alps 2:4"  # these rows (exact labels); the others are kept
    python -m bench.alps_table --device cuda --only "sparsegpt 70%,alps 70%"   # on a GPU -> alps_gpu.{json,md}

Protocol: bench/common.py (calibration 32 x 512 C4 pool seed 0, WikiText-2 test 40 x 512). Every row records the
commit it was produced at, the prune seconds and the solve seconds per block (the record's block timings).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

from layerprune import load_model, prune

from .common import (MODEL, PROTOCOL, RESULTS, calibration, code_version, device_name, read_json, wikitext_ppl,
                     write_json)

RUNS = [  # label, prune() keywords
    ("sparsegpt 70%", dict(method="sparsegpt", sparsity=0.7)),
    ("alps 70%", dict(method="alps", sparsity=0.7)),
    ("sparsegpt 2:4", dict(method="sparsegpt", nm="2:4")),
    ("alps 2:4", dict(method="alps", nm="2:4")),
    ("sparsegpt 50%", dict(method="sparsegpt", sparsity=0.5)),
    ("alps 50%", dict(method="alps", sparsity=0.5)),
    ("wanda 50%", dict(method="wanda", sparsity=0.5)),
    ("wanda 70%", dict(method="wanda", sparsity=0.7)),
    ("wanda 70% + reconstruct", dict(method="wanda", sparsity=0.7, reconstruct="block")),
    ("sparsegpt 2:4 + reconstruct", dict(method="sparsegpt", nm="2:4", reconstruct="block")),
    ("sparsegpt 70% + reconstruct", dict(method="sparsegpt", sparsity=0.7, reconstruct="block")),
    ("alps 70% + reconstruct", dict(method="alps", sparsity=0.7, reconstruct="block")),
    ("alps 70% + auto", dict(method="alps", sparsity=0.7, allocation="auto")),
    ("alps 70% + reconstruct + auto", dict(method="alps", sparsity=0.7, reconstruct="block", allocation="auto")),
]
OUT = RESULTS / "alps.json"
OUT_GPU = RESULTS / "alps_gpu.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="comma list of row labels: run only these, in this order (the "
                    "others are kept)")
    ap.add_argument("--device", default="cpu", help="where the blocks are pruned (cuda: rows go to alps_gpu.json)")
    a = ap.parse_args()
    only, device = a.only, a.device
    out = OUT if device == "cpu" else OUT_GPU
    only = [o.strip() for o in only.split(",")] if only else None
    runs = dict(RUNS)
    if only and set(only) - set(runs):
        raise SystemExit(f"unknown rows {sorted(set(only) - set(runs))}; known: {list(runs)}")
    code_version()  # now: later commits while this runs must not be recorded as this code's
    prev = read_json(out, {"rows": []})
    rows = {r["run"]: r for r in prev["rows"]}
    model, tok = load_model(MODEL)
    calib = calibration(tok)
    for label in only or list(runs):
        kw = runs[label]
        m = copy.deepcopy(model)
        t0 = time.time()
        rec = prune(m, tok, calibration=calib, progress=False, device=device, **kw)
        secs = time.time() - t0
        ppl = wikitext_ppl(m.to(device), tok)
        m.to("cpu")
        solve = [b.get("solve", 0.0) for b in rec["block_timings"]]
        recon = [b.get("reconstruct", 0.0) for b in rec["block_timings"]]
        row = {"run": label, "prune": {k: v for k, v in kw.items()}, "ppl": ppl,
               "measured_sparsity": rec["measured_sparsity"], "prune_s": secs, "timings": rec["timings"],
               "solve_s_per_block": {"mean": statistics.mean(solve), "max": max(solve)},
               "reconstruct_s_per_block": statistics.mean(recon) if any(recon) else None,
               "rel_errors": {f"{r['block']}.{r['name']}": r["rel_error"] for r in rec["layers"]},
               "commit_of_row": code_version(), "device": device_name(device) if device != "cpu" else "cpu"}
        rows[label] = row
        print(json.dumps({k: row[k] for k in ("run", "ppl", "prune_s", "solve_s_per_block")}), flush=True)
        write_json(out, {"protocol": PROTOCOL, "command": "python -m bench.alps_table [--only LABEL]"
                         + ("" if device == "cpu" else f" --device {device}"),
                         "rows": [rows[lb] for lb, _ in RUNS if lb in rows]})
        del m
    write_md(out)


def write_md(out=OUT) -> None:
    data = json.loads(out.read_text())
    lines = ["| run | WikiText-2 PPL | sparsity | prune s | solve s / block | reconstruct s / block | commit |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        rc = r.get("reconstruct_s_per_block")
        c = r["commit_of_row"]
        lines.append(f"| {r['run']} | {r['ppl']:.2f} | {r['measured_sparsity']:.4f} | {r['prune_s']:.0f} | "
                     f"{r['solve_s_per_block']['mean']:.2f} | {'-' if rc is None else f'{rc:.2f}'} | "
                     f"`{(c['commit'] or '?')[:10]}`{' dirty' if c['dirty'] else ''} |")
    devices = sorted({r.get("device", "cpu") for r in data["rows"]})
    (out.with_suffix(".md")).write_text(f"Command: `{data['command']}` ({PROTOCOL}; blocks pruned on "
                                        f"{', '.join(devices)}).\n\n"
                                        + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
