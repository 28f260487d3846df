"""Function vs spread: why DLP-median beats the searched DSA functions on SmolLM2 at 70%.

DSA's mapping spreads the per-block sparsities over 2*lambda (lambda 0.08 -> 0.16), DLP's over 2*alpha (alpha 0.15 ->
0.30). This crosses the two: the searched DSA functions (from bench/results/dsa/s70-*.summary.json) and DLP-median,
each at spread 0.16 and 0.30, Wanda, calibration 32 x 512 C4 pool seed 0, WikiText-2 TEST PPL over 40 x 512.

    flock /tmp/lp_heavy.lock .venv/bin/python -m bench.dsa_spread       # about 8 minutes here
Writes bench/results/dsa/dsa_spread.{md,json}.
"""
from __future__ import annotations

import copy
import json
import time

import torch

from layerprune import evaluate_ppl, load_model, prune
from layerprune.data import resolve_data_dir

from .common import MODEL, RESULTS, calibration, code_line, write_json

OUT = RESULTS / "dsa"
SPARSITY, HALF_SPREADS = 0.7, (0.08, 0.15)


def main() -> None:
    torch.set_num_threads(2)
    dense, tok = load_model(MODEL, "float32")
    calib = calibration(tok)
    data_dir = resolve_data_dir(None)
    rows = [("DLP-median", "dlp", "alpha", {"stat": "median"})]
    for st in ("evolutionary", "random"):
        fn = json.loads((OUT / f"s70-{st}.summary.json").read_text())["best_function"]
        rows.append((f"DSA found by {st} search `{fn}`", f"dsa:{fn}", "lam", {}))
    results = []
    for name, alloc, key, opts in rows:
        for h in HALF_SPREADS:
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            rec = prune(model, tok, method="wanda", sparsity=SPARSITY, allocation=alloc,
                        allocation_options=opts | {key: h}, calibration=calib, progress=False)
            ppl = evaluate_ppl(model, tok, "wikitext2", 512, data_dir, 40, progress=False).ppl
            block = rec["allocation"]["block"]
            results.append({"allocation": name, "spec": alloc, key: h, "spread": max(block) - min(block),
                            "test_ppl": ppl, "measured_sparsity": rec["measured_sparsity"], "block_sparsity": block})
            print(f"{name} {key}={h}: test {ppl:.2f} (spread {max(block) - min(block):.3f}, "
                  f"{time.perf_counter() - t0:.0f}s)", flush=True)
            del model
    write_json(OUT / "dsa_spread.json", {"sparsity": SPARSITY, "results": results})
    lines = ["Command: `python -m bench.dsa_spread` — SmolLM2-135M, Wanda 70%, calibration 32 x 512 C4 pool seed 0, "
             "WikiText-2 **test** PPL (40 x 512). Half-spread = DLP's alpha / DSA's lambda (per-block sparsities span "
             f"2 x that around 70%). {code_line()}", "",
             "| allocation function | half-spread 0.08 | half-spread 0.15 |", "|---|---|---|"]
    for name, *_ in rows:
        cells = [f"{r['test_ppl']:.2f}" for r in results if r["allocation"] == name]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    (OUT / "dsa_spread.md").write_text("\n".join(lines) + "\n")
    print((OUT / "dsa_spread.md").read_text())


if __name__ == "__main__":
    main()
