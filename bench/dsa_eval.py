"""Full-protocol table for the DSA searches of bench/dsa_runs.sh.

Per sparsity: SmolLM2-135M pruned with Wanda (calibration 32 x 512 C4-pool tokens, seed 0, block by block) under
uniform, OWL, DLP-median, the DSA README preset and the functions found by evolution and by random search; WikiText-2
TEST perplexity over 40 windows x 512. Also the search proxy's value for each allocation (one-shot Wanda with dense
norms, 8 WikiText-2 validation windows, the search's dtype) to show how the proxy ranks them.
Writes to --out: dsa_table.md, dsa_table.json, dsa_search_<S>.png (best fitness vs candidates, evolution vs random),
the searches' summaries and logs (< 1 MB).

    flock /tmp/lp_heavy.lock .venv/bin/python -m bench.dsa_eval --runs runs/dsa --sparsities 0.7,0.6 \
        --out bench/results/dsa
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch

from layerprune import evaluate_ppl, load_model, prune
from layerprune.allocation.dsa import PRESETS
from layerprune.search.proxy import Proxy
from layerprune.search.dsa import plot_curves
from layerprune.data import resolve_data_dir
from layerprune.errors import UserError
from layerprune.evaluation.perplexity import tokenize_corpus

from .common import MODEL, calibration, code_line, write_json

STRATEGIES = ("evolutionary", "random")


def run_dir(runs: Path, s: float, strategy: str) -> Path:
    return runs / f"s{round(s * 100)}-{strategy}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs/dsa")
    ap.add_argument("--sparsities", default="0.7,0.6")
    ap.add_argument("--out", default="bench/results/dsa")
    ap.add_argument("--windows", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(2)
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, tok = load_model(MODEL, "float32")
    calib = calibration(tok)
    data_dir = resolve_data_dir(None)
    valid = tokenize_corpus(tok, "wikitext2-valid", data_dir, 512)
    t0 = time.perf_counter()
    dense_ppl = evaluate_ppl(dense, tok, "wikitext2", 512, data_dir, args.windows, progress=False).ppl
    print(f"dense: {dense_ppl:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    table = {"model": MODEL, "protocol": f"Wanda, calibration 32x512 C4 pool seed 0, WikiText-2 test "
             f"{args.windows}x512", "dense_ppl": dense_ppl, "sparsities": {},
             "proxy": {"eval_windows": 8, "proxy_dtype": "bfloat16"}}
    for s in [float(x) for x in args.sparsities.split(",")]:
        tag = f"{round(s * 100)}"
        summaries = {st: json.loads((run_dir(runs, s, st) / "summary.json").read_text()) for st in STRATEGIES
                     if (run_dir(runs, s, st) / "summary.json").is_file()}
        settings = next(iter(summaries.values()))["settings"] if summaries else {}
        table["proxy"] = {k: settings.get(k, d) for k, d in (("eval_windows", 8), ("proxy_dtype", "bfloat16"))}
        proxy = Proxy(copy.deepcopy(dense), calib.ids, valid, s, windows=settings.get("eval_windows", 8),
                      lam=settings.get("lam", 0.08), dtype=settings.get("proxy_dtype", "bfloat16"),
                      norms_path=run_dir(runs, s, "evolutionary") / "dense_norms.safetensors")
        rows = [("uniform", "uniform", {}), ("OWL (M=5, lambda=0.08)", "owl", {}),
                ("DLP-median (alpha=0.15)", "dlp", {"stat": "median"}),
                ("DSA preset dsa-llama1-7b", f"dsa:{PRESETS['dsa-llama1-7b']}", {})]
        rows += [(f"DSA found by {st} search", f"dsa:{sm['best_function']}", {}) for st, sm in summaries.items()]
        results = []
        for name, alloc, opts in rows:
            model = copy.deepcopy(dense)
            t1 = time.perf_counter()
            try:
                rec = prune(model, tok, method="wanda", sparsity=s, allocation=alloc, allocation_options=opts,
                            calibration=calib, progress=False)
            except UserError as e:
                results.append({"allocation": name, "spec": alloc, "error": str(e)})
                print(f"{s} {name}: {e}", flush=True)
                continue
            t_prune = time.perf_counter() - t1
            ppl = evaluate_ppl(model, tok, "wikitext2", 512, data_dir, args.windows, progress=False).ppl
            block = rec["allocation"]["block"]
            results.append({"allocation": name, "spec": alloc, "test_ppl": ppl, "proxy_ppl":
                            proxy.evaluate_allocation(block), "measured_sparsity": rec["measured_sparsity"],
                            "block_sparsity": block, "prune_seconds": t_prune})
            print(f"{s} {name}: test {ppl:.3f}  proxy {results[-1]['proxy_ppl']:.3f}  "
                  f"(sparsity {rec['measured_sparsity']:.4f}, {time.perf_counter() - t1:.0f}s)", flush=True)
            del model
        table["sparsities"][tag] = {"results": results, "searches": {
            st: {k: sm[k] for k in ("best_function", "selected_by", "rescored")} | {
                "n_evaluated": sm["search"]["n_evaluated"], "n_failed": sm["search"]["n_failed"],
                "generations": sm["search"]["generations"], "best_proxy": sm["search"]["best_fitness"],
                "budget_minutes": sm["settings"]["budget_minutes"],
                "candidates_per_minute": sm["throughput"]["candidates_per_minute"],
                "ppl_evaluations_per_minute": sm["throughput"]["ppl_evaluations_per_minute"],
                "median_seconds_per_ok_candidate": sm["throughput"]["median_seconds_per_ok_candidate"]}
            for st, sm in summaries.items()}}
        logs = {st: run_dir(runs, s, st) / "search.jsonl" for st in summaries}
        if logs:
            budgets = "/".join(sorted({f"{sm['settings']['budget_minutes']:g}" for sm in summaries.values()}))
            plot_curves(logs, out / f"dsa_search_{tag}.png",
                        title=f"DSA search on SmolLM2-135M, Wanda {tag}%, {budgets} min each")
        for st in summaries:
            src = run_dir(runs, s, st)
            shutil.copy(src / "summary.json", out / f"s{tag}-{st}.summary.json")
            if (src / "search.jsonl").stat().st_size < 1 << 20:
                shutil.copy(src / "search.jsonl", out / f"s{tag}-{st}.search.jsonl")
        del proxy
    write_json(out / "dsa_table.json", table)
    (out / "dsa_table.md").write_text(markdown(table, args.windows))
    print((out / "dsa_table.md").read_text())


def markdown(table: dict, windows: int) -> str:
    lines = ["# DSA allocation search on SmolLM2-135M", "",
             f"Wanda, calibration 32 x 512 tokens from the C4 pool (seed 0), WikiText-2 **test** perplexity over "
             f"{windows} windows x 512. Dense: {table['dense_ppl']:.2f}. *proxy*: the search fitness (one-shot Wanda "
             f"with dense input norms, first {table['proxy']['eval_windows']} WikiText-2 **validation** windows x 512, "
             f"{table['proxy']['proxy_dtype']}). {code_line()}", ""]
    for tag, sec in table["sparsities"].items():
        uni = next((r["test_ppl"] for r in sec["results"] if r["allocation"] == "uniform" and "test_ppl" in r), None)
        lines += [f"## {tag}% sparsity", "", "| allocation | function | test PPL | vs uniform | proxy PPL |",
                  "|---|---|---|---|---|"]
        for r in sec["results"]:
            fn = r["spec"][4:] if r["spec"].startswith("dsa:") else ""
            if "error" in r:
                lines.append(f"| {r['allocation']} | `{fn}` | invalid on this model | | |")
                continue
            rel = f"{(r['test_ppl'] / uni - 1) * 100:+.1f}%" if uni else ""
            lines.append(f"| {r['allocation']} | {'`' + fn + '`' if fn else ''} | {r['test_ppl']:.2f} | {rel} | "
                         f"{r['proxy_ppl']:.2f} |")
        lines += ["", "| search | budget (min) | candidates | failed | generations | candidates/min | "
                  "PPL evals/min | median s/candidate | best proxy | chosen (after rescoring) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for st, x in sec["searches"].items():
            lines.append(f"| {st} | {x['budget_minutes']:g} | {x['n_evaluated']} | {x['n_failed']} | "
                         f"{x['generations']} | {x['candidates_per_minute']:.1f} | "
                         f"{x['ppl_evaluations_per_minute']:.1f} | {x['median_seconds_per_ok_candidate']:.2f} | "
                         f"{x['best_proxy']:.2f} | `{x['best_function']}` |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
