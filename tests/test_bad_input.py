"""The whole bad-input surface of the CLI, as a table: every case ends with exit code 2, exactly one line on stderr
that names the problem, no traceback, and every file in the workspace (models, runs, the user's own files) unchanged
by sha256, with nothing new created."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from layerprune import prune
from layerprune.cli import main
from layerprune.record import save_run


def _write_text_corpus(d: Path) -> None:
    import gzip
    import random

    rng = random.Random(0)
    words = "the of and to in a is was for on as with by he at from his an were are which this".split()
    sent = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    (d / "wikitext-2-raw").mkdir(parents=True)
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(f" {sent(40)} ." for _ in range(60)) + "\n")
    (d / "c4").mkdir()
    with gzip.open(d / "c4" / "c4-validation-sample.json.gz", "wt") as f:
        for _ in range(2000):
            f.write(json.dumps({"text": sent(rng.randint(5, 60))}) + "\n")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a model, a finished run, corrupt and interrupted copies, and the user's own files."""
    w = tmp_path_factory.mktemp("ws")
    data = w / "data"
    _write_text_corpus(data)
    model_dir = w / "model"
    tiny_model("llama", layers=2).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)

    m = tiny_model("llama", layers=2)
    rec = prune(m, tiny_tokenizer(), method="wanda", sparsity=0.5, calib="c4", nsamples=2, seqlen=16, data_dir=data,
                progress=False)
    run = w / "run"
    run.mkdir()
    save_run(m, tiny_tokenizer(), run, rec)

    for name, src in (("corrupt_model", model_dir), ("corrupt_run", run)):
        d = w / name
        d.mkdir()
        for f in src.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        st = d / "model.safetensors"
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])  # truncated by a killed copy

    bad_ckpt = w / "bad_ckpt"  # a run killed before its first save, with a garbled checkpoint state
    (bad_ckpt / ".checkpoint").mkdir(parents=True)
    (bad_ckpt / ".checkpoint" / "state.json").write_text("{not json")

    interrupted = w / "interrupted"  # killed while saving: checkpoint complete, weights half written, no record
    (interrupted / ".checkpoint").mkdir(parents=True)
    (interrupted / ".checkpoint" / "state.json").write_text("{}")
    (interrupted / "config.json").write_text((model_dir / "config.json").read_text())

    user = w / "mine"  # the user's own folder
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes\n")
    (user / "sub" / "keep.bin").write_bytes(os.urandom(64))
    (user / "fed_homo.json").write_text('{"mine": true}')
    (user / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (user / "result.json").write_text('{"mine": true}')
    ours = w / "ours.json"
    ours.write_text(json.dumps({"written_by": "layerprune", "results": []}))
    (w / "latin1.txt").write_bytes("caf\xe9 na\xefve r\xe9sum\xe9 " .encode("latin-1") * 50)
    (w / "record_garbage").mkdir()
    (w / "record_garbage" / "layerprune.json").write_text("{oops")

    m = tiny_model("llama", layers=2)  # a 2:4 run (the sparse-kernel refusals that need one)
    rec = prune(m, tiny_tokenizer(), method="magnitude", nm=(2, 4), calib="c4", nsamples=2, seqlen=16, data_dir=data,
                progress=False)
    (w / "run24").mkdir()
    save_run(m, tiny_tokenizer(), w / "run24", rec)

    rdir = w / "recipes"  # recipe.yaml files, each wrong in one way
    rdir.mkdir()
    good = f"layerprune_recipe: 1\nmodel: {model_dir}\nmethod: wanda\ncalibration:\n  nsamples: 2\n  seqlen: 16\n"
    for name, text in {"unknown_key": good + "colour: blue\n",
                       "unknown_sub": good.replace("  seqlen: 16\n", "  size: 16\n"),
                       "bad_type": good.replace("nsamples: 2", "nsamples: many"),
                       "nm_unquoted": good + "nm: 2:4\n",
                       "bad_choice": good + "compute:\n  offload: tape\n",
                       "bad_method": good.replace("method: wanda", "method: foo"),
                       "bad_alloc": good + "allocation: foo\n",
                       "bad_option": good + "solver_options:\n  knob: 1\n",
                       "not_yaml": good + "eval: [unclosed\n",
                       "not_recipe": "model: x\n"}.items():
        (rdir / f"{name}.yaml").write_text(text)
    return w


def _snapshot(root: Path) -> dict:
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return snap


M, R = "{ws}/model", "{ws}/run"
PRUNE = ["prune", "--model", M, "--data-dir", "{ws}/data", "--nsamples", "2", "--seqlen", "16", "--eval", ""]

CASES = [
    # top level
    ([], "required"),
    (["bogus"], "invalid choice"),
    # info
    (["info"], "no model given"),
    (["info", "{ws}/corrupt_model"], "corrupt or truncated"),
    (["info", "./no/such/model"], "does not exist"),
    (["info", "{ws}/data"], "without config.json"),
    (["info", M, "--model", R], "two models"),
    (["info", "{ws}/interrupted"], "interrupted run"),
    (["info", M, "--dtype", "int8"], "invalid choice"),
    # eval
    (["eval", "{ws}/corrupt_run", "--data-dir", "{ws}/data"], "corrupt or truncated"),
    (["eval", "--model", R, "--dataset", "{ws}/latin1.txt", "--data-dir", "{ws}/data"], "not UTF-8"),
    (["eval", R, "--dataset", "wikitext3", "--data-dir", "{ws}/data"], "unknown dataset"),
    (["eval", R, "--dataset", "ptb", "--data-dir", "{ws}/data"], "missing from the data directory"),
    (["eval", "{ws}/interrupted", "--data-dir", "{ws}/data"], "interrupted run"),
    (["eval", R, "--out", "{ws}/mine/result.json", "--force"], "did not write"),
    (["eval", R, "--out", "{ws}/ours.json"], "already exists"),
    (["eval", R, "--data-dir", "{ws}/nowhere"], "does not exist"),
    (["eval", R, "--max-windows", "0"], "at least 1"),
    (["eval", R, "--device", "cuda"], "no CUDA"),
    # prune: inputs
    (PRUNE + ["--calib", "{ws}/latin1.txt", "--out", "{ws}/new1"], "not UTF-8"),
    (PRUNE + ["--sparsity", "0.7", "--nm", "2:4", "--out", "{ws}/new2"], "conflicts with --nm"),
    (PRUNE + ["--nm", "2:5", "--out", "{ws}/new3"], "multiple of 5"),
    (PRUNE + ["--allocation", "user:0.5,0.5,0.5", "--out", "{ws}/new4"], "model has 2 blocks"),
    (PRUNE + ["--sparsity", "1.5", "--out", "{ws}/new5"], "outside"),
    (PRUNE + ["--method", "foo", "--out", "{ws}/new6"], "unknown solver"),
    (PRUNE + ["--wbits", "4", "--out", "{ws}/new7"], "needs --method sparsegpt"),
    (PRUNE + ["--skip", "mlp.nothing", "--out", "{ws}/new8"], "not linears"),
    (["prune", "--model", "{ws}/corrupt_model", "--out", "{ws}/new9"], "corrupt or truncated"),
    (["prune", "--model", "{ws}/corrupt_model", "--offload", "disk", "--out", "{ws}/new10"], "corrupt or truncated"),
    (["prune", "--model", "{ws}/interrupted", "--out", "{ws}/new11"], "interrupted run"),
    (PRUNE + ["--nsamples", "0", "--out", "{ws}/new12"], "at least 1"),
    (PRUNE + ["--method", "slimgpt", "--nm", "2:4", "--offload", "disk", "--out", "{ws}/new18"],
     "--nm and --skip do not"),
    (PRUNE + ["--method", "slimgpt", "--skip", "mlp.down_proj", "--out", "{ws}/new19"], "--nm and --skip do not"),
    # prune --recipe: the key and the fix, before any model is loaded
    (["prune", "--recipe", "{ws}/recipes/unknown_key.yaml", "--out", "{ws}/new17"], "unknown key 'colour'"),
    (["prune", "--recipe", "{ws}/recipes/unknown_sub.yaml", "--out", "{ws}/new17"], "unknown key calibration.size"),
    (["prune", "--recipe", "{ws}/recipes/bad_type.yaml", "--out", "{ws}/new17"], "calibration.nsamples: 'many'"),
    (["prune", "--recipe", "{ws}/recipes/nm_unquoted.yaml", "--out", "{ws}/new17"], "nm: expected text"),
    (["prune", "--recipe", "{ws}/recipes/bad_choice.yaml", "--out", "{ws}/new17"], "compute.offload: 'tape'"),
    (["prune", "--recipe", "{ws}/recipes/bad_method.yaml", "--out", "{ws}/new17"], "method: unknown solver"),
    (["prune", "--recipe", "{ws}/recipes/bad_alloc.yaml", "--out", "{ws}/new17"], "allocation: unknown allocation"),
    (["prune", "--recipe", "{ws}/recipes/bad_option.yaml", "--out", "{ws}/new17"], "solver_options.knob"),
    (["prune", "--recipe", "{ws}/recipes/not_yaml.yaml", "--out", "{ws}/new17"], "not valid YAML"),
    (["prune", "--recipe", "{ws}/recipes/not_recipe.yaml", "--out", "{ws}/new17"], "not a layerprune recipe"),
    (["prune", "--recipe", "{ws}/recipes/missing.yaml", "--out", "{ws}/new17"], "no such file"),
    # prune: outputs (data loss)
    (PRUNE + ["--out", "{ws}/mine", "--force"], "did not write"),
    (PRUNE + ["--out", M, "--force"], "is the input"),
    (PRUNE + ["--offload", "disk", "--out", M, "--force"], "is the input"),
    (PRUNE + ["--out", M + "/inner"], "is inside the input"),
    (PRUNE + ["--out", "{ws}", "--force"], "contains the input"),
    (PRUNE + ["--out", "{ws}/mine/notes.txt"], "is a file"),
    (PRUNE + ["--out", R], "already holds a layerprune run"),
    (PRUNE + ["--out", "{ws}/bad_ckpt", "--resume"], "corrupt or incomplete"),
    (PRUNE + ["--out", "{ws}/new13", "--resume"], "no checkpoint"),
    (PRUNE + ["--out", R, "--resume", "--force"], "pass one of them"),
    # finetune
    (["finetune", "{ws}/corrupt_run", "--steps", "1", "--out", "{ws}/new14"], "corrupt or truncated"),
    (["finetune", R, "--steps", "1"], "would overwrite"),
    (["finetune", R, "--steps", "1", "--out", "{ws}/mine", "--force"], "did not write"),
    (["finetune", R, "--steps", "0"], "at least 1"),
    (["finetune", "{ws}/interrupted", "--steps", "1"], "interrupted run"),
    (["finetune", "{ws}/record_garbage", "--steps", "1", "--out", "{ws}/new15"], "corrupt"),
    # fed
    (["fed", "--depth-flag", "f"], "--depth-flag"),
    (["fed", "--scheme", "hetero", "--depth-flag", "9"], "not a depth level"),
    (["fed", "--keep-prob", "0"], "(0, 1]"),
    (["fed", "--out", "{ws}/mine", "--force", "--data-dir", "{ws}/data"], "did not write"),
    # plot, bench-speed, demo, search-allocation
    (["plot", "{ws}/data"], "not a layerprune run directory"),
    (["plot", R, "--out", "{ws}/mine/plot.png", "--force"], "did not write"),
    (["plot", "{ws}/record_garbage"], "corrupt"),
    (["bench-speed", R, "--out", "{ws}/mine/result.json", "--force"], "did not write"),
    (["bench-speed", R, "--sparse-kernels"], "not a 2:4 run"),
    (["bench-speed", "{ws}/run24", "--sparse-kernels", "--device", "cpu"], "CUDA GPUs only"),
    (["bench-speed", "{ws}/run24", "--sparse-kernels", "--dtype", "float32"], "runs in bfloat16 or float16"),
    *([(["bench-speed", "{ws}/run24", "--sparse-kernels"], "needs a CUDA GPU")] if not torch.cuda.is_available()
      else []),
    (["demo", "--model", M, "--out", "{ws}/mine", "--force"], "did not write"),
    (["search-allocation", "--model", M, "--sparsity", "1.5", "--out", "{ws}/new16"], "must lie in"),
    (["search-allocation", "--model", M, "--out", "{ws}/mine", "--force", "--data-dir", "{ws}/data"], "did not write"),
    (["search-allocation", "--model", M, "--out", M + "/search", "--data-dir", "{ws}/data"], "inside the input"),
]


def test_the_table_is_large_and_covers_every_subcommand():
    assert len(CASES) >= 30
    commands = {c[0][0] for c in CASES if c[0]}
    assert commands >= {"info", "eval", "prune", "finetune", "fed", "plot", "bench-speed", "demo", "search-allocation"}


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_input_one_line_exit_2_nothing_touched(ws, argv, message, capfd):
    argv = [a.format(ws=ws) for a in argv]
    before = _snapshot(ws)
    cwd = os.getcwd()
    os.chdir(ws)  # relative paths resolve inside the workspace
    try:
        code = main(argv)
    finally:
        os.chdir(cwd)
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert message.lower() in lines[0].lower(), lines[0]
    assert _snapshot(ws) == before  # no file changed, none deleted, none created


def test_bad_input_in_a_real_process(ws):
    """The same contract seen from outside: exit status 2 and one stderr line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.run([sys.executable, "-m", "layerprune", "info", str(ws / "corrupt_model")], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "corrupt" in p.stderr


def test_version_and_help_show_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("layerprune ")
    from layerprune.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():
        for a in sp._actions:
            if a.dest != "help":
                assert a.help, f"{name} {a.option_strings or a.dest} has no help line"
        assert "examples:" in (sp.epilog or ""), name
    text = sub.choices["prune"].format_help()
    assert "(default: 128)" in text and "(default: c4)" in text
