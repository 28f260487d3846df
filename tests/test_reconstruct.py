"""--reconstruct block: the zero pattern stays exact on every family, the output error drops, resume is
bit-identical, options and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, kill_then_resume, tiny_model

import layerprune.reconstruct as R
from layerprune import prune
from layerprune.errors import UserError
from layerprune.models.adapters import get_adapter


def calib(n=8, seqlen=24, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def patterns(monkeypatch):
    """Every block's linears: their zero masks as the solver left them (before the least-squares refit, when it
    runs) and after Adam (reconstruct()), the weights before and after Adam, and Adam's (loss before, after)."""
    seen = []
    real, real_refit = R.reconstruct, R.refit_linears
    solver_zeros = {}

    def spy_refit(block, ctx, *a, **kw):
        solver_zeros.update({n: (m.weight == 0).clone() for n, m in ctx["linears"](block).items()})
        return real_refit(block, ctx, *a, **kw)

    def spy(block, linears, *a, **kw):
        before = {n: solver_zeros.pop(n, (m.weight == 0).clone()) for n, m in linears.items()}
        w0 = {n: m.weight.detach().clone() for n, m in linears.items()}
        out = real(block, linears, *a, **kw)
        seen.append((before, {n: (m.weight == 0).clone() for n, m in linears.items()}, w0,
                     {n: m.weight.detach().clone() for n, m in linears.items()}, out))
        return out

    monkeypatch.setattr(R, "reconstruct", spy)
    monkeypatch.setattr(R, "refit_linears", spy_refit)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_pattern_exact_and_error_drops_every_family(family, patterns):
    model = tiny_model(family, real=True)
    rec = prune(model, calibration=calib(), method="wanda", sparsity=0.6, progress=False, reconstruct="block",
                reconstruct_options={"epochs": 2, "lr": 1e-3})
    assert len(patterns) == len(get_adapter(model).blocks(model))
    for before, after, w0, w1, (loss0, loss1) in patterns:
        for n in before:
            assert torch.equal(before[n], after[n]), n  # the same zeros, exactly
            assert not torch.equal(w0[n], w1[n]), n  # and the kept weights trained
        assert loss1 < loss0
    assert rec["reconstruct"] == {"method": "block", "epochs": 2, "lr": 1e-3, "refit_iters": 20}
    for r in rec["layers"]:
        assert r["reconstruct"]["loss_after"] < r["reconstruct"]["loss_before"]
        assert r["achieved"] == pytest.approx(r["target"], abs=2e-3)
    # each stage's seconds counted once: the refit's statistics pass is statistics, not also reconstruction
    assert all(b["reconstruct"] > 0 and b.get("solve", 0) > 0 for b in rec["block_timings"])
    t = rec["timings"]
    assert sum(v for k, v in t.items() if k != "total") <= t["total"] + 1e-6


@pytest.mark.parametrize("method, kw", [("sparsegpt", {"nm": "2:4"}), ("alps", {"sparsity": 0.7}),
                                        ("slimgpt", {"sparsity": 0.3})])
def test_other_solvers(method, kw, patterns):
    model = tiny_model("llama")
    rec = prune(model, calibration=calib(), method=method, progress=False, reconstruct="block", **kw)
    for before, after, *_, (loss0, loss1) in patterns:
        assert loss1 < loss0
        if method != "slimgpt":
            assert all(torch.equal(before[n], after[n]) for n in before)
    if method == "sparsegpt":
        a = get_adapter(model)
        for block in a.blocks(model):
            for mod in a.linears(block).values():
                assert torch.all((a.get_weight(mod) == 0).view(-1, 4).sum(1) == 2)
    assert rec["params"]["after"] < rec["params"]["before"] if method == "slimgpt" else True


