"""``layerprune bench-speed``: prefill latency and decode tokens/s of a pruned run vs its dense model; with
``--sparse-kernels`` (CUDA) a 2:4 run's linears run on PyTorch's semi-structured sparse kernels."""
from __future__ import annotations

import json

from layerprune.cli.common import _positive, _examples, DTYPES
from layerprune.outputs import prepare_file, write_json


def add_parser(sub) -> None:
    s = sub.add_parser("bench-speed", help="prefill latency and decode tokens/s of a pruned run vs its dense model",
                       epilog=_examples("layerprune bench-speed runs/slim50 --out runs/slim50-speed.json",
                                        "layerprune bench-speed runs/wanda24 --device cuda --sparse-kernels "
                                        "--out runs/wanda24-sparse.json"))
    s.add_argument("run_dir", help="the --out of a prune run")
    s.add_argument("--dense", default=None, help="dense model to compare with (default: the run record's model)")
    s.add_argument("--prefill-tokens", type=_positive, default=512, help="prefill length, batch 1")
    s.add_argument("--new-tokens", type=_positive, default=128, help="greedy decode steps")
    s.add_argument("--prompt-tokens", type=_positive, default=32, help="prompt before decoding (not timed)")
    s.add_argument("--repeats", type=_positive, default=5, help="timed runs per model (medians are reported)")
    s.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    s.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weight dtype for both models (default: float32; bfloat16 with --sparse-kernels)")
    s.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: the CPU; cuda with --sparse-kernels)")
    s.add_argument("--sparse-kernels", action="store_true",
                   help="swap the run's 2:4 linears for torch semi-structured sparse tensors (CUDA, compute "
                        "capability >= 8.0, bf16/fp16) and time matmuls and prefill against the dense model")
    s.add_argument("--out", default=None, help="also write the JSON here")
    s.add_argument("--force", action="store_true", help="replace --out if layerprune wrote it")
    s.set_defaults(func=run)


def run(args) -> int:
    from layerprune.cli.common import _device
    from layerprune.errors import UserError

    out_json = prepare_file(args.out, args.force, inputs=[args.run_dir])
    if args.sparse_kernels:  # every refusal before a model is loaded
        from layerprune.record import read_record
        from layerprune.sparse_kernels import SPARSE_DTYPES, bench_sparse, check_device, check_record

        dtype = args.dtype or "bfloat16"
        if dtype not in SPARSE_DTYPES:
            raise UserError(f"--sparse-kernels runs in {' or '.join(SPARSE_DTYPES)}, not --dtype {dtype}: use "
                            "--dtype bfloat16")
        if args.threads is not None:
            raise UserError("--threads sets CPU threads; --sparse-kernels runs on the GPU: drop --threads")
        check_record(read_record(args.run_dir), args.run_dir)
        check_device(args.device)
        res = bench_sparse(args.run_dir, dense=args.dense, device=args.device, dtype=dtype,
                           prefill_tokens=args.prefill_tokens, new_tokens=args.new_tokens,
                           prompt_tokens=args.prompt_tokens, repeats=args.repeats)
    else:
        from layerprune.speed import bench_speed

        device = _device(args.device) if args.device else None
        res = bench_speed(args.run_dir, dense=args.dense, prefill_tokens=args.prefill_tokens,
                          new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                          threads=args.threads, dtype=args.dtype or "float32", device=device)
    print(json.dumps(res, indent=1))
    write_json(out_json, res)
    return 0
