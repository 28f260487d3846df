"""Distillation (KD) recovery vs LM-loss LoRA recovery with the same tokens on a pruned SmolLM2-135M (issue 29).

    flock /tmp/layerprune-heavy.lock env OMP_NUM_THREADS=2 python -m bench.kd_recovery --rows prune-slim,lm-slim,kd-slim

1. The pruned run: SlimGPT, ipr-log allocation, 50% of block parameters, calibration 32 x 512 C4 pool seed 0
   (bench/common.py), saved as a run directory under $LP_BENCH_CACHE (row "prune-slim"; "prune-depth": the depth
   method at 25% of block parameters; "prune-depth50": depth at 50%; "prune-chain": the depth-25% run pruned further
   by SlimGPT ipr-log to 50% of the dense model's block parameters).
2. Each recovery row is `layerprune finetune RUN --steps N --lr LR --nsamples N --seqlen 512 --max-windows 40`
   (recovery.finetune_run) with LoRA rank 8 / alpha 16 on every block linear, batch 1 x 512 tokens per step, the
   same N windows of the C4 pool (seed 0, each seen once) in the same order; "lm-*": the LM loss (today's recovery),
   "kd-*": `--teacher smollm2-135m` (KL divergence to the dense model's logits, T = 1, alpha = 1); "kdmix-*": the same
   with `--kd-alpha 0.5` (half KD, half LM loss; Hinton et al.'s mix of soft and hard targets). WikiText-2 test
   PPL over 40 x 512 before and after, tokens seen, training and total wall time.
The script is resumable: rows already in the JSON are kept unless named again in --rows. Each row records the commit.
"""
from __future__ import annotations

import argparse
import time

from layerprune import load_model, prune
from layerprune.record import save_run
from layerprune.recovery import finetune_run

from .common import CACHE, MODEL, PROTOCOL, RESULTS, calibration, cmdline, code_line, code_version, read_json, \
    wikitext_ppl, write_json

PRUNED = {"slim": ("SlimGPT ipr-log 50%", dict(method="slimgpt", sparsity=0.5, allocation="ipr-log")),
          "depth": ("depth 25% (shortgpt)", dict(method="depth", sparsity=0.25,
                                                 solver_options={"criterion": "shortgpt"})),
          "depth50": ("depth 50% (shortgpt)", dict(method="depth", sparsity=0.5,
                                                   solver_options={"criterion": "shortgpt"})),
          # depth 25% first (the "depth" run), then SlimGPT widths on what is left, to 50% of the dense block params
          "chain": ("depth 25% + SlimGPT ipr-log, 50% of block params", dict(method="slimgpt", allocation="ipr-log"))}
TOTAL = 0.5  # the chain's target: this fraction of the dense model's block parameters removed


def block_params(model) -> list[int]:
    return [sum(p.numel() for p in b.parameters()) for b in model.model.layers]


def run_dir(kind):
    return CACHE / f"kd-bench-{kind}-run"


def do_prune(kind):
    label, kw = PRUNED[kind]
    extra = {}
    if kind == "chain":  # prune the saved depth run further (as `layerprune prune --model DEPTH_RUN` does)
        dense = block_params(load_model(MODEL)[0])
        model, tok = load_model(str(run_dir("depth")))
        left = block_params(model)
        kw = {**kw, "sparsity": 1 - (1 - TOTAL) * sum(dense) / sum(left)}
        extra = {"parent": str(run_dir("depth")), "blocks": [len(dense), len(left)], "step_sparsity": kw["sparsity"]}
    else:
        model, tok = load_model(MODEL)
    t0 = time.time()
    rec = prune(model, tok, calibration=calibration(tok), progress=False, **kw)
    secs = time.time() - t0
    rec["model"] = MODEL
    out = run_dir(kind)
    out.mkdir(parents=True, exist_ok=True)
    save_run(model, tok, out, rec)
    return {"label": label, "prune_seconds": secs, "params": sum(p.numel() for p in model.parameters()), **extra,
            "block_params": sum(block_params(model)),
            "ppl": wikitext_ppl(model, tok), "run": str(out), "code": code_version()}


