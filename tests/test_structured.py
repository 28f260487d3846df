"""Physical head / channel removal (layerprune/models/structured.py): equality with the zero-masked model, GQA validity,
saving with a stock config (equal widths) or a registered per-block config (unequal widths), and the block budget."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from layerprune import load_model
from layerprune.errors import UserError
from layerprune.models.adapters import get_adapter
from layerprune.solvers.slimgpt import plan_block
from layerprune.models.structured import count_params, finalize, load_block, model_widths, register, remove_channels, \
    remove_heads

FAMS = ["llama", "qwen2", "mistral"]
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


def geometry(model):
    a = get_adapter(model)
    return a, a.blocks(model), a.geometry(model.config).head_dim


@torch.no_grad()
def mask_heads(block, a, hd, heads):
    o = a.linears(block)[a.o].weight
    for h in heads:
        o[:, h * hd:(h + 1) * hd] = 0


@torch.no_grad()
def logits(model):
    return model(IDS).logits


@pytest.mark.parametrize("family", FAMS)
def test_physical_removal_equals_zero_masking(family):
    """Removing heads (both GQA modes) and channels gives the output of the dense-shaped model with those o_proj /
    down_proj columns zeroed (the removed q/k/v/gate/up rows then feed nothing)."""
    model = tiny_model(family, layers=3)
    ref = copy.deepcopy(model)
    a, blocks, hd = geometry(model)
    _, rblocks, _ = geometry(ref)
    rep = 2  # tiny models: 4 query heads, 2 KV heads
    # block 0: one query head per group; block 1: the whole second KV group; block 2: channels only
    remove_heads(blocks[0], a, hd, [0, 3])
    mask_heads(rblocks[0], a, hd, [0, 3])
    remove_heads(blocks[1], a, hd, [2, 3], kv_heads=[1])
    mask_heads(rblocks[1], a, hd, [2, 3])
    chans = [1, 5, 6, 40, 127]
    remove_channels(blocks[2], a, chans)
    with torch.no_grad():
        a.linears(rblocks[2])[a.down].weight[:, chans] = 0
    assert model_widths(model) == [(2, 2, 128), (2, 1, 128), (4, 2, 123)]
    lin = a.linears(blocks[1])
    assert lin[a.k].weight.shape == (hd, 64) and lin[a.o].weight.shape == (64, rep * hd)
    assert a.blocks(model)[1].self_attn.num_key_value_groups == 2
    assert a.blocks(model)[0].self_attn.num_key_value_groups == 1
    assert a.blocks(model)[2].mlp.intermediate_size == 123
    assert torch.allclose(logits(model), logits(ref), atol=1e-5)
    # q rows + o columns of 2 + 2 query heads, k + v rows of 1 KV head, gate + up rows + down columns of 5 channels
    weights = 64 * hd * (2 * 2 + 2 * 2 + 2 * 1) + 3 * 64 * len(chans)
    biases = hd * (2 + 2 + 2 * 1) if family == "qwen2" else 0  # qwen2: q/k/v biases
    assert count_params(model) == count_params(ref) - weights - biases


def test_qwen2_biases_follow_their_rows():
    model = tiny_model("qwen2", layers=1)
    a, blocks, hd = geometry(model)
    q = a.linears(blocks[0])[a.q]
    kept = torch.cat([q.bias[hd:2 * hd], q.bias[3 * hd:]]).clone()
    remove_heads(blocks[0], a, hd, [0, 2])
    assert torch.equal(q.bias, kept) and q.out_features == 2 * hd


def test_invalid_gqa_layouts_are_refused():
    model = tiny_model("llama", layers=1)
    a, blocks, hd = geometry(model)
    with pytest.raises(UserError, match="GQA"):
        remove_heads(blocks[0], a, hd, [0])  # group 0 keeps 1 head, group 1 keeps 2
    with pytest.raises(UserError, match="GQA"):
        remove_heads(blocks[0], a, hd, [0, 1, 2, 3])  # nothing left
    with pytest.raises(UserError, match="GQA"):
        remove_heads(blocks[0], a, hd, [2], kv_heads=[1])  # head 3 of the removed group would stay
    with pytest.raises(UserError, match="range"):
        remove_heads(blocks[0], a, hd, [7])
    with pytest.raises(UserError):
        remove_channels(blocks[0], a, list(range(128)))
    assert model_widths(model) == [(4, 2, 128)]  # nothing changed


def test_unstructured_families_are_refused():
    model = tiny_model("gpt2", layers=1)
    a = get_adapter(model)
    with pytest.raises(UserError, match="structured"):
        remove_channels(a.blocks(model)[0], a, [0])


@pytest.mark.parametrize("family", FAMS)
def test_equal_widths_save_a_stock_config(family, tmp_path):
    model = tiny_model(family, layers=2)
    a, blocks, hd = geometry(model)
    for b in blocks:
        remove_heads(b, a, hd, [1, 2])
        remove_channels(b, a, list(range(0, 128, 4)))
    y = logits(model)
    info = finalize(model)
    assert info["uniform"] and type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                                          "mistral": "MistralForCausalLM"}[family]
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == family and "layer_heads" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["head_dim"]) == \
        (2, 2, 96, hd)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(stock) is type(model)
    assert torch.allclose(logits(stock), y, atol=1e-6)


@pytest.mark.parametrize("family", FAMS)
def test_per_block_widths_round_trip(family, tmp_path):
    model = tiny_model(family, layers=3)
    a, blocks, hd = geometry(model)
    remove_heads(blocks[0], a, hd, [2, 3], kv_heads=[1])
    remove_channels(blocks[1], a, [3, 4, 5])
    y = logits(model)
    info = finalize(model)
    assert not info["uniform"] and info["model_type"] == f"layerprune_{family}"
    assert info["heads"] == [2, 4, 4] and info["kv_heads"] == [1, 2, 2] and info["intermediate"] == [128, 125, 128]
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["layer_heads"] == [2, 4, 4] and cfg["layer_intermediate"] == [128, 125, 128]
    loaded, _ = load_model(str(tmp_path))
    assert model_widths(loaded) == model_widths(model)
    assert torch.allclose(logits(loaded), y, atol=1e-6)
    register()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)  # the Auto classes know the registered type
    assert torch.allclose(logits(auto), y, atol=1e-6)
    # pruning the rest to equal widths turns the config back into the stock one
    for b in a.blocks(loaded)[1:]:
        remove_heads(b, a, hd, [2, 3], kv_heads=[1])
    remove_channels(a.blocks(loaded)[0], a, [0, 1, 2])
    remove_channels(a.blocks(loaded)[2], a, [7, 8, 9])
    assert finalize(loaded)["uniform"] and loaded.config.model_type == family
    assert loaded.config.num_key_value_heads == 1 and loaded.config.intermediate_size == 125


def test_load_block_resizes_to_the_saved_shapes():
    src, dst = tiny_model("llama", layers=1, seed=1), tiny_model("llama", layers=1, seed=2)
    a, blocks, hd = geometry(src)
    remove_heads(blocks[0], a, hd, [0, 2])
    remove_channels(blocks[0], a, [9])
    load_block(a.blocks(dst)[0], a, hd, blocks[0].state_dict())
    assert model_widths(dst) == [(2, 2, 127)]
    for k, v in blocks[0].state_dict().items():
        assert torch.equal(v, a.blocks(dst)[0].state_dict()[k]), k


# ----------------------------------------------------------------------------- block budget

SMOL = dict(heads=9, kv_heads=3, head_dim=64, hidden=576, channels=1536)


def removed_params(q, kv, ch, heads, kv_heads, head_dim, hidden, channels):
    return hidden * head_dim * (2 * q + 2 * kv) + 3 * hidden * ch


@pytest.mark.parametrize("gqa", ["heads", "kv-groups"])
@pytest.mark.parametrize("ratio", [0.0, 0.0625, 0.2, 0.33, 0.5, 0.62, 0.9, 1.0])
def test_plan_block_params_budget_is_closest(gqa, ratio):
    q, kv, ch = plan_block(ratio, **{k: SMOL[k] for k in ("heads", "kv_heads", "head_dim", "hidden", "channels")},
                           gqa=gqa)
    rep = SMOL["heads"] // SMOL["kv_heads"]
    step = SMOL["kv_heads"] if gqa == "heads" else rep
    assert q % step == 0 and q <= SMOL["heads"] - step
    assert q == step * min(SMOL["heads"] // step - 1, math.floor(ratio * SMOL["heads"] / step + 0.5))
    assert kv == (q // rep if gqa == "kv-groups" else 0)
    total = removed_params(SMOL["heads"], SMOL["kv_heads"], SMOL["channels"], **SMOL)
    best = min(range(SMOL["channels"]), key=lambda c: abs(removed_params(q, kv, c, **SMOL) - ratio * total))
    assert ch == best  # brute force over every channel count (kept >= 1)


def test_plan_block_ratio_budget_and_mha():
    assert plan_block(0.5, 9, 3, 64, 576, 1536, budget="ratio") == (6, 0, 768)
    assert plan_block(0.2, 9, 3, 64, 576, 1536, budget="ratio") == (3, 0, 307)
    # multi-head attention: a head always goes with its k/v rows, one head per step
    q, kv, ch = plan_block(0.25, 8, 8, 16, 128, 256, gqa="heads")
    assert q == kv == 2
    with pytest.raises(UserError, match="gqa"):
        plan_block(0.5, 9, 3, 64, 576, 1536, gqa="groups")
    with pytest.raises(UserError, match="budget"):
        plan_block(0.5, 9, 3, 64, 576, 1536, budget="flops")


def test_config_refused_by_its_validators_is_none_and_other_errors_propagate(monkeypatch):
    """A stock config whose validators refuse the widths -> None (the per-block format); any other error (a bug) is
    raised, never turned into a different save format."""
    from transformers import LlamaConfig

    from layerprune.models import structured

    old = tiny_model("llama").config
    assert structured._config(LlamaConfig, old, num_attention_heads=3) is None  # 64 % 3: validate_architecture
    assert structured._config(LlamaConfig, old, num_attention_heads=2).num_attention_heads == 2

    class Broken(LlamaConfig):
        def __init__(self, **kw):
            raise TypeError("unexpected keyword argument 'x'")

    with pytest.raises(TypeError, match="unexpected keyword"):
        structured._config(Broken, old, num_attention_heads=2)


def test_skeleton_none_only_for_an_unreadable_config_other_errors_propagate(tmp_path, monkeypatch):
    import transformers

    from layerprune.models.loading import load_skeleton

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "ok")
    assert load_skeleton(str(tmp_path / "ok")) is not None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-family"}')
    assert load_skeleton(str(bad)) is None  # ValueError: the real load reports it as a one-line error
    with pytest.raises(UserError, match="not a causal LM"):
        load_model(str(bad))

    def broken(*a, **k):
        raise RuntimeError("a bug in building the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # before: None, and the checks ran after the full load
        load_skeleton(str(tmp_path / "ok"))
