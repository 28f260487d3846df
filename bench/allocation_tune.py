"""Tune the allocation hyperparameters on WikiText-2 VALID (never on test): SmolLM2-135M, Wanda, 70% (issue 4).

    python -m bench.allocation_tune                  # -> bench/results/allocation_tune.{json,md} (resumable)
    python -m bench.allocation_tune --windows 16 --max-minutes 12

Grid: DLP alpha in {0.05, 0.1, 0.15, 0.2} (median, the paper's statistic; ``--with-mean`` also tunes the released
code's mean), OWL lambda in {0.04, 0.08, 0.12} (M = 5), ATP beta in {0.15, 0.3, 0.6, 0.8, 1.0} x beta_max (beta_max =
min(2S, 2(1 - S)) / (L - 1) = 0.0207 at 70% for L = 30 blocks), plus uniform as the reference. The paper defaults run
first, so a run cut short by ``--max-minutes`` still has them. Same calibration (32 x 512 C4 pool, seed 0) and the same
cached dense statistics as bench.allocation_sweep (whose setup and runs it uses). The value with the lowest valid PPL
is "chosen" per method; the report prints the sweep command that uses them.
"""
from __future__ import annotations

import argparse
import json
import time

from .allocation_sweep import hyperparams, prune_and_eval, run_key, setup
from .common import RESULTS, cmdline, code_line, provenance, read_json, write_atomic, write_json

SPARSITY, SOLVER = 0.7, "wanda"
GRID = {"dlp-median": ("alpha", [0.15, 0.05, 0.1, 0.2]), "owl": ("lam", [0.08, 0.04, 0.12]),
        "atp": ("beta_frac", [0.3, 0.15, 0.6, 0.8, 1.0]), "dlp-mean": ("alpha", [0.15, 0.05, 0.1, 0.2])}
ARG = {"alpha": "--alpha", "lam": "--lam", "beta_frac": "--beta-frac"}


def plan(with_mean: bool) -> list[tuple[str, dict]]:
    """(label, hp) in run order: uniform, then every method's default, then the rest of the grid."""
    labels = ["dlp-median", "owl", "atp"] + (["dlp-mean"] if with_mean else [])
    out = [("uniform", {})]
    for i in range(max(len(v) for _, v in GRID.values())):
        for label in labels:
            name, values = GRID[label]
            if i < len(values):
                out.append((label, hyperparams(label, **{name: values[i]})))
    return out


def write_markdown(data: dict) -> None:
    runs = list(data["runs"].values())
    uni = next((r["ppl"] for r in runs if r["allocation"] == "uniform"), None)
    lines = [f"Command: `{data['command']}`. {code_line()} (the last run; each run's JSON entry has its own)", "",
             f"SmolLM2-135M fp32, {SOLVER} at {SPARSITY:.0%}, calibration 32 x 512 C4 pool seed 0, WikiText-2 "
             f"**validation** PPL over the first {data['windows']} windows of 512 tokens (the test split is never "
             f"used here). Uniform: {uni:.2f}." if uni else "", "",
             "| allocation | hyperparameter | value | valid PPL | vs uniform | block target min..max | prune s |",
             "|---|---|---|---|---|---|---|"]
    order = list(GRID)
    for r in sorted((r for r in runs if r["allocation"] != "uniform"),
                    key=lambda r: (order.index(r["allocation"]), r["hp"][GRID[r["allocation"]][0]])):
        name = GRID[r["allocation"]][0]
        chosen = data["chosen"].get(r["allocation"]) == r["hp"][name]
        bt = r["block_target"]
        v = f"**{r['ppl']:.2f}**" if chosen else f"{r['ppl']:.2f}"
        lines.append(f"| {r['allocation']} | {name} | {r['hp'][name]:g} | {v} | "
                     f"{(r['ppl'] / uni - 1) * 100:+.1f}% | {min(bt):.3f}..{max(bt):.3f} | {r['prune_s']:.0f} |")
    lines += ["", "Chosen (lowest valid PPL): " + ", ".join(f"{k} {GRID[k][0]} = {v:g}" for k, v in
                                                           data["chosen"].items())]
    lines += ["", "`python -m bench.allocation_sweep --tuned` uses the chosen values "
                  "(DLP's alpha for both statistics)."]
    write_atomic(RESULTS / "allocation_tune.md", "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 valid windows of 512 tokens")
    ap.add_argument("--with-mean", action="store_true", help="also tune alpha for DLP with the mean statistic")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes")
    args = ap.parse_args()
    t_start = time.time()
    out_json = RESULTS / "allocation_tune.json"
    data = read_json(out_json, {"command": "python -m bench.allocation_tune", "invocations": [], "solver": SOLVER,
                                "sparsity": SPARSITY, "dataset": "wikitext2-valid", "windows": args.windows,
                                "runs": {}, "chosen": {}})
    if data["windows"] != args.windows:
        raise SystemExit(f"{out_json} holds runs with {data['windows']} windows; delete it or pass --windows "
                         f"{data['windows']}")
    data["invocations"].append(cmdline())
    model, tok, calib, stats = setup()
    for label, hp in plan(args.with_mean):
        key = run_key(SOLVER, SPARSITY, label, hp)
        if key in data["runs"]:
            continue
        if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
            print("time budget reached; rerun to continue", flush=True)
            break
        r = prune_and_eval(model, tok, calib, SOLVER, SPARSITY, label, hp, stats, "wikitext2-valid", args.windows)
        data["runs"][key] = {**r, "code": provenance()}
        for lab, (name, _) in GRID.items():
            done = [x for x in data["runs"].values() if x["allocation"] == lab]
            if done:
                data["chosen"][lab] = min(done, key=lambda x: x["ppl"])["hp"][name]
        write_json(out_json, data)
        write_markdown(data)
        print(f"{label:10s} {json.dumps(hp)}  valid ppl {r['ppl']:.2f}  prune {r['prune_s']:.0f} s  "
              f"eval {r['eval_s']:.0f} s", flush=True)
    write_markdown(data)
    print((RESULTS / "allocation_tune.md").read_text())


if __name__ == "__main__":
    main()
