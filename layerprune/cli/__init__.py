"""``layerprune`` command line: one sub-command per module, each a thin layer over the Python API with
``add_parser(sub)`` and ``run(args)``.

Bad input ends with one line on stderr and exit code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from layerprune.cli import bench_speed, demo, export, fed, finetune, info, plot, prune, search_allocation
from layerprune.cli import eval as eval_
from layerprune.cli.common import _examples, _Parser
from layerprune.errors import UserError

# the order of --help
COMMANDS = (info, eval_, prune, bench_speed, export, finetune, plot, fed, demo, search_allocation)


def build_parser() -> argparse.ArgumentParser:
    from importlib import metadata

    p = _Parser(prog="layerprune", description="Layer-wise pruning of causal LMs, with honest numbers.",
                epilog=_examples(
                    "layerprune demo   # dense vs Wanda 50% vs Wanda 50% + DLP on SmolLM2: a few minutes on a CPU",
                    "layerprune prune --method wanda --sparsity 0.5 --nsamples 32 --seqlen 512 --max-windows 40 "
                    "--out runs/wanda50   # minutes",
                    "layerprune eval runs/wanda50   # with the run's own evaluation settings",
                    "layerprune prune --method wanda --sparsity 0.5 --out runs/wanda50-paper   # the papers' protocol "
                    "(128 x 2048 calibration, every 2048-token window): over 25 min on a CPU"))
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO (and Flower's DEBUG) messages")
    try:
        version = metadata.version("layerprune")
    except metadata.PackageNotFoundError:
        version = "unknown"
    p.add_argument("--version", action="version", version=f"layerprune {version}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        args.command_line = shlex.join(["layerprune", *(sys.argv[1:] if argv is None else argv)])  # for run records
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
        if not args.verbose:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()  # ours (blocks, windows) stay; loading/saving bars go
        return args.func(args)
    except UserError as e:
        if _speaks(e):
            print(f"layerprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerprune: interrupted", file=sys.stderr)
        return 130
    finally:
        if "layerprune.distributed" in sys.modules:
            sys.modules["layerprune.distributed"].shutdown()


def _speaks(e: UserError) -> bool:
    """On N processes rank 0 prints every error; another rank only its own, once the engine has begun (a refusal
    every rank raises alike, or one rank 0 already reported, stays quiet there)."""
    dist = sys.modules.get("layerprune.distributed")
    world = dist.current() if dist else None
    return world is None or world.rank == 0 or (world.started and not isinstance(e, dist.Shared))


__all__ = ["main", "build_parser", "COMMANDS"]
