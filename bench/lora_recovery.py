"""LoRA recovery of a Wanda 60%-pruned SmolLM2-135M with the mask fixed (issue 8), through `layerprune finetune`'s code.

    python -m bench.lora_recovery --sparsity 0.6 --steps 40 --lr 1e-3   # -> bench/results/lora_recovery.{json,md}

1. Wanda, uniform, calibration 32 x 512 C4 pool seed 0, saved as a run directory (under $LP_BENCH_CACHE).
2. recovery.finetune_run = `layerprune finetune RUN --steps N --lr LR --nsamples N --seqlen 512 --max-windows 40
   --out RUN-lora`: LoRA rank 8 / alpha 16 on every block linear, batch 1 x 512 tokens per step, training windows
   drawn from the same C4 pool (seed 0), merged, mask re-applied; WikiText-2 test PPL (40 x 512) before and after.
3. Sparsity and the zero pattern are measured on the saved weights before and after.
"""
from __future__ import annotations

import argparse
import time

import torch

from layerprune import load_model, prune
from layerprune.record import save_run
from layerprune.recovery import finetune_run, masks_of

from .common import CACHE, MODEL, RESULTS, calibration, code_line, write_json

OUT = RESULTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    t0 = time.time()
    pct = round(args.sparsity * 100)
    run, new = CACHE / f"wanda{pct}-run", CACHE / f"wanda{pct}-run-lora"
    if not (run / "layerprune.json").is_file():
        model, tok = load_model(MODEL)
        rec = prune(model, tok, method="wanda", sparsity=args.sparsity, calibration=calibration(tok), progress=False)
        rec["model"] = MODEL
        run.mkdir(parents=True, exist_ok=True)
        save_run(model, tok, run, rec)
        del model
    prune_s = time.time() - t0
    masks_before = masks_of(load_model(str(run))[0])
    rec = finetune_run(run, args.steps, out=new, force=True, lr=args.lr, rank=args.rank, alpha=2 * args.rank,
                       nsamples=args.steps, seqlen=512, max_windows=40, progress=False)
    masks_after = masks_of(load_model(str(new))[0])  # what was saved
    same = all(torch.equal(masks_after[n], m) for n, m in masks_before.items())
    f = rec["finetune"]
    cmd = (f"layerprune finetune RUN --steps {args.steps} --lr {args.lr} --rank {args.rank} "
           f"--lora-alpha {2 * args.rank}"
           f" --nsamples {args.steps} --seqlen 512 --max-windows 40 --out RUN-lora")
    res = {"command": f"python -m bench.lora_recovery --sparsity {args.sparsity} --steps {args.steps} --lr {args.lr}",
           "equivalent_cli": cmd, "sparsity_target": args.sparsity, "prune_seconds": prune_s,
           "ppl_before": f["eval"]["before"]["wikitext2"]["ppl"], "ppl_after": f["eval"]["after"]["wikitext2"]["ppl"],
           "sparsity_before": f["sparsity_before"], "sparsity_after": f["sparsity_after"],
           "zero_pattern_identical_on_disk": same, "finetune": f, "total_seconds": time.time() - t0}
    write_json(OUT / "lora_recovery.json", res)
    text = (f"Command: `{res['command']}` (= `{cmd}` on a Wanda {pct}% uniform run; SmolLM2-135M fp32, calibration "
            f"32 x 512 C4 pool seed 0; LoRA rank {f['rank']}, alpha {f['alpha']}, AdamW constant lr {f['lr']}, "
            f"{f['steps']} steps x {f['batch_size']} x {f['seqlen']} tokens of the C4 pool, "
            f"{f['trainable_params'] / 1e6:.2f} M trainable params)\n\n"
            "| model | measured sparsity | WikiText-2 PPL (40x512) |\n|---|---|---|\n"
            f"| Wanda {pct}% uniform | {res['sparsity_before']:.6f} | {res['ppl_before']:.2f} |\n"
            f"| + LoRA {f['steps']} steps, merged, mask re-applied | {res['sparsity_after']:.6f} | "
            f"{res['ppl_after']:.2f} |\n\n"
            f"Zero pattern of every block linear identical before/after on the saved weights: {same} "
            f"({f['masked_weights']} zeros; largest |merged weight| at a pruned position before re-masking "
            f"{f['max_abs_refilled']:.2e}). Training {f['train_seconds']:.0f}s ({f['seconds_per_step']:.1f} s/step), "
            f"finetune total incl. 2 PPL evaluations {f['total_seconds']:.0f}s, "
            f"bench total {res['total_seconds'] / 60:.1f}"
            " min on 2 CPU cores. Training loss (C4 windows): first "
            f"{f['losses'][0]:.3f}, mean of the last 10 steps "
            f"{sum(f['losses'][-10:]) / len(f['losses'][-10:]):.3f}.\n\n"
            f"{code_line()}\n")
    (OUT / "lora_recovery.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
