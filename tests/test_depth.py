"""Depth pruning (``--method depth``): whole blocks removed, saved as the family's stock config with fewer blocks.

Every family: the pruned model equals the original with the removed blocks made identity (the ground truth, so the
per-block config entries and renumbered layer_idx are right), the saved run reloads with stock ``from_pretrained``
in a fresh interpreter without layerprune and gives the same logits and the same KV-cache generation. The criteria
find a block made identity; bad input is one line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, tiny_model, tiny_tokenizer

from layerprune import prune
from layerprune.cli import main
from layerprune.errors import UserError
from layerprune.models.adapters import get_adapter
from layerprune.record import save_run
from layerprune.solvers.depth import block_influence, count_for_fraction

_g = torch.Generator().manual_seed(0)
CALIB = torch.randint(3, 256, (4, 16), generator=_g)
X = torch.randint(3, 256, (2, 14), generator=_g)  # longer than gemma3's sliding window (8)
NEW = 4
LAYERS = 6

LOADER = """
import sys
sys.modules["layerprune"] = None
import torch
from transformers import AutoModelForCausalLM
x = torch.load("x.pt")
out = {}
for d in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        gen = m.generate(x[:1], max_new_tokens=%d, do_sample=False, use_cache=True)
        out[d] = {"logits": m(x).logits, "generate": gen, "module": type(m).__module__,
                  "layers": m.config.num_hidden_layers}
torch.save(out, "out.pt")
""" % NEW


def model_of(family, seed=0):
    return tiny_model(family, layers=LAYERS, seed=seed, real=True)  # gemma3: sliding and global layers alternate


class _Identity(torch.nn.Module):
    """Stands in for a removed block in the reference: returns its input in the block's output structure."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, *args, **kwargs):
        out = self.block(hidden_states, *args, **kwargs)
        return (hidden_states, *out[1:]) if isinstance(out, tuple) else hidden_states


@torch.no_grad()
def reference_logits(family, removed, x, seed=0):
    """The original model with the removed blocks made identity."""
    m = model_of(family, seed)
    blocks = get_adapter(m).blocks(m)
    for i in removed:
        blocks[i] = _Identity(blocks[i])
    return m(x, use_cache=False).logits


@torch.no_grad()
def generate(model):
    model.config.use_cache = True
    return model.generate(X[:1], max_new_tokens=NEW, do_sample=False, use_cache=True)


@pytest.mark.parametrize("criterion", ["shortgpt"])
def test_every_family_saves_a_stock_config_that_reloads_with_the_same_logits(tmp_path, criterion):
    refs = {}
    for family in FAMILIES:
        model = model_of(family)
        types = list(getattr(model.config, "layer_types", None) or [])
        rec = prune(model, calibration=CALIB, method="depth", solver_options={"drop": 2, "criterion": criterion},
                    progress=False)
        removed = rec["depth"]["removed"]
        assert len(removed) == 2 and rec["sparsity"] is None, family
        keep = [i for i in range(LAYERS) if i not in removed]
        assert rec["depth"]["kept"] == keep and model.config.num_hidden_layers == 4
        assert len(rec["depth"]["values"]) == LAYERS and all(v is not None for v in rec["depth"]["values"])
        if types:
            assert model.config.layer_types == [types[i] for i in keep], family
        layer_idx = sorted({m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)})
        assert layer_idx in ([], [0, 1, 2, 3]), (family, layer_idx)
        with torch.no_grad():
            logits = model(X, use_cache=False).logits
        torch.testing.assert_close(logits, reference_logits(family, removed, X), atol=1e-5, rtol=0)
        d = tmp_path / f"{family}"
        save_run(model, tiny_tokenizer(), d, rec)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["num_hidden_layers" if family != "gpt2" else "n_layer"] == 4 and "auto_map" not in cfg, family
        assert not cfg["model_type"].startswith("layerprune_") and "remote_code" not in rec["saved"]
        refs[str(d)] = (logits, generate(model))
    work = tmp_path / "elsewhere"
    work.mkdir()
    torch.save(X, work / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", LOADER, *refs], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = torch.load(work / "out.pt")
    for d, (logits, gen) in refs.items():
        got = out[d]
        assert got["module"].startswith("transformers.models.") and got["layers"] == 4, d
        torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=0)
        assert torch.equal(got["generate"], gen), d


