"""What every benchmark shares: the protocol, the bench cache, and the code version written into every result.

Run the scripts from the repository root as modules, e.g. ``python -m bench.solvers_table``.

Protocol (the pruning papers'): SmolLM2-135M in fp32; calibration 32 x 512 tokens drawn from the C4 pool (documents
1000-1999 of the local sample) with seed 0, the same draws as the reference ``get_c4``; WikiText-2 test perplexity
over the first 40 non-overlapping windows of 512 tokens.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from layerprune import calibration_set, evaluate_ppl, prune

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("LP_BENCH_CACHE", "/tmp/layerprune-bench-cache"))  # pruned weights shared by scripts

MODEL = "smollm2-135m"
CALIB = {"source": "c4", "nsamples": 32, "seqlen": 512, "seed": 0}
EVAL_DATASET, EVAL_SEQLEN, EVAL_WINDOWS = "wikitext2", 512, 40
PROTOCOL = (f"SmolLM2-135M fp32, calibration {CALIB['nsamples']} x {CALIB['seqlen']} C4 pool seed {CALIB['seed']}, "
            f"WikiText-2 test PPL over {EVAL_WINDOWS} x {EVAL_SEQLEN}")


def calibration(tok):
    """The protocol's calibration set (32 x 512 tokens of the C4 pool, seed 0)."""
    return calibration_set(tok, CALIB["source"], CALIB["nsamples"], CALIB["seqlen"], CALIB["seed"])


def wikitext_ppl(model, tok, windows: int = EVAL_WINDOWS, **kw) -> float:
    """WikiText-2 test perplexity over the first `windows` windows of 512 tokens."""
    return evaluate_ppl(model, tok, EVAL_DATASET, EVAL_SEQLEN, max_windows=windows, progress=False, **kw).ppl


def cached_prune(model, tok, key, calib=None, **kw):
    """A pruned copy of `model` (prune(**kw) on the protocol's calibration), cached by `key` as a state dict under
    CACHE. Returns (model, prune seconds or None when loaded from the cache)."""
    m = copy.deepcopy(model)
    path = CACHE / f"{key}.pt"
    if path.is_file():
        m.load_state_dict(torch.load(path, weights_only=True))
        return m, None
    calib = calib if calib is not None else calibration(tok)
    t0 = time.time()
    prune(m, tok, calibration=calib, progress=False, **kw)
    secs = time.time() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(m.state_dict(), path)
    return m, secs


@functools.cache
def code_version() -> dict:
    """The git commit of the code that produces a result, and whether it had uncommitted changes (outside
    bench/results); taken once, when a script first asks, so its own outputs do not count."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--", ".", ":(exclude)bench/results"))}
    except (OSError, subprocess.CalledProcessError):
        pass
    # A copy of the tree without its .git (a GPU machine's): the sender names the commit it copied and whether its
    # tree was clean (bench/gpu_check.sh writes both from git before sending); the row says it came from a copy.
    sent = ROOT / ".gpu" / "source.json"
    if sent.is_file():
        src = json.loads(sent.read_text())
        return {"commit": src.get("commit"), "dirty": src.get("dirty"), "copied_tree": True}
    return {"commit": None, "dirty": None}


def gemm_gflops(device="cpu", n: int = 2048, reps: int = 3) -> float:
    """fp32 GEMM rate (GFLOP/s) of ``device``, best of ``reps`` n x n products (CUDA: timed after a synchronize)."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def device_name(device: str = "cpu") -> str:
    """What ran the work: the GPU's name, or the CPU's."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform
    return platform.processor() or platform.machine()


@functools.cache
def provenance() -> dict:
    """What every result row records: the code (commit, dirty), the command line, the machine's threads and its
    fp32 GEMM rate measured now (timings on a shared machine compare only within one run). Taken once per process,
    when a script first asks (call it at the start, before the work)."""
    return {**code_version(), "command": cmdline(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "gemm_gflops_fp32": round(gemm_gflops(), 1), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


ROW_KEYS = ("results", "rows", "runs")


def stamp_rows(data: dict) -> dict:
    """Every row (a dict in ``results``/``rows``/``runs``, a list or a dict of rows) without its own ``code`` gets this
    process's ``provenance()``: a row produced here. Rows carried over from an earlier file keep the ``code`` they
    had."""
    out = dict(data)
    for key in ROW_KEYS:
        rows = out.get(key)
        if isinstance(rows, list):
            out[key] = [r if not isinstance(r, dict) or "code" in r else {**r, "code": provenance()} for r in rows]
        elif isinstance(rows, dict):
            out[key] = {k: r if not isinstance(r, dict) or "code" in r else {**r, "code": provenance()}
                        for k, r in rows.items()}
    return out


def carried_row(row: dict) -> dict:
    """A row kept from an earlier result file: its own ``code``, or an explicit 'not recorded' (never this run's)."""
    if "code" in row:
        return row
    if row.get("commit_of_row"):  # the older per-row field: the commit is known, the tree state is not
        return {**row, "code": {"commit": row["commit_of_row"], "dirty": None}}
    return {**row, "code": {"commit": None, "dirty": None, "note": "produced before rows recorded their commit"}}


def code_line() -> str:
    """One line for a markdown report: the commit (and whether the tree was dirty)."""
    v = code_version()
    return f"Code: commit `{(v['commit'] or 'unknown')[:12]}`" + (" with uncommitted changes" if v["dirty"] else "")


def write_json(path: Path, data: dict, **kw) -> None:
    """Write a result JSON, atomically: every row stamped with its provenance (``stamp_rows``) and the file with the
    code version of its last writer (``"code"``)."""
    write_atomic(Path(path), json.dumps({**stamp_rows(data), "code": provenance()}, **{"indent": 1, **kw}))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path, default: dict) -> dict:
    return json.loads(path.read_text()) if path.exists() else default


def cmdline() -> str:
    """The command line that is running, as `python -m bench.NAME ARGS`."""
    return " ".join(["python", "-m", f"bench.{Path(sys.argv[0]).stem}", *map(shlex.quote, sys.argv[1:])])
