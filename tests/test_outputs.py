"""Nothing the user owns is lost: --force replaces only layerprune's own runs, a forced run is staged beside the old
one and swapped in at the end, the checkpoint stays bounded, and the disk is checked before the work."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from layerprune import prune
from layerprune.cli import main
from layerprune.engine import Checkpoint


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}




def _args(model_dir, data, out, *extra):
    return ["prune", "--model", str(model_dir), "--data-dir", str(data), "--nsamples", "2", "--seqlen", "16",
            "--eval", "", "--out", str(out), *extra]


def test_force_never_deletes_a_users_folder(tmp_path, model_dir, text_corpus, capsys):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("notes")
    (mine / "sub" / "data.csv").write_text("1,2")
    before = _tree(mine)
    assert main(_args(model_dir, text_corpus, mine, "--force")) == 2
    assert "did not write" in capsys.readouterr().err
    assert _tree(mine) == before


def test_disk_offload_out_equal_to_model_is_refused(tmp_path, model_dir, text_corpus, capsys):
    before = _tree(model_dir)
    assert main(_args(model_dir, text_corpus, model_dir, "--force", "--offload", "disk")) == 2
    assert "is the input" in capsys.readouterr().err
    assert _tree(model_dir) == before


def test_force_replaces_a_run_and_a_failed_forced_run_keeps_the_old_one(tmp_path, model_dir, text_corpus,
                                                                       monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(_args(model_dir, text_corpus, out, "--sparsity", "0.5")) == 0
    old = _tree(out)

    import layerprune.api as api

    real = api.prune_model

    def dies(*a, **k):  # the forced rerun fails midway (e.g. out of memory, Ctrl-C)
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "prune_model", dies)
    assert main(_args(model_dir, text_corpus, out, "--sparsity", "0.6", "--force")) == 130
    assert _tree(out) == old  # the user still has the old run, untouched
    monkeypatch.setattr(api, "prune_model", real)
    capsys.readouterr()

    assert main(_args(model_dir, text_corpus, out, "--sparsity", "0.6", "--force")) == 0
    rec = json.loads((out / "layerprune.json").read_text())
    assert rec["sparsity"] == 0.6 and abs(rec["measured_sparsity"] - 0.6) < 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model", "run"]  # no staging left behind


def test_killed_forced_run_resumes_from_its_staging_folder(tmp_path, model_dir, text_corpus, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(_args(model_dir, text_corpus, out)) == 0
    old = _tree(out)
    real_save = Checkpoint.save

    def save_then_die(self, i, *a, **k):
        real_save(self, i, *a, **k)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_die)
    every = ("--checkpoint-every", "0")  # a commit after every block
    assert main(_args(model_dir, text_corpus, out, "--force", "--method", "sparsegpt", *every)) == 130
    assert _tree(out) == old
    monkeypatch.setattr(Checkpoint, "save", real_save)
    assert main(_args(model_dir, text_corpus, out, "--resume", "--method", "sparsegpt", *every)) == 0
    rec = json.loads((out / "layerprune.json").read_text())
    assert rec["method"] == "sparsegpt" and rec["resumed_from_block"] == 2
    t = rec["timings"]
    assert t["total"] >= sum(v for k, v in t.items() if k != "total") - 1e-6  # the interrupted time counts too


def test_checkpoint_keeps_only_the_latest_activations(tmp_path, monkeypatch):
    seen = []
    real_commit = Checkpoint.commit  # the writer thread's write of one block (save() hands it over)

    def spy(self, *args):
        real_commit(self, *args)
        seen.append((sorted(p.name for p in self.folder.glob("acts_*")),
                     sum(p.stat().st_size for p in self.folder.iterdir())))

    monkeypatch.setattr(Checkpoint, "commit", spy)
    model = tiny_model("llama", layers=6)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    prune(model, calibration=calib, method="wanda", sparsity=0.5, out_dir=tmp_path, progress=False, checkpoint_every=0)
    assert len(seen) == 6
    assert all(len(names) == 1 for names, _ in seen), seen  # one activation file, whatever the depth
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    acts_bytes = 4 * 32 * model.config.hidden_size * 4
    for i, (_, size) in enumerate(seen):  # i+1 pruned blocks + one activation file (+ headers and state)
        assert size <= (i + 1) * block_bytes + acts_bytes + 64 * 1024


def test_short_disk_is_refused_before_the_work(tmp_path, model_dir, text_corpus, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "run"
    assert main(_args(model_dir, text_corpus, out)) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "GiB" in err
    assert not out.exists()


def test_saved_run_keeps_use_cache_and_nm_records_what_was_done(tmp_path, model_dir, text_corpus):
    out = tmp_path / "run"
    assert main(_args(model_dir, text_corpus, out, "--nm", "2:4")) == 0
    assert json.loads((out / "config.json").read_text())["use_cache"] is True  # stock generate() stays fast
    rec = json.loads((out / "layerprune.json").read_text())
    assert rec["sparsity"] == 0.5 and rec["nm"] == [2, 4]
    assert main(_args(model_dir, text_corpus, tmp_path / "r2", "--nm", "1:4")) == 0
    assert json.loads((tmp_path / "r2" / "layerprune.json").read_text())["sparsity"] == 0.25


def test_structured_table_shows_parameters(tmp_path, model_dir, text_corpus, capsys):
    out = tmp_path / "slim"
    assert main(_args(model_dir, text_corpus, out, "--method", "slimgpt", "--sparsity", "0.3")) == 0
    text = capsys.readouterr().out
    assert "params ratio" in text and "parameters " in text and " -> " in text
    assert "sparsity" not in text.splitlines()[0]


def test_eval_takes_model_as_option_and_results_are_marked(tmp_path, model_dir, text_corpus):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    base = ["--data-dir", str(text_corpus), "--seqlen", "16", "--max-windows", "2"]
    assert main(["eval", str(model_dir), "--out", str(a)] + base) == 0
    assert main(["eval", "--model", str(model_dir), "--out", str(b)] + base) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["written_by"] == "layerprune" and ra["results"][0]["ppl"] == rb["results"][0]["ppl"]
    assert main(["eval", str(model_dir), "--out", str(a), "--force"] + base) == 0  # ours: replaced


def test_local_tasks_accept_the_data_dir_or_its_zeroshot_folder(tmp_path):
    from layerprune.evaluation.tasks.local_data import load_rte

    d = tmp_path / "data" / "zeroshot" / "rte"
    d.mkdir(parents=True)
    (d / "val.jsonl").write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": "entailment"}) + "\n")
    for root in (tmp_path / "data", tmp_path / "data" / "zeroshot"):
        assert load_rte(str(root))["validation"][0]["label"] == 0
    with pytest.raises(FileNotFoundError, match="zeroshot/rte/val.jsonl"):
        load_rte(str(tmp_path))


def test_bf16_checkpoint_is_saved_in_bf16_unless_asked(tmp_path, text_corpus):
    """A bf16 checkpoint pruned with the default fp32 compute is saved in bf16 (not doubled), and the record says so;
    --save-dtype float32 keeps fp32. The saved bf16 weights are the fp32 result rounded once."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = tmp_path / "bf16"
    tiny_model("llama", layers=2).to(torch.bfloat16).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    for extra, want in (([], "bfloat16"), (["--save-dtype", "float32"], "float32")):
        out = tmp_path / want
        assert main(_args(src, text_corpus, out, *extra)) == 0
        rec = json.loads((out / "layerprune.json").read_text())
        assert rec["saved"] == {"dtype": want, "compute_weights_dtype": "float32", "source_dtype": "bfloat16"}
        with safe_open(out / "model.safetensors", "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"BF16" if want == "bfloat16" else "F32"}
        assert json.loads((out / "config.json").read_text())["dtype"] == want
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "bfloat16", dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "float32", dtype=torch.float32).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k].to(torch.bfloat16).float()), k


