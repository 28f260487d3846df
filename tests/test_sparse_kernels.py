"""2:4 sparse kernels: the pattern check, which block linears are swapped and why the others stay dense (CPU), the
refusals, and on a CUDA GPU (compute capability >= 8.0) the swapped model's logits against the dense ones."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from layerprune.errors import UserError
from layerprune.models.adapters import get_adapter
from layerprune.solvers.nm import nm_mask
from layerprune.sparse_kernels import check_record, is_2_4, select, swap


def test_is_2_4():
    ok = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3], [0, 0, 5, 6, 7, 0, 0, 0]])  # <= 2 non-zeros per group of 4
    assert is_2_4(ok)
    assert not is_2_4(torch.tensor([[1.0, 2, 3, 0, 0, 0, 0, 0]]))  # 3 in the first group
    assert not is_2_4(torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]))  # 10 inputs: groups of 4 do not tile
    assert not is_2_4(ok.t())  # groups run along the inputs (rows of an [out, in] weight), not the outputs


def _make_2_4(model):
    """Every block linear pruned 2:4 by magnitude (the pattern a --nm 2:4 run saves)."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for block in adapter.blocks(model):
            for mod in adapter.linears(block).values():
                w = adapter.get_weight(mod)
                adapter.set_weight(mod, w.masked_fill(nm_mask(w.abs(), 2, 4), 0))
    return model


def _names(model):
    adapter = get_adapter(model)
    return [f"{adapter.blocks_path}.{i}.{n}" for i in range(len(adapter.blocks(model))) for n in adapter.linear_names()]


def test_select_swaps_the_2_4_linears_and_says_why_the_others_stay_dense():
    model = _make_2_4(tiny_model("llama", layers=3))  # hidden 64, FFN 128, k/v 32 rows: every shape fits CUTLASS
    names = _names(model)
    dense_one = names[len(names) // 2]
    with torch.no_grad():
        model.get_submodule(dense_one).weight.fill_(1.0)
    sel = select(model, torch.bfloat16, "cutlass")
    assert sel.swap == [n for n in names if n != dense_one]
    assert list(sel.dense) == [dense_one] and "not 2:4" in sel.dense[dense_one]
    assert sel.representative_block() in (0, 2) and len(sel.per_block()[1]) == 6  # block 1 lost one of 7

    # the shape rule is the backend's: 32 x 96 k/v weights miss CUTLASS's 64-column multiple, not cuSPARSELt's 16
    real = _make_2_4(tiny_model("llama", layers=2, real=True))  # hidden 96
    cut, lt = select(real, torch.float16, "cutlass"), select(real, torch.float16, "cusparselt")
    assert len(lt.swap) == 14 and not lt.dense
    down = [n for n in _names(real) if n.endswith(get_adapter(real).down)]  # 96 x 256 fits, every other has 96 cols
    assert cut.swap == down and len(cut.dense) == 12
    assert all("x96 is not a multiple of 32x64" in why for why in cut.dense.values())

    with pytest.raises(UserError, match="use --dtype bfloat16"):
        select(model, torch.float32, "cutlass")


def test_conv1d_and_unpruned_models_keep_every_linear_dense():
    gpt2 = select(_make_2_4(tiny_model("gpt2", layers=2)), torch.bfloat16, "cutlass")
    assert gpt2.swap == [] and all("Conv1D is not a plain nn.Linear" in w for w in gpt2.dense.values())
    dense = select(tiny_model("llama", layers=2), torch.bfloat16, "cutlass")
    assert dense.swap == [] and len(dense.dense) == 14


def test_swap_replaces_only_the_chosen_weights_frozen():
    model = _make_2_4(tiny_model("llama", layers=2))
    names = _names(model)
    before = {n: model.get_submodule(n).weight for n in names}
    assert swap(model, names[:3], convert=lambda w: w.detach() * 2) == 3
    for n in names:
        w = model.get_submodule(n).weight
        if n in names[:3]:
            assert w is not before[n] and not w.requires_grad and torch.equal(w, before[n].detach() * 2)
        else:
            assert w is before[n]


def test_record_must_be_2_4():
    check_record({"nm": [2, 4]}, "r")
    check_record({"nm": [3, 4]}, "r")  # at most one kept of 4 is 2:4 too
    for nm in (None, [1, 4], [4, 8]):
        with pytest.raises(UserError, match="--nm 2:4"):
            check_record({"nm": nm, "method": "wanda", "sparsity": 0.5}, "r")


def _sm80() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _sm80(), reason="needs a CUDA GPU with compute capability >= 8.0")
def test_swapped_model_matches_dense_in_bf16():
    model = _make_2_4(tiny_model("llama", layers=2)).to("cuda", torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        ref = model(input_ids=ids).logits.float()
    sel = select(model, torch.bfloat16)
    assert len(sel.swap) == 14 and not sel.dense
    swap(model, sel.swap)
    assert all(type(model.get_submodule(n).weight).__name__.startswith("SparseSemiStructuredTensor") for n in sel.swap)
    with torch.inference_mode():
        got = model(input_ids=ids).logits.float()
    # bf16 keeps 8 bits of mantissa: the kernels sum in another order, so allow a few bf16 steps of the logit scale
    assert torch.allclose(got, ref, atol=3e-2 * ref.abs().max().item(), rtol=0), (got - ref).abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
