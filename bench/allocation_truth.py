"""The full-protocol test PPL of one per-block allocation file (e.g. a level search's best_allocation.json).

Wanda (or --method) at the allocation's mean sparsity, calibration 32 x 512 C4 pool seed 0, WikiText-2 test 40 x 512,
fp32: the protocol of bench/auto_eval.py and bench/proxy_study.py's truth.

    python -m bench.allocation_truth bench/results/evopress/from_dlp.best_allocation.json --threads 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from layerprune import load_model, prune

from .common import MODEL, calibration, cmdline, wikitext_ppl, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("allocation", help="a JSON list or {\"block_sparsity\": [...]}")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="result JSON (default: next to the allocation, .truth.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.allocation)
    bs = json.loads(path.read_text())
    bs = bs["block_sparsity"] if isinstance(bs, dict) else bs
    model, tok = load_model(MODEL, "float32")
    prune(model, tok, method=args.method, sparsity=args.sparsity, allocation=f"user:{path}",
          calibration=calibration(tok), progress=False)
    ppl = wikitext_ppl(model, tok)
    out = Path(args.out) if args.out else path.with_name(path.name.replace(".json", "") + ".truth.json")
    write_json(out, {"command": cmdline(), "allocation": str(path), "method": args.method, "sparsity": args.sparsity,
                     "spread": max(bs) - min(bs), "test_ppl": ppl})
    print(f"{path}: test PPL {ppl:.2f}, spread {max(bs) - min(bs):.3f} -> {out}")


if __name__ == "__main__":
    main()