def test_a_foreign_folder_in_the_staging_place_is_never_deleted(tmp_path, model_dir, text_corpus, capsys):
    out = tmp_path / "run"
    assert main(_args(model_dir, text_corpus, out)) == 0
    stage = tmp_path / ".run.layerprune-new"
    stage.mkdir()
    (stage / "mine.txt").write_text("mine")
    assert main(_args(model_dir, text_corpus, out, "--force")) == 2
    assert "did not write" in capsys.readouterr().err
    assert (stage / "mine.txt").read_text() == "mine"


def test_cli_structured_prune_with_disk_offload_equals_in_memory(tmp_path, model_dir, text_corpus):
    """`--method slimgpt --offload disk`: the run directory loads with stock transformers (remote code, per-block
    widths) and holds the same weights, config and parameter count as the in-memory run."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    flags = ["--method", "slimgpt", "--sparsity", "0.4", "--allocation", "ipr-log"]
    assert main(_args(model_dir, text_corpus, tmp_path / "mem", *flags)) == 0
    assert main(_args(model_dir, text_corpus, tmp_path / "disk", *flags, "--offload", "disk")) == 0
    mem, disk = (json.loads((tmp_path / r / "layerprune.json").read_text()) for r in ("mem", "disk"))
    assert disk["params"] == mem["params"] and disk["params"]["after"] < disk["params"]["before"]
    assert disk["structure"] == mem["structure"] and len(set(disk["structure"]["intermediate"])) > 1
    assert not (tmp_path / "disk" / ".checkpoint").exists()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem", trust_remote_code=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "disk", trust_remote_code=True).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shards = sorted((tmp_path / "disk").glob("model-*.safetensors"))
    assert len(shards) == 4 and load_file(shards[1])["model.layers.0.mlp.down_proj.weight"].shape == \
        a["model.layers.0.mlp.down_proj.weight"].shape


def test_checkpoint_commits_remove_only_their_own_older_files(tmp_path):
    """A commit removes the older generations it wrote (acts_NNNN / train_NNNNNNN) and nothing else in the folder."""
    from layerprune.checkpoint import ACTS_GLOB, commit_state
    from layerprune.recovery.train import TRAIN_GLOB

    for name in ("acts_0001.safetensors", "acts_0002.safetensors", "acts_notes.safetensors", "train_0000010.pt",
                 "train_best.pt", "mine.txt"):
        (tmp_path / name).write_text("x")
    commit_state(tmp_path, {"next_block": 2}, "acts_0002.safetensors", ACTS_GLOB)
    commit_state(tmp_path, {"step": 20}, "train_0000020.pt", TRAIN_GLOB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts_0002.safetensors", "acts_notes.safetensors",
                                                          "mine.txt", "state.json", "train_best.pt"]
