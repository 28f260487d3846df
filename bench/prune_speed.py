"""Pruning speed versus the floor, and peak memory (issue: engine benchmark).

The floor is two plain forward passes of all blocks over the same calibration batch (what any
layer-wise pruner must at least run: one pass to collect statistics, one to propagate pruned
outputs), timed twice in the same process after pruning (the lower kept). Each configuration runs
in a fresh subprocess so that its peak RSS is its own (read before the floor is timed). Optionally
evaluates WikiText-2 PPL (40 x 512) of each pruned model.

    python -m bench.prune_speed                       # all configurations -> bench/results/prune_speed.json
    python -m bench.prune_speed --one wanda --offload disk --compute-dtype float32   # one, JSON on stdout
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import CALIB, MODEL, RESULTS, ROOT, carried_row, provenance, wikitext_ppl, write_json

CONFIGS = [  # (method, offload, compute dtype, evaluate ppl)
    ("wanda", "none", "float32", True),
    ("sparsegpt", "none", "float32", True),
    ("magnitude", "none", "float32", True),
    ("wanda", "disk", "float32", False),
    ("sparsegpt", "disk", "float32", False),
    ("wanda", "none", "bfloat16", True),
    ("sparsegpt", "none", "bfloat16", True),
]


@torch.no_grad()
def floor_seconds(model, calib, dtype, batch_size: int) -> float:
    """Two plain forward passes of every block over the calibration batch."""
    import copy

    from layerprune.models.adapters import get_adapter
    from layerprune.passes import block_out, capture_inputs

    a = get_adapter(model)
    hidden, kwargs = capture_inputs(model, a, calib, torch.device("cpu"), dtype, batch_size)
    t0 = time.perf_counter()
    for i, block in enumerate(a.blocks(model)):
        fwd = block if dtype == torch.float32 else copy.deepcopy(block).to(dtype)
        args, kw = kwargs[i]
        for _ in range(2):
            out = torch.empty_like(hidden)
            for s in range(0, hidden.shape[0], batch_size):
                out[s:s + batch_size] = block_out(fwd(hidden[s:s + batch_size], *args, **kw))
        hidden = out
    return time.perf_counter() - t0


def run_one(method: str, offload: str, compute_dtype: str, evaluate: bool, nsamples: int, seqlen: int,
            batch_size: int) -> dict:
    import tempfile

    from layerprune import calibration_set, load_model, prune
    from layerprune.config import DTYPES
    from layerprune.offload import load_model_lazy

    dtype = DTYPES[compute_dtype]
    store = None
    if offload == "disk":
        model, tok, store = load_model_lazy(MODEL, torch.float32)
    else:
        model, tok = load_model(MODEL)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    calib = calibration_set(tok, CALIB["source"], nsamples, seqlen, CALIB["seed"])  # the protocol's pool and seed
    # the floor is timed twice after pruning (same kernels: pruned weights are still dense tensors) and the lower
    # kept, so that a burst of other load on the machine during one measurement does not flatter the ratio; it runs
    # after the peak-RSS reading so that its buffers do not count towards the pruner's peak
    with tempfile.TemporaryDirectory() as tmp:
        rec = prune(model, tok, method=method, sparsity=0.5, calibration=calib, offload=offload,
                    compute_dtype=compute_dtype, batch_size=batch_size, store=store,
                    out_dir=Path(tmp) / "run" if offload == "disk" else None, progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        floors, floor = [None], None
        if offload != "disk":
            floors = [floor_seconds(model, calib.ids, dtype, batch_size) for _ in range(2)]
            floor = min(floors)
        if offload == "disk":
            store.save_pretrained(model, Path(tmp) / "saved")
    t = rec["timings"]
    work = sum(t.get(k, 0.0) for k in ("capture", "statistics", "solve", "propagate", "onload", "offload"))
    out = {"method": method, "offload": offload, "compute_dtype": compute_dtype, "nsamples": nsamples,
           "seqlen": seqlen, "sparsity": 0.5, "timings": t, "prune_seconds": work, "floor_seconds": floor,
           "floor_measurements": floors,
           "ratio_to_floor": work / floor if floor else None, "peak_rss_mb": peak,
           "rss_after_load_mb": rss_loaded, "torch_threads": torch.get_num_threads()}
    if evaluate:
        out["wikitext2_ppl_40x512"] = wikitext_ppl(model, tok)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", default=None, help="run one method in this process and print JSON")
    p.add_argument("--offload", default="none")
    p.add_argument("--compute-dtype", default="float32")
    p.add_argument("--evaluate", action="store_true")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=str(RESULTS / "prune_speed.json"))
    p.add_argument("--only", default=None, help="run only configurations whose 'method:offload:dtype' contains this; "
                                                  "results are merged into --out")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.offload, args.compute_dtype, args.evaluate, args.nsamples,
                                 args.seqlen, args.batch_size)))
        return
    provenance()  # this run's code, command and GEMM rate, taken before the work
    old = json.loads(Path(args.out).read_text())["results"] if args.only and Path(args.out).is_file() else []
    results = []
    for method, offload, dt, ev in CONFIGS:
        if args.only and args.only not in f"{method}:{offload}:{dt}":
            results += [carried_row(r) for r in old
                        if (r["method"], r["offload"], r["compute_dtype"]) == (method, offload, dt)]
            continue
        cmd = [sys.executable, "-m", "bench.prune_speed", "--one", method, "--offload", offload, "--compute-dtype", dt,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
        if ev:
            cmd.append("--evaluate")
        print("running", " ".join(cmd[3:]), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            results.append({"method": method, "offload": offload, "compute_dtype": dt, "error": r.stderr[-2000:]})
            print("  failed:", r.stderr[-500:], flush=True)
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results.append(res)
        print(f"  prune {res['prune_seconds']:.1f}s floor {res['floor_seconds'] or float('nan'):.1f}s "
              f"ratio {res['ratio_to_floor'] or float('nan'):.2f} peak RSS {res['peak_rss_mb']:.0f} MB "
              f"ppl {res.get('wikitext2_ppl_40x512', float('nan')):.2f}", flush=True)
    write_json(Path(args.out), {"results": results})


if __name__ == "__main__":
    main()
