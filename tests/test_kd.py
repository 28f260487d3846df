"""Distillation recovery (`layerprune finetune --teacher`): the KD loss against a brute-force reference, and the
command on tiny unstructured, SlimGPT and depth-reduced runs (loss down, mask exact, widths kept, resume exact)."""
import json
import math

import pytest
import torch

pytest.importorskip("peft")

from conftest import tiny_config, tiny_tokenizer  # noqa: E402

from layerprune.cli import main  # noqa: E402
from layerprune.errors import UserError  # noqa: E402
from layerprune.recovery import masks_of  # noqa: E402
from layerprune.recovery.distill import kd_loss, kd_loss_from_logits, teacher_targets  # noqa: E402


# ----------------------------------------------------------------------------- the loss

def reference_kd(student, teacher, temperature, topk=None):
    """T^2 * mean over positions of sum p log(p / q), one position at a time in Python floats (float64)."""
    s, t = student.double().reshape(-1, student.shape[-1]).tolist(), teacher.double().reshape(-1, student.shape[-1])
    t = t.tolist()
    total = 0.0
    for zs, zt in zip(s, t):
        es = [math.exp(v / temperature) for v in zs]
        et = [math.exp(v / temperature) for v in zt]
        q = [v / sum(es) for v in es]
        p = [v / sum(et) for v in et]
        if topk is not None:
            top = sorted(range(len(p)), key=lambda i: -p[i])[:topk]
            rest = [i for i in range(len(p)) if i not in top]
            p = [p[i] for i in top] + [sum(p[i] for i in rest)]
            q = [q[i] for i in top] + [sum(q[i] for i in rest)]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    return temperature ** 2 * total / len(s)


@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.5])
@pytest.mark.parametrize("topk", [None, 1, 4])
def test_kd_loss_equals_float64_reference(temperature, topk):
    g = torch.Generator().manual_seed(int(temperature * 10) + (topk or 0))
    student = torch.randn(2, 3, 11, generator=g) * 3
    teacher = torch.randn(2, 3, 11, generator=g) * 3
    ref = reference_kd(student, teacher, temperature, topk)
    assert ref > 0.01
    got32 = kd_loss_from_logits(student, teacher, temperature, topk)
    assert got32.dtype == torch.float32 and got32.item() == pytest.approx(ref, rel=1e-5)
    got64 = kd_loss_from_logits(student.double(), teacher.double(), temperature, topk)
    assert got64.item() == pytest.approx(ref, rel=1e-12)
    assert kd_loss_from_logits(teacher, teacher, temperature, topk).abs().item() < 1e-6  # KL(p || p) = 0


def test_kd_targets_topk_shapes_and_gradient():
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(2, 5, 13, generator=g)).requires_grad_()
    teacher = torch.randn(2, 5, 13, generator=g)
    t = teacher_targets(teacher, 2.0, 3)
    assert t.logp.shape == (2, 5, 4) and t.index.shape == (2, 5, 3)
    assert torch.allclose(t.logp.exp().sum(-1), torch.ones(2, 5))  # k tokens + the rest: a distribution
    # k = V - 1: the rest bucket is one token, so the lumped KL is the full KL
    assert kd_loss_from_logits(student, teacher, 2.0, 12).item() == pytest.approx(
        kd_loss_from_logits(student, teacher, 2.0).item(), rel=1e-5)
    loss = kd_loss(student, teacher_targets(teacher, 1.0), 1.0)
    loss.backward()
    # d KL / d z_s = (q - p) / N per position (T = 1)
    want = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) / 10
    assert torch.allclose(student.grad, want, atol=1e-6)
    with pytest.raises(UserError, match="same vocabulary"):
        kd_loss(student[..., :12], teacher_targets(teacher), 1.0)


# ----------------------------------------------------------------------------- the command

