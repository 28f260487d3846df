"""``layerprune plot``: per-block target vs achieved sparsity of one or more runs (PNG); depth runs also get every
block's criterion value with the removed blocks marked."""
from __future__ import annotations

from pathlib import Path

from layerprune.cli.common import _examples
from layerprune.outputs import prepare_file


def add_parser(sub) -> None:
    s = sub.add_parser("plot", help="per-block target vs achieved sparsity of one or more runs (PNG); "
                                    "depth runs: criterion per block",
                       epilog=_examples("layerprune plot runs/wanda70 runs/dlp70 --out runs/compare.png"))
    s.add_argument("run_dirs", nargs="+", help="run directories (each has layerprune.json)")
    s.add_argument("--out", default=None, help="PNG path (default RUN_DIR/block_sparsity.png)")
    s.add_argument("--force", action="store_true", help="replace --out if layerprune wrote it")
    s.set_defaults(func=run)


def run(args) -> int:
    from layerprune.plots import plot_block_sparsity
    from layerprune.record import read_record

    records = {Path(d).name: read_record(Path(d)) for d in args.run_dirs}
    out = prepare_file(Path(args.out) if args.out else Path(args.run_dirs[0]) / "block_sparsity.png", args.force)
    print(plot_block_sparsity(records, out))
    return 0
