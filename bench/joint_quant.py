"""SparseGPT 50% + 4-bit (groupsize 128, joint) next to SparseGPT 50% alone and 4-bit alone on SmolLM2 (issue 8).

    python -m bench.joint_quant   # -> bench/results/joint_quant.{json,md}

WikiText-2 test PPL (40 windows x 512 tokens) of the dequantized weights, and the theoretical size (layerprune.quant:
block linears packed at `bits` with an fp16 scale + `bits`-bit zero per group, a 1-bit mask when sparse; embeddings,
norms and the tied head at fp16). "4-bit alone" is the same solver at sparsity 0 (GPTQ); "round-to-nearest" puts
every weight on the same grid without error compensation (layerprune.quant.quantize_weight, no calibration), as a
reference. Calibration 32 x 512 C4 pool, seed 0. The dense PPL is taken from bench/results/solvers_50.json (same
protocol); SparseGPT 50% comes from the bench
cache (bench/common.py, shared with bench/zeroshot_table.py) when present (else it is pruned here) and its PPL is
measured again.
"""
from __future__ import annotations

import copy
import json
import time

from layerprune import load_model, measure_sparsity
from layerprune.models.adapters import get_adapter
from layerprune.quant import model_size_bytes, quantize_weight

from .common import MODEL, RESULTS, cached_prune, calibration, code_line, wikitext_ppl, write_json

OUT = RESULTS
BITS, GROUP = 4, 128
RUNS = [  # label, cache key, sparsity, solver options, storage format of the size column
    ("sparsegpt 50%", "sparsegpt_50", 0.5, {}, "sparse_fp16"),
    (f"{BITS}-bit g{GROUP} GPTQ alone (sparsegpt, sparsity 0)", f"gptq_{BITS}b_g{GROUP}", 0.0,
     {"wbits": BITS, "groupsize": GROUP}, "quantized"),
    (f"{BITS}-bit g{GROUP} round-to-nearest (no compensation)", "rtn", 0.0, {}, "quantized"),
    (f"sparsegpt 50% + {BITS}-bit g{GROUP} (joint)", f"sparsegpt_50_{BITS}b_g{GROUP}", 0.5,
     {"wbits": BITS, "groupsize": GROUP}, "sparse_quantized"),
]


def round_to_nearest(model, bits, groupsize):
    """A copy of `model` with every block linear replaced by its round-to-nearest quantization (no compensation)."""
    m = copy.deepcopy(model)
    a = get_adapter(m)
    for block in a.blocks(m):
        for mod in a.linears(block).values():
            a.set_weight(mod, quantize_weight(a.get_weight(mod).detach(), bits, groupsize))
    return m


def write(rows, total_s, other_params):
    write_json(OUT / "joint_quant.json", {"command": "python -m bench.joint_quant", "rows": rows,
                                          "total_seconds": total_s})
    lines = ["| run | measured zeros | WikiText-2 PPL (40x512) | storage format | theoretical size MiB | vs fp16 | "
             "prune s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ps = "-" if r["prune_seconds"] is None else f"{r['prune_seconds']:.0f}"
        lines.append(f"| {r['run']} | {r['sparsity']:.4f} | {r['ppl']:.2f} | {r['format']} | "
                     f"{r['size_bytes'] / 2**20:.1f} | {r['size_ratio']:.3f} | {ps} |")
    text = ("Command: `python -m bench.joint_quant` (SmolLM2-135M fp32 compute, calibration 32 x 512 C4 pool seed 0, "
            f"asymmetric min-max grid, {BITS} bits, groupsize {GROUP}). Sizes: block linears in the given format, the "
            f"embeddings/norms/head ({other_params / 1e6:.1f} M params) at fp16 in every row. measured zeros: fraction "
            "of exact zeros in the block linears (with quantization, a few kept weights also round to 0). "
            "prune s '-': reused from "
            f"the zero-shot bench cache. Total {total_s / 60:.1f} min on 2 CPU cores. {code_line()}\n\n"
            + "\n".join(lines) + "\n")
    (OUT / "joint_quant.md").write_text(text)
    print(text, flush=True)


def main() -> None:
    t0 = time.time()
    model, tok = load_model(MODEL)
    calib = calibration(tok)
    ppl = lambda m: wikitext_ppl(m, tok, batch_size=8)  # noqa: E731
    dense = json.loads((OUT / "solvers_50.json").read_text())["rows"][0]
    size = model_size_bytes(model, BITS, GROUP)
    rows = [{"run": "dense", "sparsity": dense["sparsity"], "ppl": dense["ppl"], "format": "dense_fp16",
             "size_bytes": size["dense_fp16"], "size_ratio": 1.0, "prune_seconds": 0.0, "ppl_from": "solvers_50.json"}]
    for label, key, sparsity, opts, fmt in RUNS:
        if key == "rtn":
            t1 = time.time()
            m = round_to_nearest(model, BITS, GROUP)
            secs = time.time() - t1
        else:
            m, secs = cached_prune(model, tok, key, calib, method="sparsegpt", sparsity=sparsity, solver_options=opts)
        s = model_size_bytes(m, BITS, GROUP)
        rows.append({"run": label, "sparsity": measure_sparsity(m)["overall"], "ppl": ppl(m), "format": fmt,
                     "size_bytes": s[fmt], "size_ratio": s[fmt] / s["dense_fp16"], "prune_seconds": secs,
                     "solver_options": opts, "sizes": s})
        print(rows[-1]["run"], rows[-1]["ppl"], flush=True)
        write(rows, time.time() - t0, size["other_params"])
        del m


if __name__ == "__main__":
    main()
