"""``layerprune demo``: the main job, SmolLM2 dense vs Wanda 50% uniform vs Wanda 50% + DLP."""
from __future__ import annotations

from pathlib import Path

from layerprune.cli.common import (DATA_DIR_HELP, _common_model_args, _examples, _load, _positive, _table,
                                   calibration_args)


def add_parser(sub) -> None:
    s = sub.add_parser("demo", help="main job: SmolLM2 dense vs Wanda 50%% uniform vs Wanda 50%% + DLP",
                       epilog=_examples("layerprune demo", "layerprune demo --sparsity 0.7 --out runs/demo70"))
    s.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub id")
    s.add_argument("--sparsity", type=float, default=0.5, help="target sparsity of both pruned runs")
    s.add_argument("--alpha", type=float, default=0.15, help="DLP alpha")
    s.add_argument("--max-windows", type=_positive, default=40, help="WikiText-2 test windows evaluated")
    s.add_argument("--out", default="runs/demo", help="folder for the records and the per-block plot")
    s.add_argument("--force", action="store_true",
                   help="replace --out if it holds a layerprune run (an earlier demo's own files are replaced anyway)")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    _common_model_args(s)
    calibration_args(s, nsamples=32, seqlen=512)  # also the evaluation window length
    s.set_defaults(func=run)


def run(args) -> int:
    """The main job: dense vs Wanda 50% uniform vs Wanda 50% + DLP on SmolLM2, a before/after table and a plot."""
    import copy

    from layerprune import api
    from layerprune.data.corpora import resolve_data_dir
    from layerprune.evaluation.perplexity import evaluate_ppl
    from layerprune.models.info import measure_sparsity
    from layerprune.outputs import finish_dir, prepare_dir
    from layerprune.plots import plot_block_sparsity
    from layerprune.record import write_record

    data_dir = resolve_data_dir(args.data_dir)
    out = Path(args.out)
    force = args.force or _earlier_demo(out)  # `make demo` twice: the second replaces the first
    prepare_dir(out, force, inputs=[args.model], create=False)
    model, tok = _load(args)
    calib = api.calibration_set(tok, args.calib, args.nsamples, args.seqlen, args.seed, data_dir)
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
    work = prepare_dir(out, force, inputs=[args.model])
    plot_block_sparsity(records, work / "block_sparsity.png")
    write_record(work, {"command": "layerprune demo", "seqlen": args.seqlen, "max_windows": args.max_windows,
                       "rows": rows, "records": records})
    finish_dir(work, out)
    png = out / "block_sparsity.png"
    print(f"\nSmolLM2-135M, WikiText-2 test PPL ({args.max_windows} windows x {args.seqlen} tokens), "
          f"calibration {args.nsamples} x {args.seqlen} tokens from {args.calib}, seed {args.seed}")
    print(_table(rows, [("run", "run"), ("sparsity", "sparsity"), ("wikitext2 ppl", "ppl"),
                        ("prune s", "seconds")]))
    print(f"per-block plot: {png}; records: {out / 'layerprune.json'}")
    return 0


DEMO_FILES = {"layerprune.json", "block_sparsity.png"}  # what a demo writes


def _earlier_demo(out: Path) -> bool:
    """``out`` holds an earlier demo's output and nothing else (so rerunning replaces only what the demo wrote)."""
    import json

    from layerprune.outputs import RECORD_NAME

    if not out.is_dir() or not {p.name for p in out.iterdir()} <= DEMO_FILES:
        return False
    try:
        return json.loads((out / RECORD_NAME).read_text()).get("command") == "layerprune demo"
    except (OSError, ValueError):
        return False
