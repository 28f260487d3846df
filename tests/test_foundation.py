"""Loading, adapters, data, calibration sampling, perplexity protocol, CLI errors."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, requires_real, tiny_model

from layerprune.cli import main
from layerprune.data import calibration_pool, corpus_rows, load_text, resolve_data_dir, sample_windows
from layerprune.errors import UserError
from layerprune.evaluation.perplexity import check_seqlen, perplexity
from layerprune.models.adapters import ADAPTERS, get_adapter, supported
from layerprune.models.info import measure_sparsity, model_info
from layerprune.models.loading import load_model
from layerprune.models.structured import register


# --- adapters ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_every_part(family):
    model = tiny_model(family)
    a = get_adapter(model)
    assert a.family == family
    blocks = a.blocks(model)
    assert len(blocks) == 3
    lin = a.linears(blocks[0])
    assert len(lin) == len(a.linear_names()) >= 4
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    for name, mod in lin.items():  # [out, in] orientation, whatever the storage
        w = a.get_weight(mod)
        assert w.dim() == 2
        if name in a.input_groups[0]:
            assert w.shape[1] == hidden
    assert a.lm_head(model).weight.shape[0] == 256
    assert all(e is not None for e in a.embeddings(model))
    geo = a.geometry(model.config)
    assert geo.num_heads * geo.head_dim == a.get_weight(lin[a.o]).shape[1]


def test_gpt2_weights_are_transposed_views():
    model = tiny_model("gpt2")
    a = get_adapter(model)
    mod = a.linears(a.blocks(model)[0])["mlp.c_fc"]
    w = a.get_weight(mod)
    assert w.shape == (256, 64)  # [out, in] although Conv1D stores [in, out]
    a.set_weight(mod, torch.zeros_like(w))
    assert mod.weight.abs().sum() == 0


def test_saved_structured_type_is_its_base_family():
    """A run saved as ``layerprune_<type>`` (per-block widths) gets its base family's adapter, with no registration
    step and without anything rewriting the adapters' model types."""
    class Cfg:
        model_type = "layerprune_gemma3_text"

    before = [a.model_types for a in ADAPTERS]
    assert get_adapter(Cfg()).family == "gemma3"
    register()
    assert [a.model_types for a in ADAPTERS] == before and get_adapter(Cfg()).family == "gemma3"
    Cfg.model_type = "layerprune_mamba"
    with pytest.raises(UserError, match="'layerprune_mamba' is not supported"):
        get_adapter(Cfg())


def test_unknown_architecture_lists_supported():
    class Cfg:
        model_type = "mamba"

    with pytest.raises(UserError, match="supported families: " + ", ".join(supported())):
        get_adapter(Cfg())


def test_info_and_sparsity():
    model = tiny_model("llama")
    info = model_info(model)
    assert info["blocks"] == 3 and info["kv_heads"] == 2
    a = get_adapter(model)
    w = a.get_weight(a.linears(a.blocks(model)[1])["mlp.up_proj"])
    with torch.no_grad():
        w[:64, :] = 0  # half of a [128 out, 64 in] matrix
    sp = measure_sparsity(model)
    assert sp["per_layer"]["1.mlp.up_proj"] == pytest.approx(0.5)
    assert sp["overall"] == pytest.approx(64 * 64 / sp["prunable_params"])


# --- data ---------------------------------------------------------------------------------------------

def test_wikitext_rows_follow_hf_layout(text_corpus):
    rows, joiner = corpus_rows("wikitext2", text_corpus)
    assert joiner == "\n\n"
    assert rows[0] == "" and rows[1] == " = Title 0 = \n"  # blank -> "", others keep a trailing newline
    assert not rows[-1] == "" or rows[-2] != ""  # no extra row from the file's final newline
    assert len(rows) == 240
    text = load_text("wikitext2", text_corpus)
    assert text.startswith("\n\n = Title 0 = \n\n\n")


def test_ptb_and_c4_join(text_corpus):
    rows, joiner = corpus_rows("ptb", text_corpus)
    assert joiner == " " and len(rows) == 80 and rows[0].startswith(" ")
    rows, joiner = corpus_rows("c4", text_corpus)
    assert len(rows) == 1000 and joiner == " "
    pool = calibration_pool("c4", text_corpus)
    assert len(pool) == 1000 and pool[0] not in rows[:1]


def test_data_errors(tmp_path, text_corpus):
    with pytest.raises(UserError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="unknown dataset"):
        corpus_rows("imagenet", text_corpus)
    with pytest.raises(UserError, match="test split"):
        calibration_pool("wikitext2", text_corpus)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing from the data directory"):
        corpus_rows("ptb", tmp_path / "empty")


