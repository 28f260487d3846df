"""GPTQ-style min-max quantizer: grid, error vs bits, groups refitted from the current weights, size formula."""
import math

import pytest
import torch

from layerprune.errors import UserError
from layerprune.quant import Quantizer, make_column_quantizer, quantize_weight, theoretical_size_bytes


def rand_w(rows=16, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.linspace(0.1, 3, rows).unsqueeze(1)


@pytest.mark.parametrize("sym", [False, True])
def test_error_decreases_with_bits(sym):
    w = rand_w()
    errs = [(quantize_weight(w, b, -1, sym) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-4 * w.pow(2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("groupsize", [-1, 16])
@pytest.mark.parametrize("sym", [False, True])
def test_values_on_grid(bits, groupsize, sym):
    w = rand_w(8, 48)
    q = quantize_weight(w, bits, groupsize, sym)
    g = w.shape[1] if groupsize == -1 else groupsize
    for r in range(w.shape[0]):
        for s in range(0, w.shape[1], g):
            vals = q[r, s:s + g]
            assert len(torch.unique(vals)) <= 2 ** bits
            # every value is scale * integer, with the scale fitted on this group (brute force min-max)
            blk = w[r, s:s + g]
            lo, hi = min(blk.min().item(), 0.0), max(blk.max().item(), 0.0)
            if sym:
                hi = max(-lo, hi)
                lo = -hi
            scale = (hi - lo) / (2 ** bits - 1)
            k = vals / scale
            assert torch.allclose(k, k.round(), atol=1e-3)
            # asym: nearest grid point (<= scale / 2); sym: the top value can clip by one step
            assert (vals - blk).abs().max().item() <= (scale if sym else scale / 2) + 1e-5
    assert q.dtype == w.dtype


def test_zero_stays_zero_and_empty_rows():
    w = rand_w(4, 32)
    w[:, ::2] = 0
    w[1] = 0
    for sym in (False, True):
        q = quantize_weight(w, 3, 8, sym)
        assert torch.all(q[w == 0] == 0)
        assert torch.all(q[1] == 0)


def test_sym_vs_asym():
    w = torch.rand(6, 40) + 0.5  # all positive: asym uses the range [0, max], sym wastes half the grid
    qa, qs = quantize_weight(w, 4, -1, False), quantize_weight(w, 4, -1, True)
    assert (qa - w).pow(2).mean() < (qs - w).pow(2).mean()
    quant = Quantizer(4, sym=True).find_params(w)
    assert torch.all(quant.zero == 8)
    assert torch.all(qs >= 0) and torch.all(qa >= 0)
    # symmetric scale depends only on max |w|, so w and -w share it; asym fits each sign separately
    assert torch.equal(Quantizer(4, sym=True).find_params(-w).scale, quant.scale)
    assert not torch.equal(Quantizer(4).find_params(-w).zero, Quantizer(4).find_params(w).zero)


def test_groups_refit_from_current_weights():
    """At each group start the params come from the weight tensor as it is then, like GPTQ's sweep."""
    w = rand_w(4, 32)
    work = w.clone()
    cq = make_column_quantizer(work, bits=2, groupsize=8)
    out = []
    for j in range(32):
        if j == 8:
            work[:, 8:16] *= 10  # compensation changes later columns before their group starts
        out.append(cq(j, work[:, j]))
    out = torch.stack(out, 1)
    ref = quantize_weight(work, 2, 8)  # fitted on the changed weights
    assert torch.equal(out, ref)
    stale = quantize_weight(w, 2, 8)
    assert not torch.equal(out[:, 8:16], stale[:, 8:16] * 10)
    # block argument overrides the stored weight
    cq2 = make_column_quantizer(torch.zeros(4, 32), bits=2, groupsize=8)
    assert torch.equal(torch.stack([cq2(j, work[:, j], work[:, j:]) for j in range(32)], 1), ref)


def test_groups_differ_from_per_channel_and_group_boundaries():
    w = rand_w(4, 32)
    w[:, 16:] *= 50  # large second half: per-channel grid too coarse for the first half
    per_ch, grouped = quantize_weight(w, 3, -1), quantize_weight(w, 3, 16)
    assert (grouped[:, :16] - w[:, :16]).abs().max() < (per_ch[:, :16] - w[:, :16]).abs().max()
    # partial last group (32 = 12 + 12 + 8)
    q = quantize_weight(w, 2, 12)
    assert all(len(torch.unique(q[r, 24:])) <= 4 for r in range(4))
    cq = make_column_quantizer(w, 2, 12)
    cq(0, w[:, 0])
    with pytest.raises(RuntimeError):
        cq(13, w[:, 13])  # skipped the start of group 1


def test_bad_input():
    with pytest.raises(UserError):
        Quantizer(5)
    with pytest.raises(UserError):
        make_column_quantizer(torch.zeros(2, 4), 4, groupsize=0)
    with pytest.raises(UserError):
        theoretical_size_bytes(10, 5, 4, -1, rows=3)


def test_theoretical_size():
    rows, cols, nz = 64, 256, 64 * 256 // 2
    s = theoretical_size_bytes(rows * cols, nz, bits=4, groupsize=128, rows=rows)
    groups = rows * 2
    assert s["dense_fp16"] == 2 * rows * cols
    assert s["groups"] == groups
    assert s["quantized"] == rows * cols // 2 + groups * 2 + groups // 2
    assert s["sparse_fp16"] == rows * cols // 8 + 2 * nz
    assert s["sparse_quantized"] == rows * cols // 8 + nz // 2 + groups * 2 + groups // 2
    assert s["quantized_ratio"] == pytest.approx(s["quantized"] / s["dense_fp16"])
    sym = theoretical_size_bytes(rows * cols, nz, 4, -1, rows, sym=True)
    assert sym["groups"] == rows and sym["quant_overhead"] == 2 * rows
    three = theoretical_size_bytes(rows * cols, nz, 3, 100, rows)
    assert three["groups"] == rows * math.ceil(cols / 100)
    assert three["quantized"] == math.ceil(rows * cols * 3 / 8) + three["quant_overhead"]