def test_gemma3_sliding_and_global_pattern_is_cut_with_the_blocks():
    """Removing blocks 0 and 3 of s,f,s,f,s,f shifts the pattern: kept f,s,s,f (not the first four types)."""
    from layerprune.models.adapters import get_adapter

    model = model_of("gemma3")
    get_adapter(model).keep_blocks(model, [1, 2, 4, 5])
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    with torch.no_grad():
        torch.testing.assert_close(model(X, use_cache=False).logits, reference_logits("gemma3", [0, 3], X),
                                   atol=1e-5, rtol=0)


def test_qwen2_max_window_layers_follows_the_kept_blocks():
    import transformers as T

    cfg = T.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=6, vocab_size=256, use_sliding_window=True, sliding_window=8,
                        max_window_layers=3)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    get_adapter(model).keep_blocks(model, [0, 2, 3, 5])
    assert model.config.max_window_layers == 2 and model.config.num_hidden_layers == 4
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]


@torch.no_grad()
def brute_ppl(family, removed_block):
    """Calibration perplexity of the identity-block-3 model with ``removed_block`` also made identity."""
    m = model_of(family)
    _identity_block(m, 3)
    blocks = get_adapter(m).blocks(m)
    blocks[removed_block] = _Identity(blocks[removed_block])
    logp = torch.log_softmax(m(CALIB, use_cache=False).logits[:, :-1].float(), -1)
    return float(torch.exp(-logp.gather(-1, CALIB[:, 1:, None]).mean()))


def _identity_block(model, i):
    """Zero the output projections (and their biases) of block i: its output equals its input."""
    a = get_adapter(model)
    lin = a.linears(a.blocks(model)[i])
    with torch.no_grad():
        for role in (a.o, a.down):
            lin[role].weight.zero_()
            if getattr(lin[role], "bias", None) is not None:
                lin[role].bias.zero_()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", ["shortgpt", "sleb"])
def test_a_block_made_identity_is_removed_first(family, criterion):
    model = model_of(family)
    _identity_block(model, 3)
    rec = prune(model, calibration=CALIB, method="depth", solver_options={"drop": 1, "criterion": criterion},
                progress=False)
    values = rec["depth"]["values"]
    if criterion == "shortgpt":
        assert rec["depth"]["removed"] == [3], (family, values)
        assert values[3] < 1e-5 < min(v for i, v in enumerate(values) if i != 3)
    else:  # the perplexity without the identity block is the dense one; a random block may even lower it, so the
        # choice is checked against the brute-force perplexity of every single removal (removed blocks as identity)
        assert abs(values[3] - rec["depth"]["dense_calibration_ppl"]) < 1e-4 * values[3]
        brute = [brute_ppl(family, i) for i in range(LAYERS)]
        torch.testing.assert_close(torch.tensor(values), torch.tensor(brute), rtol=1e-4, atol=0)
        assert rec["depth"]["removed"] == [min(range(LAYERS), key=lambda i: brute[i])]
        assert rec["depth"]["cost"]["forward_passes"] == 1 + LAYERS and rec["depth"]["cost"]["seconds"] > 0


def test_sleb_rescores_after_each_removal_and_keep_first_last_protect():
    model = model_of("llama")
    _identity_block(model, 0)  # the best block to remove, but protected
    rec = prune(model, calibration=CALIB, method="depth", progress=False,
                solver_options={"drop": 2, "criterion": "sleb", "keep_first": 1, "keep_last": 1})
    d = rec["depth"]
    assert d["candidates"] == [1, 2, 3, 4] and len(d["steps"]) == 2 and 0 not in d["removed"]
    first, second = d["removal_order"]
    step0, step1 = (s["candidates"] for s in d["steps"])
    assert first == int(min(step0, key=step0.get)) and second == int(min(step1, key=step1.get))
    assert set(step1) == {"1", "2", "3", "4"} - {str(first)}  # re-scored on the model without the first
    assert d["cost"]["forward_passes"] == 1 + 4 + 3


