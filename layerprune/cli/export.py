"""``layerprune export``: write a run (or any model layerprune loads) for another runtime; ``--to gguf`` gives a
llama.cpp GGUF file (``layerprune/export/gguf.py``)."""
from __future__ import annotations

from layerprune.cli.common import _examples


def add_parser(sub) -> None:
    s = sub.add_parser("export", help="write a run as a llama.cpp GGUF file",
                       epilog=_examples("layerprune export runs/slim50 --to gguf --type f16",
                                        "layerprune export runs/wanda24 --to gguf --type q8_0 --out wanda24.gguf",
                                        "layerprune export smollm2-135m --to gguf --type f16 --out dense-f16.gguf"))
    s.add_argument("run", metavar="RUN", help="a run directory (or any model: built-in name, .gguf, model dir)")
    s.add_argument("--to", default="gguf", choices=["gguf"], help="output format (llama.cpp's GGUF)")
    s.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"],
                   help="tensor type (1-D tensors stay f32; a q8_0 weight with rows not a multiple of 32 stays f16)")
    s.add_argument("--align", type=int, default=32,
                   help="pad each block's FFN width with zero channels to a multiple of this (exact; llama.cpp's fast "
                        "CPU matmul and q8_0 need multiples of 16/32; SlimGPT widths are arbitrary); 1: as they are")
    s.add_argument("--out", default=None, help="output .gguf file (default RUN/model-TYPE.gguf for a run directory)")
    s.add_argument("--force", action="store_true", help="replace --out if layerprune wrote it")
    s.set_defaults(func=run)


def run(args) -> int:
    import time

    from layerprune.export.gguf import export

    t0 = time.time()
    info = export(args.run, args.type, args.out, args.force, align=args.align)
    types = ", ".join(f"{n} {k}" for k, n in sorted(info["tensors"].items()))
    print(f"wrote {info['out']} ({info['bytes'] / 2**20:.1f} MiB, architecture {info['architecture']}, tensors: "
          f"{types}; tokenizer {info['tokenizer']}"
          + (f"; {info['ffn_channels_padded']} zero FFN channels to multiples of {info['align']}"
             if info["ffn_channels_padded"] else "") + f") in {time.time() - t0:.1f} s")
    return 0
