"""Plots of a run record: per-block target vs achieved sparsity (matplotlib, PNG)."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError


def block_sparsity(record: dict) -> tuple[list[float], list[float]]:
    """Per-block (target, achieved), parameter-weighted over the block's pruned linears."""
    by_block: dict[int, list] = {}
    for layer in record["layers"]:
        n = layer["shape"][0] * layer["shape"][1]
        t = by_block.setdefault(layer["block"], [0.0, 0.0, 0])
        t[0] += layer["target"] * n
        t[1] += layer["achieved"] * n
        t[2] += n
    blocks = sorted(by_block)
    return [by_block[b][0] / by_block[b][2] for b in blocks], [by_block[b][1] / by_block[b][2] for b in blocks]


def plot_block_sparsity(records: dict[str, dict], out_png: Path) -> Path:
    """One line per run: target (solid) and achieved (markers) sparsity per block."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'layerprune[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for label, rec in records.items():
        target, achieved = block_sparsity(rec)
        line, = ax.plot(range(len(target)), target, "-", label=f"{label} target")
        ax.plot(range(len(achieved)), achieved, "o", ms=3.5, color=line.get_color(), label=f"{label} achieved")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("per-block sparsity")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, metadata={"Software": "layerprune"})
    plt.close(fig)
    return out_png
