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
from .outputs import prepare_file, write_json


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option shows its default; examples in the epilog keep their line breaks."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Help)
        super().__init__(*a, **kw)

    def error(self, message):  # one line, exit 2
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return n


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {x}" for x in lines)


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (bfloat16/float16 mainly for GPUs)")
    p.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda (default: cuda when present)")
    p.add_argument("--no-cache", action="store_true", help="do not use the dequantized GGUF cache")


def _model_arg(p: argparse.ArgumentParser, help: str) -> None:
    """The model as a positional argument or as --model (prune takes --model; both work everywhere)."""
    p.add_argument("model", nargs="?", default=None, help=help)
    p.add_argument("--model", dest="model_opt", default=None, metavar="MODEL", help="the same as the positional MODEL")


def _model_spec(args) -> str:
    a, b = args.model, getattr(args, "model_opt", None)
    if a and b and a != b:
        raise UserError(f"two models given ({a} and --model {b}): pass one")
    if not (a or b):
        raise UserError("no model given: pass MODEL or --model MODEL (e.g. smollm2-135m or a run directory)")
    args.model = a or b
    return args.model


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

    device = _device(args.device)  # checked before the load
    model, tok = load_model(args.model, args.dtype, use_cache=not args.no_cache)
    return model.to(device), tok


def cmd_info(args) -> int:
    from .models.info import model_info

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


def cmd_eval(args) -> int:
    from .data.corpora import resolve_data_dir
    from .evaluation.perplexity import evaluate_ppl
    from .models.info import measure_sparsity

    from .evaluation.zeroshot import format_table, join_record, parse_tasks, zeroshot
    from .record import RECORD_NAME, read_record, write_record

    _model_spec(args)
    tasks = parse_tasks(args.tasks) if args.tasks is not None else []
    spec = args.dataset if args.dataset is not None else ("" if tasks else "wikitext2")  # --tasks alone: no PPL
    datasets = [d.strip() for d in spec.split(",") if d.strip()]
    data_dir = resolve_data_dir(args.data_dir)
    out_json = prepare_file(args.out, args.force, inputs=[args.model])
    run_dir = Path(args.model) if (Path(args.model) / RECORD_NAME).is_file() else None
    model, tok = _load(args)
    sparsity = measure_sparsity(model)["overall"]
    results = []
    for ds in datasets:
        r = evaluate_ppl(model, tok, ds, args.seqlen, data_dir, args.max_windows, args.batch_size or 1)
        row = {"model": args.model, **r.to_dict(), "sparsity": sparsity}
        results.append(row)
        print(f"{ds:16s} seqlen {r.seqlen:5d}  windows {r.windows:4d}  ppl {r.ppl:10.3f}  bos {'yes' if r.bos else 'no'}  "
              f"({r.seconds:.1f}s, sparsity {sparsity:.4f})")
    report = {"results": results}
    if tasks:
        zs = zeroshot(model, tok, tasks, data_dir, args.limit, batch_size=args.batch_size or 8)
        print(format_table(zs))
        report["zeroshot"] = zs
        if run_dir is not None and zs["tasks"]:
            write_record(run_dir, join_record(read_record(run_dir), zs))
            print(f"zero-shot results added to {run_dir / RECORD_NAME}")
    write_json(out_json, report)
    return 0


ALLOC_OPTIONS = {  # CLI flag dest -> allocator hyperparameter name
    "alpha": "alpha", "dlp_stat": "stat", "owl_m": "owl_m", "lam": "lam", "beta": "beta", "r0": "r0",
    "r_end": "r_end", "min_sparsity": "lo", "max_sparsity": "hi",
}