def test_reconstruction_lowers_the_model_output_error():
    dense = tiny_model("llama", layers=3)
    x = calib(4, 24, seed=1)
    with torch.no_grad():
        ref = dense(x).logits
    errs = {}
    for rc in ("none", "block"):
        m = tiny_model("llama", layers=3)
        prune(m, calibration=calib(16, 24), method="wanda", sparsity=0.7, progress=False, reconstruct=rc,
              reconstruct_options={"epochs": 4, "lr": 1e-3} if rc == "block" else None)
        with torch.no_grad():
            errs[rc] = float((m(x).logits - ref).square().mean())
    assert errs["block"] < errs["none"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: transposed (Conv1D) weights
def test_least_squares_refit_lowers_every_blocks_error(family):
    """The refit of the kept weights (before Adam) leaves each block's output error below the solver's."""
    start = {}
    for iters in (0, 20):
        rec = prune(tiny_model(family), calibration=calib(8, 32), method="wanda", sparsity=0.7, progress=False,
                    reconstruct="block", reconstruct_options={"epochs": 1, "refit_iters": iters})
        start[iters] = {r["block"]: r["reconstruct"]["loss_before"] for r in rec["layers"]}
        assert all(("refit_rel_error" in r) == (iters > 0) for r in rec["layers"])
    assert all(start[20][b] < 0.8 * start[0][b] for b in start[0]), start


def test_options_and_bad_input():
    from layerprune.cli import build_parser
    from layerprune.cli.common import _method_options

    m = tiny_model("llama", layers=2)
    for opts, msg in [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"steps": 3}, "unknown option"),
                      ({"refit_iters": -1}, "refit_iters")]:
        with pytest.raises(UserError, match=msg):
            prune(m, calibration=calib(), method="wanda", progress=False, reconstruct="block",
                  reconstruct_options=opts)
    with pytest.raises(UserError, match="unknown reconstruction"):
        prune(m, calibration=calib(), method="wanda", progress=False, reconstruct="layer")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    p = sub.choices["prune"]
    args = p.parse_args(["--out", "x", "--reconstruct", "block", "--recon-epochs", "2", "--recon-lr", "0.01"])
    assert _method_options(R.RECONSTRUCTORS, "--reconstruct", "block", args) == {"epochs": 2, "lr": 0.01}
    args = p.parse_args(["--out", "x", "--reconstruct", "block", "--recon-refit-iters", "0"])
    assert _method_options(R.RECONSTRUCTORS, "--reconstruct", "block", args) == {"refit_iters": 0}
    args = p.parse_args(["--out", "x", "--recon-epochs", "2"])
    with pytest.raises(UserError, match="--recon-epochs needs --reconstruct block"):
        _method_options(R.RECONSTRUCTORS, "--reconstruct", "none", args)


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, offload):
    def interrupted(out):  # block 2's commit (a writer thread's) may still be in flight at the kill
        assert json.loads((out / ".checkpoint" / "state.json").read_text())["next_block"] in (2, 3)

    resumed = kill_then_resume(tmp_path, dict(method="wanda", sparsity=0.6, offload=offload, reconstruct="block",
                                              reconstruct_options={"epochs": 2, "lr": 1e-3}), between=interrupted)
    ref = tiny_model("llama", layers=5)
    prune(ref, calibration=calib(6, 24), method="wanda", sparsity=0.6, progress=False, reconstruct="block",
          reconstruct_options={"epochs": 2, "lr": 1e-3})
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed[k]), k


def test_offload_and_allocation_compose():
    """The dense stream lives where the activations do: offload modes give identical weights, with an allocation."""
    out = {}
    for offload in ("none", "cpu"):
        m = tiny_model("qwen2", real=True)
        prune(m, calibration=calib(), method="alps", sparsity=0.6, allocation="owl", offload=offload, progress=False,
              reconstruct="block", reconstruct_options={"epochs": 1})
        out[offload] = m.state_dict()
    assert all(torch.equal(v, out["cpu"][k]) for k, v in out["none"].items())
