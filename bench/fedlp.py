"""FedLP on a small real model: FedAvg vs FedLP-Homo(p) vs FedLP-Hetero(u), PPL vs measured communication.

    python -m bench.fedlp --quick            # ~2-4 min on 2 CPU cores (SmolLM2-135M cut to 2 blocks)
    python -m bench.fedlp                    # the default experiment (see FULL below)

Writes bench/results/fedlp.json (one record per scheme, as run_federated returns it), fedlp.md (table)
and fedlp.png (PPL vs cumulative MiB). Each scheme starts its own Flower simulation (Ray, ~20 s).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

from layerprune.federated.run import FedConfig, load, plot, run_federated

from .common import MODEL, RESULTS, code_line, write_json

QUICK = dict(num_blocks=2, clients=4, rounds=2, local_steps=2, batch_size=2, seqlen=64, eval_seqlen=128,
             eval_windows=4, max_client_tokens=4000, fail_clients=(3,))
FULL = dict(num_blocks=6, clients=6, rounds=5, local_steps=4, batch_size=2, seqlen=128, eval_seqlen=256,
            eval_windows=16, max_client_tokens=20000)
MEDIUM = dict(num_blocks=4, clients=6, rounds=4, local_steps=3, batch_size=2, seqlen=128, eval_seqlen=256,
              eval_windows=8, max_client_tokens=10000)
RUNS = {"fedavg": dict(scheme="fedavg"), "homo0.5": dict(scheme="homo", keep_prob=0.5),
        "homo0.7": dict(scheme="homo", keep_prob=0.7), "homo0.3": dict(scheme="homo", keep_prob=0.3),
        "hetero": dict(scheme="hetero", depth_flag=None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (2 blocks, 4 clients, 2 rounds, one failing client)")
    ap.add_argument("--medium", action="store_true",
                    help="4 blocks, 6 clients, 4 rounds (the committed table)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--num-blocks", type=int, default=None, help="override how many leading blocks to keep")
    ap.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--schemes", default="fedavg,homo0.5,homo0.7,hetero",
                    help="comma list out of fedavg, homo0.5, homo0.7, homo0.3, hetero")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    base = FedConfig(model=args.model, data_dir=args.data_dir, partition=args.partition, lr=1e-4,
                     **(QUICK if args.quick else MEDIUM if args.medium else FULL))
    if args.num_blocks:
        base = replace(base, num_blocks=args.num_blocks)
    t0 = time.time()
    model, tok = load(base)
    print(f"[fedlp bench] model loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    results = []
    for name in args.schemes.split(","):
        if name not in RUNS:
            raise SystemExit(f"unknown scheme {name!r}: use {', '.join(RUNS)}")
        cfg = replace(base, **RUNS[name])
        results.append(run_federated(cfg, copy.deepcopy(model), tok))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "fedlp.json", {"quick": args.quick, "medium": args.medium, "wall_s": round(time.time() - t0, 1),
                                    "runs": results}, default=str)
    plot(results, out / "fedlp.png")
    lines = ["| scheme | " + " | ".join(f"{k} PPL (start -> end)" for k in results[0]["summary"]["final_ppl"])
             + " | bytes / client / round (measured) | predicted fp32 bytes | vs FedAvg | wall s |",
             "|---|" + "---|" * (len(results[0]["summary"]["final_ppl"]) + 4)]
    for r in results:
        c, s = r["config"], r["summary"]
        name = c["scheme"] + (f"({c['keep_prob']})" if c["scheme"] == "homo" else "")
        name += f"({c['depth_flag'] or 'u'})" if c["scheme"] == "hetero" else ""
        ppl = " | ".join(f"{s['initial_ppl'][k]:.2f} -> {v:.2f}" for k, v in s["final_ppl"].items())
        lines.append(f"| {name} | {ppl} | {s['mean_bytes_per_client_round']:,.0f} | "
                     f"{s['predicted_fp32_bytes_per_client_round']:,.0f} | {s['bytes_ratio_vs_fedavg']:.3f} | "
                     f"{s['wall_s']} |")
    cfg = results[0]["config"]
    head = (f"# FedLP on {cfg['model']} (first {cfg['num_blocks']} blocks), {cfg['clients']} clients, "
            f"{cfg['rounds']} rounds, "
            f"{cfg['partition']} shards, {cfg['local_steps']} AdamW steps x {cfg['batch_size']} x {cfg['seqlen']} "
            f"tokens"
            f"{' (quick)' if args.quick else ' (medium)' if args.medium else ''}\n\n"
            f"Failing clients: {list(cfg['fail_clients']) or 'none'}. "
            "Bytes are the serialized ArrayRecords (download + upload) per sampled client per round. "
            f"{code_line()}\n\n")
    (out / "fedlp.md").write_text(head + "\n".join(lines) + "\n")
    print((out / "fedlp.md").read_text())


if __name__ == "__main__":
    main()