def _setup(tmp_path, family="llama", layers=3):
    """A tiny dense teacher with larger random weights than usual (initializer_range 0.2): its next-token
    distributions are peaked, as a trained model's are, so pruning it opens a clear KD gap to recover."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "dense"
    cfg = tiny_config(family, layers)
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


def _kd_on(model_dir, teacher_dir, windows, topk=None):
    from transformers import AutoModelForCausalLM

    from layerprune.models.structured import register

    register()
    s = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    t = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        return kd_loss_from_logits(s(input_ids=windows).logits, t(input_ids=windows).logits, 1.0, topk).item()


def _windows(text_corpus, n=8, seqlen=32):
    """The windows `_ft` trains on (C4 pool, seed 0): the KD loss is measured where it is minimised."""
    from layerprune.api import calibration_set

    return calibration_set(tiny_tokenizer(), "c4", n, seqlen, 0, text_corpus).ids


def _prune(src, out, text_corpus, *extra):
    assert main(["prune", "--model", str(src), "--nsamples", "4", "--seqlen", "32", "--data-dir", str(text_corpus),
                 "--max-windows", "2", "--no-dense-eval", "--out", str(out), *extra]) == 0


def _ft(run, out, text_corpus, *extra):
    return main(["finetune", str(run), "--seqlen", "32", "--nsamples", "8", "--data-dir", str(text_corpus),
                 "--max-windows", "2", "--out", str(out), *extra])


@pytest.mark.parametrize("full", [False, True])
def test_kd_lowers_kd_loss_and_keeps_2_4_mask(tmp_path, text_corpus, capsys, full):
    from transformers import AutoModelForCausalLM

    from layerprune.record import read_record

    src = _setup(tmp_path)
    run, new = tmp_path / "run", tmp_path / "run-kd"
    _prune(src, run, text_corpus, "--method", "magnitude", "--nm", "2:4")
    win = _windows(text_corpus)
    kd_before = _kd_on(run, src, win)
    lr = "3e-3" if full else "2e-2"
    assert _ft(run, new, text_corpus, "--teacher", str(src), "--steps", "12", "--lr", lr, "--batch-size", "2",
               *(["--full"] if full else ["--rank", "4"])) == 0
    assert ("KD full" if full else "KD LoRA") in capsys.readouterr().out
    kd_after = _kd_on(new, src, win)
    assert kd_after < 0.8 * kd_before
    before = masks_of(AutoModelForCausalLM.from_pretrained(run))
    after = masks_of(AutoModelForCausalLM.from_pretrained(new))
    for n, m in before.items():
        assert torch.equal(after[n], m)  # every pruned weight exactly 0, every kept weight nonzero
    f = read_record(new)["finetune"]
    assert f["loss"] == "kd" and f["teacher"] == str(src)
    assert f["kd"] == {"temperature": 1.0, "alpha": 1.0, "topk": None}
    assert f["method"] == ("full" if full else "lora") and f["mask_identical"] and f["tokens_seen"] == 12 * 2 * 32
    assert len(f["loss_parts"]["kd"]) == 12 and f["train_seconds"] > 0 and f["total_seconds"] >= f["train_seconds"]
    assert f["command_line"].startswith("layerprune finetune")
    card = (new / "README.md").read_text()
    assert f"distilled from {src}" in card and "recovery:" in card and f["command_line"] in card
    if full:  # every weight trained: the embedding too
        e0 = AutoModelForCausalLM.from_pretrained(run).get_input_embeddings().weight
        assert not torch.equal(AutoModelForCausalLM.from_pretrained(new).get_input_embeddings().weight, e0)


def test_kd_alpha_mix_and_topk(tmp_path, text_corpus):
    from layerprune.record import read_record

    src = _setup(tmp_path)
    run, new = tmp_path / "run", tmp_path / "run-kd"
    _prune(src, run, text_corpus, "--method", "wanda", "--sparsity", "0.5")
    assert _ft(run, new, text_corpus, "--teacher", str(src), "--steps", "3", "--lr", "1e-2", "--kd-alpha", "0.25",
               "--kd-topk", "8", "--kd-temperature", "2") == 0
    f = read_record(new)["finetune"]
    assert f["kd"] == {"temperature": 2.0, "alpha": 0.25, "topk": 8}
    # the recorded loss is the mix of the recorded parts
    for total, kd, lm in zip(f["losses"], f["loss_parts"]["kd"], f["loss_parts"]["lm"]):
        assert total == pytest.approx(0.25 * kd + 0.75 * lm, rel=1e-5)


def test_kd_slimgpt_run_keeps_per_block_widths(tmp_path, text_corpus):
    from transformers import AutoModelForCausalLM

    from layerprune.models.structured import model_widths, register

    src = _setup(tmp_path, layers=4)
    run, new = tmp_path / "run", tmp_path / "run-kd"
    _prune(src, run, text_corpus, "--method", "slimgpt", "--sparsity", "0.5", "--allocation", "ipr-log",
           "--fixed-group", "16", "--no-gcd")
    register()
    widths = model_widths(AutoModelForCausalLM.from_pretrained(run))
    assert len(set(widths)) > 1  # per-block widths: the case stock configs cannot hold
    win = _windows(text_corpus)
    kd_before = _kd_on(run, src, win)
    assert _ft(run, new, text_corpus, "--teacher", str(src), "--steps", "10", "--lr", "1e-2", "--batch-size", "2") == 0
    assert model_widths(AutoModelForCausalLM.from_pretrained(new)) == widths
    assert json.loads((new / "config.json").read_text())["model_type"] == "layerprune_llama"
    clean = AutoModelForCausalLM.from_pretrained(new, trust_remote_code=True)  # still loads with the shipped code
    assert model_widths(clean) == widths
    assert _kd_on(new, src, win) < 0.8 * kd_before


def test_kd_depth_run_keeps_its_blocks(tmp_path, text_corpus):
    """A depth run (stock config with fewer blocks; gemma3: the sliding/global pattern cut with them) distils from
    the full-depth teacher and keeps its blocks and layer types."""
    from transformers import AutoModelForCausalLM

    from layerprune.record import read_record

    src = _setup(tmp_path, family="gemma3", layers=4)
    run, new = tmp_path / "run", tmp_path / "run-kd"
    _prune(src, run, text_corpus, "--method", "depth", "--drop", "1")
    pruned = AutoModelForCausalLM.from_pretrained(run)
    assert pruned.config.num_hidden_layers == 3
    win = _windows(text_corpus)
    kd_before = _kd_on(run, src, win)
    assert _ft(run, new, text_corpus, "--teacher", str(src), "--steps", "10", "--lr", "1e-2", "--batch-size", "2") == 0
    out = AutoModelForCausalLM.from_pretrained(new)
    assert out.config.num_hidden_layers == 3 and len(out.model.layers) == 3
    assert out.config.layer_types == pruned.config.layer_types
    assert _kd_on(new, src, win) < 0.8 * kd_before
    rec = read_record(new)
    assert rec["method"] == "depth" and rec["finetune"]["teacher"] == str(src)


def test_resume_equals_uninterrupted(tmp_path, text_corpus, monkeypatch, capsys):
    from safetensors.torch import load_file

    import layerprune.recovery.distill as distill
    from layerprune.record import read_record

    src = _setup(tmp_path)
    run = tmp_path / "run"
    _prune(src, run, text_corpus, "--method", "wanda", "--sparsity", "0.5")
    args = ["--teacher", str(src), "--steps", "7", "--lr", "1e-2", "--batch-size", "2", "--checkpoint-every", "2",
            "--nsamples", "3"]  # 3 windows, batch 2: the order is redrawn mid-run, so the generator state matters
    assert _ft(run, tmp_path / "whole", text_corpus, *args) == 0

    calls, real = [0], distill.kd_loss

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == 6:  # during step 6: the checkpoint of step 4 is the latest
            raise KeyboardInterrupt
        return real(*a, **k)

    part = tmp_path / "part"
    monkeypatch.setattr(distill, "kd_loss", failing)
    assert _ft(run, part, text_corpus, *args) == 130  # main reports the interruption
    monkeypatch.setattr(distill, "kd_loss", real)
    state = json.loads((part / ".checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and not (part / "layerprune.json").exists()
    capsys.readouterr()
    assert _ft(run, part, text_corpus, *args) == 2 and "--resume" in capsys.readouterr().err
    assert _ft(run, part, text_corpus, *args, "--resume", "--lr", "2e-2") == 2  # other settings
    assert "other settings" in capsys.readouterr().err
    assert _ft(run, part, text_corpus, *args, "--resume") == 0
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(part / "model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    fw, fr = read_record(tmp_path / "whole")["finetune"], read_record(part)["finetune"]
    assert fr["losses"] == fw["losses"] and fr["resumed_at_step"] == 4 and fw["resumed_at_step"] is None
    assert fr["eval"]["after"]["wikitext2"]["ppl"] == fw["eval"]["after"]["wikitext2"]["ppl"]
    assert not (part / ".checkpoint").exists()
    assert _ft(run, part, text_corpus, *args, "--resume") == 2  # finished: nothing to resume


def test_in_place_resume(tmp_path, text_corpus, monkeypatch):
    import layerprune.recovery.distill as distill
    from layerprune.record import read_record

    src = _setup(tmp_path)
    run = tmp_path / "run"
    _prune(src, run, text_corpus, "--method", "wanda", "--sparsity", "0.5")
    args = ["finetune", str(run), "--teacher", str(src), "--steps", "4", "--checkpoint-every", "2", "--seqlen", "32",
            "--nsamples", "4", "--data-dir", str(text_corpus), "--max-windows", "2"]
    real = distill.kd_loss
    calls = [0]

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(distill, "kd_loss", failing)
    assert main(args + ["--force"]) == 130
    monkeypatch.setattr(distill, "kd_loss", real)
    assert (run / ".checkpoint" / "state.json").is_file() and "finetune" not in read_record(run)
    assert main(args + ["--resume"]) == 0
    assert read_record(run)["finetune"]["resumed_at_step"] == 2 and not (run / ".checkpoint").exists()
    assert main(args + ["--resume"]) == 2


def test_bad_input_one_line(tmp_path, text_corpus, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    src = _setup(tmp_path)
    run = tmp_path / "run"
    _prune(src, run, text_corpus, "--method", "magnitude", "--sparsity", "0.5")
    other = tmp_path / "other-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    cases = [(["--kd-alpha", "0.5"], "needs --teacher"),
             (["--teacher", str(src), "--kd-alpha", "1.5"], "--kd-alpha"),
             (["--teacher", str(src), "--kd-temperature", "0"], "--kd-temperature"),
             (["--teacher", str(src), "--kd-topk", "256"], "--kd-topk"),
             (["--teacher", str(other)], "300 logits per token and the student 256"),
             (["--teacher", str(tmp_path / "missing")], "does not exist"),
             (["--full", "--rank", "4"], "--full"),
             (["--resume", "--force"], "pass one of them"),
             (["--resume"], "no checkpoint"),
             (["--checkpoint-every", "-1"], "--checkpoint-every")]
    for extra, msg in cases:
        capsys.readouterr()
        assert _ft(run, tmp_path / "new", text_corpus, "--steps", "2", *extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1 and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "new").exists()
