"""``layerprune prune``: prune a model block by block and save it with a run record.

The method and allocation flags are not written here: each registered solver and allocator declares its options
(layerprune.registry) and they become flags, grouped per method in ``layerprune prune --help``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from layerprune import distributed
from layerprune.allocation import ALLOCATORS, get_allocator, split_spec
from layerprune.cli.common import (DATA_DIR_HELP, DTYPES, _common_model_args, _device, _eval_all, _examples, _load,
                                   _method_flags, _method_list, _method_options, _positive, _table)
from layerprune.cli import recipe
from layerprune.errors import UserError
from layerprune.reconstruct import RECONSTRUCTORS
from layerprune.solvers import SOLVER_REGISTRY

_REGISTRIES = {"solver_options": SOLVER_REGISTRY, "allocation_options": ALLOCATORS,  # recipe sections
               "reconstruct_options": RECONSTRUCTORS}


def add_parser(sub) -> None:
    s = sub.add_parser("prune", help="prune a model block by block and save it with a run record",
                       epilog=_examples(
                           "layerprune prune --method wanda --sparsity 0.5 --out runs/wanda50",
                           "layerprune prune --method sparsegpt --nm 2:4 --nsamples 32 --seqlen 512 --out runs/sgpt24",
                           "layerprune prune --method wanda --sparsity 0.7 --allocation dlp --out runs/dlp70",
                           "layerprune prune --method slimgpt --sparsity 0.5 --allocation ipr-log --out runs/slim50",
                           "layerprune prune --method wanda --sparsity 0.7 --reconstruct block --out runs/wanda70rb",
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
    s.add_argument("--nsamples", type=_positive, default=128, help="calibration windows")
    s.add_argument("--seqlen", type=int, default=None, help="calibration window length (default 2048, capped)")
    s.add_argument("--calib", default="c4", help="c4 (pool: docs 1000-1999), wikitext2-valid, ptb-valid or a file")
    s.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    s.add_argument("--recipe", default=None,
                   help="take every setting from this recipe.yaml (written into each run directory); flags given "
                        "here override it; --out, --data-dir and --device never come from a recipe")
    s.add_argument("--out", required=True, help="run directory to write (weights + layerprune.json + recipe.yaml)")
    s.add_argument("--force", action="store_true",
                   help="replace --out if it holds a layerprune run (written beside it, swapped in at the end)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument("--checkpoint", default=None, choices=["full", "weights", "none"],
                   help="resume state kept in --out after each block: full (pruned block + next inputs; the CPU "
                        "default), weights (pruned block; a resume reruns the finished blocks; the GPU default), none")
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
    _method_flags(s, SOLVER_REGISTRY)
    _method_flags(s, ALLOCATORS)
    _method_flags(s, RECONSTRUCTORS)
    s.set_defaults(func=run, prune_parser=s)


def run(args) -> int:
    from layerprune import api
    from layerprune.data.corpora import resolve_data_dir
    from layerprune.engine import DTYPES, PruneConfig, preflight
    from layerprune.evaluation.perplexity import check_seqlen
    from layerprune.models.info import measure_sparsity
    from layerprune.models.loading import load_skeleton
    from layerprune.outputs import RECORD_NAME, check_free_space, finish_dir, prepare_dir, run_disk_need, write_text
    from layerprune.record import parent_summary, read_record, save_dtype, save_run, write_record
    from layerprune.solvers.nm import parse_nm

    # 1. everything that needs no model, then what the model's config alone tells: before any load or write
    if args.recipe:
        recipe.apply(args.recipe, args, args.prune_parser, _REGISTRIES)
    if args.resume and args.force:
        raise UserError("--resume continues the run in --out and --force starts it over: pass one of them")
    nm = parse_nm(args.nm) if args.nm else None
    solver_opts = _method_options(SOLVER_REGISTRY, "--method", args.method, args)
    alloc_opts = _method_options(ALLOCATORS, "--allocation", split_spec(args.allocation)[0], args)
    get_allocator(args.allocation, **alloc_opts)
    recon_opts = _method_options(RECONSTRUCTORS, "--reconstruct", args.reconstruct, args)
    cfg = PruneConfig(method=args.method, sparsity=args.sparsity, nm=nm, allocation=args.allocation,
                      allocation_options=alloc_opts, solver_options=solver_opts, offload=args.offload,
                      compute_dtype=args.compute_dtype, batch_size=args.batch_size,
                      true_sequential=args.true_sequential, skip=tuple(s for s in (args.skip or "").split(",") if s),
                      reconstruct=args.reconstruct, reconstruct_options=recon_opts)
    cfg.validate()
    device = _device(args.device)
    world = distributed.current()
    if distributed.launched():  # torchrun: N processes, each on its shard of the calibration windows
        world.check(cfg, args.nsamples)
        world = distributed.init(device)
        device = world.device
        if world.rank:  # logs, progress, evaluation and every write: rank 0
            logging.getLogger().setLevel(logging.ERROR)
    lead = world.rank == 0
    data_dir = resolve_data_dir(args.data_dir)
    datasets = [d.strip() for d in args.eval.split(",") if d.strip()] if args.eval else []
    out = Path(args.out)
    if lead:
        prepare_dir(out, args.force, args.resume, inputs=[args.model, args.recipe], create=False)
    if args.recipe and "model" not in getattr(args, "explicit_dests", set()):
        parent = recipe.parent_of(args.recipe)
        if parent is not None:  # a chained recipe: its earlier steps first, into OUT.parent
            args.model = _replay_parent(args, parent, out)
    skeleton = load_skeleton(args.model, args.dtype)
    if skeleton is not None:
        preflight(skeleton, cfg)
        del skeleton

    # 2. load, draw the calibration windows, check the disk, then write
    store = None
    if args.offload == "disk":  # idle blocks stay on disk from load to save
        from layerprune.offload import load_model_lazy

        model, tok, store = load_model_lazy(args.model, args.dtype)
    else:
        model, tok = _load(args, to_device=False)  # in CPU RAM: the engine moves one block at a time to `device`
    preflight(model, cfg)  # again, for a model whose config was not at hand before the load
    seqlen = check_seqlen(model, args.seqlen)
    eval_seqlen = check_seqlen(model, args.eval_seqlen or seqlen)
    calib = api.calibration_set(tok, args.calib, args.nsamples, seqlen, args.seed, data_dir)
    need_out = run_disk_need(model, args.nsamples, seqlen, DTYPES[args.compute_dtype], args.offload)
    work = out  # another rank writes nothing: the engine only needs to know that rank 0 checkpoints
    if lead:
        work = prepare_dir(out, args.force, args.resume, inputs=[args.model, args.recipe], create=False)
        check_free_space(work, need_out - _du(work), "the checkpoint and the saved run")
        work = prepare_dir(out, args.force, args.resume, inputs=[args.model, args.recipe])
    if store is not None and lead:  # pruned blocks go straight to their final shards in the run directory
        store.bind(work, save_dtype(model, args.save_dtype))

    lazy = store is not None  # with disk offload the full model is never in memory: evaluate the saved run
    before = _eval_all(model, tok, datasets, eval_seqlen, data_dir, args.max_windows, args.batch_size, device) \
        if datasets and not args.no_dense_eval and not lazy and lead else {}
    dense_sparsity = None if lazy else measure_sparsity(model)["overall"]
    record = api.prune(model, tok, method=args.method, sparsity=args.sparsity, nm=nm, allocation=args.allocation,
                       allocation_options=alloc_opts, solver_options=solver_opts, calibration=calib,
                       calib=args.calib, device=device, offload=args.offload, compute_dtype=args.compute_dtype,
                       true_sequential=args.true_sequential, batch_size=args.batch_size, skip=cfg.skip,
                       out_dir=work, resume=args.resume, store=store, data_dir=data_dir, checkpoint=args.checkpoint,
                       reconstruct=args.reconstruct, reconstruct_options=recon_opts)
    if not lead:
        return 0
    record["model"] = args.model
    record["command_line"] = getattr(args, "command_line", None)  # shown in the run's model card
    # the sparsity the run used; N:M sets it itself, and a run that records none (e.g. depth --drop) had none
    sparsity = args.sparsity if nm is not None or record["sparsity"] is None else cfg.sparsity
    resolved = {"model": _model_path(args.model), "allocation": _inline_user_file(args.allocation),
                "sparsity": sparsity, "seqlen": seqlen, "eval_seqlen": eval_seqlen,
                "save_dtype": str(save_dtype(model, args.save_dtype)).removeprefix("torch.")}
    parent_dir = Path(args.model).expanduser()
    parent_recipe = None
    if (parent_dir / RECORD_NAME).is_file():  # pruned further: the record and the recipe chain the steps
        record["parent"] = parent_summary(read_record(parent_dir), parent_dir)
        parent_recipe = recipe.run_recipe(parent_dir)
        record["parent"]["recipe"] = parent_recipe is not None
    recipe_text = recipe.dump(recipe.build(args, _REGISTRIES, resolved, parent_recipe))
    if lazy:
        write_text(work / recipe.RECIPE_NAME, recipe_text)
        sp = store.measure_sparsity(model)  # one block at a time
        record["measured_sparsity"], record["measured_block_sparsity"] = sp["overall"], sp["per_block"]
        save_run(model, tok, work, record, store, dtype=args.save_dtype)
        finish_dir(work, out)
        if datasets or solver_opts.get("wbits") is not None:  # these need the whole pruned model in memory
            from layerprune.models.loading import load_model

            model, tok = load_model(str(out), args.dtype)
    if solver_opts.get("wbits") is not None:  # stored dequantized (fp32); this is what packed storage would take
        from layerprune.quant import model_size_bytes

        record["quantization"] = model_size_bytes(model, solver_opts["wbits"], solver_opts["groupsize"])
    after = _eval_all(model, tok, datasets, eval_seqlen, data_dir, args.max_windows, args.batch_size, device)
    record["eval"] = {"before": before, "after": after, "seqlen": eval_seqlen, "max_windows": args.max_windows}
    if lazy:
        write_record(out, record)
    else:
        write_text(work / recipe.RECIPE_NAME, recipe_text)
        save_run(model, tok, work, record, dtype=args.save_dtype)
        finish_dir(work, out)

    label = f"{args.method} {args.allocation}" + (f" {args.nm}" if args.nm else "")
    params = record["params"]
    if params["after"] != params["before"]:  # structured: the model got smaller; sparsity says nothing
        rows = [{"model": "dense", "params": params["before"], "ratio": 1.0},
                {"model": label, "params": params["after"], "ratio": params["after"] / params["before"]}]
        cols = [("model", "model"), ("params", "params"), ("params ratio", "ratio")]
    else:
        rows = [{"model": "dense", "sparsity": dense_sparsity}, {"model": label, "sparsity": record["measured_sparsity"]}]
        cols = [("model", "model"), ("sparsity", "sparsity")]
    for row, ev in zip(rows, (before, after)):
        row.update({ds: r["ppl"] for ds, r in ev.items()})
    print(_table(rows, cols + [(f"{ds} ppl", ds) for ds in datasets]))
    if datasets:
        print("BOS per evaluation window: " + ("yes" if any(r.get("bos") for r in after.values()) else "no")
              + f"; per calibration window: {'yes' if calib.bos else 'no'}")
    if params["after"] != params["before"]:
        print(f"parameters {params['before']:,} -> {params['after']:,} "
              f"({params['after'] / params['before']:.3f}x, {1 - params['after'] / params['before']:.1%} removed)")
    if record.get("depth"):
        d = record["depth"]
        print(f"removed blocks {d['removed']} of {d['blocks_before']} by {d['criterion']} "
              f"({d['removed_fraction']:.1%} of the block parameters); the criterion took "
              f"{d['cost']['forward_passes']} forward passes, {d['cost']['seconds']:.1f}s")
    if "allocation_auto" in record:
        a = record["allocation_auto"]
        from layerprune.allocation.auto import summary

        print(f"allocation auto: {summary(a)}")
    t = record["timings"]
    print(f"pruned in {t['total']:.1f}s ("
          + ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if k != "total")
          + f"); saved to {out} in {record['saved']['dtype']}")
    if "quantization" in record:
        q, mib = record["quantization"], 2 ** 20
        print(f"theoretical size, {q['bits']}-bit groupsize {q['groupsize']} (block linears; the rest fp16): "
              f"fp16 {q['dense_fp16'] / mib:.1f} MiB, quantized {q['quantized'] / mib:.1f} MiB, "
              f"sparse+quantized {q['sparse_quantized'] / mib:.1f} MiB ({q['sparse_quantized_ratio']:.3f}x)")
    return 0


def _replay_parent(args, parent: dict, out: Path) -> str:
    """Run the parent recipe of a chained recipe into ``OUT.parent`` (or reuse the run there when it holds that
    recipe's result and --force is not given); returns that directory, the model of the next step."""
    import tempfile

    from layerprune.cli import main

    step = out.with_name(out.name + ".parent")
    have = recipe.run_recipe(step) if (step / "layerprune.json").is_file() else None
    same = lambda a, b: {k: v for k, v in a.items() if k != "model" or "parent" not in a} == \
        {k: v for k, v in b.items() if k != "model" or "parent" not in b}  # noqa: E731 (a replayed chain moves)
    if have is not None and not args.force and same(have, parent):
        print(f"reusing the parent step in {step} (it holds this recipe's parent run)")
        return str(step)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / recipe.RECIPE_NAME
        path.write_text(recipe.dump(parent), encoding="utf-8")
        argv = ["prune", "--recipe", str(path), "--out", str(step)]
        argv += ["--data-dir", args.data_dir] if args.data_dir else []
        argv += ["--device", args.device] if args.device else []
        argv += ["--force"] if args.force else []
        argv += ["--no-cache"] if args.no_cache else []
        print(f"replaying the recipe's parent step into {step}")
        rc = main(argv)
    if rc != 0:
        raise UserError(f"the parent step of --recipe {args.recipe} failed (exit {rc}, reason above); nothing was "
                        f"written to {out}")
    return str(step)


def _model_path(spec: str) -> str:
    """A local model path made absolute for the recipe (a recipe replays from any directory); names stay as given."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _inline_user_file(spec: str) -> str:
    """``user:FILE.json`` becomes ``user:0.4,0.5,...`` in the recipe, so the recipe holds the sparsities themselves."""
    from layerprune.allocation.user import parse_sparsities

    name, arg = split_spec(spec)
    if name == "user" and arg and Path(arg).is_file():
        return "user:" + ",".join(repr(v) for v in parse_sparsities(arg))
    return spec


def _du(folder: Path) -> int:
    """Bytes already under ``folder`` (a resumed run's checkpoint counts toward what it needs)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).is_dir() else 0
