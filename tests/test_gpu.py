"""CPU vs CUDA: the same pruning on a tiny model of every family gives the same masks (but where scores tie to
rounding) and, where both keep a weight, the same weights to float tolerance, for every solver and every allocator
(dsa and auto included), with the model kept in CPU RAM and one block at a time on the GPU (sequential onloading);
and bf16 compute on the GPU stays close to the fp32 CPU reference. Skipped without CUDA; run with ``pytest -m gpu``.
``LAYERPRUNE_TEST_DEVICE=cpu`` runs the same tests with the CPU on both sides (a check of the tests themselves).
The comparison is ``pruned_compare.compare_pruned`` (tested on CPU in test_pruned_compare.py)."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import FAMILIES, tiny_model, tiny_tokenizer
from pruned_compare import compare_pruned

from layerprune import prune
from layerprune.allocation import ALLOCATORS
from layerprune.solvers import SOLVER_REGISTRY

DEVICE = os.environ.get("LAYERPRUNE_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]

_g = torch.Generator().manual_seed(0)
CALIB = torch.randint(3, 256, (8, 16), generator=_g)
STRUCTURED = {"llama", "mistral", "qwen2", "qwen3", "gemma3", "granite"}
ALLOC_SPECS = {"user": "user:0.5,0.7", "dsa": "dsa:W:(ABSLOG)-(VAR)-(ATAN)"}  # dsa: varies across tiny blocks
# fp32 on both devices: GEMMs and reductions differ in rounding only. Solvers that invert a Hessian amplify it.
ATOL = {"sparsegpt": 1e-3, "slimgpt": 1e-3}


def _pair(family, ref_kw=None, **kw):
    """The same prune on the CPU (with ``ref_kw`` overriding ``kw``) and on DEVICE; returns both models and records."""
    cpu, dev = tiny_model(family, layers=2, real=True), tiny_model(family, layers=2, real=True)
    rec_c = prune(cpu, calibration=CALIB, progress=False, device="cpu", **{**kw, **(ref_kw or {})})
    rec_d = prune(dev, calibration=CALIB, progress=False, device=DEVICE, **kw)
    assert all(p.device.type == "cpu" for p in dev.parameters())  # blocks went back: sequential onloading
    return cpu, dev, rec_c, rec_d


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(SOLVER_REGISTRY))
def test_every_solver_cpu_equals_cuda(family, method):
    if method == "slimgpt" and family not in STRUCTURED:
        pytest.skip("SlimGPT refuses this family")
    cpu, dev, rc, rd = _pair(family, method=method, sparsity=0.5)
    compare_pruned(cpu.state_dict(), dev.state_dict(), atol=ATOL.get(method, 1e-5))
    assert rc["params"] == rd["params"]


@pytest.mark.parametrize("allocation", sorted(ALLOCATORS))
def test_every_allocator_cpu_equals_cuda(allocation, tmp_path):
    method = "slimgpt" if allocation.startswith("ipr") else "wanda"  # IPR schedules are SlimGPT's
    kw = dict(method=method, sparsity=0.6 if method == "wanda" else 0.3,
              allocation=ALLOC_SPECS.get(allocation, allocation))
    if allocation == "auto":  # the choice itself runs on the device too: the same candidate must win
        from test_proxy import _tiny_wikitext
        _tiny_wikitext(tmp_path / "data")
        kw.update(tokenizer=tiny_tokenizer(), data_dir=tmp_path / "data")
        kw["sparsity"] = 0.7
        kw["allocation_options"] = {"budget": 0}  # no time budget: what each device fits in it would differ
    cpu, dev, rc, rd = _pair("llama", **kw)
    targets = lambda rec: [r["target"] for r in rec["layers"]]  # noqa: E731
    assert targets(rc) == pytest.approx(targets(rd), abs=1e-4)
    if allocation == "auto":
        assert rc["allocation_auto"]["chosen"] == rd["allocation_auto"]["chosen"]
    compare_pruned(cpu.state_dict(), dev.state_dict(), atol=ATOL.get(method, 1e-5))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bf16_compute_on_cuda_close_to_fp32_cpu(method):
    """bf16 forwards change the statistics (the solves stay fp32), so masks move near ties and kept weights by about
    bf16's precision: against a real fp32 CPU reference, a few percent of the mask and 5e-2 on the weights."""
    ref, dev, _, _ = _pair("llama", method=method, sparsity=0.5, compute_dtype="bfloat16",
                           ref_kw={"compute_dtype": "float32"})
    compare_pruned(ref.state_dict(), dev.state_dict(), atol=5e-2, rtol=5e-2, mask_tol=0.05)


def test_auto_proxy_runs_on_the_device():
    """``--allocation auto`` honours the device: its proxy's copy lives there and every forward runs there; the
    proxy values match the CPU's (bf16 on both) and the model passed in is only read."""
    from layerprune.search.auto import choose
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
