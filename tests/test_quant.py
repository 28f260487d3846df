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


# ---------------------------------------------------------------- joint sparsify + quantize inside SparseGPT

def sgpt_stats(cols, tokens=256, seed=0):
    from layerprune.stats import LayerStats

    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + 0.5 * torch.eye(cols)
    X = (torch.randn(tokens, cols, generator=g) @ mix) * torch.exp(torch.randn(cols, generator=g))
    return LayerStats(ntokens=tokens, hessian=(2 / tokens) * X.T @ X)


class Recorder:
    """Wraps a ColumnQuantizer: keeps, per column, the pruned mask and the (scale, zero) the column was rounded with,
    and at each group start the (masked) block the grid was fitted on."""

    def __init__(self, weight, bits, groupsize):
        self.cq = make_column_quantizer(weight, bits, groupsize)
        self.groupsize = groupsize  # the solver aligns its sweep blocks to it, as it does for wbits
        self.masks, self.scales, self.zeros, self.fits = {}, {}, {}, {}

    def __call__(self, j, col, block, mask):
        g = self.groupsize
        if g != -1 and j % g == 0:
            self.fits[j] = block[:, :g].masked_fill(mask[:, :g], 0).clone()
        out = self.cq(j, col, block, mask)
        self.masks[j] = mask[:, 0].clone()
        self.scales[j], self.zeros[j] = self.cq.quantizer.scale[:, 0].clone(), self.cq.quantizer.zero[:, 0].clone()
        return out


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("groupsize", [-1, 16, 12])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_joint_sparsegpt_on_grid_with_exact_mask(bits, groupsize, nm):
    from layerprune.solvers import get_solver

    W = rand_w(8, 48, seed=3)
    stats = sgpt_stats(48)
    sgpt = get_solver("sparsegpt")
    out = sgpt.prune(W, stats, 0.5, nm=nm, blocksize=20, wbits=bits, groupsize=groupsize)  # 20: rounded to the groups
    rec = Recorder(W.clone(), bits, groupsize)
    assert torch.equal(sgpt.prune(W, stats, 0.5, nm=nm, blocksize=20, quantizer=rec), out)
    mask = torch.stack([rec.masks[j] for j in range(48)], 1)
    if nm is None:
        assert int(mask.sum()) == round(0.5 * W.numel())
    else:
        assert torch.all(mask.view(8, -1, 4).sum(-1) == 2)
    assert torch.all(out[mask] == 0)
    maxq = 2 ** bits - 1
    for j in range(48):
        k = out[:, j] / rec.scales[j] + rec.zeros[j]  # integer grid index in [0, maxq]
        assert torch.allclose(k, k.round(), atol=1e-3) and k.min() > -1e-3 and k.max() < maxq + 1e-3
    for j0, blk in rec.fits.items():  # every group's grid is the min-max fit of its kept, compensated weights
        lo, hi = blk.min(1).values.clamp(max=0), blk.max(1).values.clamp(min=0)
        empty = (lo == 0) & (hi == 0)  # a row pruned entirely in this group: any grid works, the quantizer uses [-1, 1]
        lo[empty], hi[empty] = -1.0, 1.0
        assert torch.allclose(rec.scales[j0], (hi - lo) / maxq)
        assert all(rec.scales[j] is not None and torch.equal(rec.scales[j], rec.scales[j0])
                   for j in range(j0, min(j0 + groupsize, 48)))
    zeros = int((out == 0).sum())
    assert zeros >= int(mask.sum())  # a kept weight may also round to the grid's 0
    assert zeros - int(mask.sum()) == int(((out == 0) & ~mask).sum())


def test_joint_beats_prune_then_round():
    """GPTQ's point: rounding inside the sweep (error compensated) reconstructs W X better than rounding afterwards."""
    from layerprune.solvers import get_solver, relative_error

    W = rand_w(16, 64, seed=4)
    stats = sgpt_stats(64, tokens=512)
    sgpt = get_solver("sparsegpt")
    joint = sgpt.prune(W, stats, 0.5, wbits=3, groupsize=16)
    pruned = sgpt.prune(W, stats, 0.5)
    after = quantize_weight(pruned, 3, 16)
    assert relative_error(W, joint, stats) < relative_error(W, after, stats)
    # 4-bit alone (sparsity 0) goes through the sweep too: on the grid, close to W, no pruning
    q = sgpt.prune(W, stats, 0.0, wbits=4, groupsize=16)
    assert not torch.equal(q, W) and relative_error(W, q, stats) < relative_error(W, quantize_weight(W, 4, 16), stats)


def test_joint_bad_options():
    from layerprune.solvers import get_solver

    W, stats = rand_w(4, 16), sgpt_stats(16)
    sgpt = get_solver("sparsegpt")
    for kw in ({"wbits": 5}, {"wbits": 4, "groupsize": 0}, {"wbits": 4, "groupsize": 8.0}, {"groupsize": 8},
               {"wbits": 4, "quantizer": lambda j, c, b, m: c}):
        with pytest.raises(UserError):
            sgpt.prune(W, stats, 0.5, **kw)
    for name in ("magnitude", "wanda"):
        with pytest.raises(UserError, match="wbits"):
            get_solver(name).prune(W, stats, 0.5, wbits=4)


