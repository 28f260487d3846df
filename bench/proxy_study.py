"""How faithful is an allocation proxy? Rank correlation between cheap proxies and the full protocol.

Stage ``truth``: for every allocation of ``ALLOCATIONS`` (uniform, OWL, DLP, ATP, IPR, DSA functions at several
spreads, linear schedules and random ones; the parameter-weighted budget holds exactly for all of them) SmolLM2-135M is
pruned with Wanda at 70% under the full protocol (calibration 32 x 512 C4 pool seed 0, block by block with propagation)
and evaluated on WikiText-2 **test** (40 x 512). One line per allocation goes to ``truth.jsonl`` (its per-block
sparsities, the test PPL, the seconds); a rerun skips the allocations already there.

Stage ``proxies``: every proxy of ``PROXIES`` scores every allocation of truth.jsonl on the WikiText-2 **validation**
split only; one line per (proxy, allocation) to ``proxies.jsonl`` with the value and the seconds it took.

Stage ``report``: Spearman's rho between each proxy and the test PPL, and the cost per candidate relative to today's
proxy (``proxy_study.md`` / ``proxy_study.json``).

    OMP_NUM_THREADS=1 python -m bench.proxy_study truth
    OMP_NUM_THREADS=1 python -m bench.proxy_study proxies
    python -m bench.proxy_study report
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from layerprune import load_model, prune
from layerprune.allocation.base import rebalance

from .common import MODEL, RESULTS, calibration, cmdline, code_line, code_version, wikitext_ppl, write_atomic, \
    write_json

OUT = RESULTS / "proxy_study"
TARGET = 0.7
NUM_BLOCKS = 30  # SmolLM2-135M
EVO = "W:(EXP,TANH)-(GRAM)-(ATAN,SIGMOID)-(SIGMOID)"  # found by the 70% DSA evolution (README, DSA)
RND = "W:(NO_OP)-(L1_NORM)-(LOG,SIN)-(SIN)"  # found by the 70% DSA random search
PRESET = "W:(ABSLOG)-(VAR)-(ATAN,ASIN)"  # the DSA README preset dsa-llama1-7b


def _linear(spread: float, increasing: bool = True) -> list[float]:
    x = np.linspace(-spread / 2, spread / 2, NUM_BLOCKS)
    return rebalance((x if increasing else -x) + TARGET, TARGET)


def _random(seed: int, sigma: float, smooth: int) -> list[float]:
    """Gaussian noise of std ``sigma`` around the target, averaged over ``smooth`` neighbours, budget exact."""
    g = np.random.default_rng(seed).normal(0.0, sigma, NUM_BLOCKS + smooth - 1)
    v = np.convolve(g, np.ones(smooth) / smooth * math.sqrt(smooth), mode="valid")
    return rebalance(v + TARGET, TARGET)


def _user(values) -> str:
    return "user:" + ",".join(f"{v:.12g}" for v in values)


# name -> (allocation spec, options)
ALLOCATIONS = {
    "uniform": ("uniform", {}),
    "owl l0.08": ("owl", {"lam": 0.08}),
    "owl l0.15": ("owl", {"lam": 0.15}),
    "dlp median a0.05": ("dlp", {"stat": "median", "alpha": 0.05}),
    "dlp median a0.08": ("dlp", {"stat": "median", "alpha": 0.08}),
    "dlp median a0.10": ("dlp", {"stat": "median", "alpha": 0.10}),
    "dlp median a0.15": ("dlp", {"stat": "median", "alpha": 0.15}),
    "dlp median a0.20": ("dlp", {"stat": "median", "alpha": 0.20}),
    "dlp mean a0.15": ("dlp", {"stat": "mean", "alpha": 0.15}),
    "atp b0.3": ("atp", {"beta_frac": 0.3}),
    "atp b0.6": ("atp", {"beta_frac": 0.6}),
    "ipr-log": ("ipr-log", {}),
    "dsa evo l0.04": (f"dsa:{EVO}", {"lam": 0.04}),
    "dsa evo l0.08": (f"dsa:{EVO}", {"lam": 0.08}),
    "dsa evo l0.15": (f"dsa:{EVO}", {"lam": 0.15}),
    "dsa rnd l0.08": (f"dsa:{RND}", {"lam": 0.08}),
    "dsa rnd l0.15": (f"dsa:{RND}", {"lam": 0.15}),
    "dsa preset l0.08": (f"dsa:{PRESET}", {"lam": 0.08}),
    "linear up 0.2": (_user(_linear(0.2)), {}),
    "linear down 0.2": (_user(_linear(0.2, False)), {}),
    "random s1 0.05": (_user(_random(1, 0.05, 1)), {}),
    "random s2 0.05 smooth": (_user(_random(2, 0.05, 5)), {}),
    "random s3 0.08 smooth": (_user(_random(3, 0.08, 5)), {}),
    "random s4 0.03": (_user(_random(4, 0.03, 1)), {}),
    "random s5 0.1 smooth": (_user(_random(5, 0.10, 3)), {}),
}

# the order in which the allocations not imported are run (the most diverse first, in case the run is cut short)
PRIORITY = ["random s1 0.05", "linear down 0.2", "random s3 0.08 smooth", "dsa evo l0.04", "linear up 0.2",
            "owl l0.15", "random s2 0.05 smooth", "dlp median a0.05", "random s4 0.03", "random s5 0.1 smooth",
            "dlp median a0.10", "dlp median a0.20"]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().split("\n"):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by an interruption
                pass
    return out


def append_jsonl(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


# full-protocol runs already measured by other benchmarks (same protocol: Wanda 70%, calibration 32 x 512 C4 pool seed
# 0, WikiText-2 test 40 x 512): name -> (results file, how to find the run in it)
IMPORTED = {
    "uniform": ("allocation_sweep.json", "wanda|0.7|uniform|{}"),
    "owl l0.08": ("allocation_sweep.json", 'wanda|0.7|owl|{"lam": 0.08, "owl_m": 5.0}'),
    "dlp median a0.15": ("allocation_sweep.json", 'wanda|0.7|dlp-median|{"alpha": 0.15, "stat": "median"}'),
    "dlp mean a0.15": ("allocation_sweep.json", 'wanda|0.7|dlp-mean|{"alpha": 0.15, "stat": "mean"}'),
    "ipr-log": ("allocation_sweep.json", "wanda|0.7|ipr-log|{}"),
    "atp b0.3": ("allocation_sweep.json", "wanda|0.7|atp|{\"beta_frac\": 0.3}"),
    "atp b0.6": ("allocation_sweep.json", "wanda|0.7|atp|{\"beta_frac\": 0.6}"),
    "dsa preset l0.08": ("dsa/dsa_table.json", "DSA preset dsa-llama1-7b"),
    "dsa evo l0.08": ("dsa/dsa_table.json", "DSA found by evolutionary search"),
    "dsa rnd l0.08": ("dsa/dsa_table.json", "DSA found by random search"),
    "dlp median a0.08": ("dsa/dsa_spread.json", ("DLP-median", 0.08)),
    "dsa evo l0.15": ("dsa/dsa_spread.json", ("DSA found by evolutionary search", 0.15)),
    "dsa rnd l0.15": ("dsa/dsa_spread.json", ("DSA found by random search", 0.15)),
}


def imported_rows() -> list[dict]:
    """The IMPORTED runs as truth rows (block sparsities and test PPL from their results files)."""
    rows = []
    for name, (file, key) in IMPORTED.items():
        data = json.loads((RESULTS / file).read_text())
        if file == "allocation_sweep.json":
            block, ppl = data["runs"][key]["block_target"], data["runs"][key]["ppl"]
        elif file == "dsa/dsa_table.json":
            r = next(r for r in data["sparsities"]["70"]["results"] if r["allocation"] == key)
            block, ppl = r["block_sparsity"], r["test_ppl"]
        else:
            r = next(r for r in data["results"] if r["allocation"].startswith(key[0]) and
                     abs(r.get("alpha", r.get("lam", -1)) - key[1]) < 1e-9)
            block, ppl = r["block_sparsity"], r["test_ppl"]
        rows.append({"name": name, "spec": ALLOCATIONS[name][0], "options": ALLOCATIONS[name][1],
                     "block_sparsity": block, "spread": max(block) - min(block), "mean_sparsity": float(np.mean(block)),
                     "test_ppl": ppl, "source": f"bench/results/{file}"})
    return rows


def truth(args) -> None:
    path = OUT / "truth.jsonl"
    done = {r["name"] for r in read_jsonl(path)}
    for row in imported_rows():
        if row["name"] not in done:
            append_jsonl(path, row)
            done.add(row["name"])
    order = sorted(ALLOCATIONS, key=lambda n: PRIORITY.index(n) if n in PRIORITY else len(PRIORITY))
    todo = [n for n in order if n not in done and (not args.only or n in args.only.split(","))]
    if not todo:
        print("truth: nothing to do")
        return
    dense, tok = load_model(MODEL, "float32")
    calib = calibration(tok)
    for name in todo:
        spec, opts = ALLOCATIONS[name]
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        rec = prune(model, tok, method="wanda", sparsity=TARGET, allocation=spec, allocation_options=opts,
                    calibration=calib, progress=False)
        t1 = time.perf_counter()
        ppl = wikitext_ppl(model, tok)
        t2 = time.perf_counter()
        block = rec["allocation"]["block"]
        row = {"name": name, "spec": spec if not spec.startswith("user:") else "user", "options": opts,
               "block_sparsity": block, "spread": max(block) - min(block),
               "mean_sparsity": float(np.mean(block)), "measured_sparsity": rec["measured_sparsity"],
               "test_ppl": ppl, "prune_seconds": t1 - t0, "eval_seconds": t2 - t1,
               "threads": torch.get_num_threads(), "commit": code_version()["commit"]}
        append_jsonl(path, row)
        print(f"{name}: test {ppl:.2f}  spread {row['spread']:.3f}  prune {t1 - t0:.0f}s eval {t2 - t1:.0f}s",
              flush=True)
        del model


# proxy families: one pruning per allocation, then per-window NLL and KL on up to WINDOWS validation windows; a proxy
# is (family, metric, number of windows), e.g. "oneshot ppl 8" (today's) = the mean NLL of the first 8 windows
FAMILIES = {"oneshot": 0, "prop4": 4, "prop2": 2}  # name -> calibration windows pruned through with propagation
WINDOWS = 16


def proxies(args) -> None:
    from layerprune.search.proxy import Proxy, dense_hidden, eval_windows, window_scores
    from layerprune.engine import prune_model
    from layerprune.data import resolve_data_dir
    from layerprune.data.bos import bos_id
    from layerprune.evaluation.perplexity import tokenize_corpus

    path = OUT / "proxies.jsonl"
    done = {(r["family"], r["name"]) for r in read_jsonl(path)}
    rows = read_jsonl(OUT / "truth.jsonl")
    families = [f for f in FAMILIES if not args.only or f in args.only.split(",")]
    todo = [(f, r) for f in families for r in rows if (f, r["name"]) not in done]
    if not todo:
        print("proxies: nothing to do")
        return
    dense, tok = load_model(MODEL, "float32")
    valid = tokenize_corpus(tok, "wikitext2-valid", resolve_data_dir(None), 512)
    bos = bos_id(tok)
    t0 = time.perf_counter()
    calib = calibration(tok).ids
    proxy = Proxy(dense, calib, valid, TARGET, windows=8, bos=bos, prune_fn=prune_model)  # bf16, as the search
    windows = eval_windows(valid, 512, WINDOWS, bos)
    ref = dense_hidden(proxy.model, windows)
    print(f"setup {time.perf_counter() - t0:.0f}s", flush=True)
    for fam, row in todo:
        proxy.propagate = FAMILIES[fam]
        proxy.prop_calib = calib[:FAMILIES[fam]] if FAMILIES[fam] else None
        t1 = time.perf_counter()
        proxy.apply(row["block_sparsity"])
        t2 = time.perf_counter()
        per_window = []
        nll, kl = [], []
        for w in range(WINDOWS):
            t = time.perf_counter()
            a, b = window_scores(proxy.model, windows[w:w + 1], ref[w:w + 1])
            per_window.append(time.perf_counter() - t)
            nll += a
            kl += b
        rec = {"family": fam, "name": row["name"], "nll": nll, "kl": kl, "apply_seconds": t2 - t1,
               "window_seconds": per_window, "threads": torch.get_num_threads(), "commit": code_version()["commit"]}
        append_jsonl(path, rec)
        print(f"{fam} {row['name']}: ppl8 {math.exp(sum(nll[:8]) / 8):.2f}  kl8 {sum(kl[:8]) / 8:.4f}  "
              f"apply {t2 - t1:.1f}s  windows {sum(per_window):.1f}s", flush=True)


def spearman(x, y) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(x, y).statistic)


def report(args) -> None:
    truth = {r["name"]: r for r in read_jsonl(OUT / "truth.jsonl")}
    recs = read_jsonl(OUT / "proxies.jsonl")
    fams = [f for f in FAMILIES if any(r["family"] == f for r in recs)]
    base = None
    rows = []
    for fam in fams:
        got = {r["name"]: r for r in recs if r["family"] == fam and r["name"] in truth}
        names = sorted(got)
        apply_s = float(np.median([got[n]["apply_seconds"] for n in names]))
        for metric in ("ppl", "kl"):
            for k in (2, 4, 8, 16):
                vals = [float(np.mean(got[n]["nll" if metric == "ppl" else "kl"][:k])) for n in names]
                tp = [truth[n]["test_ppl"] for n in names]
                rho = spearman(vals, tp)
                top = sorted(range(len(names)), key=lambda i: tp[i])[:len(names) // 2]  # the better half (test)
                rho_top = spearman([vals[i] for i in top], [tp[i] for i in top])
                cost = apply_s + float(np.median([sum(got[n]["window_seconds"][:k]) for n in names]))
                rows.append({"proxy": f"{fam} {metric} {k}", "family": fam, "metric": metric, "windows": k,
                             "n": len(names), "rho": rho, "rho_better_half": rho_top,
                             "seconds_per_candidate": cost})
                if (fam, metric, k) == ("oneshot", "ppl", 8):
                    base = cost
    for r in rows:
        r["cost_vs_today"] = r["seconds_per_candidate"] / base if base else None
    both = [n for n in truth if all(any(r["family"] == f and r["name"] == n for r in recs) for f in fams)]
    table = {"command": cmdline(), "protocol": "SmolLM2-135M, Wanda 70%; truth: calibration 32 x 512 C4 pool seed 0, "
             "WikiText-2 test 40 x 512 (fp32); proxies: WikiText-2 validation, bfloat16, 1 thread",
             "allocations": [{k: truth[n][k] for k in ("name", "test_ppl", "spread")} | {"source": truth[n].get(
                 "source", "bench/results/proxy_study/truth.jsonl")} for n in truth],
             "proxies": rows, "allocations_scored_by_every_family": len(both)}
    write_json(OUT / "proxy_study.json", table)
    lines = ["# Proxy study: which cheap score ranks allocations like the full protocol?", "",
             f"{table['protocol']}. {code_line()}. Command: `{cmdline()}`", "",
             "rho: Spearman rank correlation between the proxy and the test PPL over the allocations below (all, and "
             "the better half by test PPL, where a search works); cost: "
             "median seconds per candidate (pruning + the windows' forward passes, measured here at 1 thread on a "
             "shared 2-core CPU) and its ratio to today's proxy (oneshot ppl 8).", "",
             "| proxy | allocations | rho | rho, better half | s / candidate | cost vs today |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["rho"]):
        lines.append(f"| {r['proxy']} | {r['n']} | {r['rho']:.3f} | {r['rho_better_half']:.3f} | "
                     f"{r['seconds_per_candidate']:.1f} | "
                     f"{r['cost_vs_today']:.2f}x |")
    lines += ["", "| allocation | spread | test PPL | " + " | ".join(f"{f} ppl 8" for f in fams) + " |",
              "|---|---|---|" + "---|" * len(fams)]
    for n, t in sorted(truth.items(), key=lambda kv: kv[1]["test_ppl"]):
        vals = []
        for f in fams:
            r = next((r for r in recs if r["family"] == f and r["name"] == n), None)
            vals.append(f"{math.exp(np.mean(r['nll'][:8])):.1f}" if r else "")
        lines.append(f"| {n} | {t['spread']:.3f} | {t['test_ppl']:.2f} | " + " | ".join(vals) + " |")
    write_atomic(OUT / "proxy_study.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["truth", "proxies", "report"])
    ap.add_argument("--only", default=None, help="comma list of allocation (truth) or proxy names")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"truth": truth, "proxies": proxies, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