def test_user_text_and_jsonl(tmp_path):
    p = tmp_path / "my.jsonl"
    p.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    assert corpus_rows(str(p), None)[0] == ["a b", "c"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\"x\": 1}\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        corpus_rows(str(bad), None)


def test_sampler_follows_reference_get_c4():
    """Step for step the reference loop: random.seed, randint doc until > seqlen tokens, randint offset."""
    rng = random.Random(5)
    docs = [[rng.randint(0, 99) for _ in range(rng.randint(1, 60))] for _ in range(50)]
    got = sample_windows(docs, nsamples=7, seqlen=20, seed=3)
    random.seed(3)
    for k in range(7):
        while True:
            i = random.randint(0, len(docs) - 1)
            if len(docs[i]) > 20:
                break
        j = random.randint(0, len(docs[i]) - 20 - 1)
        assert got.draws[k] == (i, j)
        assert got.ids[k].tolist() == docs[i][j:j + 20]


def test_sampler_errors():
    with pytest.raises(UserError, match="longest has 5"):
        sample_windows([[1] * 5, [2] * 3], 2, 10, 0)
    with pytest.raises(UserError, match="holds only 30 tokens"):
        sample_windows([[1] * 30], 4, 10, 0)


# --- perplexity -----------------------------------------------------------------------------------------

def test_perplexity_matches_plain_transformers_loop():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 16 * 10 + 7))
    r = perplexity(model, ids, seqlen=16, batch_size=3, progress=False)
    assert r.windows == 10 and r.tokens == 160  # the tail is dropped
    losses = [model(ids[:, i * 16:(i + 1) * 16], labels=ids[:, i * 16:(i + 1) * 16]).loss.item() for i in range(10)]
    ref = math.exp(sum(losses) / len(losses))
    assert r.ppl == pytest.approx(ref, rel=1e-3)
    assert perplexity(model, ids, 16, max_windows=4, progress=False).windows == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_seqlen_limits(family):
    model = tiny_model(family)  # 256 positions, under each family's own config key (GPT-2: n_positions)
    assert get_adapter(model).max_positions(model.config) == 256
    assert check_seqlen(model, None) == 256  # default 2048 capped
    with pytest.raises(UserError, match="maximum of 256"):
        check_seqlen(model, 512)


# --- loading ----------------------------------------------------------------------------------------------

def test_loading_errors(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="not a model"):
        load_model(str(f))
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        load_model(str(tmp_path / "d"))
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "missing" / "x"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a GGUF model"):
        load_model(str(bad), use_cache=False)


def test_local_dir_roundtrip(tmp_path, tokenizer):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    m2, tok2 = load_model(str(tmp_path / "m"))
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(model(x).logits, m2(x).logits)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope" / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    assert main(["eval", "smollm2-135m", "--data-dir", str(tmp_path / "no-data")]) == 2
    assert "data directory" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["eval", "org/definitely-not-a-model-xyz", "--no-cache"]) == 2
    assert "org/definitely-not-a-model-xyz" in capsys.readouterr().err


def test_eval_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("{}")
    assert main(["eval", "smollm2-135m", "--out", str(out)]) == 2
    assert out.read_text() == "{}"


# --- real model ----------------------------------------------------------------------------------------------

@requires_real
@pytest.mark.real
def test_real_smollm2_cache_and_ppl(tmp_path, monkeypatch):
    """GGUF -> dequantized cache; a corrupted cache entry is rebuilt; WikiText-2 PPL on 4 windows of 512."""
    import time

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    t0 = time.time()
    model, tok = load_model("smollm2-135m")
    first = time.time() - t0
    t0 = time.time()
    model2, _ = load_model("smollm2-135m")
    second = time.time() - t0
    assert second < first
    x = torch.randint(0, 1000, (1, 16))
    assert torch.equal(model(x).logits, model2(x).logits)
    entry = next((tmp_path / "cache" / "gguf").iterdir())
    with open(entry / "model.safetensors", "r+b") as f:  # flip bytes in the weights
        f.seek(4096)
        f.write(b"\x00\x01\x02\x03")
    model3, _ = load_model("smollm2-135m")
    assert torch.equal(model(x).logits, model3(x).logits)
    ids = tok(load_text("wikitext2", resolve_data_dir()), return_tensors="pt").input_ids
    r = perplexity(model, ids, 512, max_windows=4, progress=False)
    ref = math.exp(sum(F.cross_entropy(model(ids[:, i * 512:(i + 1) * 512]).logits[0, :-1],
                                       ids[0, i * 512 + 1:(i + 1) * 512]).item() for i in range(4)) / 4)
    assert r.ppl == pytest.approx(ref, rel=1e-3)
    assert 10 < r.ppl < 60


@requires_real
@pytest.mark.real
def test_real_calibration_draws():
    """The issue's check: SmolLM2 tokenizer, seed 0, 32 x 512 from the C4 pool."""
    from transformers import AutoTokenizer

    from layerprune.models.loading import builtin_gguf

    g = builtin_gguf("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    from layerprune.api import calibration_set

    c = calibration_set(tok, "c4", 32, 512, 0)
    assert c.draws[:3] == [(394, 107), (497, 829), (940, 310)]