def _solver_options(args) -> dict:
    if args.wbits is None and args.groupsize is not None:
        raise UserError("--groupsize only applies with --wbits: add e.g. --wbits 4, or drop --groupsize")
    if args.wbits is not None and args.method != "sparsegpt":
        raise UserError(f"--wbits (joint quantization) needs --method sparsegpt, not {args.method}")
    if args.method == "sparsegpt":
        opts = {k: v for k, v in (("blocksize", args.blocksize), ("percdamp", args.percdamp)) if v is not None}
        if args.wbits is not None:
            from .quant import check_quant

            opts.update(wbits=args.wbits, groupsize=-1 if args.groupsize is None else args.groupsize)
            check_quant(opts["wbits"], opts["groupsize"])
        return opts
    if args.method == "magnitude":
        return {"scope": args.magnitude_scope}
    if args.method == "slimgpt":
        opts = {"gqa": args.gqa, "budget": args.slim_budget, "score": args.slim_score,
                "compensate": not args.no_compensate, "grouped_cholesky": not args.no_gcd}
        if args.fixed_group is not None:
            opts.update(dynamic_group_size=False, fixed_group=args.fixed_group)
        if args.percdamp is not None:
            opts["percdamp"] = args.percdamp
        return opts
    return {}


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    cells = [[h for h, _ in cols]] + [[_fmt(r.get(k)) for _, k in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _eval_all(model, tok, datasets, seqlen, data_dir, max_windows, batch_size) -> dict:
    from .evaluation.perplexity import evaluate_ppl

    return {ds: evaluate_ppl(model, tok, ds, seqlen, data_dir, max_windows, batch_size).to_dict() for ds in datasets}


def cmd_prune(args) -> int:
    from . import api
    from .data.corpora import resolve_data_dir
    from .engine import DTYPES, PruneConfig, preflight
    from .evaluation.perplexity import check_seqlen
    from .models.info import measure_sparsity
    from .models.loading import load_skeleton
    from .outputs import check_free_space, finish_dir, prepare_dir, run_disk_need
    from .record import save_run, write_record
    from .solvers.nm import parse_nm

    # 1. everything that needs no model, then what the model's config alone tells: before any load or write
    if args.resume and args.force:
        raise UserError("--resume continues the run in --out and --force starts it over: pass one of them")
    nm = parse_nm(args.nm) if args.nm else None
    solver_opts = _solver_options(args)
    alloc_opts = {dst: getattr(args, src) for src, dst in ALLOC_OPTIONS.items() if getattr(args, src) is not None}
    from .allocation import get_allocator

    get_allocator(args.allocation, **alloc_opts)
    cfg = PruneConfig(method=args.method, sparsity=args.sparsity, nm=nm, allocation=args.allocation,
                      allocation_options=alloc_opts, offload=args.offload, compute_dtype=args.compute_dtype,
                      batch_size=args.batch_size, true_sequential=args.true_sequential,
                      skip=tuple(s for s in (args.skip or "").split(",") if s))
    cfg.validate()
    data_dir = resolve_data_dir(args.data_dir)
    datasets = [d.strip() for d in args.eval.split(",") if d.strip()] if args.eval else []
    out = Path(args.out)
    prepare_dir(out, args.force, args.resume, inputs=[args.model], create=False)
    device = _device(args.device)
    skeleton = load_skeleton(args.model, args.dtype)
    if skeleton is not None:
        preflight(skeleton, cfg)
        del skeleton

    # 2. load, draw the calibration windows, check the disk, then write
    store = None
    if args.offload == "disk":  # idle blocks stay on disk from load to save
        from .offload import load_model_lazy

        model, tok, store = load_model_lazy(args.model, args.dtype)
    else:
        model, tok = _load(args)
        device = next(model.parameters()).device
    preflight(model, cfg)  # again, for a model whose config was not at hand before the load
    seqlen = check_seqlen(model, args.seqlen)
    eval_seqlen = check_seqlen(model, args.eval_seqlen or seqlen)
    calib = api.calibration_set(tok, args.calib, args.nsamples, seqlen, args.seed, data_dir)
    need_out, need_tmp = run_disk_need(model, args.nsamples, seqlen, DTYPES[args.compute_dtype], args.offload)
    work = prepare_dir(out, args.force, args.resume, inputs=[args.model], create=False)
    check_free_space(work, need_out - _du(work), "the checkpoint and the saved run")
    if store is not None:
        check_free_space(store.work_dir, need_tmp, "disk offload of the blocks")
    work = prepare_dir(out, args.force, args.resume, inputs=[args.model])

    lazy = store is not None  # with disk offload the full model is never in memory: evaluate the saved run
    before = _eval_all(model, tok, datasets, eval_seqlen, data_dir, args.max_windows, args.batch_size) \
        if datasets and not args.no_dense_eval and not lazy else {}
    dense_sparsity = None if lazy else measure_sparsity(model)["overall"]
    record = api.prune(model, tok, method=args.method, sparsity=cfg.sparsity, nm=nm, allocation=args.allocation,
                       allocation_options=alloc_opts, solver_options=solver_opts, calibration=calib,
                       calib=args.calib, device=device, offload=args.offload, compute_dtype=args.compute_dtype,
                       true_sequential=args.true_sequential, batch_size=args.batch_size, skip=cfg.skip,
                       out_dir=work, resume=args.resume, store=store)
    record["model"] = args.model
    if lazy:
        save_run(model, tok, work, record, store, dtype=args.save_dtype)
        finish_dir(work, out)
        from .models.loading import load_model

        model, tok = load_model(str(out), args.dtype)
        record["measured_sparsity"] = measure_sparsity(model)["overall"]
    if args.wbits is not None:  # weights are stored dequantized (fp32); this is what packed storage would take
        from .quant import model_size_bytes

        record["quantization"] = model_size_bytes(model, args.wbits, solver_opts["groupsize"])
    after = _eval_all(model, tok, datasets, eval_seqlen, data_dir, args.max_windows, args.batch_size)
    record["eval"] = {"before": before, "after": after, "seqlen": eval_seqlen, "max_windows": args.max_windows}
    if lazy:
        write_record(out, record)
    else:
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


def _du(folder: Path) -> int:
    """Bytes already under ``folder`` (a resumed run's checkpoint counts toward what it needs)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).is_dir() else 0


def cmd_bench_speed(args) -> int:
    from .speed import bench_speed

    out_json = prepare_file(args.out, args.force, inputs=[args.run_dir])
    res = bench_speed(args.run_dir, dense=args.dense, prefill_tokens=args.prefill_tokens, new_tokens=args.new_tokens,
                      prompt_tokens=args.prompt_tokens, repeats=args.repeats, threads=args.threads, dtype=args.dtype)
    print(json.dumps(res, indent=1))
    write_json(out_json, res)
    return 0


def cmd_finetune(args) -> int:
    from .recovery.finetune import finetune_run

    datasets = [d.strip() for d in args.eval.split(",") if d.strip()]
    rec = finetune_run(args.run_dir, args.steps, out=args.out, force=args.force, lr=args.lr, rank=args.rank,
                       alpha=args.lora_alpha, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                       batch_size=args.batch_size, seed=args.seed, eval_datasets=datasets, max_windows=args.max_windows,
                       data_dir=args.data_dir, dtype=args.dtype, device=_device(args.device))
    f = rec["finetune"]
    ppl = {k: {d: r["ppl"] for d, r in f["eval"][k].items()} for k in ("before", "after")}
    rows = [{"model": "pruned", "sparsity": f["sparsity_before"], **ppl["before"]},
            {"model": f"+ LoRA {f['steps']} steps", "sparsity": f["sparsity_after"], **ppl["after"]}]
    print(_table(rows, [("model", "model"), ("sparsity", "sparsity")] + [(f"{d} ppl", d) for d in datasets]))
    print(f"LoRA rank {f['rank']}, lr {f['lr']}, {f['steps']} steps x {f['batch_size']} x {f['seqlen']} tokens in "
          f"{f['train_seconds']:.0f}s; zero pattern identical: {f['mask_identical']}; "
          f"saved to {args.out or args.run_dir}")
    return 0


def cmd_plot(args) -> int:
    from .plots import plot_block_sparsity
    from .record import read_record

    records = {Path(d).name: read_record(Path(d)) for d in args.run_dirs}
    out = prepare_file(Path(args.out) if args.out else Path(args.run_dirs[0]) / "block_sparsity.png", args.force)
    print(plot_block_sparsity(records, out))
    return 0


def cmd_demo(args) -> int:
    """The main job: dense vs Wanda 50% uniform vs Wanda 50% + DLP on SmolLM2, a before/after table and a plot."""
    import copy

    from . import api
    from .data.corpora import resolve_data_dir
    from .evaluation.perplexity import evaluate_ppl
    from .models.info import measure_sparsity
    from .outputs import finish_dir, prepare_dir
    from .plots import plot_block_sparsity
    from .record import write_record

    data_dir = resolve_data_dir(args.data_dir)
    out = Path(args.out)
    prepare_dir(out, args.force, inputs=[args.model], create=False)
    model, tok = _load(args)
    calib = api.calibration_set(tok, "c4", args.nsamples, args.seqlen, args.seed, data_dir)
    ppl = lambda m: evaluate_ppl(m, tok, "wikitext2", args.seqlen, data_dir, args.max_windows, 8).ppl  # noqa: E731
    rows = [{"run": "dense", "sparsity": measure_sparsity(model)["overall"], "ppl": ppl(model), "seconds": None}]
    records = {}
    for label, alloc, opts in (("wanda uniform", "uniform", {}), ("wanda dlp", "dlp", {"alpha": args.alpha})):
        m = copy.deepcopy(model)
        rec = api.prune(m, tok, method="wanda", sparsity=args.sparsity, allocation=alloc, allocation_options=opts,
                        calibration=calib)
        rows.append({"run": label, "sparsity": rec["measured_sparsity"], "ppl": ppl(m),
                     "seconds": rec["timings"]["total"]})
        records[label] = rec
        del m
    work = prepare_dir(out, args.force, inputs=[args.model])
    plot_block_sparsity(records, work / "block_sparsity.png")
    write_record(work, {"command": "layerprune demo", "seqlen": args.seqlen, "max_windows": args.max_windows,
                       "rows": rows, "records": records})
    finish_dir(work, out)
    png = out / "block_sparsity.png"
    print(f"\nSmolLM2-135M, WikiText-2 test PPL ({args.max_windows} windows x {args.seqlen} tokens), "
          f"calibration {args.nsamples} x {args.seqlen} C4-pool tokens, seed {args.seed}")
    print(_table(rows, [("run", "run"), ("sparsity", "sparsity"), ("wikitext2 ppl", "ppl"),
                        ("prune s", "seconds")]))
    print(f"per-block plot: {png}; records: {out / 'layerprune.json'}")
    return 0


def cmd_fed(args) -> int:
    from .data.corpora import resolve_data_dir
    from .federated import FedConfig, run_federated

    if not 0.0 < args.keep_prob <= 1.0:
        raise UserError(f"--keep-prob {args.keep_prob} must be in (0, 1]")
    flag = args.depth_flag.strip().lower()
    if flag != "u" and not flag.isdigit():
        raise UserError(f"--depth-flag {args.depth_flag!r}: use u (uniform depths) or a level number such as 3")
    cfg = FedConfig(model=args.model, scheme=args.scheme, keep_prob=args.keep_prob, clients=args.clients,
                    rounds=args.rounds, num_blocks=args.num_blocks, depth_flag=None if flag == "u" else int(flag),
                    partition=args.partition, alpha=args.alpha, local_steps=args.local_steps, seqlen=args.seqlen,
                    lr=args.lr, weighted=not args.unweighted, data_dir=args.data_dir, out_dir=args.out,
                    verbose=args.verbose)
    resolve_data_dir(args.data_dir)  # a bad --data-dir fails before the model loads
    for f in cfg.output_files():
        prepare_file(f, args.force, inputs=[args.model])
    res = run_federated(cfg)
    print(json.dumps(res["summary"], indent=1))
    return 0


DATA_DIR_HELP = "data directory (default: $LAYERPRUNE_DATA, else ../shared/data when present, else the hub)"
DTYPES = ["float32", "bfloat16", "float16"]


def build_parser() -> argparse.ArgumentParser:
    from importlib import metadata

    p = _Parser(prog="layerprune", description="Layer-wise pruning of causal LMs, with honest numbers.",
                epilog=_examples("layerprune demo", "layerprune prune --model smollm2-135m --method wanda "
                                 "--sparsity 0.5 --out runs/wanda50", "layerprune eval runs/wanda50"))
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO (and Flower's DEBUG) messages")
    try:
        version = metadata.version("layerprune")
    except metadata.PackageNotFoundError:
        version = "unknown"
    p.add_argument("--version", action="version", version=f"layerprune {version}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("info", help="architecture, blocks, parameters, linear shapes, sparsity",
                       epilog=_examples("layerprune info smollm2-135m", "layerprune info runs/wanda50 --json"))
    _model_arg(s, "built-in name (smollm2-135m), .gguf file, model or run directory, or hub id")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    _common_model_args(s)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("eval", help="perplexity with the papers' protocol; zero-shot accuracy with --tasks (lm-eval)",
                       epilog=_examples("layerprune eval smollm2-135m --seqlen 512 --max-windows 40",
                                        "layerprune eval --model runs/wanda50 --dataset wikitext2,ptb,c4",
                                        "layerprune eval runs/wanda50 --tasks arc_easy,piqa --limit 100"))
    _model_arg(s, "built-in name, .gguf file, model or run directory, or hub id")
    s.add_argument("--dataset", default=None,
                   help="comma list of wikitext2, ptb, c4, wikitext2-valid, ptb-valid, or a .txt/.jsonl path "
                        "(default wikitext2, or none when --tasks is given)")
    s.add_argument("--tasks", default=None,
                   help="zero-shot tasks, comma list: boolq,rte,arc_easy,arc_challenge,openbookqa,piqa (local data), "
                        "hellaswag,winogrande (hub); a task without data is skipped and named; on a run directory "
                        "the results join its layerprune.json")
    s.add_argument("--limit", type=_positive, default=None, help="zero-shot: only the first N examples of each task")
    s.add_argument("--seqlen", type=int, default=None, help="window length (default 2048, capped at the model's maximum)")
    s.add_argument("--max-windows", type=_positive, default=None, help="evaluate only the first N windows")
    s.add_argument("--batch-size", type=_positive, default=None,
                   help="windows (PPL, default 1) or requests (zero-shot, default 8) per forward")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    s.add_argument("--out", default=None, help="write the results as JSON here")
    s.add_argument("--force", action="store_true", help="replace --out if layerprune wrote it")
    _common_model_args(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("prune", help="prune a model block by block and save it with a run record",
                       epilog=_examples(
                           "layerprune prune --method wanda --sparsity 0.5 --out runs/wanda50",
                           "layerprune prune --method sparsegpt --nm 2:4 --nsamples 32 --seqlen 512 --out runs/sgpt24",
                           "layerprune prune --method wanda --sparsity 0.7 --allocation dlp --out runs/dlp70",
                           "layerprune prune --method slimgpt --sparsity 0.5 --allocation ipr-log --out runs/slim50",
                           "layerprune prune ... --out runs/wanda50 --resume   # after an interruption"))
    s.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub id")
    s.add_argument("--method", default="wanda",
                   help="magnitude, wanda, sparsegpt, or slimgpt (structured: heads + FFN channels)")
    s.add_argument("--sparsity", type=float, default=None,
                   help="global target sparsity in [0, 1) (default 0.5; with --nm it is N/M)")
    s.add_argument("--nm", default=None, help="N:M semi-structured pattern, N pruned of every M (e.g. 2:4)")
    s.add_argument("--allocation", default="uniform",
                   help="uniform, owl, dlp, dsa[:FUNC], ipr-log, ipr-log-dec, ipr-lin, ipr-lin-dec, atp, er, erk, "
                        "global, lamp, user:LIST|FILE")
    s.add_argument("--alpha", type=float, default=None, help="DLP alpha (spread 2*alpha)")
    s.add_argument("--dlp-stat", default=None, choices=["median", "mean"], help="DLP block statistic")
    s.add_argument("--owl-m", type=float, default=None, help="OWL outlier threshold M")
    s.add_argument("--lam", type=float, default=None, help="OWL/DSA lambda (spread 2*lambda)")
    s.add_argument("--beta", type=float, default=None, help="ATP step")
    s.add_argument("--r0", type=float, default=None, help="IPR first-block ratio (with --r-end)")
    s.add_argument("--r-end", type=float, default=None, help="IPR last-block ratio (with --r0)")
    s.add_argument("--min-sparsity", type=float, default=None, help="lowest per-layer sparsity allowed (default 0)")
    s.add_argument("--max-sparsity", type=float, default=None, help="highest per-layer sparsity allowed (default 0.99)")
    s.add_argument("--nsamples", type=_positive, default=128, help="calibration windows")
    s.add_argument("--seqlen", type=int, default=None, help="calibration window length (default 2048, capped)")
    s.add_argument("--calib", default="c4", help="c4 (pool: docs 1000-1999), wikitext2-valid, ptb-valid or a file")
    s.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    s.add_argument("--out", required=True, help="run directory to write (weights + layerprune.json)")
    s.add_argument("--force", action="store_true",
                   help="replace --out if it holds a layerprune run (written beside it, swapped in at the end)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
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
    s.add_argument("--blocksize", type=_positive, default=None, help="SparseGPT column block size (default 128)")
    s.add_argument("--percdamp", type=float, default=None, help="SparseGPT damping, fraction of mean diag (0.01)")
    s.add_argument("--wbits", type=int, default=None, choices=[3, 4, 8],
                   help="SparseGPT only: quantize the kept weights jointly (GPTQ-style) to this many bits")
    s.add_argument("--groupsize", type=int, default=None,
                   help="with --wbits: one grid per this many input columns (default: one per output channel)")
    s.add_argument("--magnitude-scope", default="matrix", choices=["matrix", "row"],
                   help="magnitude comparison group")
    s.add_argument("--gqa", default="heads", choices=["heads", "kv-groups"],
                   help="slimgpt: remove query heads evenly within KV groups, or whole KV groups")
    s.add_argument("--slim-budget", default="params", choices=["params", "ratio"],
                   help="slimgpt: FFN channels fill the block's parameter budget, or use the head ratio")
    s.add_argument("--slim-score", default="obs", choices=["obs", "magnitude"],
                   help="slimgpt: OBS error, or the structured-magnitude baseline (L2 norm)")
    s.add_argument("--no-compensate", action="store_true", help="slimgpt ablation: no OBS weight update")
    s.add_argument("--no-gcd", action="store_true", help="slimgpt ablation: raw diag(H^-1) head score, no grouped "
                                                         "Cholesky")
    s.add_argument("--fixed-group", type=_positive, default=None,
                   help="slimgpt ablation: fixed FFN group size instead of Dynamic Group Size")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    _common_model_args(s)
    s.set_defaults(func=cmd_prune)

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
    s.set_defaults(func=cmd_bench_speed)

    s = sub.add_parser("finetune", help="LoRA recovery of a pruned run, mask fixed, merged and saved",
                       epilog=_examples("layerprune finetune runs/wanda60 --steps 60 --out runs/wanda60-lora"))
    s.add_argument("run_dir", help="a prune run directory (has layerprune.json)")
    s.add_argument("--steps", type=_positive, required=True, help="optimizer steps")
    s.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    s.add_argument("--rank", type=_positive, default=8, help="LoRA rank r")
    s.add_argument("--lora-alpha", type=_positive, default=16, help="LoRA alpha (update scaled by alpha / r)")
    s.add_argument("--batch-size", type=_positive, default=1, help="windows per step")
    s.add_argument("--calib", default="c4", help="training text: c4 (pool: docs 1000-1999), wikitext2-valid, ...")
    s.add_argument("--nsamples", type=_positive, default=128, help="training windows drawn from the pool")
    s.add_argument("--seqlen", type=int, default=512, help="training and evaluation window length")
    s.add_argument("--seed", type=int, default=0, help="sampling and LoRA initialisation seed")
    s.add_argument("--eval", default="wikitext2", help="comma list of datasets for PPL before/after ('' for none)")
    s.add_argument("--max-windows", type=_positive, default=None, help="evaluate only the first N windows")
    s.add_argument("--out", default=None, help="new run directory (default: none; replacing RUN_DIR needs --force)")
    s.add_argument("--force", action="store_true", help="replace --out if it holds a run, or RUN_DIR in place")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    s.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype while training")
    s.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("plot", help="per-block target vs achieved sparsity of one or more runs (PNG)",
                       epilog=_examples("layerprune plot runs/wanda70 runs/dlp70 --out runs/compare.png"))
    s.add_argument("run_dirs", nargs="+", help="run directories (each has layerprune.json)")
    s.add_argument("--out", default=None, help="PNG path (default RUN_DIR/block_sparsity.png)")
    s.add_argument("--force", action="store_true", help="replace --out if layerprune wrote it")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("fed", help="FedLP federated training on Flower (simulation engine); see docs/federated.md",
                       epilog=_examples("layerprune fed --scheme homo --keep-prob 0.5 --num-blocks 4 --rounds 4",
                                        "layerprune fed --scheme hetero --depth-flag 3 --partition dirichlet"))
    s.add_argument("--scheme", choices=["fedavg", "homo", "hetero"], default="homo",
                   help="fedavg (every layer every round), homo (each layer kept with --keep-prob), "
                        "hetero (clients of different depths)")
    s.add_argument("--keep-prob", type=float, default=0.5, help="homo: layer-preserving probability p in (0, 1]")
    s.add_argument("--clients", type=_positive, default=8, help="number of simulated clients")
    s.add_argument("--rounds", type=_positive, default=10, help="federated rounds")
    s.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub id")
    s.add_argument("--num-blocks", type=_positive, default=None, help="keep only the first N blocks (small CPU runs)")
    s.add_argument("--depth-flag", default="u",
                   help="hetero depth law: u (uniform over the levels) or a level F in 1..5 (P(depth=F)=0.6)")
    s.add_argument("--partition", choices=["iid", "dirichlet"], default="iid",
                   help="client data: iid shards of the C4 pool, or a Dirichlet mix of C4 / WikiText-2 / PTB")
    s.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (non-IID)")
    s.add_argument("--local-steps", type=_positive, default=4, help="optimizer steps per client per round")
    s.add_argument("--seqlen", type=int, default=128, help="training window length")
    s.add_argument("--lr", type=float, default=1e-4, help="client learning rate")
    s.add_argument("--unweighted", action="store_true", help="the paper's plain mean instead of example-weighted")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    s.add_argument("--out", default="runs/fed", help="folder for the result JSON and plot")
    s.add_argument("--force", action="store_true", help="replace an earlier result of the same scheme in --out")
    s.set_defaults(func=cmd_fed)

    s = sub.add_parser("demo", help="main job: SmolLM2 dense vs Wanda 50%% uniform vs Wanda 50%% + DLP",
                       epilog=_examples("layerprune demo", "layerprune demo --sparsity 0.7 --out runs/demo70"))
    s.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub id")
    s.add_argument("--sparsity", type=float, default=0.5, help="target sparsity of both pruned runs")
    s.add_argument("--alpha", type=float, default=0.15, help="DLP alpha")
    s.add_argument("--nsamples", type=_positive, default=32, help="calibration windows (C4 pool)")
    s.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window length")
    s.add_argument("--max-windows", type=_positive, default=40, help="WikiText-2 test windows evaluated")
    s.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    s.add_argument("--out", default="runs/demo", help="folder for the records and the per-block plot")
    s.add_argument("--force", action="store_true", help="replace --out if it holds an earlier demo")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    _common_model_args(s)
    s.set_defaults(func=cmd_demo)

    from .allocation.dsa import run as dsa_run

    s = sub.add_parser("search-allocation", help="DSA: search an allocation function (evolutionary or random)",
                       epilog=_examples("layerprune search-allocation --sparsity 0.7 --budget-minutes 20 "
                                        "--out runs/dsa70"))
    dsa_run.add_arguments(s)
    s.set_defaults(func=dsa_run.main)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
        if not args.verbose:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()  # ours (blocks, windows) stay; loading/saving bars go
        return args.func(args)
    except UserError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
