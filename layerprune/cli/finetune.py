"""``layerprune finetune``: LoRA recovery of a pruned run, mask fixed, merged and saved."""
from __future__ import annotations

from layerprune.cli.common import DATA_DIR_HELP, DTYPES, _device, _examples, _positive, _table, calibration_args


def add_parser(sub) -> None:
    s = sub.add_parser("finetune", help="LoRA recovery of a pruned run, mask fixed, merged and saved",
                       epilog=_examples("layerprune finetune runs/wanda60 --steps 60 --out runs/wanda60-lora"))
    s.add_argument("run_dir", help="a prune run directory (has layerprune.json)")
    s.add_argument("--steps", type=_positive, required=True, help="optimizer steps")
    s.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    s.add_argument("--rank", type=_positive, default=8, help="LoRA rank r")
    s.add_argument("--lora-alpha", type=_positive, default=16, help="LoRA alpha (update scaled by alpha / r)")
    s.add_argument("--batch-size", type=_positive, default=1, help="windows per step")
    s.add_argument("--eval", default="wikitext2", help="comma list of datasets for PPL before/after ('' for none)")
    s.add_argument("--max-windows", type=_positive, default=None, help="evaluate only the first N windows")
    s.add_argument("--out", default=None, help="new run directory (default: none; replacing RUN_DIR needs --force)")
    s.add_argument("--force", action="store_true", help="replace --out if it holds a run, or RUN_DIR in place")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    s.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype while training")
    s.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda")
    calibration_args(s, seqlen=512, what="training")  # --seed also seeds the LoRA initialisation
    s.set_defaults(func=run)


def run(args) -> int:
    from layerprune.recovery.finetune import finetune_run

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
