"""Check that every run of a FedLP result trained the same partitions in every round (issue 32).

    python -m bench.fedlp_partitions [bench/results/fedlp_lora.json ...]

A file holds one record (``layerprune fed`` output: ``rounds``) or several (``runs``: the bench table). Prints the
sampled partitions per round (and the hetero depths), exits 1 when two runs differ in any round or a round lists
no partitions (a record written before partitions were recorded).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import RESULTS


def runs_of(data: dict) -> list[dict]:
    return data["runs"] if "runs" in data else [data]


def name_of(run: dict) -> str:
    c = run.get("config", {})
    extra = {"homo": f"({c.get('keep_prob')})", "hetero": f"({c.get('depth_flag') or 'u'})"}.get(c.get("scheme"), "")
    return f"{c.get('scheme')}{extra}" + (" + personal heads" if c.get("scheme") == "hetero" and
                                          c.get("personal_heads") else "")


def partitions_by_round(run: dict) -> list[list[int] | None]:
    """The sampled partition IDs of rounds 1.. (None where the record has none)."""
    return [row.get("partitions") for row in run["rounds"] if row.get("round", 0) > 0]


def check(runs: list[dict]) -> list[str]:
    """Problems (empty: every run lists the same, non-empty partitions in every round)."""
    problems, ref = [], partitions_by_round(runs[0]) if runs else []
    for run in runs:
        got = partitions_by_round(run)
        if any(not p for p in got):
            problems.append(f"{name_of(run)}: rounds without recorded partitions")
        elif got != ref:
            bad = [i + 1 for i, (a, b) in enumerate(zip(got, ref)) if a != b] or ["count"]
            problems.append(f"{name_of(run)}: partitions differ from {name_of(runs[0])} in round(s) {bad}")
    return problems


def main(argv: list[str] | None = None) -> int:
    files = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or [RESULTS / "fedlp_lora.json"]
    bad = 0
    for f in files:
        runs = runs_of(json.loads(f.read_text()))
        print(f"{f}: {len(runs)} run(s)")
        for run in runs:
            depths = [row.get("depths") for row in run["rounds"] if row.get("round", 0) > 0]
            cells = [f"{p}" + (f" depths {d}" if d else "") for p, d in zip(partitions_by_round(run), depths)]
            print(f"  {name_of(run):32s} " + " | ".join(cells))
        problems = check(runs)
        for p in problems:
            print(f"  MISMATCH {p}")
        print("  same partitions in every run and round" if not problems else "  FAILED")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
