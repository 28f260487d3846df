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

    from .evaluation.zeroshot import format_table, join_record, parse_tasks, zeroshot
    from .record import RECORD_NAME, read_record, write_record

    tasks = parse_tasks(args.tasks) if args.tasks is not None else []
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give a positive number of examples per task")
    spec = args.dataset if args.dataset is not None else ("" if tasks else "wikitext2")  # --tasks alone: no PPL
    datasets = [d.strip() for d in spec.split(",") if d.strip()]
    data_dir = resolve_data_dir(args.data_dir)
    if args.out and Path(args.out).exists() and not args.force:
        raise UserError(f"{args.out} already exists: choose another path or pass --force to overwrite it")
    run_dir = Path(args.model) if (Path(args.model) / RECORD_NAME).is_file() else None
    model, tok = _load(args)
    sparsity = measure_sparsity(model)["overall"]
    results = []
    for ds in datasets:
        r = evaluate_ppl(model, tok, ds, args.seqlen, data_dir, args.max_windows, args.batch_size or 1)
        row = {"model": args.model, **r.to_dict(), "sparsity": sparsity}
        results.append(row)
        print(f"{ds:16s} seqlen {r.seqlen:5d}  windows {r.windows:4d}  ppl {r.ppl:10.3f}  "
              f"({r.seconds:.1f}s, sparsity {sparsity:.4f})")
    report = {"results": results}
    if tasks:
        zs = zeroshot(model, tok, tasks, data_dir, args.limit, batch_size=args.batch_size or 8)
        print(format_table(zs))
        report["zeroshot"] = zs
        if run_dir is not None and zs["tasks"]:
            write_record(run_dir, join_record(read_record(run_dir), zs))
            print(f"zero-shot results added to {run_dir / RECORD_NAME}")
    _write_json(args.out, report, args.force)
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
    from .engine import PruneConfig
    from .evaluation.perplexity import check_seqlen
    from .models.info import measure_sparsity
    from .record import prepare_out_dir, save_run, write_record
    from .solvers.nm import parse_nm

    # validate everything that needs no model before loading it or touching --out
    nm = parse_nm(args.nm) if args.nm else None
    solver_opts = _solver_options(args)
    alloc_opts = {dst: getattr(args, src) for src, dst in ALLOC_OPTIONS.items() if getattr(args, src) is not None}
    from .allocation import get_allocator

    get_allocator(args.allocation, **alloc_opts)
    cfg = PruneConfig(method=args.method, sparsity=args.sparsity, nm=nm, allocation=args.allocation,
                      allocation_options=alloc_opts, offload=args.offload, compute_dtype=args.compute_dtype,
                      batch_size=args.batch_size)
    cfg.validate()
    data_dir = resolve_data_dir(args.data_dir)
    datasets = [d.strip() for d in args.eval.split(",") if d.strip()] if args.eval else []
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not (args.force or args.resume):
        raise UserError(f"output directory {out} already exists: choose another --out, "
                        "pass --resume to continue an interrupted run, or --force to overwrite it")
    store = None
    if args.offload == "disk":  # idle blocks stay on disk from load to save
        from .offload import load_model_lazy

        model, tok, store = load_model_lazy(args.model, args.dtype)
        device = _device(args.device)
    else:
        model, tok = _load(args)
        device = next(model.parameters()).device
    seqlen = check_seqlen(model, args.seqlen)
    eval_seqlen = check_seqlen(model, args.eval_seqlen or seqlen)
    calib = api.calibration_set(tok, args.calib, args.nsamples, seqlen, args.seed, data_dir)
    prepare_out_dir(out, args.force, args.resume)

    lazy = store is not None  # with disk offload the full model is never in memory: evaluate the saved run
    before = _eval_all(model, tok, datasets, eval_seqlen, data_dir, args.max_windows, args.batch_size) \
        if datasets and not args.no_dense_eval and not lazy else {}
    dense_sparsity = None if lazy else measure_sparsity(model)["overall"]
    record = api.prune(model, tok, method=args.method, sparsity=args.sparsity, nm=nm, allocation=args.allocation,
                       allocation_options=alloc_opts, solver_options=solver_opts, calibration=calib,
                       calib=args.calib, device=device, offload=args.offload, compute_dtype=args.compute_dtype,
                       true_sequential=args.true_sequential, batch_size=args.batch_size,
                       skip=tuple(s for s in (args.skip or "").split(",") if s), out_dir=out, resume=args.resume,
                       store=store)
    record["model"] = args.model
    if lazy:
        save_run(model, tok, out, record, store)
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
        save_run(model, tok, out, record)

    rows = [{"model": "dense", "sparsity": dense_sparsity, **{ds: r["ppl"] for ds, r in before.items()}},
            {"model": f"{args.method} {args.allocation}" + (f" {args.nm}" if args.nm else ""),
             "sparsity": record["measured_sparsity"], **{ds: r["ppl"] for ds, r in after.items()}}]
    print(_table(rows, [("model", "model"), ("sparsity", "sparsity")] + [(f"{ds} ppl", ds) for ds in datasets]))
    t = record["timings"]
    print(f"pruned in {t['total']:.1f}s ("
          + ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if k != "total") + f"); saved to {out}")
    if "quantization" in record:
        q, mib = record["quantization"], 2 ** 20
        print(f"theoretical size, {q['bits']}-bit groupsize {q['groupsize']} (block linears; the rest fp16): "
              f"fp16 {q['dense_fp16'] / mib:.1f} MiB, quantized {q['quantized'] / mib:.1f} MiB, "
              f"sparse+quantized {q['sparse_quantized'] / mib:.1f} MiB ({q['sparse_quantized_ratio']:.3f}x)")
    return 0


