"""SparseGPT at another commit vs now, on SmolLM2's real Hessians: does a solver change move masks or only rounding?

    python -m bench.sparsegpt_commits --old f1988e3^ --nm 2:4     # -> bench/results/sparsegpt_commits.md

Both solvers see the same weights and the same Hessians (dense inputs of blocks 0, 10 and 20 on 8 x 512 C4-pool
calibration windows, accumulated in float64); the old ``solvers/sparsegpt.py`` and ``solvers/common.py`` are read with
``git show`` and run beside today's. Per linear: the fraction of mask entries that differ, the layer objective
tr(dW H dWᵀ) of each, and the largest difference of the kept weights.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import types

import torch

from bench.common import MODEL, RESULTS, ROOT, cmdline, code_line, write_atomic
from layerprune import load_model
from layerprune.data.calibration import get_calibration
from layerprune.data.corpora import calibration_pool, resolve_data_dir
from layerprune.solvers.sparsegpt import SparseGPT
from layerprune.stats import LayerStats

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def old_solver(rev: str):
    """The SparseGPT class of ``rev`` (its common.py too), loaded without registering it."""
    show = lambda path: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True,  # noqa: E731
                                       capture_output=True, text=True).stdout
    common = types.ModuleType("_old_common")
    exec(compile(show("layerprune/solvers/common.py"), "old common.py", "exec"), common.__dict__)
    sys.modules["_old_common"] = common
    src = show("layerprune/solvers/sparsegpt.py").replace("@register_solver\n", "")
    src = src.replace("from layerprune.solvers.common import", "from _old_common import")
    mod = types.ModuleType("_old_sparsegpt")
    exec(compile(src, "old sparsegpt.py", "exec"), mod.__dict__)
    return mod.SparseGPT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="git revision of the other solver")
    ap.add_argument("--nm", default="2:4", help="N:M pattern, or 'none' for 50%% unstructured")
    ap.add_argument("--blocks", default="0,10,20")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    nm = None if args.nm == "none" else tuple(int(x) for x in args.nm.split(":"))
    Old = old_solver(args.old)
    model, tok = load_model(MODEL, "float32")
    calib = get_calibration(tok, calibration_pool("c4", resolve_data_dir(args.data_dir)), 8, 512, 0).ids
    sums: dict[str, list] = {}
    mods = {}
    for b in map(int, args.blocks.split(",")):
        for ln in LINEARS:
            name, mod = f"{b}.{ln}", model.model.layers[b].get_submodule(ln)
            mods[name] = mod

            def hook(m, a, name=name):
                x = a[0].reshape(-1, a[0].shape[-1]).double()
                s = sums.setdefault(name, [0, 0])
                s[0], s[1] = s[0] + x.T @ x, s[1] + x.shape[0]
            mod.register_forward_pre_hook(hook)
    with torch.no_grad():
        for i in range(calib.shape[0]):
            model(calib[i:i + 1])
    lines = [f"# SparseGPT at {args.old} vs now ({'unstructured 50%' if nm is None else f'{nm[0]}:{nm[1]}'}), "
             "SmolLM2 real Hessians", "", code_line(), "", f"`{cmdline()}`", "",
             "| linear | mask entries that differ | objective old | objective now | ratio | max diff of weights |",
             "|---|---|---|---|---|---|"]
    for name, mod in mods.items():
        H = (2 / sums[name][1] * sums[name][0]).float()
        W = mod.weight.detach().float()
        out = {tag: cls().prune(W, LayerStats(ntokens=sums[name][1], hessian=H.clone()), 0.5, nm=nm)
               for tag, cls in (("old", Old), ("now", SparseGPT))}
        err = {t: float(torch.trace((W - v).double() @ H.double() @ (W - v).double().T)) for t, v in out.items()}
        differ = ((out["old"] == 0) != (out["now"] == 0)).float().mean().item()
        lines.append(f"| {name} | {differ:.4%} | {err['old']:.6g} | {err['now']:.6g} | {err['now'] / err['old']:.5f} | "
                     f"{(out['old'] - out['now']).abs().max().item():.3g} |")
        print(lines[-1], flush=True)
    write_atomic(RESULTS / "sparsegpt_commits.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
