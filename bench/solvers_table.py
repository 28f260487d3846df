"""SmolLM2 at 50% and 2:4 with every solver: WikiText-2 PPL (40 x 512) and exactness (issue: engine).

    python -m bench.solvers_table                    # -> bench/results/solvers_50.{json,md}
    python -m bench.solvers_table --only sparsegpt   # rerun the rows whose label contains it; the others are kept

Protocol: bench/common.py (calibration 32 x 512 C4 pool seed 0, WikiText-2 test 40 x 512).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

from layerprune import load_model, measure_sparsity, prune

from .common import MODEL, RESULTS, calibration, carried_row, code_line, wikitext_ppl, write_json

RUNS = [  # label, method, nm, solver options
    ("magnitude (per matrix)", "magnitude", None, {"scope": "matrix"}),
    ("magnitude (per row)", "magnitude", None, {"scope": "row"}),
    ("wanda", "wanda", None, {}),
    ("sparsegpt", "sparsegpt", None, {}),
    ("magnitude 2:4", "magnitude", "2:4", {}),
    ("wanda 2:4", "wanda", "2:4", {}),
    ("sparsegpt 2:4", "sparsegpt", "2:4", {}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="rerun only the rows whose label contains this (others kept)")
    only = ap.parse_args().only
    prev = json.loads((RESULTS / "solvers_50.json").read_text()) if only else {"rows": [], "code": {}}
    old = {r["run"]: r for r in prev["rows"]}
    model, tok = load_model(MODEL)
    calib = calibration(tok)
    ppl = lambda m: wikitext_ppl(m, tok)  # noqa: E731
    rows = [carried_row(old["dense"]) if only else {"run": "dense", "sparsity": measure_sparsity(model)["overall"],
                                         "ppl": ppl(model)}]
    for label, method, nm, opts in RUNS:
        if only and only not in label:
            rows.append(carried_row(old[label]))
            continue
        m = copy.deepcopy(model)
        t0 = time.time()
        rec = prune(m, tok, method=method, sparsity=0.5, nm=nm, solver_options=opts, calibration=calib, progress=False)
        dev = max(abs(layer["achieved"] - layer["target"]) for layer in rec["layers"])
        rows.append({"run": label, "sparsity": rec["measured_sparsity"], "ppl": ppl(m),
                     "max_abs(achieved-target)": dev, "prune_s": time.time() - t0})
        print(rows[-1], flush=True)
        del m
    out = RESULTS
    write_json(out / "solvers_50.json", {"command": "python -m bench.solvers_table"
                                                    + (f" --only {only}" if only else ""),
                                         "rows": rows})
    lines = ["| run | measured sparsity | WikiText-2 PPL (40x512) | max abs(achieved - target) | prune s |",
             "|---|---|---|---|---|"]
    for r in rows:
        dev = r.get("max_abs(achieved-target)")
        lines.append(f"| {r['run']} | {r['sparsity']:.4f} | {r['ppl']:.2f} | "
                     f"{'-' if dev is None else f'{dev:.1e}'} | {r.get('prune_s', 0):.0f} |")
    (out / "solvers_50.md").write_text("Command: `python -m bench.solvers_table` (SmolLM2-135M fp32, calibration "
                                       f"32 x 512 C4 pool, seed 0). {code_line()}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
