"""Pruned SmolLM2 in llama.cpp: export to GGUF, then llama.cpp's own PPL and speed against the dense GGUF.

    bash bench/setup_llamacpp.sh                   # builds llama-perplexity / llama-bench (bench only, never CI)
    python -m bench.deploy_gguf --run slim=RUN1 --run wanda24=RUN2 [--bin DIR] [--work DIR]
    python -m bench.deploy_gguf ... --keep dense,wanda24   # measure only the other runs again, keep those rows

The dense model is exported straight from ``smollm2-135m``. For every model and type: ``layerprune export`` (timed),
then
- PPL in llama.cpp (``llama-perplexity``) and in layerprune (the same weights in PyTorch, fp32) on the same windows.
  llama-perplexity's default scores only the second half of each window, so it runs in its strided mode
  (``--ppl-stride 511 -c 257``; that mode adds stride // 2 to the context, giving 512): window i holds tokens
  ``[511 i, 511 i + 512)`` and all 511 predictions are scored.
  layerprune scores exactly those windows with ``window_nll``; the paper protocol's windows (``layerprune eval``:
  ``[512 i, 512 i + 512)``) are reported beside them, so the protocol difference is measured, not assumed.
- Speed in llama.cpp (``llama-bench``): prefill ``pp512`` and decode ``tg128`` tokens/s at ``--threads``.
Writes ``bench/results/NAME.json`` and ``.md`` (``--name``, default deploy_gguf).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import MODEL, RESULTS, code_line, cmdline, write_atomic, write_json
from layerprune import evaluate_ppl, load_model
from layerprune.data.corpora import load_text, resolve_data_dir
from layerprune.evaluation.perplexity import tokenize_corpus, window_nll
from layerprune.export.gguf import export

SEQLEN, WINDOWS = 512, 40


def llama_ppl(binary: Path, gguf: Path, text: Path, threads: int) -> dict:
    stride = SEQLEN - 1  # strided mode widens the context by stride // 2: -c 257 gives windows of 512
    cmd = [str(binary / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(SEQLEN - stride // 2),
           "-b", str(SEQLEN), "--ppl-stride", str(stride), "--chunks", str(WINDOWS), "-t", str(threads)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    log = p.stdout + p.stderr
    if p.returncode:
        raise RuntimeError(f"llama-perplexity failed ({p.returncode}): {log[-2000:]}")
    chunks = re.findall(r"\[(\d+)\]([0-9.]+)", log)
    tokens = re.search(r"have (\d+) tokens", log)
    n_ctx = re.search(r"n_ctx=(\d+)", log)
    if not n_ctx or int(n_ctx.group(1)) != SEQLEN:
        raise RuntimeError(f"llama-perplexity ran with n_ctx {n_ctx and n_ctx.group(1)}, not {SEQLEN}")
    return {"ppl": float(chunks[-1][1]), "windows": int(chunks[-1][0]), "tokens": int(tokens.group(1)) if tokens
            else None, "seconds": round(time.time() - t0, 1), "command": " ".join(cmd)}


@torch.inference_mode()
def torch_ppl(model, ids: torch.Tensor, stride: int) -> float:
    """PPL over WINDOWS windows of SEQLEN tokens starting every ``stride`` tokens, every prediction scored."""
    ids = ids.reshape(-1)
    x = torch.stack([ids[i * stride: i * stride + SEQLEN] for i in range(WINDOWS)])
    nll = torch.cat([window_nll(model, x[i:i + 4]) for i in range(0, WINDOWS, 4)])
    return math.exp(nll.mean().item())


def llama_bench(binary: Path, ggufs: list[Path], threads: int, reps: int) -> list[dict]:
    cmd = [str(binary / "llama-bench"), "-m", ",".join(map(str, ggufs)), "-p", str(SEQLEN), "-n", "128",
           "-t", str(threads), "-r", str(reps), "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"llama-bench failed ({p.returncode}): {p.stderr[-2000:]}")
    rows = json.loads(p.stdout)
    return [{"model": r["model_filename"], "test": "pp512" if r["n_prompt"] else "tg128",
             "tokens_per_s": r["avg_ts"], "stdev": r["stddev_ts"], "size_bytes": r["model_size"],
             "params": r["model_n_params"]} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR", help="a pruned run to compare")
    ap.add_argument("--bin", default=os.environ.get("LLAMACPP_BIN", "/tmp/layerprune-llamacpp/build/bin"),
                    help="folder with llama-perplexity and llama-bench (bench/setup_llamacpp.sh)")
    ap.add_argument("--work", default="/tmp/layerprune-deploy", help="scratch folder for the dense GGUFs and text")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    ap.add_argument("--ppl-types", default="f32,f16", help="types whose PPL is measured")
    ap.add_argument("--speed-types", default="f16,q8_0", help="types whose speed is measured")
    ap.add_argument("--data-dir", default=None, help="data directory")
    ap.add_argument("--speed-only", action="store_true", help="keep the PPL part of bench/results/deploy_gguf.json "
                    "and measure the speed again")
    ap.add_argument("--keep", default="", help="comma-separated models whose PPL part is kept from "
                    "bench/results/deploy_gguf.json (their GGUFs unchanged); the others are exported and measured")
    ap.add_argument("--align", type=int, default=32, help="export --align: FFN widths padded to a multiple of it")
    ap.add_argument("--name", default="deploy_gguf", help="result files bench/results/NAME.{json,md} (also what "
                    "--keep and --speed-only read), e.g. deploy_gguf_depth for depth runs")
    args = ap.parse_args()
    binary, work = Path(args.bin), Path(args.work)
    missing = [b for b in ("llama-perplexity", "llama-bench") if not (binary / b).is_file()]
    if missing:  # before any export: the whole run needs them
        print(f"no {' / '.join(missing)} in {binary}: build them with `bash bench/setup_llamacpp.sh` or pass --bin DIR",
              file=sys.stderr)
        sys.exit(2)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(args.data_dir)
    text = work / "wikitext2-test.txt"
    text.write_text(load_text("wikitext2", data_dir), encoding="utf-8")  # the text layerprune tokenizes
    ppl_types, speed_types = args.ppl_types.split(","), args.speed_types.split(",")
    models = {"dense": MODEL, **dict(r.split("=", 1) for r in args.run)}
    build = binary.parents[1] / "build_time.json"  # written by bench/setup_llamacpp.sh
    out = {"command": cmdline(), "threads": args.threads, "seqlen": SEQLEN, "windows": WINDOWS, "models": {},
           "align": args.align,
           "llamacpp_build": json.loads(build.read_text()) if build.is_file() else None}
    torch.set_num_threads(args.threads)
    partial_path = work / "deploy_partial.json"  # finished llama-perplexity runs, kept across a crash
    partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    keep = set(models) if args.speed_only else set(filter(None, args.keep.split(",")))
    if keep:
        before = json.loads((RESULTS / f"{args.name}.json").read_text())["models"]
        out["models"] = {n: before[n] for n in models if n in keep}
    for name, spec in models.items():
        if name in keep:
            continue
        model, tok = load_model(spec)
        ids = tokenize_corpus(tok, "wikitext2", data_dir, SEQLEN)
        row = {"spec": spec, "hf_tokens": int(ids.numel()), "params": sum(p.numel() for p in model.parameters()),
               "layerprune_eval_ppl": evaluate_ppl(model, tok, "wikitext2", SEQLEN, data_dir, WINDOWS,
                                                   progress=False).ppl,
               "torch_strided_ppl": torch_ppl(model, ids, SEQLEN - 1), "gguf": {}}
        for qtype in sorted(set(ppl_types) | set(speed_types)):
            dest = None if Path(spec).is_dir() else work / f"{name}-{qtype}.gguf"
            t0 = time.time()
            info = export(spec, qtype, dest, force=True, model=model, tokenizer=tok, align=args.align)
            g = {"file": info["out"], "bytes": info["bytes"], "architecture": info["architecture"],
                 "tensors": info["tensors"], "export_s": round(time.time() - t0, 1),
                 "ffn_channels_padded": info["ffn_channels_padded"]}
            if qtype in ppl_types:
                key = f"{spec} {qtype}" + (f" align {args.align}" if info["ffn_channels_padded"] else "")
                if key not in partial:
                    partial[key] = llama_ppl(binary, Path(info["out"]), text, args.threads)
                    write_atomic(partial_path, json.dumps(partial, indent=1))
                g["llamacpp"] = partial[key]
                g["llamacpp_vs_torch_same_windows"] = g["llamacpp"]["ppl"] / row["torch_strided_ppl"] - 1
                g["llamacpp_vs_layerprune_eval"] = g["llamacpp"]["ppl"] / row["layerprune_eval_ppl"] - 1
            row["gguf"][qtype] = g
            print(name, qtype, json.dumps(g)[:400], flush=True)
        out["models"][name] = row
        del model
    speed = {}
    for qtype in speed_types:
        files = [Path(out["models"][n]["gguf"][qtype]["file"]) for n in models]
        rows = llama_bench(binary, files, args.threads, args.reps)
        for n, f in zip(models, files):
            for r in rows:
                if Path(r["model"]).resolve() == f.resolve():  # runs may share file names (RUN/model-f16.gguf)
                    speed.setdefault(qtype, {}).setdefault(n, {})[r["test"]] = r
        for n in models:
            s, d = speed[qtype][n], speed[qtype]["dense"]
            for test in ("pp512", "tg128"):
                s[test]["vs_dense"] = s[test]["tokens_per_s"] / d[test]["tokens_per_s"]
    out["models"] = {n: out["models"][n] for n in models}  # the order of --run, kept rows included
    out["speed"] = speed
    write_json(RESULTS / f"{args.name}.json", out)
    lines = [f"# Pruned SmolLM2 in llama.cpp ({args.threads} threads, WikiText-2 {WINDOWS} x {SEQLEN})", "",
             code_line(), "", f"`{cmdline()}`", "",
             "| model | type | GGUF MiB | llama.cpp PPL | layerprune PPL, same windows | diff | layerprune eval PPL |",
             "|---|---|---|---|---|---|---|"]
    for n, row in out["models"].items():
        for qtype, g in row["gguf"].items():
            if "llamacpp" in g:
                lines.append(f"| {n} | {qtype} | {g['bytes'] / 2**20:.1f} | {g['llamacpp']['ppl']:.3f} | "
                             f"{row['torch_strided_ppl']:.3f} | {100 * g['llamacpp_vs_torch_same_windows']:+.2f}% | "
                             f"{row['layerprune_eval_ppl']:.3f} |")
    lines += ["", "| model | type | GGUF MiB | prefill pp512 tok/s | vs dense | decode tg128 tok/s | vs dense |",
              "|---|---|---|---|---|---|---|"]
    for qtype, per in speed.items():
        for n, s in per.items():
            lines.append(f"| {n} | {qtype} | {s['pp512']['size_bytes'] / 2**20:.1f} | "
                         f"{s['pp512']['tokens_per_s']:.1f} ± {s['pp512']['stdev']:.1f} | "
                         f"{s['pp512']['vs_dense']:.2f}x | "
                         f"{s['tg128']['tokens_per_s']:.1f} ± {s['tg128']['stdev']:.1f} | "
                         f"{s['tg128']['vs_dense']:.2f}x |")
    write_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
