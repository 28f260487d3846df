"""``layerprune finetune``: recovery of a pruned run (LM loss or distillation from a teacher), mask fixed, saved."""
from __future__ import annotations

from layerprune.cli.common import DATA_DIR_HELP, DTYPES, _device, _examples, _positive, _table, calibration_args
from layerprune.errors import UserError


def add_parser(sub) -> None:
    s = sub.add_parser("finetune", help="recovery of a pruned run (LoRA or all weights, LM loss or distillation), "
                                        "mask fixed, saved",
                       epilog=_examples("layerprune finetune runs/wanda60 --steps 60 --out runs/wanda60-lora",
                                        "layerprune finetune runs/slim50 --teacher smollm2-135m --steps 300 "
                                        "--out runs/slim50-kd",
                                        "layerprune finetune runs/slim50 --teacher smollm2-135m --steps 300 "
                                        "--out runs/slim50-kd --resume   # after an interruption"))
    s.add_argument("run_dir", help="a prune run directory (has layerprune.json)")
    s.add_argument("--steps", type=_positive, required=True, help="optimizer steps")
    s.add_argument("--teacher", default=None,
                   help="distil from this dense model's logits (built-in name, directory, GGUF or hub id; the same "
                        "tokenizer as the run): KL divergence instead of the LM loss")
    s.add_argument("--kd-temperature", type=float, default=None, help="distillation temperature T (default 1)")
    s.add_argument("--kd-alpha", type=float, default=None,
                   help="weight of the distillation term: alpha * KD + (1 - alpha) * LM loss (default 1)")
    s.add_argument("--kd-topk", type=_positive, default=None,
                   help="KL over the teacher's top-k tokens plus one bucket for the rest (default: whole vocabulary)")
    s.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters (mask kept)")
    s.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    s.add_argument("--rank", type=_positive, default=None, help="LoRA rank r (default 8)")
    s.add_argument("--lora-alpha", type=_positive, default=None, help="LoRA alpha, update scaled by alpha / r "
                                                                      "(default 16)")
    s.add_argument("--batch-size", type=_positive, default=1, help="windows per step")
    s.add_argument("--eval", default="wikitext2", help="comma list of datasets for PPL before/after ('' for none)")
    s.add_argument("--max-windows", type=_positive, default=None, help="evaluate only the first N windows")
    s.add_argument("--checkpoint-every", type=int, default=50,
                   help="save the training state every N steps in the output's .checkpoint (0: never)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted finetuning of the same settings")
    s.add_argument("--out", default=None, help="new run directory (default: none; replacing RUN_DIR needs --force)")
    s.add_argument("--force", action="store_true", help="replace --out if it holds a run, or RUN_DIR in place")
    s.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    s.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype while training")
    s.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda")
    calibration_args(s, seqlen=512, what="training")  # --seed also seeds the LoRA initialisation
    s.set_defaults(func=run)


def run(args) -> int:
    from layerprune.recovery.finetune import finetune_run

    kd_given = [f for f, v in (("--kd-temperature", args.kd_temperature), ("--kd-alpha", args.kd_alpha),
                               ("--kd-topk", args.kd_topk)) if v is not None]
    if kd_given and args.teacher is None:
        raise UserError(f"{', '.join(kd_given)} set the distillation loss, which needs --teacher MODEL")
    lora_given = [f for f, v in (("--rank", args.rank), ("--lora-alpha", args.lora_alpha)) if v is not None]
    if lora_given and args.full:
        raise UserError(f"{', '.join(lora_given)} set the LoRA adapters, which --full does not use: drop one")
    datasets = [d.strip() for d in args.eval.split(",") if d.strip()]
    rec = finetune_run(args.run_dir, args.steps, out=args.out, force=args.force, lr=args.lr, rank=args.rank or 8,
                       alpha=args.lora_alpha or 16, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                       batch_size=args.batch_size, seed=args.seed, eval_datasets=datasets, max_windows=args.max_windows,
                       data_dir=args.data_dir, dtype=args.dtype, device=_device(args.device), teacher=args.teacher,
                       kd_temperature=1.0 if args.kd_temperature is None else args.kd_temperature,
                       kd_alpha=1.0 if args.kd_alpha is None else args.kd_alpha, kd_topk=args.kd_topk, full=args.full,
                       checkpoint_every=args.checkpoint_every, resume=args.resume,
                       command_line=getattr(args, "command_line", None))
    f = rec["finetune"]
    ppl = {k: {d: r["ppl"] for d, r in f["eval"][k].items()} for k in ("before", "after")}
    how = ("KD " if f["loss"] == "kd" else "") + ("full" if f["full"] else "LoRA")
    rows = [{"model": "pruned", "sparsity": f["sparsity_before"], **ppl["before"]},
            {"model": f"+ {how} {f['steps']} steps", "sparsity": f["sparsity_after"], **ppl["after"]}]
    print(_table(rows, [("model", "model"), ("sparsity", "sparsity")] + [(f"{d} ppl", d) for d in datasets]))
    adapters = "all weights" if f["full"] else f"LoRA rank {f['rank']}"
    kd = f"; KD from {f['teacher']}, T {f['kd']['temperature']}, alpha {f['kd']['alpha']}, top-k " \
         f"{f['kd']['topk'] or 'all'}" if f["loss"] == "kd" else ""
    print(f"{adapters}, lr {f['lr']}, {f['steps']} steps x {f['batch_size']} x {f['seqlen']} tokens "
          f"({f['tokens_seen']} tokens) in {f['train_seconds']:.0f}s training, {f['total_seconds']:.0f}s in all{kd}; "
          f"zero pattern identical: {f['mask_identical']}; saved to {args.out or args.run_dir}")
    return 0
