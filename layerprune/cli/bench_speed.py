"""``layerprune bench-speed``: prefill latency and decode tokens/s of a pruned run vs its dense model."""
from __future__ import annotations

import json

from layerprune.cli.common import _positive, _examples, DTYPES
from layerprune.outputs import prepare_file, write_json


def add_parser(sub) -> None:
    s = sub.add_parser("bench-speed", help="prefill latency and decode tokens/s of a pruned run vs its dense model",
                       epilog=_examples("layerprune bench-speed runs/slim50 --out runs/slim50-speed.json"))
    s.add_argument("run_dir", help="the --out of a prune run")
    s.add_argument("--dense", default=None, help="dense model to compare with (default: the run record's model)")
    s.add_argument("--prefill-tokens", type=_positive, default=512, help="prefill length, batch 1")
    s.add_argument("--new-tokens", type=_positive, default=128, help="greedy decode steps")
    s.add_argument("--prompt-tokens", type=_positive, default=32, help="prompt before decoding (not timed)")
    s.add_argument("--repeats", type=_positive, default=5, help="timed runs per model (medians are reported)")
    s.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    s.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype for both models")
    s.add_argument("--out", default=None, help="also write the JSON here")
    s.add_argument("--force", action="store_true", help="replace --out if layerprune wrote it")
    s.set_defaults(func=run)


def run(args) -> int:
    from layerprune.speed import bench_speed

    out_json = prepare_file(args.out, args.force, inputs=[args.run_dir])
    res = bench_speed(args.run_dir, dense=args.dense, prefill_tokens=args.prefill_tokens, new_tokens=args.new_tokens,
                      prompt_tokens=args.prompt_tokens, repeats=args.repeats, threads=args.threads, dtype=args.dtype)
    print(json.dumps(res, indent=1))
    write_json(out_json, res)
    return 0