def on_lattice(w, bits, groupsize):
    """True when every (row, group) of w holds integer multiples of one step d, spanning <= 2^bits - 1 steps, with 0.

    With 2 bits the grid is 4 consecutive levels around 0, so d is the smallest gap between the values and 0."""
    rows, cols = w.shape
    x = w.double().view(rows, cols // groupsize, groupsize)
    x = torch.sort(torch.cat([x, torch.zeros_like(x[..., :1])], -1), -1).values
    gaps = x.diff(dim=-1)
    d = gaps.masked_fill(gaps < 1e-9, float("inf")).min(-1, keepdim=True).values
    d = d.masked_fill(torch.isinf(d), 1.0)  # all zero: trivially on the grid
    k = x / d
    return bool(torch.allclose(k, k.round(), atol=1e-4) and ((k[..., -1] - k[..., 0]).round() <= 2 ** bits - 1).all())


@pytest.mark.parametrize("allocation,nm", [("uniform", None), ("owl", None), ("dlp", None), ("uniform", "2:4")])
def test_joint_through_engine_every_allocation(allocation, nm):
    from conftest import tiny_model

    from layerprune import prune
    from layerprune.models.adapters import get_adapter

    assert not on_lattice(torch.randn(4, 32), 2, 16) and on_lattice(quantize_weight(torch.randn(4, 32), 2, 16), 2, 16)
    model = tiny_model("llama", layers=2)
    calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    rec = prune(model, calibration=calib, method="sparsegpt", sparsity=0.5, nm=nm, allocation=allocation,
                solver_options={"wbits": 2, "groupsize": 16}, progress=False)
    assert rec["solver_options"] == {"wbits": 2, "groupsize": 16}
    a = get_adapter(model)
    targets = {(r["block"], r["name"]): r for r in rec["layers"]}
    for i, block in enumerate(a.blocks(model)):
        for name, mod in a.linears(block).items():
            w = a.get_weight(mod).detach()
            r = targets[(i, name)]
            if nm:
                assert torch.all((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2)
            else:
                assert int((w == 0).sum()) >= round(r["target"] * w.numel())
            assert r["achieved"] == float((w == 0).sum()) / w.numel()
            assert on_lattice(w, 2, 16)
    if allocation != "uniform":
        assert len({round(r["target"], 6) for r in rec["layers"]}) > 1  # the allocation really varied the targets


def test_model_size_counts_every_linear():
    from conftest import tiny_model

    from layerprune.quant import model_size_bytes

    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, ::2] = 0
    s = model_size_bytes(model, 4, 32)
    lin = [m.weight for b in model.model.layers for m in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                                                         b.self_attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj,
                                                         b.mlp.down_proj)]
    other = sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in lin)  # tied head counted once
    assert s["linear_params"] == sum(w.numel() for w in lin) and s["other_params"] == other
    ref = [theoretical_size_bytes(w.numel(), int((w != 0).sum()), 4, 32, w.shape[0]) for w in lin]
    for f in ("dense_fp16", "quantized", "sparse_fp16", "sparse_quantized"):
        assert s[f] == 2 * other + sum(r[f] for r in ref)
    assert s["quantized"] < s["dense_fp16"] < s["sparse_fp16"]  # mostly dense: the 1-bit mask costs more than it saves
    assert s["sparse_quantized"] > s["quantized"]


def test_cli_prune_wbits(tmp_path, text_corpus, capsys):
    from conftest import tiny_model, tiny_tokenizer

    from layerprune.cli import main
    from layerprune.record import read_record

    src = tmp_path / "tiny"
    tiny_model("llama", layers=2).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    base = ["prune", "--model", str(src), "--nsamples", "4", "--seqlen", "32", "--max-windows", "4",
            "--data-dir", str(text_corpus)]
    out = tmp_path / "run"
    assert main(base + ["--method", "sparsegpt", "--wbits", "4", "--groupsize", "16", "--out", str(out)]) == 0
    assert "sparse+quantized" in capsys.readouterr().out
    rec = read_record(out)
    assert rec["solver_options"] == {"wbits": 4, "groupsize": 16}
    q = rec["quantization"]
    assert q["bits"] == 4 and q["groupsize"] == 16 and 0 < q["sparse_quantized"] < q["quantized"] < q["dense_fp16"]
    for extra, msg in ((["--method", "wanda", "--wbits", "4"], "needs --method sparsegpt"),
                       (["--method", "magnitude", "--wbits", "3"], "needs --method sparsegpt"),
                       (["--method", "sparsegpt", "--groupsize", "16"], "only applies with --wbits"),
                       (["--method", "sparsegpt", "--wbits", "4", "--groupsize", "0"], "groupsize")):
        bad = tmp_path / "bad"
        assert main(base + extra + ["--out", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and not bad.exists()
