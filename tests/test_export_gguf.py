"""``layerprune export --to gguf`` on tiny random models of every family llama.cpp has an architecture for: the file
is read back with ``gguf.GGUFReader`` (every tensor, its shape, its f32 values, Q8_0 within its rounding, the
per-layer widths of a per-block SlimGPT run, the tokenizer keys), the q/k permutation turns HF's rotary into
llama.cpp's adjacent-pair rotary, and the refusals end with one line, exit 2, nothing written."""
from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest
import torch
import transformers as T
from conftest import FAMILIES, requires_real, tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from layerprune import prune
from layerprune.cli import main
from layerprune.export.gguf import export, interleave_heads
from layerprune.models.adapters import get_adapter
from layerprune.record import save_run

EXPORTED = [f for f in FAMILIES if f != "opt"]
CALIB = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))


def bpe_tokenizer():
    """Byte-level BPE over 256 ids: 254 byte symbols, one merge ("Ġ" + "t" = id 254), a special EOS (id 255)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet[:254])} | {"Ġt": 254}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _save(model, d):
    model.save_pretrained(d)
    bpe_tokenizer().save_pretrained(d)
    return d


def _fields(path):
    r = gguf.GGUFReader(path)
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.t")}


def _expected(model):
    """GGUF name -> expected float32 values, built from the model and the family's facts."""
    a = get_adapter(model)
    arch, interleave = a.gguf_target(model.config, False)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], a.num_blocks(model))
    sd = dict(model.state_dict())
    hd = a.geometry(model.config).head_dim
    for i, block in enumerate(a.blocks(model)):
        for n, mod in a.linears(block).items():
            sd[f"{a.blocks_path}.{i}.{n}.weight"] = a.get_weight(mod)
    if model.config.tie_word_embeddings:
        sd.pop(f"{a.lm_head_path}.weight")
    out = {}
    for k, v in sd.items():
        v = v.detach().float()
        if interleave and any(f".{r}." in k for r in (a.q, a.k)):
            v = v.reshape(-1, 2, hd // 2, *v.shape[1:]).transpose(1, 2).reshape(v.shape)
        out[names.get_name(k, try_suffixes=(".weight", ".bias"))] = a.gguf_tensor(k, v)
    return arch, out


@pytest.mark.parametrize("family", EXPORTED)
def test_every_tensor_and_value_read_back(family, tmp_path):
    model = tiny_model(family, layers=2, real=True)
    src = _save(model, tmp_path / "model")
    arch, expected = _expected(model)
    info32 = export(str(src), "f32", out=tmp_path / "m32.gguf")
    info8 = export(str(src), "q8_0", out=tmp_path / "m8.gguf")
    assert info32["architecture"] == arch and set(info32["tensors"]) == {"F32"}
    r32, meta = _fields(tmp_path / "m32.gguf")
    assert meta["general.architecture"] == arch and meta["layerprune.written_by"] == "layerprune"
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.vocab_size"] == model.config.vocab_size
    got = {t.name: t for t in r32.tensors}
    assert set(got) == set(expected)
    for name, t in got.items():
        want = expected[name].numpy()
        assert tuple(int(x) for x in reversed(t.shape)) == want.shape, name  # GGUF lists dims innermost first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want, err_msg=name)
    r8, _ = _fields(tmp_path / "m8.gguf")
    q8 = {t.name: t for t in r8.tensors}
    n_q8 = 0
    for name, want in expected.items():
        t, want = q8[name], want.numpy()
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            n_q8 += 1
            back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
            step = np.abs(want).reshape(-1, 32).max(1, keepdims=True) / 127  # a Q8_0 step, per block of 32
            assert np.all(np.abs(back - want).reshape(-1, 32) <= step * 0.57 + 1e-12), name  # + f16 scale rounding
        else:  # 1-D tensors stay f32; a weight whose rows are not a multiple of 32 stays f16
            assert (t.tensor_type, want.ndim) in ((gguf.GGMLQuantizationType.F32, 1),
                                                 (gguf.GGMLQuantizationType.F16, 2)), name
            assert want.ndim == 1 or want.shape[-1] % 32, name
    assert n_q8 == info8["tensors"]["Q8_0"] > 0
    tok = {k: f.contents() for k, f in r32.fields.items() if k.startswith("tokenizer.")}
    assert tok["tokenizer.ggml.model"] == "gpt2" and len(tok["tokenizer.ggml.tokens"]) == model.config.vocab_size
    # transformers rebuilds a saved qwen2 tokenizer as Qwen2Tokenizer, with Qwen2's pre-tokenizer
    assert tok["tokenizer.ggml.pre"] == ("qwen2" if family == "qwen2" else "gpt-2")
    assert tok["tokenizer.ggml.merges"] == ["Ġ t"] and tok["tokenizer.ggml.tokens"][254] == "Ġt"
    assert tok["tokenizer.ggml.tokens"][255] == "<|endoftext|>" and tok["tokenizer.ggml.eos_token_id"] == 255
    assert tok["tokenizer.ggml.token_type"][254:] == [1, 3]  # normal, control (special)


def test_permutation_turns_hf_rotary_into_adjacent_pair_rotary():
    """llama.cpp's llama/deci rotary turns pairs (2i, 2i+1) by angle_i; HF's turns (i, i + d/2). Rotating the
    permuted q equals permuting the HF-rotated q, at every position."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hd, heads, pos = 16, 3, torch.arange(7)
    torch.manual_seed(0)
    q = torch.randn(heads * hd, 5)  # a q_proj weight [heads * head_dim, in]
    x = torch.randn(5)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = pos[:, None] * inv[None]  # [pos, hd/2]
    emb = torch.cat([ang, ang], -1)
    hf_q = (q @ x).view(heads, hd)[None].expand(len(pos), heads, hd)  # [pos, heads, hd]
    hf, _ = apply_rotary_pos_emb(hf_q.transpose(0, 1)[None], hf_q.transpose(0, 1)[None], emb.cos()[None],
                                 emb.sin()[None])
    hf = hf[0].transpose(0, 1)  # [pos, heads, hd]
    pq = (interleave_heads(q, hd) @ x).view(heads, hd // 2, 2)
    c, s = ang.cos()[:, None], ang.sin()[:, None]  # [pos, 1, hd/2]
    a, b = pq[None, ..., 0], pq[None, ..., 1]
    ggml = torch.stack([a * c - b * s, a * s + b * c], -1).reshape(len(pos), heads, hd)
    want = interleave_heads(hf.reshape(len(pos), heads * hd).T, hd).T.reshape(len(pos), heads, hd)
    torch.testing.assert_close(ggml, want, atol=1e-5, rtol=0)
    assert not torch.allclose(ggml, hf, atol=1e-3)  # the layouts do differ


def _slim_run(tmp_path, family="llama", layers=4):
    model = tiny_model(family, layers=layers, real=True)
    rec = prune(model, calibration=CALIB, method="slimgpt", sparsity=0.5, allocation="ipr-log", progress=False)
    run = tmp_path / "slim"
    save_run(model, bpe_tokenizer(), run, rec)
    return model, rec, run


def test_per_block_slimgpt_run_exports_as_deci_with_per_layer_widths(tmp_path, capsys):
    model, rec, run = _slim_run(tmp_path)
    s = rec["structure"]
    assert not s["uniform"] and len(set(s["intermediate"])) > 1
    assert any(ff % 32 for ff in s["intermediate"])  # something to pad
    assert main(["export", str(run), "--type", "f32", "--align", "1"]) == 0
    out = run / "model-f32.gguf"
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "architecture deci" in printed and "zero FFN channels" not in printed
    r, meta = _fields(out)
    assert meta["general.architecture"] == "deci"
    assert meta["deci.attention.head_count"] == s["heads"] and meta["deci.attention.head_count_kv"] == s["kv_heads"]
    assert meta["deci.feed_forward_length"] == s["intermediate"]
    a = get_adapter(model)
    hd = a.geometry(model.config).head_dim
    got = {t.name: t for t in r.tensors}
    for i, (h, kv, ff) in enumerate(zip(s["heads"], s["kv_heads"], s["intermediate"])):
        shape = lambda n: tuple(int(x) for x in reversed(got[f"blk.{i}.{n}.weight"].shape))  # noqa: E731
        assert shape("attn_q") == (h * hd, 96) and shape("attn_k") == (kv * hd, 96)
        assert shape("attn_output") == (96, h * hd) and shape("ffn_up") == (ff, 96) == shape("ffn_gate")
        q = a.get_weight(a.linears(a.blocks(model)[i])[a.q]).detach()
        np.testing.assert_array_equal(np.asarray(got[f"blk.{i}.attn_q.weight"].data), interleave_heads(q, hd).numpy())


def test_ffn_widths_are_padded_with_zero_channels_that_change_nothing(tmp_path, capsys):
    """The default --align 32: every FFN width rounded up with zero channels (llama.cpp's fast matmul needs
    multiples of 16; q8_0 of 32); the block's MLP computes the same output from the padded tensors."""
    model, rec, run = _slim_run(tmp_path)
    s = rec["structure"]
    assert main(["export", str(run), "--type", "f32"]) == 0
    padded = [ff + (-ff % 32) for ff in s["intermediate"]]
    assert f"{sum(padded) - sum(s['intermediate'])} zero FFN channels to multiples of 32" in capsys.readouterr().out
    r, meta = _fields(run / "model-f32.gguf")
    assert meta["deci.feed_forward_length"] == padded != s["intermediate"]
    got = {t.name: torch.from_numpy(np.asarray(t.data).copy()) for t in r.tensors}
    a = get_adapter(model)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    for i, (ff, fp) in enumerate(zip(s["intermediate"], padded)):
        lin = a.linears(a.blocks(model)[i])
        gate, up, down = (got[f"blk.{i}.ffn_{n}.weight"] for n in ("gate", "up", "down"))
        assert gate.shape == up.shape == (fp, 96) and down.shape == (96, fp)
        assert not gate[ff:].any() and not up[ff:].any() and not down[:, ff:].any()
        torch.testing.assert_close(up[:ff], a.get_weight(lin[a.up]).detach(), rtol=0, atol=0)
        want = lin[a.down](torch.nn.functional.silu(lin[a.gate](x)) * lin[a.up](x))
        torch.testing.assert_close(torch.nn.functional.silu(x @ gate.T) * (x @ up.T) @ down.T, want,
                                   rtol=1e-5, atol=1e-6)
    assert main(["export", str(run), "--type", "q8_0"]) == 0  # padded rows of 32: every FFN weight is Q8_0
    r8, _ = _fields(run / "model-q8_0.gguf")
    assert all(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in r8.tensors if ".ffn_" in t.name
               and "norm" not in t.name)


def test_per_block_run_of_a_family_deci_cannot_express_is_refused_before_loading(tmp_path, monkeypatch):
    _, rec, run = _slim_run(tmp_path, "qwen3", layers=3)
    assert not rec["structure"]["uniform"]
    import layerprune.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded before the refusal"))
    with pytest.raises(Exception, match="per-block widths and llama.cpp's per-layer-width architecture"):
        export(str(run), "f16")
    assert not list(run.glob("*.gguf"))


def _snapshot(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_refusals_one_line_exit_2_nothing_written(tmp_path, capfd):
    run = tmp_path / "run"
    m = tiny_model("llama", layers=2)
    save_run(m, bpe_tokenizer(), run, prune(m, calibration=CALIB, method="magnitude", sparsity=0.5, progress=False))
    assert main(["export", str(run), "--type", "q8_0"]) == 0  # ours, marked
    opt = _save(tiny_model("opt", layers=2), tmp_path / "opt")
    (tmp_path / "mine.gguf").write_bytes(b"GGUF" + bytes(60))  # the user's own GGUF
    (tmp_path / ".t.gguf.layerprune-tmp").write_text("the user's, at our temporary name")
    wp = _save(tiny_model("llama", layers=2), tmp_path / "wordpiece")
    from conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(wp)  # WordPiece, not BPE
    capfd.readouterr()
    cases = [(["export", str(opt), "--out", str(tmp_path / "o.gguf")], "no OPT architecture"),
             (["export", str(run), "--type", "q4_0"], "invalid choice"),
             (["export", str(run), "--type", "q8_0"], "already exists"),
             (["export", str(run), "--out", str(tmp_path / "mine.gguf"), "--force"], "did not write"),
             (["export", str(opt)], "not a run directory"),
             (["export", str(run), "--out", str(tmp_path / "t.gguf")], "layerprune did not write it"),
             (["export", str(run), "--out", str(tmp_path / "x.bin")], "should end in .gguf"),
             (["export", str(run), "--out", str(tmp_path / "a.gguf"), "--align", "0"], "--align 0 should be"),
             (["export", str(wp), "--out", str(tmp_path / "w.gguf")], "WordPiece model")]
    for argv, message in cases:
        before = _snapshot(tmp_path)
        code = main(argv)
        err = capfd.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert message.lower() in lines[0].lower(), (argv, lines[0])
        assert _snapshot(tmp_path) == before, argv
    mark = (run / "model-q8_0.gguf").stat().st_mtime_ns
    assert main(["export", str(run), "--type", "q8_0", "--force"]) == 0  # --force replaces our own file
    assert (run / "model-q8_0.gguf").stat().st_mtime_ns >= mark and not list(run.glob(".*tmp"))


@requires_real
def test_builtin_tokenizer_is_copied_from_the_source_gguf():
    from layerprune.export.gguf import _tokenizer_from_gguf
    from layerprune.models.loading import builtin_gguf

    keys = {k: v for k, v, *_ in _tokenizer_from_gguf(builtin_gguf("smollm2-135m"))}
    assert keys["tokenizer.ggml.pre"] == "smollm" and len(keys["tokenizer.ggml.tokens"]) == 49152
    assert keys["tokenizer.ggml.add_bos_token"] is False and len(keys["tokenizer.ggml.merges"]) == 48900
