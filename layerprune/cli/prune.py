"""``layerprune prune``: prune a model block by block and save it with a run record.

The method and allocation flags are not written here: each registered solver and allocator declares its options
(layerprune.registry) and they become flags, grouped per method in ``layerprune prune --help``.
"""
from __future__ import annotations

from pathlib import Path

from layerprune.allocation import ALLOCATORS, split_spec
from layerprune.cli.common import (DATA_DIR_HELP, DTYPES, _common_model_args, _examples, _method_flags, _method_list,
                                   _method_options, _positive, _table, calibration_args)
from layerprune.cli import recipe
from layerprune.recipe import RECIPE_NAME, dump
from layerprune.reconstruct import RECONSTRUCTORS
from layerprune.config import CHECKPOINT_EVERY_S
from layerprune.solvers import SOLVER_REGISTRY

QUICK = "--nsamples 32 --seqlen 512 --max-windows 40"  # the help's examples: minutes on a CPU
_REGISTRIES = {"solver_options": SOLVER_REGISTRY, "allocation_options": ALLOCATORS,  # recipe sections
               "reconstruct_options": RECONSTRUCTORS}


def add_parser(sub) -> None:
    s = sub.add_parser("prune", help="prune a model block by block and save it with a run record",
                       epilog=_examples(
                           "# SmolLM2-135M on a CPU: minutes with 32 x 512 calibration and 40 evaluation windows, over",
                           "# 25 min with the defaults, the papers' protocol (128 x 2048, every 2048-token window)",
                           f"layerprune prune --method wanda --sparsity 0.5 {QUICK} --out runs/wanda50",
                           f"layerprune prune --method sparsegpt --nm 2:4 {QUICK} --out runs/sgpt24",
                           f"layerprune prune --method wanda --sparsity 0.7 --allocation dlp {QUICK} --out runs/dlp70",
                           f"layerprune prune --method slimgpt --sparsity 0.5 --allocation ipr-log {QUICK} "
                           "--out runs/slim50",
                           "layerprune prune --method wanda --sparsity 0.5 --out runs/wanda50-paper   # paper protocol",
                           f"layerprune prune --method wanda --sparsity 0.7 --reconstruct block {QUICK} "
                           "--out runs/wanda70rb",
                           "layerprune prune ... --out runs/wanda50 --resume   # after an interruption",
                           "layerprune prune --recipe runs/wanda50/recipe.yaml --out runs/again   # rerun a run",
                           "layerprune prune --recipe runs/wanda50/recipe.yaml --seed 1 --out runs/seed1",
                           "torchrun --nproc-per-node 4 -m layerprune prune --method sparsegpt --out runs/sgpt50   "
                           "# 4 processes (docs/distributed.md)"))
    s.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub id")
    s.add_argument("--method", default="wanda", help=_method_list(SOLVER_REGISTRY))
    s.add_argument("--sparsity", type=float, default=None,
                   help="global target sparsity in [0, 1) (default 0.5; with --nm it is N/M)")
    s.add_argument("--nm", default=None, help="N:M semi-structured pattern, N pruned of every M (e.g. 2:4)")
    s.add_argument("--allocation", default="uniform", help=_method_list(ALLOCATORS, last=", "))
    s.add_argument("--recipe", default=None,
                   help="take every setting from this recipe.yaml (written into each run directory); flags given "
                        "here override it; --out, --data-dir and --device never come from a recipe")
    _run_dir_args(s)
    s.add_argument("--eval", default="wikitext2", help="comma list of datasets to evaluate before/after ('' for none)")
    s.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window length (default: --seqlen)")
    s.add_argument("--max-windows", type=_positive, default=None, help="evaluate only the first N windows")
    s.add_argument("--no-dense-eval", action="store_true", help="skip evaluating the dense model first")
    s.add_argument("--batch-size", type=_positive, default=8, help="calibration windows per forward")
    s.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                   help="where activations (and idle blocks with disk) live")
    s.add_argument("--compute-dtype", default="float32", choices=DTYPES,
                   help="dtype of the forward passes (statistics and solves stay fp32)")
    s.add_argument("--save-dtype", default="auto", choices=["auto"] + DTYPES,
                   help="dtype of the saved weights; auto: the input checkpoint's (a bf16 model stays bf16), "
                        "else --dtype")
    s.add_argument("--true-sequential", action="store_true", help="prune q/k/v, o, gate/up, down in turn")
    s.add_argument("--skip", default=None, help="comma list of linear names left dense, e.g. mlp.down_proj")
    s.add_argument("--reconstruct", default="none", choices=list(RECONSTRUCTORS),
                   help="after each block's solve: " + _method_list(RECONSTRUCTORS))
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    _common_model_args(s)
    calibration_args(s)
    _method_flags(s, SOLVER_REGISTRY)
    _method_flags(s, ALLOCATORS)
    _method_flags(s, RECONSTRUCTORS)
    s.set_defaults(func=run, prune_parser=s)


def _run_dir_args(s) -> None:
    """The run directory: where, whether to replace or continue it, and its resume state."""
    s.add_argument("--out", required=True, help="run directory to write (weights + layerprune.json + recipe.yaml)")
    s.add_argument("--force", action="store_true",
                   help="replace --out if it holds a layerprune run (written beside it, swapped in at the end)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument("--checkpoint", default=None, choices=["full", "weights", "none"],
                   help="resume state kept in --out after each block: full (pruned block + next inputs), weights "
                        "(pruned block; a resume reruns the finished blocks) or none (default: full on a CPU, weights "
                        "on a GPU)")
    s.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY_S, metavar="SECONDS",
                   help="commit the resume state at most this often (default %(default)g s: a resume redoes at most "
                        "about that much; 0: after every block)")


