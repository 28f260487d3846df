"""Run directories load where layerprune is not installed, and carry a model card.

Per-block widths (SlimGPT with a non-uniform allocation) ship ``configuration_layerprune.py`` +
``modeling_layerprune.py`` and an ``auto_map``: for every family SlimGPT supports, a subprocess in which layerprune
cannot be imported loads the run with ``trust_remote_code=True`` and reproduces the in-memory logits and greedy
generation (KV cache). layerprune itself still loads such runs, and the old ones without the files. Every saved run
gets a README.md model card (front matter, the command, the measured tables)."""
from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys

import torch
import yaml
from conftest import tiny_model, tiny_tokenizer

from layerprune import load_model, prune
from layerprune.card import CARD_NAME, MARK
from layerprune.cli import main
from layerprune.models.remote_code import CONFIG_MODULE, MODEL_MODULE
from layerprune.models.structured import model_widths
from layerprune.record import read_record, save_run, write_record

STRUCTURED = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "granite"]
_g = torch.Generator().manual_seed(0)
CALIB = torch.randint(3, 256, (4, 16), generator=_g)
X = torch.randint(3, 256, (2, 12), generator=_g)  # longer than gemma3's sliding window (8)
NEW = 4

# Runs in a fresh interpreter, outside the repository, with every import of layerprune failing.
LOADER = """
import sys
sys.modules["layerprune"] = None
try:
    import layerprune
    raise SystemExit("layerprune is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM
x = torch.load("x.pt")
out = {}
for d in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    with torch.no_grad():
        gen = m.generate(x[:1], max_new_tokens=%d, do_sample=False, use_cache=True)
        out[d] = {"logits": m(x).logits, "generate": gen, "module": type(m).__module__, "class": type(m).__name__}
torch.save(out, "out.pt")
assert not [k for k, v in sys.modules.items() if k.split(".")[0] == "layerprune" and v is not None]
""" % NEW


@torch.no_grad()
def reference(model):
    model.config.use_cache = True
    gen = model.generate(X[:1], max_new_tokens=NEW, do_sample=False, use_cache=True)
    return model(X).logits, gen


def imported_packages(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}


def test_per_block_runs_load_with_trust_remote_code_without_layerprune(tmp_path):
    refs = {}
    for family in STRUCTURED:
        model = tiny_model(family, layers=3, real=True)
        rec = prune(model, calibration=CALIB, method="slimgpt", sparsity=0.5, allocation="ipr-log", progress=False)
        assert not rec["structure"]["uniform"] and len(set(model_widths(model))) == 3, family
        d = tmp_path / f"run_{family}"
        save_run(model, tiny_tokenizer(), d, rec)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"].startswith("layerprune_") and cfg["layer_heads"] == rec["structure"]["heads"]
        assert cfg["auto_map"] == {"AutoConfig": f"{CONFIG_MODULE}.{type(model.config).__name__}",
                                   "AutoModelForCausalLM": f"{MODEL_MODULE}.{type(model).__name__}"}
        for name in (CONFIG_MODULE, MODEL_MODULE):
            assert imported_packages(d / f"{name}.py") <= {"torch", "transformers"}, (family, name)
        assert rec["saved"]["remote_code"] == sorted([f"{CONFIG_MODULE}.py", f"{MODEL_MODULE}.py"])
        refs[str(d)] = reference(model)
    work = tmp_path / "elsewhere"
    work.mkdir()
    torch.save(X, work / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", LOADER, *refs], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = torch.load(work / "out.pt")
    for d, (logits, gen) in refs.items():
        got = out[d]
        assert got["module"].startswith("transformers_modules.") and got["module"].endswith(MODEL_MODULE), got
        assert got["class"].startswith("Layerprune")
        torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=0)
        assert torch.equal(got["generate"], gen), d

    # layerprune loads the new runs through its own registered classes, and old runs (no shipped code) as before
    d = tmp_path / "run_qwen2"
    loaded, _ = load_model(str(d))
    assert type(loaded).__module__ == "layerprune.models.structured"
    torch.testing.assert_close(reference(loaded)[0], refs[str(d)][0], atol=1e-6, rtol=0)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["auto_map"]
    (d / "config.json").write_text(json.dumps(cfg))
    for name in (CONFIG_MODULE, MODEL_MODULE):
        (d / f"{name}.py").unlink()
    old, _ = load_model(str(d))
    torch.testing.assert_close(reference(old)[0], refs[str(d)][0], atol=1e-6, rtol=0)


