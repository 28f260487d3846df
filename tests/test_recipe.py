"""recipe.yaml: every prune run writes one; ``prune --recipe`` replays it to the same bytes, flags given on the command
line win (even one equal to its default), a new method's options appear in recipes by themselves."""
from __future__ import annotations

import hashlib

import pytest
import yaml
from conftest import tiny_model, tiny_tokenizer

from layerprune.cli import build_parser, main
from layerprune.cli import recipe as recipe_mod
from layerprune.registry import SOLVER_REGISTRY, Option
from layerprune.solvers import get_solver


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    tiny_model("llama", layers=2).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _prune(model_dir, data, out, *extra):
    return main(["prune", "--model", str(model_dir), "--data-dir", str(data), "--nsamples", "2", "--seqlen", "16",
                 "--eval", "", "--out", str(out), *extra])


def _replay(recipe, data, out, *extra):
    return main(["prune", "--recipe", str(recipe), "--data-dir", str(data), "--out", str(out), *extra])


def test_recipe_replays_byte_identical_and_flags_override(tmp_path, model_dir, text_corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _prune(model_dir, text_corpus, a, "--method", "sparsegpt", "--sparsity", "0.6", "--percdamp", "0.05",
                  "--allocation", "dlp", "--alpha", "0.1", "--seed", "3") == 0
    r = yaml.safe_load((a / "recipe.yaml").read_text())
    assert r["method"] == "sparsegpt" and r["sparsity"] == 0.6 and r["solver_options"]["percdamp"] == 0.05
    assert r["allocation"] == "dlp" and r["allocation_options"]["alpha"] == 0.1
    assert r["calibration"] == {"calib": "c4", "nsamples": 2, "seqlen": 16, "seed": 3}
    assert r["model"] == str(model_dir.resolve()) and r["save"] == {"dtype": "float32"}

    assert _replay(a / "recipe.yaml", text_corpus, b) == 0
    assert _sha(b / "model.safetensors") == _sha(a / "model.safetensors")
    assert (b / "recipe.yaml").read_text() == (a / "recipe.yaml").read_text()

    # --seed 0 equals its default and still overrides the recipe's 3: the same bytes as a direct seed-0 run
    c, d = tmp_path / "c", tmp_path / "d"
    assert _replay(a / "recipe.yaml", text_corpus, c, "--seed", "0") == 0
    assert _prune(model_dir, text_corpus, d, "--method", "sparsegpt", "--sparsity", "0.6", "--percdamp", "0.05",
                  "--allocation", "dlp", "--alpha", "0.1", "--seed", "0") == 0
    assert yaml.safe_load((c / "recipe.yaml").read_text())["calibration"]["seed"] == 0
    assert _sha(c / "model.safetensors") == _sha(d / "model.safetensors") != _sha(a / "model.safetensors")

    # another method on the command line: the recipe's sparsegpt options are not carried over to it
    e = tmp_path / "e"
    assert _replay(a / "recipe.yaml", text_corpus, e, "--method", "wanda") == 0
    r = yaml.safe_load((e / "recipe.yaml").read_text())
    assert r["method"] == "wanda" and r["solver_options"] == {} and r["allocation_options"]["alpha"] == 0.1


class Knob:
    """Magnitude pruning with an option nothing in the CLI or the recipe code knows about."""

    name = "knob-solver"
    needs = frozenset()
    options = (Option("knob_level", int, None, "knob-solver: a level (default 1)"),)

    def prune(self, weight, stats, sparsity, nm=None, knob_level=1):
        return get_solver("magnitude").prune(weight, stats, min(0.9, sparsity * knob_level), nm)


def test_a_new_solvers_options_appear_in_the_recipe(tmp_path, model_dir, text_corpus):
    with SOLVER_REGISTRY.registered(Knob):
        a, b = tmp_path / "a", tmp_path / "b"
        assert _prune(model_dir, text_corpus, a, "--method", "knob-solver", "--knob-level", "2",
                      "--sparsity", "0.3") == 0
        assert yaml.safe_load((a / "recipe.yaml").read_text())["solver_options"] == {"knob_level": 2}
        assert _replay(a / "recipe.yaml", text_corpus, b) == 0
        assert _sha(b / "model.safetensors") == _sha(a / "model.safetensors")


def test_every_prune_flag_has_a_place_in_the_recipe():
    """A new core flag must be put into LAYOUT (or NOT_RECORDED on purpose); registry options place themselves."""
    parser = build_parser()
    prune = next(a for a in parser._actions if a.dest == "command").choices["prune"]
    from layerprune.allocation import ALLOCATORS
    from layerprune.reconstruct import RECONSTRUCTORS

    registry = {o.dest for r in (SOLVER_REGISTRY, ALLOCATORS, RECONSTRUCTORS) for o, _ in r.options().values()}
    dests = {a.dest for a in prune._actions}
    unplaced = dests - recipe_mod.core_dests() - recipe_mod.NOT_RECORDED - registry
    assert unplaced == set()
    assert not recipe_mod.core_dests() - dests  # and the layout names no flag that is gone