def do_recover(kind, loss, args):
    teacher = MODEL if loss in ("kd", "kdmix") else None
    kd_alpha = args.mix_alpha if loss == "kdmix" else 1.0
    out = CACHE / f"kd-bench-{kind}-{loss}"
    rec = finetune_run(run_dir(kind), args.steps, out=out, force=True, lr=args.lr, rank=8, alpha=16,
                       nsamples=args.steps, seqlen=512, max_windows=40, teacher=teacher, kd_alpha=kd_alpha,
                       checkpoint_every=0, progress=False)
    f = rec["finetune"]
    cli = (f"layerprune finetune RUN --steps {args.steps} --lr {args.lr} --nsamples {args.steps} --seqlen 512 "
           f"--max-windows 40" + (f" --teacher {MODEL}" if teacher else "")
           + (f" --kd-alpha {kd_alpha}" if loss == "kdmix" else "") + " --out NEW")
    name = {"lm": "LM-loss", "kd": "KD", "kdmix": f"KD x {kd_alpha} + LM x {1 - kd_alpha:g}"}[loss]
    return {"label": f"{PRUNED[kind][0]} + {name} LoRA", "equivalent_cli": cli,
            "ppl_before": f["eval"]["before"]["wikitext2"]["ppl"], "ppl_after": f["eval"]["after"]["wikitext2"]["ppl"],
            "tokens_seen": f["tokens_seen"], "train_seconds": f["train_seconds"], "total_seconds": f["total_seconds"],
            "seconds_per_step": f["seconds_per_step"], "params": sum(p.numel() for p in load_model(str(out))[0]
                                                                     .parameters()),
            "mask_identical": f["mask_identical"], "first_loss": f["losses"][0],
            "last10_loss": sum(f["losses"][-10:]) / len(f["losses"][-10:]), "finetune": f, "code": code_version()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="dense,prune-slim,lm-slim,kd-slim",
                    help="comma list of: dense, prune-K, lm-K, kd-K, kdmix-K for K in slim, depth, depth50, chain "
                    "(chain: prune-depth first; kdmix: KD and LM loss mixed, --mix-alpha)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--name", default="kd_recovery", help="result files bench/results/NAME.{json,md} (e.g. "
                    "kd_recovery_200 for a longer training; rows already there are kept)")
    ap.add_argument("--mix-alpha", type=float, default=0.5, help="kd_alpha of the kdmix-K rows (KD weight; LM: 1 - it)")
    args = ap.parse_args()
    out_path = RESULTS / f"{args.name}.json"
    res = read_json(out_path, {"rows": {}})
    res["meta"] = {"protocol": PROTOCOL, "command": cmdline(), "steps": args.steps, "lr": args.lr}
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        t0 = time.time()
        if row == "dense":
            model, tok = load_model(MODEL)
            out = {"label": "dense SmolLM2-135M", "params": sum(p.numel() for p in model.parameters()),
                   "ppl": wikitext_ppl(model, tok), "code": code_version()}
        elif row.startswith("prune-"):
            out = do_prune(row.removeprefix("prune-"))
        else:
            loss, kind = row.split("-")
            out = do_recover(kind, loss, args)
        out["row_seconds"] = time.time() - t0
        res["rows"][row] = out
        write_json(out_path, res)
        print(row, {k: v for k, v in out.items() if not isinstance(v, dict)}, flush=True)
    write_md(res, out_path.with_suffix(".md"))


def write_md(res, path):
    rows = res["rows"]
    lines = [f"Command: `{res['meta']['command']}` — {res['meta']['protocol']}. Recovery: LoRA rank 8 / alpha 16 on "
             "every block linear, AdamW constant lr, batch 1 x 512 tokens of the C4 pool per step, the same windows "
             "in the same order for both losses; KD = KL divergence to the dense model's logits (T 1, alpha 1).", "",
             "| model | params | WikiText-2 PPL (40x512) | tokens | train s | total s | commit |",
             "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        commit = (r["code"]["commit"] or "?")[:10] + ("+dirty" if r["code"]["dirty"] else "")
        if "ppl_after" in r:
            lines.append(f"| {r['label']} ({r['finetune']['steps']} steps, lr {r['finetune']['lr']}) | "
                         f"{r['params'] / 1e6:.2f} M | {r['ppl_before']:.2f} → **{r['ppl_after']:.2f}** | "
                         f"{r['tokens_seen']} | {r['train_seconds']:.0f} | {r['total_seconds']:.0f} | {commit} |")
        else:
            lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f} M | {r['ppl']:.2f} | - | "
                         f"{r.get('prune_seconds', 0):.0f} | {r['row_seconds']:.0f} | {commit} |")
    lines += ["", code_line() + " (the last write; each row's JSON entry has its own commit)", ""]
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