def test_uniform_runs_keep_the_stock_config_and_ship_no_code(tmp_path):
    model = tiny_model("llama", layers=2, real=True)
    rec = prune(model, calibration=CALIB, method="slimgpt", sparsity=0.5, progress=False)
    save_run(model, None, tmp_path, rec)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert rec["structure"]["uniform"] and cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert not list(tmp_path.glob("*layerprune.py")) and "remote_code" not in rec["saved"]
    card = (tmp_path / CARD_NAME).read_text()
    assert "trust_remote_code" not in card and 'from_pretrained("THIS_DIR")' in card


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_cli_run_writes_a_model_card(tmp_path, text_corpus):
    src = tmp_path / "tiny"
    tiny_model("llama", layers=3).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "run"
    argv = ["prune", "--model", str(src), "--method", "slimgpt", "--sparsity", "0.4", "--allocation", "ipr-log",
            "--nsamples", "4", "--seqlen", "32", "--data-dir", str(text_corpus), "--out", str(out),
            "--max-windows", "3"]
    assert main(argv) == 0
    rec, text = read_record(out), (out / CARD_NAME).read_text()
    meta = front_matter(text)
    assert meta["base_model"] == str(src) and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and {"layerprune", "pruned", "slimgpt"} <= set(meta["tags"])
    assert rec["command_line"] == shlex.join(["layerprune", *argv]) and rec["command_line"] in text
    ev = rec["eval"]
    assert f"| wikitext2 | {ev['before']['wikitext2']['ppl']:.2f} | {ev['after']['wikitext2']['ppl']:.2f} |" in text
    assert f"{rec['params']['before']:,} -> {rec['params']['after']:,}" in text
    assert "4 x 32 tokens, seed 0" in text and "trust_remote_code=True" in text and MARK in text
    assert (out / "recipe.yaml").is_file() and "layerprune prune --recipe recipe.yaml" in text

    # a record update (eval --tasks adds zero-shot results) refreshes the card; a README.md the user wrote stays
    from layerprune.evaluation.zeroshot import join_record

    zs = {"tasks": {"piqa": {"n": 5, "acc": 0.6, "acc_norm": 0.4, "source": "local"}}, "skipped": {}, "limit": 5,
          "seconds": 1.0, "num_fewshot": 0, "lm_eval_version": "x"}
    write_record(out, join_record(rec, zs))
    assert "| piqa | 5 | 0.6000 | 0.4000 |" in (out / CARD_NAME).read_text()
    (out / CARD_NAME).write_text("my own notes\n")
    write_record(out, rec)
    assert (out / CARD_NAME).read_text() == "my own notes\n"


def test_python_api_card_names_the_call_and_the_base_model(tmp_path):
    src = tmp_path / "tiny"
    tiny_model("mistral", layers=2).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    model, tok = load_model(str(src))
    rec = prune(model, tok, calibration=CALIB, method="wanda", nm="2:4", progress=False)
    save_run(model, tok, tmp_path / "run", rec)
    text = (tmp_path / "run" / CARD_NAME).read_text()
    meta = front_matter(text)
    assert meta["base_model"] == str(src) and {"wanda", "n:m-sparsity"} <= set(meta["tags"])
    assert "Python API" in text and "method='wanda', nm='2:4'" in text
    assert "stored as zeros in dense tensors" in text
