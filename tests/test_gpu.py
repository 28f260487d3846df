"""CPU vs CUDA: the same pruning on a tiny model of every family gives the same masks and (to float tolerance) the
same weights, for every solver and every allocator, with the model kept in CPU RAM and one block at a time on the
GPU (sequential onloading). Skipped without CUDA; run with ``pytest -m gpu``."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import FAMILIES, tiny_model

from layerprune import prune
from layerprune.allocation import ALLOCATORS
from layerprune.solvers import SOLVER_REGISTRY

DEVICE = os.environ.get("LAYERPRUNE_TEST_DEVICE", "cuda")  # "cpu" checks these tests themselves on a CPU machine
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]

_g = torch.Generator().manual_seed(0)
CALIB = torch.randint(3, 256, (8, 16), generator=_g)
STRUCTURED = {"llama", "mistral", "qwen2", "qwen3", "gemma3", "granite"}
ALLOC_SPECS = {"user": "user:0.5,0.7", "dsa": None, "auto": None}  # built from a spec / needs a search or data


def _pair(family, **kw):
    cpu, gpu = tiny_model(family, layers=2, real=True), tiny_model(family, layers=2, real=True)
    rec_c = prune(cpu, calibration=CALIB, progress=False, device="cpu", **kw)
    rec_g = prune(gpu, calibration=CALIB, progress=False, device=DEVICE, **kw)
    assert all(p.device.type == "cpu" for p in gpu.parameters())  # blocks went back: sequential onloading
    return cpu, gpu, rec_c, rec_g


def _same(cpu, gpu, atol):
    sc, sg = cpu.state_dict(), gpu.state_dict()
    assert sc.keys() == sg.keys()
    for k in sc:
        assert sc[k].shape == sg[k].shape, k
        if sc[k].is_floating_point():
            mism = ((sc[k] == 0) != (sg[k] == 0)).float().mean().item()
            assert mism <= 1e-3, f"{k}: {mism:.2%} of the zero pattern differs"
            torch.testing.assert_close(sg[k], sc[k], atol=atol, rtol=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(SOLVER_REGISTRY))
def test_every_solver_cpu_equals_cuda(family, method):
    if method == "slimgpt" and family not in STRUCTURED:
        pytest.skip("SlimGPT refuses this family")
    kw = dict(method=method, sparsity=0.5)
    cpu, gpu, rc, rg = _pair(family, **kw)
    _same(cpu, gpu, atol=1e-3 if method in ("sparsegpt", "slimgpt") else 1e-6)
    assert rc["params"] == rg["params"]


@pytest.mark.parametrize("allocation", sorted(ALLOCATORS))
def test_every_allocator_cpu_equals_cuda(allocation):
    if allocation in ALLOC_SPECS and ALLOC_SPECS[allocation] is None:
        pytest.skip(f"{allocation} needs a searched function (tested in its own module)")
    method = "slimgpt" if allocation.startswith("ipr") else "wanda"  # IPR schedules are SlimGPT's
    kw = dict(method=method, sparsity=0.6 if method == "wanda" else 0.3,
              allocation=ALLOC_SPECS.get(allocation, allocation))
    cpu, gpu, rc, rg = _pair("llama", **kw)
    targets = lambda rec: [r["target"] for r in rec["layers"]]  # noqa: E731
    assert targets(rc) == pytest.approx(targets(rg), abs=1e-4)
    _same(cpu, gpu, atol=1e-3 if method == "slimgpt" else 1e-6)


def test_bf16_compute_on_cuda_close_to_fp32():
    cpu, gpu, _, _ = _pair("llama", method="sparsegpt", sparsity=0.5, compute_dtype="bfloat16")
    _same(cpu, gpu, atol=5e-2)


def test_auto_proxy_runs_on_the_device():
    """``--allocation auto`` honours the device: its proxy's copy lives there and every forward runs there; the
    proxy values match the CPU's (bf16 on both) and the model passed in is only read."""
    from layerprune.allocation.auto import choose
    from layerprune.engine import prune_model

    ev = torch.randint(3, 256, (1, 400), generator=torch.Generator().manual_seed(1))
    model = tiny_model("llama", layers=2, real=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(seqlen=32, prune_fn=prune_model, budget=0, finalists=2, margin=0.0)
    rc = choose(model, CALIB, ev, 0.6, device="cpu", **kw)
    rg = choose(model, CALIB, ev, 0.6, device=DEVICE, **kw)
    assert rg["device"].startswith(DEVICE) and rc["device"] == "cpu"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    vc = {r["label"]: r["screen"] for r in rc["tried"] if r["screen"] is not None}
    vg = {r["label"]: r["screen"] for r in rg["tried"] if r["screen"] is not None}
    assert vc.keys() == vg.keys() and all(vg[k] == pytest.approx(vc[k], rel=5e-2) for k in vc)