def cmd_bench_speed(args) -> int:
    from .speed import bench_speed

    if args.out and Path(args.out).exists() and not args.force:
        raise UserError(f"{args.out} already exists: choose another path or pass --force to overwrite it")
    res = bench_speed(args.run_dir, dense=args.dense, prefill_tokens=args.prefill_tokens, new_tokens=args.new_tokens,
                      prompt_tokens=args.prompt_tokens, repeats=args.repeats, threads=args.threads, dtype=args.dtype)
    print(json.dumps(res, indent=1))
    _write_json(args.out, res, args.force)
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
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "block_sparsity.png"
    if out.exists() and not args.force:
        raise UserError(f"{out} already exists: pass --out elsewhere or --force")
    print(plot_block_sparsity(records, out))
    return 0


def cmd_demo(args) -> int:
    """The main job: dense vs Wanda 50% uniform vs Wanda 50% + DLP on SmolLM2, a before/after table and a plot."""
    import copy

    from . import api
    from .data.corpora import resolve_data_dir
    from .evaluation.perplexity import evaluate_ppl
    from .models.info import measure_sparsity
    from .plots import plot_block_sparsity
    from .record import write_record

    data_dir = resolve_data_dir(args.data_dir)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UserError(f"{out} already exists: pass --force to overwrite it or --out elsewhere")
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
    out.mkdir(parents=True, exist_ok=True)
    png = plot_block_sparsity(records, out / "block_sparsity.png")
    write_record(out, {"command": "layerprune demo", "seqlen": args.seqlen, "max_windows": args.max_windows,
                       "rows": rows, "records": records})
    print(f"\nSmolLM2-135M, WikiText-2 test PPL ({args.max_windows} windows x {args.seqlen} tokens), "
          f"calibration {args.nsamples} x {args.seqlen} C4-pool tokens, seed {args.seed}")
    print(_table(rows, [("run", "run"), ("sparsity", "sparsity"), ("wikitext2 ppl", "ppl"),
                        ("prune s", "seconds")]))
    print(f"per-block plot: {png}; records: {out / 'layerprune.json'}")
    return 0


