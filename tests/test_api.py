"""The API runs, the CLI parses: ``run_prune`` does what ``layerprune prune`` does, from one validated config."""
from __future__ import annotations

import ast
import hashlib
import inspect
from pathlib import Path

import pytest
from conftest import tiny_model, tiny_tokenizer

from layerprune import PruneConfig, RunConfig, api, prune, run_prune
from layerprune.cli import main
from layerprune.errors import UserError

NOT_COMPARED = {"layerprune.json", "README.md"}  # they carry timings and the command line




def _files(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file() and p.name not in NOT_COMPARED}


@pytest.mark.parametrize("flags,settings", [
    (["--method", "wanda", "--sparsity", "0.5"], dict(method="wanda", sparsity=0.5)),
    (["--method", "sparsegpt", "--nm", "2:4", "--percdamp", "0.05", "--allocation", "owl"],
     dict(method="sparsegpt", nm="2:4", solver_options={"percdamp": 0.05}, allocation="owl")),
    (["--method", "slimgpt", "--sparsity", "0.5", "--allocation", "ipr-log", "--offload", "disk"],
     dict(method="slimgpt", sparsity=0.5, allocation="ipr-log", offload="disk",
          solver_options={"gqa": "heads", "budget": "params", "score": "obs", "compensate": True,
                          "grouped_cholesky": True})),
])
def test_one_api_call_writes_the_cli_runs_bytes(tmp_path, model_dir, text_corpus, flags, settings):
    cli, py = tmp_path / "cli", tmp_path / "py"
    assert main(["prune", "--model", str(model_dir), "--data-dir", str(text_corpus), "--nsamples", "4", "--seqlen",
                 "32", "--max-windows", "2", "--seed", "1", *flags, "--out", str(cli)]) == 0
    record = run_prune(RunConfig(model=str(model_dir), out=py, data_dir=text_corpus, max_windows=2, progress=False,
                                 prune=PruneConfig(nsamples=4, seqlen=32, seed=1, **settings)))
    assert _files(py) == _files(cli) and "recipe.yaml" in _files(py)
    import json

    want = json.loads((cli / "layerprune.json").read_text())
    ppl = lambda ev: {k: {ds: r["ppl"] for ds, r in ev[k].items()} for k in ("before", "after")}  # noqa: E731
    assert ppl(record["eval"]) == ppl(want["eval"]) and record["eval"]["after"]["wikitext2"]["ppl"] > 0
    assert record["allocation"] == want["allocation"]


def test_keywords_build_the_same_run(tmp_path, model_dir, text_corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(model=str(model_dir), data_dir=text_corpus, eval="", progress=False)
    run_prune(RunConfig(out=a, prune=PruneConfig(method="magnitude", sparsity=0.6, nsamples=2, seqlen=16), **kw))
    run_prune(out=b, method="magnitude", sparsity=0.6, nsamples=2, seqlen=16, **kw)
    assert _files(a) == _files(b)
    with pytest.raises(UserError, match="not both"):
        run_prune(RunConfig(out=b), method="wanda")
    with pytest.raises(TypeError, match="sparsty"):
        run_prune(out=b, sparsty=0.5)


def test_run_checks_before_loading(tmp_path, model_dir):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="did not write"):
        run_prune(model=str(model_dir), out=tmp_path / "taken", progress=False)
    with pytest.raises(UserError, match="--resume .* --force"):
        run_prune(model=str(model_dir), out=tmp_path / "new", resume=True, force=True)
    with pytest.raises(UserError, match="output directory"):
        run_prune(model=str(model_dir))
    assert not (tmp_path / "new").exists()


def test_calibration_is_given_one_way(text_corpus):
    import torch

    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    ids = torch.randint(0, 100, (2, 16))
    with pytest.raises(UserError, match="calibration given twice.*nsamples"):
        prune(model, tok, calibration=ids, nsamples=4)
    with pytest.raises(UserError, match="not both"):
        prune(model, tok, PruneConfig(), method="wanda", calibration=ids)
    # the settings alone draw the windows; the record says how
    rec = prune(model, tok, sparsity=0.5, nsamples=2, seqlen=16, seed=3, data_dir=text_corpus, progress=False)
    assert rec["calibration"]["source"] == "c4" and rec["calibration"]["nsamples"] == 2 and rec["seed"] == 3


def test_validated_once_and_again_after_a_change():
    cfg = PruneConfig(nm="2:4", skip="mlp.down_proj")
    assert cfg.validate() is cfg and cfg.nm == (2, 4) and cfg.sparsity == 0.5 and cfg.skip == ("mlp.down_proj",)
    cfg.sparsity = 1.5
    with pytest.raises(UserError, match="conflicts"):
        cfg.validate()


def test_a_chosen_allocation_is_resolved_through_the_registry_not_by_name():
    """api.py does not test for 'auto': the allocator declares its choice step (choose_for_run)."""
    from layerprune.allocation import ALLOCATORS

    tree = ast.parse(inspect.getsource(api))
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert "auto" not in strings
    choosers = [n for n, cls in ALLOCATORS.items() if hasattr(cls, "choose_for_run")]
    assert choosers == ["auto"]


def test_every_cli_function_is_short():
    """The CLI parses, the API runs: no function of layerprune/cli is longer than 60 lines."""
    root = Path(api.__file__).parent / "cli"
    long = [(p.name, n.name, n.end_lineno - n.lineno + 1) for p in sorted(root.glob("*.py"))
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef)
            and n.end_lineno - n.lineno + 1 > 60]
    assert long == []