def test_block_influence_is_one_minus_mean_token_cosine():
    model = model_of("llama")
    a = get_adapter(model)
    seen = {}
    h = a.blocks(model)[2].register_forward_hook(
        lambda m, args, kw, out: seen.update(x=(args[0] if args else kw["hidden_states"]), y=out[0]
                                             if isinstance(out, tuple) else out), with_kwargs=True)
    with torch.no_grad():
        model(CALIB[:1], use_cache=False)
    h.remove()
    x, y = seen["x"][0], seen["y"][0]
    want = sum(1 - float(x[t] @ y[t] / (x[t].norm() * y[t].norm())) for t in range(x.shape[0])) / x.shape[0]
    assert abs(block_influence(model, a, CALIB[:1], 1)[2] - want) < 1e-5


def test_sparsity_is_the_fraction_of_block_parameters():
    assert count_for_fraction([10] * 30, 300, 0.25) == 8  # 7.5 blocks: the tie goes to the larger count
    assert count_for_fraction([10] * 6, 60, 0.5) == 3
    assert count_for_fraction([30, 10, 10], 50, 0.4) == 1  # the target is 20: 30 is closer than 0 or 40
    model = model_of("llama")
    rec = prune(model, calibration=CALIB, method="depth", sparsity=0.5, progress=False)
    assert len(rec["depth"]["removed"]) == 3 and rec["sparsity"] == 0.5
    assert abs(rec["depth"]["removed_fraction"] - 0.5) < 1e-9


@pytest.mark.parametrize("kwargs, message", [
    (dict(solver_options={"drop": 6}), "leaves no block"),
    (dict(solver_options={"drop": 7}), "leaves no block"),
    (dict(solver_options={"drop": 2}, sparsity=0.3), "not both"),
    (dict(solver_options={"drop": 2, "keep_first": 3, "keep_last": 2}), "only 1 of 6 blocks"),
    (dict(solver_options={"keep_first": 3, "keep_last": 3}), "protect all 6"),
    (dict(solver_options={"criterion": "magic"}), "unknown --criterion"),
    (dict(solver_options={"drop": 2}, allocation="owl"), "--allocation does not apply"),
    (dict(solver_options={"drop": 2}, offload="disk"), "--offload disk"),
    (dict(solver_options={"drop": 2}, nm="2:4"), "--nm and --skip do not apply"),
    (dict(sparsity=0.05), "no block would go"),
])
def test_bad_input_is_refused(kwargs, message):
    model = model_of("llama")
    with pytest.raises(UserError, match=message):
        prune(model, calibration=CALIB, method="depth", progress=False, **kwargs)


