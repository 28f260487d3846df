"""``layerprune eval``: perplexity with the papers' protocol; zero-shot accuracy with --tasks (lm-eval)."""
from __future__ import annotations

from pathlib import Path

from layerprune.cli.common import (DATA_DIR_HELP, _common_model_args, _examples, _load, _model_arg, _model_spec,
                                   _positive, seqlen_type)
from layerprune.errors import UserError
from layerprune.outputs import prepare_file, write_json


def add_parser(sub) -> None:
    s = sub.add_parser("eval", help="perplexity with the papers' protocol; zero-shot accuracy with --tasks (lm-eval)",
                       epilog=_examples(
                           "layerprune eval smollm2-135m --seqlen 512 --max-windows 40   # about a minute on a CPU",
                           "layerprune eval runs/wanda50   # the run's own settings; the result joins its record",
                           "layerprune eval runs/wanda50 --protocol paper --dataset wikitext2,ptb,c4   "
                           "# 2048-token windows, all of them: tens of minutes on a CPU",
                           "layerprune eval runs/wanda50 --tasks arc_easy,piqa --limit 100"))
    _model_arg(s, "built-in name, .gguf file, model or run directory, or hub id")
    s.add_argument("--protocol", default=None, choices=["run", "paper"],
                   help="run: the datasets, window length and window count that the run directory's record used; "
                        "paper: 2048-token windows (capped), all of them (default: run for a run directory, else "
                        "paper); flags given here override either")
    s.add_argument("--dataset", default=None,
                   help="comma list of wikitext2, ptb, c4, wikitext2-valid, ptb-valid, or a .txt/.jsonl path "
                        "(default: wikitext2, or none when --tasks is given)")
    s.add_argument("--tasks", default=None,
                   help="zero-shot tasks, comma list: boolq,rte,arc_easy,arc_challenge,openbookqa,piqa (local data), "
                        "hellaswag,winogrande (hub); a task without data is skipped and named")
    s.add_argument("--limit", type=_positive, default=None, help="zero-shot: only the first N examples of each task")
    s.add_argument("--seqlen", type=seqlen_type, default=None, help="window length (see --protocol)")
    s.add_argument("--max-windows", type=_positive, default=None, help="evaluate only the first N windows")
    s.add_argument("--batch-size", type=_positive, default=None,
                   help="windows (PPL) or requests (zero-shot) per forward (default: 1 for PPL, 8 for zero-shot)")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    s.add_argument("--out", default=None, help="also write the results as JSON here (a run directory's record "
                   "always gets them)")
    s.add_argument("--force", action="store_true", help="replace --out if layerprune wrote it")
    _common_model_args(s)
    s.set_defaults(func=run)


def _protocol(args, run_record: dict | None) -> str:
    """Fill the PPL settings not given as flags from the protocol: the run's recorded ones, or the paper's."""
    protocol = args.protocol or ("run" if run_record is not None else "paper")
    if protocol == "run":
        if run_record is None:
            raise UserError(f"--protocol run reads the settings of a run directory; {args.model} is not one: "
                            "pass a prune run's --out, or --protocol paper")
        ev = run_record.get("eval") or {}
        if args.dataset is None and not args.tasks:
            args.dataset = ",".join(ev.get("after") or {}) or "wikitext2"
        if args.seqlen is None:
            args.seqlen = ev.get("seqlen") or (run_record.get("calibration") or {}).get("seqlen")
        if "max_windows" not in args.explicit_dests:
            args.max_windows = ev.get("max_windows")
    return protocol


def run(args) -> int:
    from layerprune.data.corpora import resolve_data_dir
    from layerprune.evaluation.perplexity import evaluate_ppl
    from layerprune.evaluation.zeroshot import format_table, join_record, parse_tasks, zeroshot
    from layerprune.models.info import measure_sparsity
    from layerprune.record import RECORD_NAME, read_record, write_record

    _model_spec(args)
    run_dir = Path(args.model) if (Path(args.model) / RECORD_NAME).is_file() else None
    protocol = _protocol(args, read_record(run_dir) if run_dir is not None else None)
    tasks = parse_tasks(args.tasks) if args.tasks is not None else []
    spec = args.dataset if args.dataset is not None else ("" if tasks else "wikitext2")  # --tasks alone: no PPL
    datasets = [d.strip() for d in spec.split(",") if d.strip()]
    data_dir = resolve_data_dir(args.data_dir)
    out_json = prepare_file(args.out, args.force, inputs=[args.model])
    model, tok = _load(args)
    sparsity = measure_sparsity(model)["overall"]
    results = []
    for ds in datasets:
        r = evaluate_ppl(model, tok, ds, args.seqlen, data_dir, args.max_windows, args.batch_size or 1)
        results.append({"model": args.model, **r.to_dict(), "sparsity": sparsity})
        print(f"{ds:16s} seqlen {r.seqlen:5d}  windows {r.windows:4d}  ppl {r.ppl:10.3f}  "
              f"bos {'yes' if r.bos else 'no'}  ({r.seconds:.1f}s, sparsity {sparsity:.4f})")
    report = {"protocol": protocol, "results": results}
    if tasks:
        zs = zeroshot(model, tok, tasks, data_dir, args.limit, batch_size=args.batch_size or 8)
        print(format_table(zs))
        report["zeroshot"] = zs
    if run_dir is not None and (results or (tasks and zs["tasks"])):
        record = read_record(run_dir)
        if results:
            record.setdefault("evals", []).append({"protocol": protocol, "max_windows": args.max_windows,
                                                   "command_line": getattr(args, "command_line", None),
                                                   "results": {r["dataset"]: r for r in results}})
        write_record(run_dir, join_record(record, zs) if tasks and zs["tasks"] else record)
        print(f"results added to {run_dir / RECORD_NAME} and its model card")
    write_json(out_json, report)
    return 0
