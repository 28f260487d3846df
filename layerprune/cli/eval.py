"""``layerprune eval``: perplexity with the papers' protocol; zero-shot accuracy with --tasks (lm-eval)."""
from __future__ import annotations

from pathlib import Path

from layerprune.cli.common import (DATA_DIR_HELP, _common_model_args, _examples, _load, _model_arg, _model_spec,
                                   _positive)
from layerprune.outputs import prepare_file, write_json


def add_parser(sub) -> None:
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
    s.set_defaults(func=run)


def run(args) -> int:
    from layerprune.data.corpora import resolve_data_dir
    from layerprune.evaluation.perplexity import evaluate_ppl
    from layerprune.models.info import measure_sparsity

    from layerprune.evaluation.zeroshot import format_table, join_record, parse_tasks, zeroshot
    from layerprune.record import RECORD_NAME, read_record, write_record

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
