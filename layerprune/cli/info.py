"""``layerprune info``: architecture, blocks, parameters, linear shapes, sparsity."""
from __future__ import annotations

import json

from layerprune.cli.common import _examples, _common_model_args, _model_arg, _model_spec, _load


def add_parser(sub) -> None:
    s = sub.add_parser("info", help="architecture, blocks, parameters, linear shapes, sparsity",
                       epilog=_examples("layerprune info smollm2-135m", "layerprune info runs/wanda50 --json"))
    _model_arg(s, "built-in name (smollm2-135m), .gguf file, model or run directory, or hub id")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    _common_model_args(s)
    s.set_defaults(func=run)


def run(args) -> int:
    from layerprune.models.info import model_info

    _model_spec(args)
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
