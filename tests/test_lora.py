"""LoRA recovery keeps the pruning mask: masked weights exactly zero after merge, 2:4 kept, loss goes down."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")

from layerprune.errors import UserError
from layerprune.recovery import apply_masks, finetune_lora, masks_of


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def prune_2_4(model):
    """Keep the 2 largest |w| of every 4 consecutive input columns in each row of every prunable linear."""
    with torch.no_grad():
        for name in masks_of(model):
            w = model.get_submodule(name).weight
            g = w.view(w.shape[0], -1, 4)
            drop = g.abs().argsort(dim=-1)[..., :2]
            g.scatter_(-1, drop, 0.0)


def windows(n=4, seqlen=16):
    pattern = torch.arange(8).repeat(seqlen)[:seqlen]  # repeated "text": easy to learn
    return pattern.repeat(n, 1)


def test_masked_weights_stay_zero_and_2_4_holds():
    model = tiny_llama()
    prune_2_4(model)
    masks = masks_of(model)
    assert len(masks) == 2 * 7
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    head, emb = model.lm_head.weight.detach().clone(), model.model.embed_tokens.weight.detach().clone()
    out = finetune_lora(model, None, windows(), steps=8, lr=1e-2, rank=4, alpha=8, seqlen=16, batch_size=2,
                        progress=False)
    assert out["max_abs_refilled"] > 0  # merging did refill the pruned positions before re-masking
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert torch.all(w[~mask] == 0)
        assert int((w.view(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
        assert not torch.equal(w[mask], before[name][mask])  # the kept weights did change
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, emb)
    assert out["masked_weights"] == sum(int((~m).sum()) for m in masks.values())
    assert out["trainable_params"] == sum(4 * sum(model.get_submodule(n).weight.shape) for n in masks)
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(p.requires_grad for p in model.parameters())  # flags restored after peft froze them
    assert len(out["losses"]) == 8 and out["seconds_per_step"] > 0


def test_loss_decreases_and_texts_path():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat", "a", "\n\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    model = tiny_llama()
    prune_2_4(model)
    texts = ["the cat sat on a mat"] * 20
    out = finetune_lora(model, tokenizer, texts, steps=12, lr=1e-2, rank=4, alpha=8, seqlen=12, batch_size=2,
                        progress=False)
    assert out["windows"] == (20 * 6) // 12 and out["seqlen"] == 12
    assert sum(out["losses"][-3:]) / 3 < out["losses"][0] - 0.5


def test_target_subset_and_apply_masks():
    model = tiny_llama()
    prune_2_4(model)
    masks = masks_of(model)
    down = {n: model.get_submodule(n).weight.detach().clone() for n in masks if n.endswith("down_proj")}
    calib = SimpleNamespace(ids=windows(n=3, seqlen=20))  # like data.calibration.CalibrationSet
    out = finetune_lora(model, None, calib, steps=3, lr=1e-2, rank=2, alpha=4, target_modules=("q_proj",),
                        seqlen=16, progress=False)
    assert out["trainable_params"] == 2 * 2 * (32 + 32) and out["windows"] == 3 and out["seqlen"] == 16
    for n, w in down.items():
        assert torch.equal(model.get_submodule(n).weight, w)  # no adapter there: untouched
    w = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w.fill_(float("nan"))
    apply_masks(model, masks)
    assert torch.all(w[~masks["model.layers.0.mlp.up_proj"]] == 0)


def test_bad_input():
    model = tiny_llama()
    with pytest.raises(UserError):
        finetune_lora(model, None, windows(), steps=0, seqlen=16, progress=False)
    with pytest.raises(UserError):
        apply_masks(model, {"model.layers.0.mlp.up_proj": torch.ones(3, 3, dtype=torch.bool)})


def test_cli_finetune_run_dir_keeps_2_4(tmp_path, text_corpus, capsys):
    """prune --nm 2:4 -> finetune --out NEW: the saved weights keep the exact zero pattern; in place needs --force."""
    from conftest import tiny_model, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from layerprune.cli import main
    from layerprune.record import read_record

    src = tmp_path / "tiny"
    tiny_model("llama", layers=2).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    run, new = tmp_path / "run", tmp_path / "run-lora"
    common = ["--seqlen", "32", "--max-windows", "4", "--data-dir", str(text_corpus)]
    assert main(["prune", "--model", str(src), "--method", "wanda", "--nm", "2:4", "--nsamples", "4", "--out", str(run),
                 *common]) == 0
    before = masks_of(AutoModelForCausalLM.from_pretrained(run))
    ft = ["finetune", str(run), "--steps", "4", "--lr", "1e-2", "--rank", "2", "--nsamples", "6", *common]
    capsys.readouterr()
    assert main(ft) == 2 and "--force" in capsys.readouterr().err  # no --out: would overwrite the run
    assert main(ft + ["--out", str(new)]) == 0
    assert "LoRA rank 2" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(new)
    after = masks_of(model)
    for name, m in before.items():
        assert torch.equal(after[name], m)  # every pruned weight exactly 0, every kept weight still nonzero
        w = model.get_submodule(name).weight
        assert torch.all((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2)
    src_w = AutoModelForCausalLM.from_pretrained(run).model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, src_w)  # the finetune changed the weights
    rec = read_record(new)
    f = rec["finetune"]
    assert rec["method"] == "wanda" and f["source_run"] == str(run) and f["steps"] == 4
    assert f["sparsity_before"] == f["sparsity_after"] == rec["measured_sparsity"] and f["mask_identical"]
    assert f["calibration"] == {"source": "c4", "nsamples": 6, "seqlen": 32, "seed": 0}
    assert set(f["eval"]["before"]) == set(f["eval"]["after"]) == {"wikitext2"}
    assert "finetune" not in read_record(run)  # the source run is untouched
    assert main(ft + ["--out", str(new)]) == 2  # exists: needs --force
    capsys.readouterr()
    assert main(ft + ["--force", "--steps", "1"]) == 0  # in place
    assert read_record(run)["finetune"]["steps"] == 1
    assert all(torch.equal(m, before[n]) for n, m in masks_of(AutoModelForCausalLM.from_pretrained(run)).items())
    assert not list(tmp_path.glob(".run.finetune-tmp"))
