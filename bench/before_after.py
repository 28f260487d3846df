"""A refactor that must change no number: four SmolLM2 runs at two commits, perplexity and weights compared bit for bit.

    python -m bench.before_after --before COMMIT --after COMMIT [--work DIR] [--configs wanda50,sgpt24,dlp70,slim50]

Each commit's own command line (``python -m layerprune prune``) runs from a detached, clean git worktree of this
repository at that commit (``git worktree add``; kept in ``--work`` for reruns), on the protocol of bench/common.py:
calibration 32 x 512 C4 pool seed 0, WikiText-2 test PPL over 40 x 512 (the dense evaluation skipped), 2 threads.
The weights are compared as the sha256 of every tensor of the saved run (name, shape, dtype and bytes, in name
order); the PPL as the float the run recorded. A run directory that already holds a run of the requested commit is
reused. Writes ``bench/results/before_after.json``: per configuration and pair of commits both runs' commit (from
their records), PPL, prune seconds and weight hash, and whether they are identical; rows of other pairs are kept.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from .common import CALIB, RESULTS, ROOT, carried_row, provenance, read_json, write_json

CONFIGS = {  # the four runs of the #14/#28 comparison
    "wanda50": ("Wanda 50%", ["--method", "wanda", "--sparsity", "0.5"]),
    "sgpt24": ("SparseGPT 2:4", ["--method", "sparsegpt", "--nm", "2:4"]),
    "dlp70": ("Wanda + DLP 70%", ["--method", "wanda", "--sparsity", "0.7", "--allocation", "dlp"]),
    "slim50": ("SlimGPT ipr-log 50%", ["--method", "slimgpt", "--sparsity", "0.5", "--allocation", "ipr-log"]),
}


def weights_hash(run: Path) -> tuple[str, int]:
    """sha256 over every tensor of the run's safetensors files (name, shape, dtype, bytes; names sorted)."""
    h, n = hashlib.sha256(), 0
    for f in sorted(run.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in sorted(s.keys()):
                t = s.get_tensor(k).contiguous()
                h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
                n += 1
    return h.hexdigest(), n


def worktree(commit: str, work: Path) -> Path:
    full = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = work / f"src-{full.strip()[:12]}"
    if not path.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), full.strip()], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def recorded(out: Path) -> dict | None:
    f = out / "layerprune.json"
    return json.loads(f.read_text()) if f.is_file() else None


def run(commit: str, src: Path, cfg: str, out: Path, data_dir: str) -> dict:
    rec = recorded(out)
    want = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True).stdout.strip()
    if rec is None or (rec.get("versions", {}).get("layerprune_commit") or {}).get("commit") != want:
        cmd = [sys.executable, "-m", "layerprune", "prune", "--model", "smollm2-135m", *CONFIGS[cfg][1],
               "--calib", CALIB["source"], "--nsamples", str(CALIB["nsamples"]), "--seqlen", str(CALIB["seqlen"]),
               "--seed", str(CALIB["seed"]), "--eval", "wikitext2", "--eval-seqlen", "512", "--max-windows", "40",
               "--no-dense-eval", "--data-dir", data_dir, "--out", str(out), "--force"]
        threads = os.environ.get("OMP_NUM_THREADS", "2")
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        p = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{commit} {cfg} failed:\n{p.stderr[-3000:]}")
        rec = recorded(out)
    sha, n = weights_hash(out)
    return {"commit": rec["versions"].get("layerprune_commit"), "ppl": rec["eval"]["after"]["wikitext2"]["ppl"],
            "prune_s": rec["timings"]["total"], "measured_sparsity": rec.get("measured_sparsity"),
            "weights_sha256": sha, "tensors": n, "run": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--work", default="/tmp/layerprune-before-after")
    ap.add_argument("--data-dir", default=os.environ.get("LAYERPRUNE_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out-json", default=str(RESULTS / "before_after.json"))
    args = ap.parse_args()
    cfgs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if set(cfgs) - set(CONFIGS):
        raise SystemExit(f"unknown configs {sorted(set(cfgs) - set(CONFIGS))}; known: {list(CONFIGS)}")
    provenance()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = {side: worktree(getattr(args, side), work) for side in ("before", "after")}
    out = Path(args.out_json)
    kept = [carried_row(r) for r in read_json(out, {"rows": []})["rows"]]  # other pairs' rows keep their own code
    rows = []
    for cfg in cfgs:
        row = {"config": cfg, "label": CONFIGS[cfg][0], "args": " ".join(CONFIGS[cfg][1]), "pair": [args.before,
                                                                                                    args.after]}
        for side in ("before", "after"):
            row[side] = run(getattr(args, side), src[side], cfg, work / f"run-{src[side].name[4:]}-{cfg}",
                            args.data_dir)
        for side in ("before", "after"):  # each run's own code, as a column of the table
            c = row[side]["commit"] or {}
            row[f"{side}_commit"] = (c.get("commit") or "unknown")[:12] + (" (dirty)" if c.get("dirty") else "")
        row["ppl_identical"] = row["before"]["ppl"] == row["after"]["ppl"]
        row["weights_identical"] = row["before"]["weights_sha256"] == row["after"]["weights_sha256"]
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("label", "ppl_identical", "weights_identical")}),
              row["before"]["ppl"], row["after"]["ppl"], flush=True)
    key = lambda r: (r["config"], r["before"]["commit"]["commit"], r["after"]["commit"]["commit"])  # noqa: E731
    kept = [r for r in kept if key(r) not in {key(n) for n in rows}]
    write_json(out, {"protocol": f"SmolLM2-135M fp32, calibration {CALIB['nsamples']} x {CALIB['seqlen']} C4 pool "
                     f"seed {CALIB['seed']}, WikiText-2 test 40 x 512", "rows": kept + rows})


if __name__ == "__main__":
    main()