def test_cli_bad_input_is_one_line(tmp_path, capsys, text_corpus):
    src = tmp_path / "tiny"
    model_of("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    capsys.readouterr()
    rc = main(["prune", "--model", str(src), "--method", "depth", "--drop", "6", "--out", str(tmp_path / "o"),
               "--data-dir", str(text_corpus)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "leaves no block" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- chaining (depth + width)

def _safetensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_depth_then_slimgpt_chains_record_card_and_recipe_and_reproduces(tmp_path, text_corpus):
    import yaml

    from layerprune.card import CARD_NAME
    from layerprune.models.loading import load_model
    from layerprune.record import read_record

    src = tmp_path / "tiny"
    model_of("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    common = ["--nsamples", "4", "--seqlen", "32", "--data-dir", str(text_corpus), "--eval", "wikitext2",
              "--max-windows", "2"]
    assert main(["prune", "--model", str(src), "--method", "depth", "--drop", "2", "--criterion", "sleb",
                 "--out", str(tmp_path / "d"), *common]) == 0
    assert main(["prune", "--model", str(tmp_path / "d"), "--method", "slimgpt", "--sparsity", "0.3",
                 "--out", str(tmp_path / "w"), *common]) == 0
    rec = read_record(tmp_path / "w")
    first = rec["parent"]
    assert first["method"] == "depth" and first["path"] == str((tmp_path / "d").resolve())
    assert len(first["depth"]["removed"]) == 2 and first["params"]["after"] == rec["params"]["before"]
    assert first["model"] == str(src) and rec["method"] == "slimgpt"
    r = yaml.safe_load((tmp_path / "w" / "recipe.yaml").read_text())
    assert r["method"] == "slimgpt" and r["parent"]["method"] == "depth" and r["parent"]["model"] == str(src)
    assert r["parent"]["solver_options"]["drop"] == 2 and r["parent"]["sparsity"] is None
    card = (tmp_path / "w" / CARD_NAME).read_text()
    assert "## Pruning steps" in card and "pruned with depth then slimgpt" in card and str(src) in card
    # one recipe replays both steps: the parent into OUT.parent, then this step from it
    assert main(["prune", "--recipe", str(tmp_path / "w" / "recipe.yaml"), "--out", str(tmp_path / "again"),
                 "--data-dir", str(text_corpus)]) == 0
    assert read_record(tmp_path / "again.parent")["depth"]["removed"] == first["depth"]["removed"]
    a, b = _safetensors(tmp_path / "w"), _safetensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = read_record(tmp_path / "again")
    assert again["parent"]["path"] == str((tmp_path / "again.parent").resolve())
    assert again["eval"]["after"]["wikitext2"]["ppl"] == rec["eval"]["after"]["wikitext2"]["ppl"]
    # a second replay reuses the parent step
    assert main(["prune", "--recipe", str(tmp_path / "w" / "recipe.yaml"), "--out", str(tmp_path / "again"),
                 "--data-dir", str(text_corpus), "--force", "--eval", ""]) == 0
    m, _ = load_model(str(tmp_path / "again"))
    assert m.config.num_hidden_layers == 4 and m.config.model_type == "llama"


def test_slimgpt_per_block_widths_then_depth_cuts_the_width_lists(tmp_path):
    from layerprune.models.loading import load_model
    from layerprune.models.structured import model_widths

    model = model_of("llama")
    prune(model, calibration=CALIB, method="slimgpt", sparsity=0.4, allocation="ipr-log", progress=False)
    widths = model_widths(model)
    assert model.config.model_type.startswith("layerprune_") and len(set(widths)) > 1
    rec = prune(model, calibration=CALIB, method="depth", solver_options={"drop": 2}, progress=False)
    keep = rec["depth"]["kept"]
    assert model_widths(model) == [widths[i] for i in keep]
    assert model.config.layer_heads == [widths[i][0] for i in keep]
    assert rec["structure"]["uniform"] == (len({widths[i] for i in keep}) == 1)
    save_run(model, tiny_tokenizer(), tmp_path, rec)
    loaded, _ = load_model(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, model(X).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- equal widths the stock config refuses

def test_gemma3_slimgpt_equal_widths_export_to_the_stock_gguf_architecture(tmp_path):
    """3 of 4 heads everywhere: gemma3's config refuses hidden 64 % 3 heads (head_dim is decoupled), so transformers
    needs the per-block form, but llama.cpp's gemma3 takes it: the export is gemma3, not a refusal."""
    import gguf
    from test_export_gguf import bpe_tokenizer

    from layerprune.card import CARD_NAME
    from layerprune.export.gguf import export

    model = tiny_model("gemma3", layers=3, real=True)
    rec = prune(model, calibration=CALIB, method="slimgpt", sparsity=0.25, progress=False)
    st = rec["structure"]
    assert st["heads"] == [3, 3, 3] and not st["uniform"] and st["equal_widths"]
    assert "not a multiple of the number of attention heads" in st["stock_config_refused"]
    save_run(model, bpe_tokenizer(), tmp_path / "run", rec)
    assert "refuses them" in (tmp_path / "run" / CARD_NAME).read_text()
    info = export(str(tmp_path / "run"), "f32", out=tmp_path / "m.gguf")
    assert info["architecture"] == "gemma3" and not info["per_block_widths"]
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.")}
    assert f["gemma3.attention.head_count"] == 3 and f["gemma3.attention.head_count_kv"] == 1
    assert f["gemma3.attention.key_length"] == 32 and f["gemma3.block_count"] == 3
    q = {t.name: t for t in r.tensors}["blk.0.attn_q.weight"]
    assert tuple(int(x) for x in reversed(q.shape)) == (3 * 32, 64)
    # different widths still get the one-line refusal naming the reason
    model = tiny_model("gemma3", layers=3, real=True)
    rec = prune(model, calibration=CALIB, method="slimgpt", sparsity=0.4, allocation="ipr-log", progress=False)
    assert len(set(zip(rec["structure"]["heads"], rec["structure"]["intermediate"]))) > 1
    save_run(model, bpe_tokenizer(), tmp_path / "var", rec)
    with pytest.raises(UserError, match="per-block widths and llama.cpp's per-layer-width architecture"):
        export(str(tmp_path / "var"), "f32", out=tmp_path / "v.gguf")


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_depth_run_exports_the_stock_gguf_architecture_with_fewer_blocks(tmp_path, family):
    import gguf
    from test_export_gguf import bpe_tokenizer

    from layerprune.export.gguf import export

    model = model_of(family)
    rec = prune(model, calibration=CALIB, method="depth", solver_options={"drop": 2}, progress=False)
    save_run(model, bpe_tokenizer(), tmp_path, rec)
    info = export(str(tmp_path), "f16", out=tmp_path / "m.gguf")
    arch = info["architecture"]
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.")}
    assert f[f"{arch}.block_count"] == 4 and arch == get_adapter(model).gguf_arch
    blocks = {int(t.name.split(".")[1]) for t in r.tensors if t.name.startswith("blk.")}
    assert blocks == {0, 1, 2, 3}
    if family == "gemma3":
        kept = rec["depth"]["kept"]
        pattern = [t == "sliding_attention" for t in (tiny_model("gemma3", LAYERS, real=True).config.layer_types)]
        assert f["gemma3.attention.sliding_window_pattern"] == [pattern[i] for i in kept]


def test_plot_and_card_of_a_depth_run(tmp_path):
    from layerprune.card import CARD_NAME
    from layerprune.plots import block_sparsity

    model = model_of("llama")
    rec = prune(model, calibration=CALIB, method="depth", solver_options={"drop": 2, "criterion": "sleb"},
                progress=False)
    save_run(model, tiny_tokenizer(), tmp_path / "run", rec)
    _, target, achieved = block_sparsity(rec)
    assert achieved == [float(i in rec["depth"]["removed"]) for i in range(LAYERS)]
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    card = (tmp_path / "run" / CARD_NAME).read_text()
    assert f"| blocks removed | 2 of {LAYERS} by sleb: {rec['depth']['removed']}" in card
    assert "forward passes over the calibration windows" in card and "target sparsity" not in card
    assert "trust_remote_code" not in card


def test_configs_that_cannot_be_cut_are_refused_before_any_work():
    m = model_of("gpt2")
    m.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx"):
        prune(m, calibration=CALIB, method="depth", solver_options={"drop": 1}, progress=False)
    m = model_of("llama")
    m.config.per_layer_scale = [1.0] * LAYERS  # a per-block list layerprune does not know
    with pytest.raises(UserError, match="per_layer_scale have one entry per block"):
        prune(m, calibration=CALIB, method="depth", solver_options={"drop": 1}, progress=False)
    assert m.config.num_hidden_layers == LAYERS
