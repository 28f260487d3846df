"""Method registries: a solver and an allocator declared in this file (one option each) run through the CLI with
their flags generated from the declarations; duplicates and conflicting declarations are refused; the flags the
built-in methods declare give exactly the options the hand-written CLI gave."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from conftest import tiny_model, tiny_tokenizer

from layerprune.allocation import ALLOCATORS, get_allocator
from layerprune.allocation.base import BoundedAllocator, block_weights, from_blocks, rebalance
from layerprune.cli import build_parser, main
from layerprune.cli.common import _method_options
from layerprune.errors import UserError
from layerprune.record import read_record
from layerprune.registry import Option, Registry
from layerprune.solvers import SOLVER_REGISTRY, SOLVERS, get_solver


class ToySolver:
    """Magnitude pruning that remembers the knob it was given."""

    name = "toy"
    needs = frozenset()
    options = (Option("toy_knob", int, None, "toy: how hard to turn (default 1)"),)
    seen: list = []

    def prune(self, weight, stats, sparsity, nm=None, toy_knob=1):
        ToySolver.seen.append(toy_knob)
        return get_solver("magnitude").prune(weight, stats, sparsity, nm)


class ToyAllocation(BoundedAllocator):
    """Block b gets target + tilt * (b - mean block index), rebalanced to the budget."""

    name = "toy-alloc"
    options = (Option("tilt", float, None, "toy: sparsity slope over the blocks (default 0)"),
               *BoundedAllocator.options)

    def __init__(self, tilt: float = 0.0, lo: float = 0.0, hi: float = 0.99):
        super().__init__(lo, hi)
        self.tilt = float(tilt)

    def allocate(self, target, ctx):
        target = self.check_target(target, ctx)
        raw = [target + self.tilt * (b - (ctx.num_blocks - 1) / 2) for b in range(ctx.num_blocks)]
        bs = rebalance(raw, target, block_weights(ctx), self.lo, self.hi)
        return from_blocks(ctx, bs, {"method": self.name, "target": target, "tilt": self.tilt})


def _prune_help() -> str:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["prune"].format_help()


def test_toy_solver_and_allocator_run_through_the_cli(tmp_path, text_corpus, capsys):
    src = tmp_path / "model"
    tiny_model("llama", layers=3).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    base = ["prune", "--model", str(src), "--data-dir", str(text_corpus), "--nsamples", "2", "--seqlen", "16",
            "--eval", "", "--sparsity", "0.5"]
    ToySolver.seen.clear()
    with SOLVER_REGISTRY.registered(ToySolver), ALLOCATORS.registered(ToyAllocation):
        text = _prune_help()
        assert "toy options:" in text and "--toy-knob TOY_KNOB" in text and "toy: how hard to turn" in text
        assert "toy-alloc options:" in text and "--tilt TILT" in text
        assert "toy" in SOLVERS and "toy" in list(SOLVER_REGISTRY) and "toy-alloc" in list(ALLOCATORS)

        out = tmp_path / "run"
        assert main(base + ["--method", "toy", "--toy-knob", "3", "--allocation", "toy-alloc", "--tilt", "0.1",
                            "--out", str(out)]) == 0
        rec = read_record(out)
        assert ToySolver.seen == [3] * len(rec["layers"]) and len(rec["layers"]) == 3 * 7
        assert rec["method"] == "toy" and rec["solver_options"] == {"toy_knob": 3}
        alloc = rec["allocation"]
        assert alloc["name"] == "toy-alloc" and alloc["options"] == {"tilt": 0.1} and alloc["stats"]["tilt"] == 0.1
        assert alloc["block"] == pytest.approx([0.4, 0.5, 0.6])  # the tilt reached the allocator
        for row in rec["layers"]:
            assert row["target"] == pytest.approx(alloc["block"][row["block"]])

        ToySolver.seen.clear()
        out2 = tmp_path / "run2"
        assert main(base + ["--method", "toy", "--out", str(out2)]) == 0  # not given: the method's own default
        assert read_record(out2)["solver_options"] == {} and set(ToySolver.seen) == {1}

        capsys.readouterr()
        assert main(base + ["--method", "wanda", "--toy-knob", "3", "--out", str(tmp_path / "x")]) == 2
        assert "--toy-knob needs --method toy, not wanda" in capsys.readouterr().err
        assert main(base + ["--tilt", "0.2", "--out", str(tmp_path / "x")]) == 2
        assert "--tilt needs --allocation toy-alloc, not uniform" in capsys.readouterr().err
    assert "toy" not in SOLVER_REGISTRY and "toy-alloc" not in ALLOCATORS and "toy" not in SOLVERS
    assert "--toy-knob" not in _prune_help() and "--tilt" not in _prune_help()


def test_duplicate_names_are_refused():
    class Wanda2:
        name, needs, options = "wanda", frozenset(), ()

    with pytest.raises(ValueError, match=r"two solvers named 'wanda': layerprune\.solvers\.wanda\.Wanda and "
                                         r".*Wanda2"):
        SOLVER_REGISTRY.register(Wanda2)
    assert SOLVER_REGISTRY["wanda"] is type(get_solver("wanda"))

    class DLP2(ToyAllocation):
        name = "dlp"

    with pytest.raises(ValueError, match="two allocations named 'dlp'"):
        with ALLOCATORS.registered(DLP2):
            pass
    assert ALLOCATORS["dlp"].__module__ == "layerprune.allocation.dlp"
    with ALLOCATORS.registered(ToyAllocation):
        with pytest.raises(ValueError, match="two allocations named 'toy-alloc'"):
            ALLOCATORS.register(ToyAllocation)
    assert "toy-alloc" not in ALLOCATORS


def test_registry_basics():
    r = Registry("widget")

    class A:
        name, options = "a", (Option("size", int, None, "size"),)

    class B:
        name, options = "b", (Option("size", float, None, "size"),)  # same flag, another type

    r.register(A)
    assert list(r) == ["a"] and r.get("a") is A and "a" in r and len(r) == 1
    with pytest.raises(UserError, match="unknown widget 'c'; known: a"):
        r.get("c")
    r.register(B)
    with pytest.raises(ValueError, match="--size is declared differently by widgets 'a' and 'b'"):
        r.options()
    r.unregister("b")
    with pytest.raises(RuntimeError):
        with r.registered(B):
            raise RuntimeError("boom")
    assert list(r) == ["a"]  # unregistered even when the block fails

    class C:
        name, options = "c", ("size",)

    with pytest.raises(ValueError, match="must be Option"):
        r.register(C)


def test_declarations_match_what_the_methods_take():
    for name, cls in ALLOCATORS.items():
        takes = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        declared = [o.name for o in cls.options] + ([cls.spec_arg] if getattr(cls, "spec_arg", None) else [])
        assert sorted(declared) == sorted(takes), name
    for name in SOLVERS:
        cls = SOLVER_REGISTRY[name]
        params = inspect.signature(getattr(cls, "prune_group", cls.prune)).parameters  # prune forwards to it
        assert all(o.name in params for o in cls.options), name
    assert get_allocator("erk", erk_power=2.0).power == 2.0 and get_allocator("atp", beta_frac=0.5).beta_frac == 0.5


# The flags of the hand-written CLI (before the registries) and the options each combination gave.
OLD_PRUNE_FLAGS = {
    "--allocation", "--alpha", "--batch-size", "--beta", "--blocksize", "--calib", "--compute-dtype", "--data-dir",
    "--device", "--dlp-stat", "--dtype", "--eval", "--eval-seqlen", "--fixed-group", "--force", "--gqa",
    "--groupsize", "--lam", "--magnitude-scope", "--max-sparsity", "--max-windows", "--method", "--min-sparsity",
    "--model", "--nm", "--no-cache", "--no-compensate", "--no-dense-eval", "--no-gcd", "--nsamples", "--offload",
    "--out", "--owl-m", "--percdamp", "--r-end", "--r0", "--resume", "--save-dtype", "--seed", "--seqlen", "--skip",
    "--slim-budget", "--slim-score", "--sparsity", "--true-sequential", "--wbits"}
SLIM = {"gqa": "heads", "budget": "params", "score": "obs", "compensate": True, "grouped_cholesky": True}
SOLVER_CASES = [
    ("magnitude", [], {"scope": "matrix"}),
    ("magnitude", ["--magnitude-scope", "row"], {"scope": "row"}),
    ("wanda", [], {}),
    ("sparsegpt", [], {}),
    ("sparsegpt", ["--blocksize", "64", "--percdamp", "0.1"], {"blocksize": 64, "percdamp": 0.1}),
    ("sparsegpt", ["--wbits", "4"], {"wbits": 4, "groupsize": -1}),
    ("sparsegpt", ["--wbits", "3", "--groupsize", "32"], {"wbits": 3, "groupsize": 32}),
    ("slimgpt", [], SLIM),
    ("slimgpt", ["--gqa", "kv-groups", "--slim-budget", "ratio", "--slim-score", "magnitude"],
     {**SLIM, "gqa": "kv-groups", "budget": "ratio", "score": "magnitude"}),
    ("slimgpt", ["--no-compensate", "--no-gcd", "--fixed-group", "8", "--percdamp", "0.05"],
     {**SLIM, "compensate": False, "grouped_cholesky": False, "dynamic_group_size": False, "fixed_group": 8,
      "percdamp": 0.05}),
    ("wanda", ["--wbits", "4"], "--wbits needs --method sparsegpt, not wanda"),
    ("magnitude", ["--wbits", "3"], "--wbits needs --method sparsegpt, not magnitude"),
    ("sparsegpt", ["--groupsize", "16"], "--groupsize only applies with --wbits"),
    ("wanda", ["--percdamp", "0.1"], "--percdamp needs --method sparsegpt or slimgpt or alps, not wanda"),
    ("alps", [], {}),
    ("alps", ["--admm-iters", "100", "--rho", "0.2", "--pcg-iters", "5", "--percdamp", "0.05"],
     {"admm_iters": 100, "rho": 0.2, "pcg_iters": 5, "percdamp": 0.05}),
    ("foo", [], "unknown solver 'foo'"),
]
ALLOC_CASES = [
    ("uniform", [], {}),
    ("dlp", ["--alpha", "0.2", "--dlp-stat", "mean", "--max-sparsity", "0.9"],
     {"alpha": 0.2, "stat": "mean", "hi": 0.9}),
    ("owl", ["--owl-m", "3", "--lam", "0.1", "--min-sparsity", "0.1"], {"owl_m": 3.0, "lam": 0.1, "lo": 0.1}),
    ("dsa", ["--lam", "0.2"], {"lam": 0.2}),
    ("ipr-lin-dec", ["--r0", "0.1", "--r-end", "0.5"], {"r0": 0.1, "r_end": 0.5}),
    ("atp", ["--beta", "0.01"], {"beta": 0.01}),
    ("uniform", ["--alpha", "0.2"], "--alpha needs --allocation dlp, not uniform"),
    ("dlp", ["--r0", "0.1"], "--r0 needs --allocation ipr-log or ipr-log-dec or ipr-lin or ipr-lin-dec, not dlp"),
]


def test_builtin_flags_give_the_options_of_the_hand_written_cli():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    prune = sub.choices["prune"]
    flags = {s for a in prune._actions for s in a.option_strings}
    assert OLD_PRUNE_FLAGS <= flags  # nothing removed
    assert sum(a.option_strings == ["--percdamp"] for a in prune._actions) == 1  # shared by three methods, one flag
    groups = {g.title: [a.option_strings[0] for a in g._group_actions] for g in prune._action_groups}
    assert groups["sparsegpt options"] == ["--blocksize", "--wbits", "--groupsize"]
    assert groups["sparsegpt, slimgpt, alps options"] == ["--percdamp"]
    assert groups["alps options"] == ["--admm-iters", "--rho", "--pcg-iters"]
    assert groups["allocation options"] == ["--min-sparsity", "--max-sparsity"]
    assert groups["dlp options"] == ["--alpha", "--dlp-stat"]
    text = prune.format_help()
    assert ("magnitude, wanda, sparsegpt, slimgpt (structured: heads + FFN channels), depth (depth: whole blocks "
            "removed, a stock config with fewer layers), or alps") in " ".join(text.split())
    for registry, select, cases in ((SOLVER_REGISTRY, "--method", SOLVER_CASES), (ALLOCATORS, "--allocation",
                                                                                   ALLOC_CASES)):
        for name, extra, want in cases:
            args = prune.parse_args(["--out", "x", select, name, *extra])
            if isinstance(want, dict):
                assert _method_options(registry, select, name, args) == want, (name, extra)
            else:
                with pytest.raises(UserError, match=want):
                    _method_options(registry, select, name, args)


def test_the_adding_a_method_examples_run_through_the_cli(tmp_path, text_corpus):
    text = (Path(__file__).parents[1] / "docs" / "adding-a-method.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    src = tmp_path / "model"
    tiny_model("llama", layers=3).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    try:
        for code in blocks:
            exec(code, {})
        assert "mine options:" in _prune_help() and "deeper options:" in _prune_help()
        out = tmp_path / "run"
        assert main(["prune", "--model", str(src), "--data-dir", str(text_corpus), "--nsamples", "2", "--seqlen", "16",
                     "--eval", "", "--method", "mine", "--power", "2", "--allocation", "deeper", "--step", "0.02",
                     "--out", str(out)]) == 0
        rec = read_record(out)
        assert rec["solver_options"] == {"power": 2.0} and rec["allocation"]["options"] == {"step": 0.02}
        assert rec["allocation"]["block"] == pytest.approx([0.48, 0.5, 0.52])
        assert all(abs(r["achieved"] - r["target"]) < 0.01 for r in rec["layers"])
    finally:
        for registry, name in ((SOLVER_REGISTRY, "mine"), (ALLOCATORS, "deeper")):
            if name in registry:
                registry.unregister(name)
