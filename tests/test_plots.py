"""`layerprune plot` and the card show per-block sparsity from the record's own definition (``record.block_sparsity``):
the values drawn equal what the pruned model holds, for unstructured, N:M and structured (SlimGPT) runs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model

from layerprune import prune
from layerprune.card import render
from layerprune.models.adapters import get_adapter
from layerprune.plots import block_sparsity_figure


def calib(n=6, seqlen=24, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def linear_sizes(model) -> list[tuple[int, int]]:
    """Per block: (parameters, exact zeros) over the block's prunable linears."""
    a = get_adapter(model)
    out = []
    for block in a.blocks(model):
        ws = [a.get_weight(m) for m in a.linears(block).values()]
        out.append((sum(w.numel() for w in ws), sum(int((w == 0).sum()) for w in ws)))
    return out


def plotted(record: dict) -> tuple[list, list, list]:
    """(blocks, target, achieved) as drawn: the y data of the figure's two lines."""
    import matplotlib.pyplot as plt

    fig = block_sparsity_figure({"run": record})
    try:
        target, achieved = fig.axes[0].lines
        return list(target.get_xdata()), list(target.get_ydata()), list(achieved.get_ydata())
    finally:
        plt.close(fig)


RUNS = {
    "wanda-dlp": dict(method="wanda", sparsity=0.6, allocation="dlp"),
    "sparsegpt-2:4": dict(method="sparsegpt", sparsity=0.5, nm=(2, 4)),
    "slimgpt-ipr": dict(method="slimgpt", sparsity=0.4, allocation="ipr-log"),
}


@pytest.mark.parametrize("run", RUNS)
def test_plotted_sparsity_is_what_the_pruned_model_holds(run):
    pytest.importorskip("matplotlib")
    model = tiny_model("qwen2", layers=4)
    dense = linear_sizes(model)
    rec = json.loads(json.dumps(prune(model, calibration=calib(), progress=False, **RUNS[run]), default=str))
    after = linear_sizes(model)
    if run.startswith("slimgpt"):  # rows and columns cut away: removed = parameters before - parameters kept
        truth = [1 - kept / before for (before, _), (kept, _) in zip(dense, after)]
        assert any(t > 0.1 for t in truth)
    else:  # zeros in place: the record's measured per-block sparsity counts them too
        truth = [zeros / n for n, zeros in after]
        assert truth == pytest.approx(rec["measured_block_sparsity"], abs=1e-12)
    blocks, target, achieved = plotted(rec)
    assert blocks == [0, 1, 2, 3]
    assert achieved == pytest.approx(truth, abs=1e-9)
    assert target == pytest.approx(rec["allocation"]["block"], abs=1e-9)
    if run != "sparsegpt-2:4":
        assert max(target) - min(target) > 0.05  # allocations that differ per block


def test_structured_record_before_shape_before_reads_the_same_and_card_shows_it():
    model = tiny_model("llama", layers=3)
    dense = linear_sizes(model)
    rec = prune(model, calibration=calib(), method="slimgpt", sparsity=0.5, progress=False)
    now = plotted(rec)
    old = copy.deepcopy(rec)
    for row in old["layers"]:
        del row["shape_before"]
    for got, want in zip(plotted(old), now):  # a record written before shape_before: the same values
        assert got == pytest.approx(want, abs=1e-12)
    removed = 1 - sum(k for k, _ in linear_sizes(model)) / sum(n for n, _ in dense)
    assert f"| achieved sparsity | {removed:.4f} of the block linears' parameters removed |" in render(rec)
