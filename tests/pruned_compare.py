"""How two pruned models are compared when they come from different devices or dtypes (tests/test_gpu.py).

Masks may flip where two scores tie to rounding, so the zero patterns may differ in at most ``mask_tol`` of each
tensor's entries; the weights are compared only where both masks keep the weight (a flipped entry is a mask
difference, counted once, never also a weight difference)."""
from __future__ import annotations

import torch


def compare_pruned(ref: dict, other: dict, atol: float, rtol: float = 1e-3, mask_tol: float = 1e-3) -> None:
    """Assert ``other`` (a state dict) equals ``ref``: same keys and shapes, zero patterns equal in all but
    ``mask_tol`` of the entries of every tensor, weights close where both are nonzero."""
    assert ref.keys() == other.keys()
    for k in ref:
        a, b = ref[k], other[k]
        assert a.shape == b.shape, k
        if not a.is_floating_point():
            assert torch.equal(a, b), k
            continue
        a, b = a.float().cpu(), b.float().cpu()
        za, zb = a == 0, b == 0
        flipped = (za != zb).float().mean().item()
        assert flipped <= mask_tol, f"{k}: {flipped:.3%} of the zero pattern differs (at most {mask_tol:.3%})"
        kept = ~za & ~zb
        torch.testing.assert_close(b[kept], a[kept], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")
