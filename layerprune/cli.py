"""``layerprune`` command line: one sub-command per verb, each a thin layer over the Python API.

Bad input ends with one line on stderr and exit code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _write_json(path: str | None, data: dict, force: bool) -> None:
    if not path:
        return
    p = Path(path)
    if p.exists() and not force:
        raise UserError(f"{p} already exists: choose another path or pass --force to overwrite it")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1))


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (bfloat16/float16 mainly for GPUs)")
    p.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda (default: cuda when present)")
    p.add_argument("--no-cache", action="store_true", help="do not use the dequantized GGUF cache")


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for but no CUDA device is present: use --device cpu")
    return dev


def _load(args):
    from .models.loading import load_model

    model, tok = load_model(args.model, args.dtype, use_cache=not args.no_cache)
    return model.to(_device(args.device)), tok


def cmd_info(args) -> int:
    from .models.info import model_info

    model, _ = _load(args)
    info = model_info(model)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for k, v in info.items():
        if k == "block_linear_shapes":
            print("block linear shapes [out, in]:")
            for name, shape in v.items():
                print(f"  {name:28s} {shape}")
        elif k == "block_sparsity":
            print("block sparsity: " + " ".join(f"{x:.3f}" for x in v))
        else:
            print(f"{k}: {v}")
    return 0


def cmd_eval(args) -> int:
    from .data.corpora import resolve_data_dir
    from .evaluation.perplexity import evaluate_ppl
    from .models.info import measure_sparsity

    datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
    data_dir = resolve_data_dir(args.data_dir)
    if args.out and Path(args.out).exists() and not args.force:
        raise UserError(f"{args.out} already exists: choose another path or pass --force to overwrite it")
    model, tok = _load(args)
    sparsity = measure_sparsity(model)["overall"]
    results = []
    for ds in datasets:
        r = evaluate_ppl(model, tok, ds, args.seqlen, data_dir, args.max_windows, args.batch_size)
        row = {"model": args.model, **r.to_dict(), "sparsity": sparsity}
        results.append(row)
        print(f"{ds:16s} seqlen {r.seqlen:5d}  windows {r.windows:4d}  ppl {r.ppl:10.3f}  "
              f"({r.seconds:.1f}s, sparsity {sparsity:.4f})")
    _write_json(args.out, {"results": results}, args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="layerprune", description="Layer-wise pruning of causal LMs, with honest numbers.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("info", help="architecture, blocks, parameters, linear shapes, sparsity")
    s.add_argument("model", help="built-in name (smollm2-135m), .gguf file, model directory or hub id")
    s.add_argument("--json", action="store_true")
    _common_model_args(s)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("eval", help="perplexity with the papers' protocol")
    s.add_argument("model", help="built-in name, .gguf file, model or run directory, or hub id")
    s.add_argument("--dataset", default="wikitext2",
                   help="comma list of wikitext2, ptb, c4, wikitext2-valid, ptb-valid, or a .txt/.jsonl path")
    s.add_argument("--seqlen", type=int, default=None, help="window length (default 2048, capped at the model's maximum)")
    s.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--data-dir", default=None, help="data directory (default: $LAYERPRUNE_DATA or ../shared/data)")
    s.add_argument("--out", default=None, help="write the results as JSON here")
    s.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _common_model_args(s)
    s.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
        if not args.verbose:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        return args.func(args)
    except UserError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
