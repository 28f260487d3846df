"""SlimGPT structured pruning of SmolLM2-135M at 20% and 50% (issue 6): schedules, baseline and ablations.

    flock /tmp/lp_heavy.lock /work/main/.venv/bin/python -m bench.slimgpt_table   # -> bench/results/slimgpt.{json,md}

Calibration 32 x 512 tokens from the C4 pool (bench/common.py), seed 0, fp32. WikiText-2 test PPL with the two
protocols: 40 windows x 512 tokens, and the first 160 windows x 128 tokens (LLM-Pruner / SlimGPT protocol, same 20,480
tokens). Prefill latency: batch 1 x 512 tokens, logits of the last position only, median of 5 after a warm-up,
measured in this process (2 CPU threads, not isolated from other load; `layerprune bench-speed` gives the interleaved
dense-vs-pruned ratio). The script is resumable: rows already in the JSON are not run again.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time

import torch

from layerprune import evaluate_ppl, load_model, prune
from layerprune.speed import prefill_seconds

from .common import MODEL, RESULTS, calibration, code_line, provenance, wikitext_ppl, write_json

OUT = RESULTS / "slimgpt"
RUNS = []  # key, label, sparsity, allocation, solver options
for sp in (0.2, 0.5):
    p = int(sp * 100)
    RUNS += [
        (f"uniform-{p}", "SlimGPT, uniform", sp, "uniform", {}),
        (f"ipr-log-{p}", "SlimGPT, log-increase (ipr-log)", sp, "ipr-log", {}),
        (f"ipr-log-dec-{p}", "SlimGPT, log-decrease (ipr-log-dec)", sp, "ipr-log-dec", {}),
        (f"magnitude-{p}", "structured magnitude (L2 of each unit's weights), uniform", sp, "uniform",
         {"score": "magnitude"}),
        (f"nocomp-{p}", "ablation: no compensation, uniform", sp, "uniform", {"compensate": False}),
        (f"nogcd-{p}", "ablation: no grouped Cholesky (raw diag), uniform", sp, "uniform", {"grouped_cholesky": False}),
        (f"fixed-{p}", "ablation: fixed FFN group 256 (no DGS), uniform", sp, "uniform",
         {"dynamic_group_size": False, "fixed_group": 256}),
    ]
RUNS.append(("kv-groups-50", "SlimGPT, uniform, GQA mode kv-groups", 0.5, "uniform", {"gqa": "kv-groups"}))


def latency(model, ids, repeats=5) -> float:
    prefill_seconds(model, ids)
    return statistics.median(prefill_seconds(model, ids) for _ in range(repeats))


def evaluate(model, tok, ids) -> dict:
    t0 = time.time()
    ppl512 = wikitext_ppl(model, tok)
    ppl128 = evaluate_ppl(model, tok, "wikitext2", 128, max_windows=160, progress=False).ppl
    return {"ppl128": ppl128, "ppl512": ppl512, "params": sum(p.numel() for p in model.parameters()),
            "prefill_ms": 1000 * latency(model, ids), "eval_s": time.time() - t0}


def write(results: dict) -> None:
    write_json(OUT.with_suffix(".json"), results)
    dense = results["rows"].get("dense")
    lines = [f"Command: `flock /tmp/lp_heavy.lock python -m bench.slimgpt_table` — {results['meta']['setup']}", "",
             code_line() + " (the last run; each row's JSON entry has the commit that produced it)", "",
             "| run | sparsity | params | WT2 PPL seq 128 (160 win) | WT2 PPL seq 512 (40 win) | prefill ms (1x512) "
             "| prune s |", "|---|---|---|---|---|---|---|"]
    order = ["dense"] + [run[0] for run in RUNS]
    for key in sorted(results["rows"], key=lambda k: order.index(k) if k in order else len(order)):
        r = results["rows"][key]
        ratio = f" ({r['params'] / dense['params']:.1%})" if dense and key != "dense" else ""
        sp = "-" if key == "dense" else f"{r['sparsity']:.0%}"
        prune_s = f"{r['prune_s']:.0f}" if r.get("prune_s") is not None else "-"
        lines.append(f"| {r['label']} | {sp} | {r['params'] / 1e6:.2f}M{ratio} | {r['ppl128']:.2f} | "
                     f"{r['ppl512']:.2f} | {r['prefill_ms']:.0f} | {prune_s} |")
    notes = results["meta"].get("notes", [])
    lines += [""] + [f"- {n}" for n in notes] if notes else []
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    torch.manual_seed(0)
    path = OUT.with_suffix(".json")
    results = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "rows": {}}
    results["meta"]["setup"] = ("SmolLM2-135M-Instruct fp32, calibration 32 x 512 C4-pool tokens, seed 0; WikiText-2 "
                                "test PPL over 40 x 512 and the first 160 x 128 windows; prefill = median of 5")
    only = set(sys.argv[1:])
    model, tok = load_model(MODEL)
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    if "dense" not in results["rows"]:
        results["rows"]["dense"] = {"label": "dense", "sparsity": 0.0, **evaluate(model, tok, ids),
                                    "code": provenance()}
        write(results)
        print("dense", results["rows"]["dense"], flush=True)
    calib = calibration(tok)
    for key, label, sp, alloc, opts in RUNS:
        if key in results["rows"] or (only and key not in only):
            continue
        m = copy.deepcopy(model)
        t0 = time.time()
        rec = prune(m, tok, method="slimgpt", sparsity=sp, allocation=alloc, solver_options=opts, calibration=calib,
                    progress=False)
        row = {"label": label, "sparsity": sp, "allocation": alloc, "options": opts, "prune_s": time.time() - t0,
               "timings": rec["timings"], "block_ratio": rec["allocation"]["block"], "structure": rec["structure"],
               "params_record": rec["params"], **evaluate(m, tok, ids), "code": provenance()}
        results["rows"][key] = row
        write(results)
        print(key, {k: row[k] for k in ("ppl128", "ppl512", "params", "prefill_ms", "prune_s", "eval_s")}, flush=True)
        del m


if __name__ == "__main__":
    main()
