"""Plots of a run record: per-block target vs achieved sparsity, and for a depth run every block's criterion value
with the removed blocks marked (matplotlib, PNG)."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError


def block_sparsity(record: dict) -> tuple[list[int], list[float], list[float]]:
    """Per block (index, target, achieved) as the record defines them (``record.block_sparsity``: each row weighted by
    its parameters before pruning, so the rows and columns a structured run cut away count as removed)."""
    from .record_rows import block_sparsity as of_record

    bs = of_record(record)
    return bs["blocks"], bs["target"], bs["achieved"]


def block_sparsity_figure(records: dict[str, dict]):
    """The matplotlib figure: one line per run, target (solid) and achieved (markers) sparsity per block."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'layerprune[plot]'") from None
    depth = {label: rec["depth"] for label, rec in records.items() if rec.get("depth")}
    if depth:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7.4), sharex=True)
        plot_depth_values(ax2, depth)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.2))
    for label, rec in records.items():
        blocks, target, achieved = block_sparsity(rec)
        line, = ax.plot(blocks, target, "-", label=f"{label} target")
        ax.plot(blocks, achieved, "o", ms=3.5, color=line.get_color(), label=f"{label} achieved")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("per-block sparsity")
    fig.tight_layout()
    return fig


def plot_block_sparsity(records: dict[str, dict], out_png: Path) -> Path:
    """``block_sparsity_figure`` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = block_sparsity_figure(records)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, metadata={"Software": "layerprune"})
    plt.close(fig)
    return out_png


def plot_depth_values(ax, depth: dict[str, dict]) -> None:
    """One line per depth run: every block's criterion value (its record's ``depth.values``), removed blocks ringed.
    Runs of different criteria get their own y axis (twin) since their values are not comparable."""
    axes: dict[str, object] = {}
    for label, d in depth.items():
        name = d.get("value_name", d.get("criterion", ""))
        a = axes.setdefault(name, ax if not axes else ax.twinx())
        values = d["values"]
        xs = [i for i, v in enumerate(values) if v is not None]
        line, = a.plot(xs, [values[i] for i in xs], "-o", ms=3, label=f"{label} ({d.get('criterion')})")
        gone = [i for i in d["removed"] if values[i] is not None]
        a.plot(gone, [values[i] for i in gone], "o", ms=9, mfc="none", color=line.get_color(),
               label=f"{label} removed {d['removed']}")
        a.set_ylabel(name, fontsize=8)
        a.legend(fontsize=7, loc="upper left" if a is ax else "upper right")
    ax.set_xlabel("decoder block (of the model the run started from)")
    ax.grid(alpha=0.3)
    ax.set_title("depth: criterion per block (rings: removed)")
