"""Distributed pruning (layerprune.distributed) on this CPU, gloo: 2 processes x 1 thread against 1 process x 1 thread
and 1 process x 2 threads, Wanda 50% and SparseGPT 50% on the protocol (SmolLM2-135M fp32, C4 32 x 512, WikiText-2
40 x 512), all six runs in one invocation; then a *simulation* of 8 GPUs on a 7B model from the measured bytes per
block and stage shares (see ``project``). Writes bench/results/distributed.json (and .md).

    flock /tmp/layerprune-heavy.lock python -m bench.distributed
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import CALIB, MODEL, PROTOCOL, RESULTS, ROOT, cmdline, code_line, code_version, write_atomic, \
    write_json

CONFIGS = (("1x1", 1, 1), ("1x2", 1, 2), ("2x1", 2, 1))  # processes x threads each


def run_one(method: str, procs: int, threads: int, out: Path, checkpoint: str | None = None) -> dict:
    args = ["prune", "--model", MODEL, "--method", method, "--sparsity", "0.5", "--calib", CALIB["source"],
            "--nsamples", str(CALIB["nsamples"]), "--seqlen", str(CALIB["seqlen"]), "--seed", str(CALIB["seed"]),
            "--eval", "", "--device", "cpu", "--force", "--out", str(out)]
    args += ["--checkpoint", checkpoint] if checkpoint else []
    # MKL_NUM_THREADS too: torch takes its thread count from it when it is set (a "1 thread" run under an inherited
    # MKL_NUM_THREADS=2 ran 2 threads, and 2 ranks 4 threads on 2 cores)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "layerprune"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "-m", "layerprune"]
    t0 = time.perf_counter()
    p = subprocess.run(launch + args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{method} {procs}x{threads} failed:\n{p.stderr[-3000:]}")
    rec = json.loads((out / "layerprune.json").read_text())
    return {"processes": procs, "threads": threads, "prune_s": rec["timings"]["total"], "process_wall_s": wall,
            "timings": rec["timings"], "block_timings": rec["block_timings"],
            "measured_sparsity": rec["measured_sparsity"], "distributed": rec.get("distributed")}


def ppl(run: Path) -> float:
    """WikiText-2 40 x 512 of a saved run, evaluated here (2 threads: the same for every run)."""
    from layerprune import load_model

    from bench.common import wikitext_ppl

    model, tok = load_model(str(run))
    return wikitext_ppl(model, tok)


def mask_agreement(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    tot = agree = close = 0
    for k, x in wa.items():
        if x.dim() == 2 and "layers" in k:
            y = wb[k]
            tot += x.numel()
            agree += int(((x == 0) == (y == 0)).sum())
            close += int((x - y).abs().le(1e-5 + 1e-3 * x.abs()).sum())
    return {"masks_equal": agree / tot, "weights_close": close / tot}


# --- the 8-GPU / 7B projection: a simulation, not a measurement ---------------------------------------------------
# LLaMA-2-7B shapes; calibration 128 x 2048; assumed sustained device rates (documented in docs/distributed.md)
SEVEN_B = {"hidden": 4096, "ffn": 11008, "blocks": 32, "tokens": 128 * 2048, "weight_bytes": 2}
GPU = {"gemm_flops": 400e12, "fp32_flops": 50e12, "solve_flops": 10e12, "link_bytes_s": 200e9}


def jobs_7b(method: str, h: int, f: int) -> list[float]:
    """Solve cost of each job of one block (the program's own cost model: rows x cols^2 + cols^3 / 3 per input group
    for SparseGPT, rows x cols per linear for Wanda), in multiply-adds."""
    if method == "sparsegpt":  # q/k/v, o, gate/up, down
        c = h ** 3 / 3
        return [(3 * h) * h * h + c, h * h * h + c, (2 * f) * h * h + c, h * f * f + f ** 3 / 3]
    return [h * h] * 4 + [f * h] * 3


def project(method: str, n: int, gpu: dict = GPU, m: dict = SEVEN_B) -> dict:
    """Seconds per 7B block on 1 and n GPUs: statistics and propagation split n ways (data parallel), the solve jobs
    shared out by the same longest-first rule as the engine (the slowest rank sets the time), plus communication: the
    statistics all-gathered (each rank receives (n-1) x the payload), the pruned weights broadcast once."""
    from layerprune.distributed import World

    h, f, t = m["hidden"], m["ffn"], m["tokens"]
    params = 4 * h * h + 3 * h * f
    fwd = 2 * t * params / gpu["gemm_flops"]  # one block forward (attention's t x seqlen term left out)
    hess_cols2 = 3 * h * h + f * f if method == "sparsegpt" else 0
    stats = fwd + 2 * t * hess_cols2 * 5 / 8 / gpu["fp32_flops"]
    jobs = [2 * c / gpu["solve_flops"] for c in jobs_7b(method, h, f)]
    payload = 4 * hess_cols2 if method == "sparsegpt" else 4 * (3 * h + f)  # Hessians, or the sums of x_j^2
    sample = 0 if method == "sparsegpt" else 4 * 256 * (3 * h + f)  # rank 0's error-report rows, one per input group
    weights = params * m["weight_bytes"]
    one = stats + sum(jobs) + fwd
    owner = World(n, 0).assign(jobs)
    solve_n = max(sum(j for j, o in zip(jobs, owner) if o == r) for r in range(n))
    comm = ((n - 1) * payload + weights + sample) / gpu["link_bytes_s"]
    many = stats / n + solve_n + fwd / n + comm
    return {"block_s_1": one, "block_s_n": many, "speedup": one / many, "stats_s": stats, "solve_s": sum(jobs),
            "solve_s_n": solve_n, "propagate_s": fwd, "comm_s": comm, "allgather_payload_bytes": payload,
            "broadcast_bytes": weights + sample, "model_s_1": one * m["blocks"], "model_s_n": many * m["blocks"]}


def report(rows: dict, out_name: str = "distributed", checkpoint: str | None = None) -> None:
    """Write the JSON and the markdown table of the methods done so far."""
    data = {"protocol": PROTOCOL, "command": cmdline(), "machine_cpus": os.cpu_count(),
            "checkpoint": checkpoint or "default (full on CPU; N processes keep full)",
            "projection_assumptions": {"model": SEVEN_B, "gpu": GPU,
                                       "note": "simulation from the engine's cost model and assumed device rates"},
            "results": rows}
    write_json(RESULTS / f"{out_name}.json", data)
    lines = ["# Distributed pruning: 2 gloo processes vs 1 process (CPU)", "", code_line(), "", PROTOCOL, "",
             "| method | run | prune s | vs 1x1 | vs 1x2 | PPL | PPL diff | sparsity | masks equal | bytes/block "
             "all-gathered | bytes/block broadcast |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, r in rows.items():
        for name, x in r["runs"].items():
            bpb = x.get("bytes_per_block", {})
            ppl_cells = f"{x['ppl']:.4f} | {x.get('ppl_rel_diff', 0.0):+.4%}" if "ppl" in x else "- | -"
            vs12 = f"{x['speedup_vs_1x2']:.2f}x" if "speedup_vs_1x2" in x else "-"
            lines.append(f"| {method} | {name} | {x['prune_s']:.1f} | {x.get('speedup_vs_1x1', 1.0):.2f}x | {vs12} | "
                         f"{ppl_cells} | {x['measured_sparsity']:.4f} | "
                         f"{x.get('masks_equal', 1.0):.5f} | {bpb.get('reduced', 0):,.0f} | "
                         f"{bpb.get('broadcast', 0):,.0f} |")
    lines += ["", "Projection (simulation, not measured): 8 GPUs, LLaMA-2-7B shapes, 128 x 2048 calibration", "",
              "| method | s/block 1 GPU | s/block 8 GPUs | speedup | solve 1 -> 8 | comm s/block |",
              "|---|---|---|---|---|---|"]
    for method, r in rows.items():
        p = r["projection_8gpu_7b"]
        lines.append(f"| {method} | {p['block_s_1']:.3f} | {p['block_s_n']:.3f} | {p['speedup']:.2f}x | "
                     f"{p['solve_s']:.3f} -> {p['solve_s_n']:.3f} | {p['comm_s']:.4f} |")
    write_atomic(RESULTS / f"{out_name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--work", default="/tmp/layerprune-dist-bench")
    ap.add_argument("--checkpoint", default=None, help="--checkpoint of every run (default: the prune default)")
    ap.add_argument("--name", default="distributed", help="result files bench/results/NAME.{json,md}")
    a = ap.parse_args()
    code_version()  # the commit that runs, taken before anything else
    import torch

    torch.set_num_threads(2)  # this process only evaluates
    work = Path(a.work)
    rows = {}
    for method in a.methods.split(","):
        runs = {}
        for name, procs, threads in CONFIGS:
            runs[name] = run_one(method, procs, threads, work / f"{method}-{name}", a.checkpoint)
            print(f"{method} {name}: prune {runs[name]['prune_s']:.1f}s", flush=True)
        base = runs["1x1"]
        for name in ("1x1", "2x1"):  # the PPL the issue compares (1x2 is compared by its masks)
            runs[name]["ppl"] = ppl(work / f"{method}-{name}")
        for name in ("1x2", "2x1"):
            r = runs[name]
            r.update(mask_agreement(work / f"{method}-1x1", work / f"{method}-{name}"))
            r["speedup_vs_1x1"] = base["prune_s"] / r["prune_s"]
        runs["2x1"]["ppl_rel_diff"] = runs["2x1"]["ppl"] / base["ppl"] - 1
        runs["2x1"]["speedup_vs_1x2"] = runs["1x2"]["prune_s"] / runs["2x1"]["prune_s"]
        blocks = runs["2x1"]["distributed"]["blocks"]
        runs["2x1"]["bytes_per_block"] = {k: sum(b[k] for b in blocks) / len(blocks)
                                         for k in ("reduced", "broadcast", "gathered")}
        rows[method] = {"runs": runs, "projection_8gpu_7b": project(method, 8)}
        report(rows, a.name, a.checkpoint)  # after each method: a cut-short run keeps what it measured



if __name__ == "__main__":
    main()
