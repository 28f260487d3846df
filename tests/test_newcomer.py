"""A newcomer's first hour: one default per option in --help, "did you mean" for a mistyped flag, nothing left in the
working directory by a refused command, saved weights with the user's umask, `demo` reruns, `eval RUN` reuses the
run's settings and joins its record."""
from __future__ import annotations

import os
import re

import pytest
from conftest import tiny_model, tiny_tokenizer

from layerprune.cli import COMMANDS, build_parser, main


def _helps():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {name: p.format_help() for name, p in sub.choices.items()}


def test_every_option_shows_one_default_and_never_none():
    helps = _helps()
    assert len(helps) == len(COMMANDS)
    for name, text in helps.items():
        assert "(default: None)" not in text, name
        for option in re.split(r"\n  (?=-)", text.split("options:", 1)[1]):
            assert len(re.findall(r"\bdefault\b", option, re.I)) <= 1, (name, option)


def test_a_mistyped_flag_gets_did_you_mean(capfd):
    assert main(["prune", "--sparsty", "0.5", "--out", "x"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean --sparsity" in err[0], err
    assert main(["eval", "smollm2-135m", "--max-windowz", "3"]) == 2
    assert "did you mean --max-windows" in capfd.readouterr().err


def test_a_refused_command_leaves_no_folder_behind(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # fed's default --out is runs/fed, relative to the working directory
    assert main(["fed", "--fail-clients", "a,b"]) == 2
    assert main(["fed", "--lora-rank", "-1"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_saved_weights_follow_the_umask(tmp_path):
    from layerprune.record import save_run

    old = os.umask(0o022)
    try:
        save_run(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path, {"method": "none"})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_eval_of_a_run_reuses_its_settings_and_joins_its_record(tmp_path, text_corpus, capfd):
    import json

    model_dir, run = tmp_path / "model", tmp_path / "run"
    tiny_model("llama", layers=2).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    assert main(["prune", "--model", str(model_dir), "--data-dir", str(text_corpus), "--nsamples", "2", "--seqlen",
                 "16", "--eval-seqlen", "24", "--max-windows", "3", "--out", str(run)]) == 0
    pruned = json.loads((run / "layerprune.json").read_text())["eval"]["after"]["wikitext2"]
    capfd.readouterr()
    assert main(["eval", str(run), "--data-dir", str(text_corpus)]) == 0
    assert "results added to" in capfd.readouterr().out
    rec = json.loads((run / "layerprune.json").read_text())
    got = rec["evals"][-1]
    assert got["protocol"] == "run" and got["max_windows"] == 3
    r = got["results"]["wikitext2"]
    assert (r["seqlen"], r["windows"]) == (24, 3) and r["ppl"] == pytest.approx(pruned["ppl"], rel=1e-6)
    assert "Evaluated later" in (run / "README.md").read_text()
    # the paper protocol: all windows at the longest length the model takes (this tiny model: its maximum)
    assert main(["eval", str(run), "--data-dir", str(text_corpus), "--protocol", "paper", "--seqlen", "32"]) == 0
    got = json.loads((run / "layerprune.json").read_text())["evals"][-1]
    assert got["protocol"] == "paper" and got["max_windows"] is None and got["results"]["wikitext2"]["windows"] > 3
    # a model that is no run has no recorded settings
    assert main(["eval", str(model_dir), "--protocol", "run"]) == 2


def test_demo_reruns_and_replaces_only_its_own_output(tmp_path, text_corpus, capfd):
    model_dir, out = tmp_path / "model", tmp_path / "demo"
    tiny_model("llama", layers=2).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    argv = ["demo", "--model", str(model_dir), "--data-dir", str(text_corpus), "--nsamples", "2", "--seqlen", "16",
            "--max-windows", "2", "--out", str(out)]
    assert main(argv) == 0
    first = (out / "layerprune.json").stat().st_mtime_ns
    assert main(argv) == 0  # `make demo` twice in a row
    assert (out / "layerprune.json").stat().st_mtime_ns != first
    assert {p.name for p in out.iterdir()} == {"layerprune.json", "block_sparsity.png"}
    (out / "notes.txt").write_text("mine")  # a file the demo did not write: no silent replacement
    capfd.readouterr()
    assert main(argv) == 2 and "--force" in capfd.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_progress_bars_count_windows_and_write_lines_in_a_log(tmp_path, text_corpus, capfd):
    from layerprune.evaluation.perplexity import evaluate_ppl

    capfd.readouterr()
    r = evaluate_ppl(tiny_model("llama", layers=2), tiny_tokenizer(), "wikitext2", 16, text_corpus, max_windows=8,
                     batch_size=3)
    err = capfd.readouterr().err  # not a terminal: plain lines
    assert r.windows == 8 and "\r" not in err
    lines = [x for x in err.splitlines() if x.startswith("ppl wikitext2")]
    assert lines and "8/8" in lines[-1] and "window" in lines[-1], err
