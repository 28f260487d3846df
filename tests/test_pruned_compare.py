"""The comparison test_gpu.py makes between pruned models, checked on the CPU: it tolerates what it should (a mask
entry flipped at a tie, rounding), and fails on what it must (many flips, a kept weight that differs)."""
from __future__ import annotations

import pytest
import torch
from pruned_compare import compare_pruned


def _pruned(seed=0):
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))
    return {"w": w.masked_fill(w.abs() < 0.67, 0.0), "step": torch.tensor(3)}


def test_a_flipped_tie_and_rounding_pass():
    a = _pruned()
    b = {k: v.clone() for k, v in a.items()}
    b["w"] *= 1 + 1e-7
    i = (a["w"] != 0).nonzero()[0]
    j = (a["w"] == 0).nonzero()[0]
    b["w"][tuple(i)], b["w"][tuple(j)] = 0.0, 0.5  # one weight pruned instead of another: 2 of 4096 entries
    compare_pruned(a, b, atol=1e-6, mask_tol=1e-3)


def test_many_flips_fail():
    a = _pruned()
    b = {k: v.clone() for k, v in a.items()}
    b["w"][:, :2] = torch.where(a["w"][:, :2] == 0, 1.0, 0.0)  # 128 flips = 3%
    with pytest.raises(AssertionError, match="zero pattern differs"):
        compare_pruned(a, b, atol=1e-6, mask_tol=1e-3)


def test_a_kept_weight_that_differs_fails():
    a = _pruned()
    b = {k: v.clone() for k, v in a.items()}
    i = tuple((a["w"] != 0).nonzero()[0])
    b["w"][i] += 1e-2
    with pytest.raises(AssertionError):
        compare_pruned(a, b, atol=1e-5)


def test_shape_and_integer_buffers_must_match():
    a = _pruned()
    with pytest.raises(AssertionError):
        compare_pruned(a, {**a, "step": torch.tensor(4)}, atol=1e-6)
    with pytest.raises(AssertionError):
        compare_pruned(a, {**a, "w": a["w"][:32]}, atol=1e-6)