def run(args) -> int:
    from layerprune import api

    record = api.run_prune(config_from_args(args))
    if record is not None:  # None: a rank other than 0 of a torchrun launch (rank 0 reports)
        print(summary(record, args.out))
    return 0


def config_from_args(args):
    """The RunConfig of the parsed flags (a recipe's settings filled in where no flag was given), validated once."""
    from layerprune.config import PruneConfig, RunConfig

    if args.recipe:
        recipe.apply(args.recipe, args, args.prune_parser, _REGISTRIES)
    cfg = PruneConfig(method=args.method, sparsity=args.sparsity, nm=args.nm, allocation=args.allocation,
                      allocation_options=_method_options(ALLOCATORS, "--allocation", split_spec(args.allocation)[0],
                                                         args),
                      solver_options=_method_options(SOLVER_REGISTRY, "--method", args.method, args),
                      offload=args.offload, compute_dtype=args.compute_dtype, batch_size=args.batch_size,
                      true_sequential=args.true_sequential, skip=args.skip or (), calib=args.calib,
                      nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, reconstruct=args.reconstruct,
                      reconstruct_options=_method_options(RECONSTRUCTORS, "--reconstruct", args.reconstruct, args))
    parent = None
    if args.recipe and "model" not in getattr(args, "explicit_dests", set()):
        parent = recipe.parent_of(args.recipe)  # a chained recipe: its earlier steps run first, into OUT.parent
    return RunConfig(model=args.model, out=args.out, prune=cfg, dtype=args.dtype, save_dtype=args.save_dtype,
                     eval=args.eval, eval_seqlen=args.eval_seqlen, max_windows=args.max_windows,
                     dense_eval=not args.no_dense_eval, device=args.device, data_dir=args.data_dir,
                     use_cache=not args.no_cache, force=args.force, resume=args.resume, checkpoint=args.checkpoint,
                     checkpoint_every=args.checkpoint_every,
                     command_line=getattr(args, "command_line", None), inputs=(args.recipe,) if args.recipe else (),
                     parent=None if parent is None else _parent_config(args, parent)).validate()


def _parent_config(args, parent: dict):
    """The RunConfig of a chained recipe's parent step (parsed like ``--recipe`` itself), written to ``OUT.parent``;
    where and how it runs (data, device, force, cache) as this run's flags say."""
    import tempfile

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / RECIPE_NAME
        path.write_text(dump(parent), encoding="utf-8")
        argv = ["--recipe", str(path), "--out", str(out.with_name(out.name + ".parent"))]
        argv += ["--data-dir", args.data_dir] if args.data_dir else []
        argv += ["--device", args.device] if args.device else []
        argv += ["--force"] if args.force else []
        argv += ["--no-cache"] if args.no_cache else []
        step = config_from_args(args.prune_parser.parse_args(argv))
    step.inputs, step.replays = (), parent
    return step


def summary(record: dict, out) -> str:
    """What ``layerprune prune`` prints at the end: the before/after table and the run's figures."""
    label = f"{record['method']} {record['api_call']['allocation']}" + (
        f" {record['api_call']['nm']}" if record["nm"] else "")
    before, after = record["eval"]["before"], record["eval"]["after"]
    datasets = list(after)
    params = record["params"]
    structured = params["after"] != params["before"]  # the model got smaller; sparsity says nothing
    if structured:
        rows = [{"model": "dense", "params": params["before"], "ratio": 1.0},
                {"model": label, "params": params["after"], "ratio": params["after"] / params["before"]}]
        cols = [("model", "model"), ("params", "params"), ("params ratio", "ratio")]
    else:
        rows = [{"model": "dense", "sparsity": record.get("dense_sparsity")},
                {"model": label, "sparsity": record["measured_sparsity"]}]
        cols = [("model", "model"), ("sparsity", "sparsity")]
    for row, ev in zip(rows, (before, after)):
        row.update({ds: r["ppl"] for ds, r in ev.items()})
    lines = [_table(rows, cols + [(f"{ds} ppl", ds) for ds in datasets])]
    if datasets:
        lines.append("BOS per evaluation window: " + ("yes" if any(r.get("bos") for r in after.values()) else "no")
                     + f"; per calibration window: {'yes' if record['calibration'].get('bos') else 'no'}")
    if structured:
        ratio = params["after"] / params["before"]
        lines.append(f"parameters {params['before']:,} -> {params['after']:,} ({ratio:.3f}x, {1 - ratio:.1%} removed)")
    if record.get("depth"):
        d = record["depth"]
        lines.append(f"removed blocks {d['removed']} of {d['blocks_before']} by {d['criterion']} "
                     f"({d['removed_fraction']:.1%} of the block parameters); the criterion took "
                     f"{d['cost']['forward_passes']} forward passes, {d['cost']['seconds']:.1f}s")
    if "allocation_auto" in record:
        from layerprune.search.auto import summary as auto_summary

        lines.append(f"allocation auto: {auto_summary(record['allocation_auto'])}")
    t = record["timings"]
    lines.append(f"pruned in {t['total']:.1f}s (" + ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if k != "total")
                 + f"); saved to {out} in {record['saved']['dtype']}")
    if "quantization" in record:
        q, mib = record["quantization"], 2 ** 20
        lines.append(f"theoretical size, {q['bits']}-bit groupsize {q['groupsize']} (block linears; the rest fp16): "
                     f"fp16 {q['dense_fp16'] / mib:.1f} MiB, quantized {q['quantized'] / mib:.1f} MiB, "
                     f"sparse+quantized {q['sparse_quantized'] / mib:.1f} MiB ({q['sparse_quantized_ratio']:.3f}x)")
    return "\n".join(lines)
