"""``--allocation auto`` under the full protocol: what it chose, its cost against the pruning run, the test PPL.

Cost: auto's whole wall time, and what it adds to the command: its dense pass over the calibration is the run's
allocation pre-pass (the run is given its statistics and skips it), so the command takes
``auto - dense_pass + pruning`` against ``dense_pass + pruning`` for the same allocation given by hand.

SmolLM2-135M, calibration 32 x 512 C4 pool seed 0, WikiText-2 test 40 x 512. Writes bench/results/auto/<method>_<S>.json
(the record's ``allocation_auto``: every candidate with its proxy value, the choice and why; timings; test PPL).

    OMP_NUM_THREADS=1 python -m bench.auto_eval --method wanda --sparsity 0.7
"""
from __future__ import annotations

import argparse
import time

import torch

from layerprune import load_model, prune

from .common import MODEL, RESULTS, calibration, cmdline, wikitext_ppl, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--proxy", default=None, help="auto's proxy (default: the library's)")
    ap.add_argument("--finalists", type=int, default=None, help="auto's finalists (default: the library's)")
    ap.add_argument("--margin", type=float, default=None, help="auto's margin (default: the library's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(MODEL, "float32")
    calib = calibration(tok)
    t0 = time.perf_counter()
    rec = prune(model, tok, method=args.method, sparsity=args.sparsity, allocation="auto",
                allocation_options={k: v for k, v in (("proxy", args.proxy), ("finalists", args.finalists),
                                                               ("margin", args.margin))
                                    if v is not None}, calibration=calib, progress=False)
    total = time.perf_counter() - t0
    ppl = wikitext_ppl(model, tok)
    t = rec["timings"]
    auto = rec["allocation_auto"]
    out = {"command": cmdline(), "method": args.method, "sparsity": args.sparsity, "test_ppl": ppl,
           "chosen": auto["chosen"], "reason": auto["reason"], "proxy": auto["proxy"],
           "tried": [{k: r.get(k) for k in ("label", "spec", "options", "screen", "value", "spread", "seconds",
                                            "error")}
                     for r in auto["tried"]],
           "screen": auto.get("screen"), "block_sparsity": rec["allocation"]["block"],
           "seconds": {"auto_choice": t["auto_choice"], **{f"auto_{k}": v for k, v in auto["seconds"].items()},
                       "pruning": t["total"], "all": total},
           "auto_cost_vs_pruning": t["auto_choice"] / t["total"],
           "auto_cost_vs_pruning_with_prepass": t["auto_choice"] / (t["total"] + auto["seconds"]["dense_pass"]),
           "auto_added_vs_pruning": (t["auto_choice"] - auto["seconds"]["dense_pass"]) / t["total"],
           "threads": torch.get_num_threads()}
    tag = (f"{args.method}_{round(args.sparsity * 100)}" + (f"_{args.proxy}" if args.proxy else "")
           + (f"_f{args.finalists}" if args.finalists is not None else "")
           + (f"_m{args.margin:g}" if args.margin is not None else ""))
    write_json(RESULTS / "auto" / f"{tag}.json", out)
    print(f"{tag}: chose {auto['chosen']} ({auto['reason']}); test PPL {ppl:.2f}; auto {t['auto_choice']:.0f}s "
          f"(dense pass {auto['seconds']['dense_pass']:.0f}s, the run's pre-pass) vs pruning {t['total']:.0f}s: "
          f"{out['auto_cost_vs_pruning']:.2f}x whole, {out['auto_cost_vs_pruning_with_prepass']:.2f}x of the run "
          f"with its "
          f"pre-pass, {out['auto_added_vs_pruning']:.2f}x added")


if __name__ == "__main__":
    main()
