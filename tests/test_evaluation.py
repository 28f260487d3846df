"""Evaluation and calibration windows: a BOS per window where the tokenizer wants one; chunked logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import FAMILIES, tiny_config, tiny_model, tiny_tokenizer

import layerprune.evaluation.perplexity as P
from layerprune.data import calibration_pool, get_calibration, load_text, sample_windows, tokenize_docs
from layerprune.data.bos import needs_bos
from layerprune.errors import UserError
from layerprune.models.adapters import get_adapter

BOS = 1


def bos_tokenizer():
    """The tiny byte tokenizer with a post-processor that puts BOS (id 1) in front of every text, like Gemma's."""
    from tokenizers import processors

    backend = tiny_tokenizer().backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single=f"{chr(0x101)} $A",
                                                           special_tokens=[(chr(0x101), BOS)])
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=chr(0x100), eos_token=chr(0x100),
                                      bos_token=chr(0x101))


def fed_windows(model) -> list[torch.Tensor]:
    """Record the input_ids every forward of the model's body receives."""
    seen = []
    get_adapter(model).body(model).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True)
    return seen


def test_needs_bos_follows_the_tokenizer():
    assert needs_bos(bos_tokenizer()) and not needs_bos(tiny_tokenizer())


def test_bos_tokenizer_gets_bos_in_every_evaluation_window(text_corpus):
    tok, model = bos_tokenizer(), tiny_model("llama")
    seen = fed_windows(model)
    r = P.evaluate_ppl(model, tok, "wikitext2", 32, text_corpus, max_windows=6, batch_size=4, progress=False)
    x = torch.cat(seen)
    assert r.bos and r.to_dict()["bos"] and x.shape == (6, 32) and (x[:, 0] == BOS).all()
    text = tok(load_text("wikitext2", text_corpus))["input_ids"]
    assert text[0] == BOS and BOS not in text[1:]
    assert x[:, 1:].reshape(-1).tolist() == text[1:1 + 6 * 31]  # consecutive text, BOS + 31 tokens each
    # the loss is not counted on predicting BOS: window NLL = mean over the 31 text tokens
    ref = F.cross_entropy(model(x[:1]).logits[0, :-1], x[0, 1:]).item()
    assert r.window_nll[0] == pytest.approx(ref, rel=1e-5)
    # override: no BOS on request
    seen.clear()
    r = P.evaluate_ppl(model, tok, "wikitext2", 32, text_corpus, max_windows=6, progress=False, bos=False)
    assert not r.bos and torch.cat(seen).reshape(-1).tolist() == text[:6 * 32]


def test_no_bos_tokenizer_gets_the_old_windows(text_corpus):
    tok, model = tiny_tokenizer(), tiny_model("llama")
    seen = fed_windows(model)
    r = P.evaluate_ppl(model, tok, "wikitext2", 32, text_corpus, max_windows=6, batch_size=4, progress=False)
    ids = tok(load_text("wikitext2", text_corpus), return_tensors="pt").input_ids
    assert not r.bos and torch.equal(torch.cat(seen), ids[0, :6 * 32].view(6, 32))
    with pytest.raises(UserError, match="no BOS token"):
        P.evaluate_ppl(model, tok, "wikitext2", 32, text_corpus, max_windows=1, progress=False, bos=True)


def test_bos_tokenizer_gets_bos_in_every_calibration_window(text_corpus):
    tok = bos_tokenizer()
    pool = calibration_pool("c4", text_corpus)
    c = get_calibration(tok, pool, 12, 40, seed=0)
    assert c.bos and c.ids.shape == (12, 40) and (c.ids[:, 0] == BOS).all() and not (c.ids[:, 1:] == BOS).any()
    docs = [t[1:] for t in tokenize_docs(tok, pool)]  # the same draws as the reference, on 39 text tokens
    ref = sample_windows(docs, 12, 39, seed=0)
    assert c.draws == ref.draws and torch.equal(c.ids[:, 1:], ref.ids)
    assert not get_calibration(tok, pool, 12, 40, seed=0, bos=False).ids[:, 0].eq(BOS).any()


def test_no_bos_tokenizer_gets_the_old_calibration_windows(text_corpus):
    tok = tiny_tokenizer()
    pool = calibration_pool("c4", text_corpus)
    c = get_calibration(tok, pool, 12, 40, seed=0)
    ref = sample_windows(tokenize_docs(tok, pool), 12, 40, seed=0)
    assert not c.bos and c.draws == ref.draws and torch.equal(c.ids, ref.ids)


# --- the NLL from hidden states, a chunk of logits at a time ------------------------------------------

VARIANTS = [(f, {}) for f in FAMILIES] + [
    ("gemma3", {"final_logit_softcapping": 3.0}), ("opt", {"word_embed_proj_dim": 32}),
    ("qwen2", {"tie_word_embeddings": False})]


def _model(family, **extra):
    cfg = tiny_config(family)
    for k, v in extra.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family,extra", VARIANTS, ids=[f + "".join(f"-{k}" for k in e) for f, e in VARIANTS])
def test_chunked_nll_equals_full_logits_loss(family, extra, monkeypatch):
    model = _model(family, **extra)
    a, x = get_adapter(model), torch.randint(0, 256, (3, 24))
    if "final_logit_softcapping" in extra:  # head weights large enough that the cap changes the logits
        torch.nn.init.normal_(a.lm_head(model).weight, std=1.0)
        with torch.no_grad():
            assert a.lm_head(model)(a.body(model)(input_ids=x).last_hidden_state).abs().max() > 6
    monkeypatch.setattr(P, "LOGIT_CHUNK", 7 * 256)  # 7 rows per chunk: windows span several chunks
    got = P.window_nll(model, x)
    with torch.no_grad():
        logits = model(x).logits.float()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1), reduction="none").view(3, -1).mean(1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_evaluation_logits_do_not_grow_with_windows(monkeypatch):
    """No more than one chunk of logits exists at once, however many windows and whatever the batch."""
    model = _model("llama", vocab_size=50_000, tie_word_embeddings=False)
    chunk = 4 * 50_000
    monkeypatch.setattr(P, "LOGIT_CHUNK", chunk)
    sizes = []
    get_adapter(model).lm_head(model).register_forward_hook(lambda m, i, out: sizes.append(out.numel()))
    peaks = []
    for windows in (2, 20):
        sizes.clear()
        P.perplexity(model, torch.randint(0, 50_000, (1, 64 * windows)), 64, batch_size=8, progress=False)
        peaks.append(max(sizes))
    assert peaks == [chunk, chunk]
