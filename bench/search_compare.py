"""Level search (EvoPress) against the DSA function searches at an equal candidate budget, on the proxy.

Reads an evopress ``search.jsonl`` (``layerprune search-allocation --strategy evopress``, final stage on 8 windows) and
the DSA logs of bench/results/dsa (evolution and random search, the same proxy: one-shot Wanda, 8 WikiText-2
validation windows, bfloat16) and reports the best proxy value each reached within the first N candidates, N = the
candidates the level search evaluated (its first-stage offspring), plus the level search's spread.

    python -m bench.search_compare --evopress bench/results/evopress/w1.search.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import RESULTS, cmdline, code_line, write_atomic, write_json


def best_within(log: Path, n: int) -> float | None:
    vals = [r["fitness"] for r in [json.loads(x) for x in log.read_text().splitlines()][:n] if r["status"] == "ok"]
    return min(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--evopress", required=True)
    ap.add_argument("--summary", default=None, help="the evopress summary.json (spread, settings)")
    ap.add_argument("--out", default=str(RESULTS / "evopress" / "search_compare"))
    args = ap.parse_args()
    recs = [json.loads(x) for x in Path(args.evopress).read_text().splitlines()]
    final_w = max(r["windows"] for r in recs)
    n = len({tuple(r["levels"]) for r in recs if r["generation"] > 0})
    finals = [r["fitness"] for r in recs if r["windows"] == final_w and r["status"] == "ok"]
    rows = {"evopress (levels)": min(finals)}
    for kind in ("evolutionary", "random"):
        rows[f"DSA {kind} (lambda 0.08)"] = best_within(RESULTS / "dsa" / f"s70-{kind}.search.jsonl", n)
    summary = json.loads(Path(args.summary).read_text()) if args.summary else {}
    out = {"command": cmdline(), "candidates": n, "final_windows": final_w, "best_proxy": rows,
           "evopress_spread": summary.get("spread")}
    write_json(Path(args.out + ".json"), out)
    lines = [f"# Level search vs DSA searches at {n} candidates (SmolLM2-135M, Wanda 70%)", "",
             f"Best proxy value (one-shot Wanda, {final_w} WikiText-2 validation windows, bfloat16) "
             f"within the first {n} "
             f"candidates. {code_line()}. Command: `{cmdline()}`", "", "| search | best proxy PPL |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rows.items() if v is not None]
    write_atomic(Path(args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