def cmd_fed(args) -> int:
    from .federated import FedConfig, run_federated

    if not 0.0 < args.keep_prob <= 1.0:
        raise UserError(f"--keep-prob {args.keep_prob} must be in (0, 1]")
    res = run_federated(FedConfig(model=args.model, scheme=args.scheme, keep_prob=args.keep_prob, clients=args.clients,
                                  rounds=args.rounds, num_blocks=args.num_blocks,
                                  depth_flag=None if args.depth_flag == "u" else int(args.depth_flag),
                                  partition=args.partition, alpha=args.alpha, local_steps=args.local_steps,
                                  seqlen=args.seqlen, lr=args.lr, weighted=not args.unweighted,
                                  data_dir=args.data_dir, out_dir=args.out))
    print(json.dumps(res["summary"], indent=1))
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

    s = sub.add_parser("eval", help="perplexity with the papers' protocol; zero-shot accuracy with --tasks (lm-eval)")
    s.add_argument("model", help="built-in name, .gguf file, model or run directory, or hub id")
    s.add_argument("--dataset", default=None,
                   help="comma list of wikitext2, ptb, c4, wikitext2-valid, ptb-valid, or a .txt/.jsonl path "
                        "(default wikitext2, or none when --tasks is given)")
    s.add_argument("--tasks", default=None,
                   help="zero-shot tasks, comma list: boolq,rte,arc_easy,arc_challenge,openbookqa,piqa (local data), "
                        "hellaswag,winogrande (hub); a task without data is skipped and named; on a run directory "
                        "the results join its layerprune.json")
    s.add_argument("--limit", type=int, default=None, help="zero-shot: only the first N examples of each task")
    s.add_argument("--seqlen", type=int, default=None, help="window length (default 2048, capped at the model's maximum)")
    s.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    s.add_argument("--batch-size", type=int, default=None, help="windows (PPL, default 1) or requests (zero-shot, "
                                                                "default 8) per forward")
    s.add_argument("--data-dir", default=None, help="data directory (default: $LAYERPRUNE_DATA or ../shared/data)")
    s.add_argument("--out", default=None, help="write the results as JSON here")
    s.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _common_model_args(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("prune", help="prune a model block by block and save it with a run record")
    s.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub id")
    s.add_argument("--method", default="wanda",
                   help="magnitude, wanda, sparsegpt, or slimgpt (structured: heads + FFN channels)")
    s.add_argument("--sparsity", type=float, default=0.5, help="global target sparsity in [0, 1)")
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
    s.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    s.add_argument("--seqlen", type=int, default=None, help="calibration window length (default 2048, capped)")
    s.add_argument("--calib", default="c4", help="c4 (pool: docs 1000-1999), wikitext2-valid, ptb-valid or a file")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="run directory to write (weights + layerprune.json)")
    s.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument("--eval", default="wikitext2", help="comma list of datasets to evaluate before/after ('' for none)")
    s.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window length (default: --seqlen)")
    s.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    s.add_argument("--no-dense-eval", action="store_true", help="skip evaluating the dense model first")
    s.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    s.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                   help="where activations (and idle blocks with disk) live")
    s.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the forward passes (statistics and solves stay fp32)")
    s.add_argument("--true-sequential", action="store_true", help="prune q/k/v, o, gate/up, down in turn")
    s.add_argument("--skip", default=None, help="comma list of linear names left dense, e.g. mlp.down_proj")
    s.add_argument("--blocksize", type=int, default=None, help="SparseGPT column block size (default 128)")
    s.add_argument("--percdamp", type=float, default=None, help="SparseGPT damping, fraction of mean diag (0.01)")
    s.add_argument("--wbits", type=int, default=None, choices=[3, 4, 8],
                   help="SparseGPT only: quantize the kept weights jointly (GPTQ-style) to this many bits")
    s.add_argument("--groupsize", type=int, default=None,
                   help="with --wbits: one grid per this many input columns (default: one per output channel)")
    s.add_argument("--magnitude-scope", default="matrix", choices=["matrix", "row"],
                   help="magnitude comparison group")
    s.add_argument("--gqa", default="heads", choices=["heads", "kv-groups"],
                   help="slimgpt: remove query heads evenly within KV groups (default) or whole KV groups")
    s.add_argument("--slim-budget", default="params", choices=["params", "ratio"],
                   help="slimgpt: FFN channels fill the block's parameter budget (default) or use the head ratio")
    s.add_argument("--slim-score", default="obs", choices=["obs", "magnitude"],
                   help="slimgpt: OBS error (default) or the structured-magnitude baseline (L2 norm)")
    s.add_argument("--no-compensate", action="store_true", help="slimgpt ablation: no OBS weight update")
    s.add_argument("--no-gcd", action="store_true", help="slimgpt ablation: raw diag(H^-1) head score, no grouped "
                                                         "Cholesky")
    s.add_argument("--fixed-group", type=int, default=None,
                   help="slimgpt ablation: fixed FFN group size instead of Dynamic Group Size")
    s.add_argument("--data-dir", default=None)
    _common_model_args(s)
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("bench-speed", help="prefill latency and decode tokens/s of a pruned run vs its dense model")
    s.add_argument("run_dir", help="the --out of a prune run")
    s.add_argument("--dense", default=None, help="dense model to compare with (default: the run record's model)")
    s.add_argument("--prefill-tokens", type=int, default=512, help="prefill length, batch 1")
    s.add_argument("--new-tokens", type=int, default=128, help="greedy decode steps")
    s.add_argument("--prompt-tokens", type=int, default=32, help="prompt before decoding (not timed)")
    s.add_argument("--repeats", type=int, default=5, help="timed runs per model (medians are reported)")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--out", default=None, help="also write the JSON here")
    s.add_argument("--force", action="store_true", help="overwrite --out")
    s.set_defaults(func=cmd_bench_speed)

    s = sub.add_parser("finetune", help="LoRA recovery of a pruned run, mask fixed, merged and saved")
    s.add_argument("run_dir", help="a prune run directory (has layerprune.json)")
    s.add_argument("--steps", type=int, required=True, help="optimizer steps")
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    s.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (update scaled by alpha / r)")
    s.add_argument("--batch-size", type=int, default=1, help="windows per step")
    s.add_argument("--calib", default="c4", help="training text: c4 (pool: docs 1000-1999), wikitext2-valid, ...")
    s.add_argument("--nsamples", type=int, default=128, help="training windows drawn from the pool")
    s.add_argument("--seqlen", type=int, default=512, help="training and evaluation window length")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval", default="wikitext2", help="comma list of datasets for PPL before/after ('' for none)")
    s.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    s.add_argument("--out", default=None, help="new run directory (default: none; overwrite RUN_DIR needs --force)")
    s.add_argument("--force", action="store_true", help="overwrite --out, or RUN_DIR in place when --out is not given")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("plot", help="per-block target vs achieved sparsity of one or more runs (PNG)")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("--out", default=None, help="PNG path (default RUN_DIR/block_sparsity.png)")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("fed", help="FedLP federated training on Flower (simulation engine); see docs/federated.md")
    s.add_argument("--scheme", choices=["fedavg", "homo", "hetero"], default="homo")
    s.add_argument("--keep-prob", type=float, default=0.5, help="homo: layer-preserving probability p")
    s.add_argument("--clients", type=int, default=8)
    s.add_argument("--rounds", type=int, default=10)
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--num-blocks", type=int, default=None, help="keep only the first N blocks (small CPU runs)")
    s.add_argument("--depth-flag", default="u", help="hetero depth law: u (uniform) or f (P(c=f)=0.6)")
    s.add_argument("--partition", choices=["iid", "dirichlet"], default="iid")
    s.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (non-IID)")
    s.add_argument("--local-steps", type=int, default=4)
    s.add_argument("--seqlen", type=int, default=128)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--unweighted", action="store_true", help="the paper's plain mean instead of example-weighted")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--out", default="runs/fed")
    s.set_defaults(func=cmd_fed)

    s = sub.add_parser("demo", help="main job: SmolLM2 dense vs Wanda 50%% uniform vs Wanda 50%% + DLP")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--sparsity", type=float, default=0.5)
    s.add_argument("--alpha", type=float, default=0.15, help="DLP alpha")
    s.add_argument("--nsamples", type=int, default=32)
    s.add_argument("--seqlen", type=int, default=512)
    s.add_argument("--max-windows", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--force", action="store_true")
    s.add_argument("--data-dir", default=None)
    _common_model_args(s)
    s.set_defaults(func=cmd_demo)

    from .allocation.dsa import run as dsa_run

    s = sub.add_parser("search-allocation", help="DSA: search an allocation function (evolutionary or random)")
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
