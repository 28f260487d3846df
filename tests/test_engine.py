"""The layer-wise engine on tiny random models of every family: capture, propagation, exactness, N:M,
allocation plumbing, resume after SIGKILL, the saved run directory, CLI errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAMILIES, kill_then_resume, tiny_model, tiny_tokenizer

from layerprune import prune
from layerprune.cli import main
from layerprune.errors import UserError
from layerprune.hooks import HookSet
from layerprune.models.adapters import get_adapter
from layerprune.models.info import measure_sparsity
from layerprune.passes import block_out as _block_out
from layerprune.passes import capture_inputs
from layerprune.solvers import get_solver


def calib(n=6, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seqlen), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_captured_inputs_reproduce_the_model(family):
    """Running the blocks one by one on the captured inputs and call arguments gives the model's own hidden states."""
    model = tiny_model(family, layers=3)
    a = get_adapter(model)
    x = calib(4, 16)
    hidden, kwargs = capture_inputs(model, a, x, torch.device("cpu"), torch.float32, batch_size=3)
    ref = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    assert torch.allclose(hidden, ref[0], atol=1e-6)
    h = hidden
    for i, block in enumerate(a.blocks(model)[:-1]):
        args, kw = kwargs[i]
        h = _block_out(block(h, *args, **kw))
        assert torch.allclose(h, ref[i + 1], atol=1e-5), f"block {i}"


@torch.no_grad()
def linear_inputs(block, names, hidden, kwargs, batch=8) -> dict:
    """{name: the full input [tokens, in] of each named linear} over the windows ``hidden``."""
    xs = {n: [] for n in names}
    handles = [block.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]).float())) for n in names]
    try:
        for s in range(0, hidden.shape[0], batch):
            block(hidden[s:s + batch], *kwargs[0], **kwargs[1])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


@torch.no_grad()
def stage_stats(block, name, hidden, kwargs, want, batch=8):
    """LayerStats of one linear's input over the windows ``hidden`` (as the engine collects them)."""
    with HookSet({name: block.get_submodule(name)}, want) as hs:
        for s in range(0, hidden.shape[0], batch):
            block(hidden[s:s + batch], *kwargs[0], **kwargs[1])
    return hs.collectors[name].stats()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_family_every_solver_exact(family, method):
    """Exact counts, and the recorded error of block 0's linears is ||(W - W')X||^2 / ||WX||^2 over their inputs."""
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    rec = prune(model, calibration=calib(), method=method, sparsity=0.5, progress=False)
    for layer in rec["layers"]:
        assert layer["achieved"] == pytest.approx(layer["target"], abs=1e-4)
    assert measure_sparsity(model)["overall"] == pytest.approx(0.5, abs=1e-3)
    assert torch.isfinite(model(calib(1, 8)).logits).all()
    a = get_adapter(dense)
    hidden, kwargs = capture_inputs(dense, a, calib(), torch.device("cpu"), torch.float32, 8)
    block, pruned = a.blocks(dense)[0], a.blocks(model)[0]
    xs = linear_inputs(block, a.linear_names(), hidden, kwargs[0])  # one pass: every stage sees the dense block
    rows = [r for r in rec["layers"] if r["block"] == 0]
    assert [r["name"] for r in rows] == a.linear_names()
    for r in rows:
        W = a.get_weight(block.get_submodule(r["name"])).detach()
        dW = W - a.get_weight(pruned.get_submodule(r["name"])).detach()
        X = xs[r["name"]]
        want = float((X @ dW.T).square().sum() / (X @ W.T).square().sum())
        assert r["rel_error"] == pytest.approx(want, rel=1e-3) and want > 0, r["name"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_every_group_exact(method):
    model = tiny_model("llama")
    prune(model, calibration=calib(), method=method, nm="2:4", progress=False)
    a = get_adapter(model)
    for block in a.blocks(model):
        for mod in a.linears(block).values():
            zeros = (a.get_weight(mod) == 0).view(-1, 4).sum(1)
            assert torch.all(zeros == 2)


def test_sparsegpt_has_lowest_reconstruction_error():
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_model("llama")
        rec = prune(model, calibration=calib(8, 32), method=method, sparsity=0.6, progress=False)
        errs[method] = sum(r["rel_error"] for r in rec["layers"] if r["block"] == 0)
    assert errs["sparsegpt"] < min(errs["wanda"], errs["magnitude"])  # OBS compensation helps


@torch.no_grad()
def test_propagation_uses_pruned_outputs():
    """Block 1 is pruned with statistics of block 0's *pruned* outputs (recomputed here by hand)."""
    x = calib()
    pruned = tiny_model("llama")
    prune(pruned, calibration=x, method="wanda", sparsity=0.7, progress=False)
    dense = tiny_model("llama")
    a = get_adapter(dense)
    hidden, kwargs = capture_inputs(dense, a, x, torch.device("cpu"), torch.float32, 8)
    args, kw = kwargs[0]
    h1 = _block_out(a.blocks(pruned)[0](hidden, *args, **kw))
    blk = a.blocks(dense)[1]
    with HookSet({"mlp.up_proj": blk.mlp.up_proj}, {"sq_norm"}) as hs:
        blk(h1, *kwargs[1][0], **kwargs[1][1])
    want = get_solver("wanda").prune(blk.mlp.up_proj.weight, hs.collectors["mlp.up_proj"].stats(), 0.7)
    got = a.blocks(pruned)[1].mlp.up_proj.weight
    assert torch.equal(want == 0, got == 0)
    # and it differs from what dense inputs would give
    h1_dense = _block_out(a.blocks(dense)[0](hidden, *args, **kw))
    with HookSet({"mlp.up_proj": blk.mlp.up_proj}, {"sq_norm"}) as hs:
        blk(h1_dense, *kwargs[1][0], **kwargs[1][1])
    other = get_solver("wanda").prune(blk.mlp.up_proj.weight, hs.collectors["mlp.up_proj"].stats(), 0.7)
    assert not torch.equal(other == 0, got == 0)


def test_allocation_flows_into_layers_and_record():
    model = tiny_model("llama", layers=4)
    rec = prune(model, calibration=calib(), method="wanda", sparsity=0.6, allocation="dlp", progress=False)
    alloc = rec["allocation"]
    assert len(alloc["block"]) == 4 and abs(sum(alloc["block"]) / 4 - 0.6) < 1e-9
    assert max(alloc["block"]) - min(alloc["block"]) == pytest.approx(0.3, abs=1e-6)
    for layer in rec["layers"]:
        assert layer["target"] == pytest.approx(alloc["block"][layer["block"]], abs=1e-9)
    assert len(alloc["stats"]["values"]) == 4


def test_shared_allocation_statistics_match_the_prepass():
    from layerprune.allocation import get_allocator
    from layerprune.engine import allocation_statistics

    base = tiny_model("llama", layers=4)
    x = calib()
    stats = allocation_statistics(base, x, {"owl": get_allocator("owl"), "dlp": get_allocator("dlp", stat="mean")})
    for key, alloc, opts in (("owl", "owl", {}), ("dlp", "dlp", {"stat": "mean"})):
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        ra = prune(a, calibration=x, method="wanda", sparsity=0.6, allocation=alloc, allocation_options=opts,
                   progress=False)
        rb = prune(b, calibration=x, method="wanda", sparsity=0.6, allocation=alloc, allocation_options=opts,
                   progress=False, block_stats=stats[key])
        assert ra["allocation"]["stats"]["values"] == pytest.approx(stats[key], rel=1e-6)
        assert ra["allocation"]["block"] == pytest.approx(rb["allocation"]["block"], abs=1e-12)
        assert "allocation" not in rb["timings"]
    with pytest.raises(UserError, match="block_stats has 3 values"):
        prune(copy.deepcopy(base), calibration=x, allocation="owl", block_stats=[1.0, 2.0, 3.0], progress=False)


def test_mixed_nm_with_allocation():
    model = tiny_model("llama", layers=4)
    rec = prune(model, calibration=calib(), method="wanda", nm="4:8", allocation="owl",
                allocation_options={"lam": 0.2}, progress=False)
    ns = [n for n, m in rec["allocation"]["block_nm"]]
    assert sum(ns) == 4 * 4 and all(1 <= n <= 7 for n in ns)
    a = get_adapter(model)
    for i, block in enumerate(a.blocks(model)):
        for mod in a.linears(block).values():
            assert torch.all((a.get_weight(mod) == 0).view(-1, 8).sum(1) == ns[i])


def test_true_sequential_collects_each_stage_after_the_previous_one():
    """Block 0 by hand: q/k/v pruned on the dense inputs, o_proj on its inputs through the pruned q/k/v, gate/up through
    the pruned attention, then down_proj: the engine's block 0 is exactly that, and not the one-pass result."""
    x = calib()
    base = tiny_model("llama")
    seq, one_pass, ref = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    prune(seq, calibration=x, method="sparsegpt", sparsity=0.5, true_sequential=True, progress=False)
    prune(one_pass, calibration=x, method="sparsegpt", sparsity=0.5, progress=False)
    a = get_adapter(ref)
    hidden, kwargs = capture_inputs(ref, a, x, torch.device("cpu"), torch.float32, 8)
    block = a.blocks(ref)[0]
    for group in a.input_groups:
        st = stage_stats(block, group[0], hidden, kwargs[0], {"hessian"})
        for name in group:
            lin = block.get_submodule(name)
            a.set_weight(lin, get_solver("sparsegpt").prune(a.get_weight(lin).detach(), st, 0.5))
    got, other = a.linears(a.blocks(seq)[0]), a.linears(a.blocks(one_pass)[0])
    for name, lin in a.linears(block).items():
        assert torch.equal(got[name].weight, lin.weight), name
    assert not torch.equal(other[a.o].weight, got[a.o].weight) and not torch.equal(other[a.down].weight,
                                                                                  got[a.down].weight)


def test_bf16_compute_collects_statistics_in_bf16():
    """compute_dtype bfloat16: block 0's statistics come from a bf16 copy of the block on bf16 inputs (by hand here),
    the solve and the kept weights stay fp32, and the result is not the fp32 run's."""
    x = calib()
    base = tiny_model("llama")
    m16, m32, ref = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    rec = prune(m16, calibration=x, method="sparsegpt", sparsity=0.5, compute_dtype="bfloat16", progress=False)
    prune(m32, calibration=x, method="sparsegpt", sparsity=0.5, progress=False)
    a = get_adapter(ref)
    hidden, kwargs = capture_inputs(ref, a, x, torch.device("cpu"), torch.bfloat16, 8)
    block = a.blocks(ref)[0]
    st = stage_stats(copy.deepcopy(block).to(torch.bfloat16), a.q, hidden, kwargs[0], {"hessian"})
    want = get_solver("sparsegpt").prune(block.get_submodule(a.q).weight.detach(), st, 0.5)
    got = a.blocks(m16)[0].get_submodule(a.q).weight
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert not torch.equal(got, a.blocks(m32)[0].get_submodule(a.q).weight)
    assert next(m16.parameters()).dtype == torch.float32 and rec["compute_dtype"] == "bfloat16"
    assert measure_sparsity(m16)["overall"] == pytest.approx(0.5, abs=1e-3)


def test_offload_modes_give_identical_weights(tmp_path):
    x = calib()
    ref = tiny_model("llama")
    prune(ref, calibration=x, method="wanda", sparsity=0.5, progress=False)
    for mode in ("cpu", "disk"):
        m = tiny_model("llama")
        prune(m, calibration=x, method="wanda", sparsity=0.5, offload=mode, out_dir=tmp_path / mode, progress=False)
        for (k, v), (_, w) in zip(ref.state_dict().items(), m.state_dict().items()):
            assert torch.equal(v, w), (mode, k)


def test_bad_input():
    model = tiny_model("llama")
    for kwargs, msg in [({"sparsity": 1.0}, "outside"), ({"sparsity": -0.1}, "outside"),
                        ({"nm": "4:4"}, None), ({"nm": "2:5"}, None), ({"method": "obs"}, "unknown solver"),
                        ({"allocation": "nope"}, "unknown allocation"), ({"skip": ("mlp.nope",)}, "not linears")]:
        with pytest.raises(UserError, match=msg):
            prune(model, calibration=calib(), progress=False, **kwargs)


# --- resume after SIGKILL -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,method,sparsity", [("full", "sparsegpt", 0.6), ("weights", "sparsegpt", 0.6),
                                                  ("weights", "slimgpt", 0.3)])
def test_resume_after_sigkill_matches_uninterrupted(tmp_path, mode, method, sparsity):
    """--checkpoint full resumes from the saved inputs of the next block; weights rebuilds them by running the
    finished (pruned) blocks again: both give the uninterrupted run's weights exactly."""
    def interrupted(out):
        state = json.loads((out / ".checkpoint" / "state.json").read_text())
        assert state["next_block"] in (2, 3)  # block 2's commit (a writer thread's) may still be in flight at the kill
        acts = sorted(p.name for p in (out / ".checkpoint").glob("acts_*"))
        if mode == "weights":
            assert state["activations"] is None and not acts
        else:  # the committed block's inputs, and at most one other (the next commit's, written before its state
            # file, or the previous one's, removed after it)
            assert state["activations"] in acts and len(acts) <= 2, (state["activations"], acts)

    resumed = kill_then_resume(tmp_path, dict(method=method, sparsity=sparsity, checkpoint=mode), between=interrupted)
    ref = tiny_model("llama", layers=5)
    prune(ref, calibration=calib(6, 24), method=method, sparsity=sparsity, progress=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed[k]), k


def test_checkpoint_every_commits_the_blocks_since_and_resumes_identically(tmp_path, monkeypatch):
    """--checkpoint-every: the commit comes after the first block that ends that long after the previous one and
    saves every block pruned since; a resume from it gives the uninterrupted run's weights."""
    import itertools
    import types

    import layerprune.engine as E
    from layerprune.offload import MemoryStore

    class Crash(MemoryStore):
        def onload(self, model, i, device):
            if i == 5:
                raise RuntimeError("simulated crash")
            super().onload(model, i, device)

    ticks = itertools.count()  # the engine's clock: one second per reading
    monkeypatch.setattr(E, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    kw = dict(calibration=calib(), method="sparsegpt", sparsity=0.5, progress=False, out_dir=tmp_path,
              checkpoint_every=4)
    with pytest.raises(RuntimeError, match="simulated"):
        prune(tiny_model("llama", layers=6), store=Crash(), **kw)
    state = json.loads((tmp_path / ".checkpoint" / "state.json").read_text())
    saved = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / ".checkpoint").glob("block_*"))
    assert 2 <= state["next_block"] < 5 and saved == list(range(state["next_block"])), (state["next_block"], saved)
    monkeypatch.undo()
    resumed = tiny_model("llama", layers=6)
    assert prune(resumed, resume=True, **kw)["resumed_from_block"] == state["next_block"]
    ref = tiny_model("llama", layers=6)
    prune(ref, calibration=calib(), method="sparsegpt", sparsity=0.5, progress=False)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in ref.state_dict().items())
    with pytest.raises(UserError, match="--checkpoint-every"):
        prune(tiny_model("llama"), **{**kw, "checkpoint_every": -1})


def test_checkpoint_none_keeps_nothing_and_refuses_resume(tmp_path):
    rec = prune(tiny_model("llama"), calibration=calib(), method="wanda", sparsity=0.5, out_dir=tmp_path,
                progress=False, checkpoint="none")
    assert rec["checkpoint"] == "none" and not (tmp_path / ".checkpoint").exists()
    with pytest.raises(UserError, match="--checkpoint none"):
        prune(tiny_model("llama"), calibration=calib(), method="wanda", sparsity=0.5, out_dir=tmp_path, resume=True,
              progress=False, checkpoint="none")
    with pytest.raises(UserError, match="--checkpoint 'some'"):
        prune(tiny_model("llama"), calibration=calib(), method="wanda", sparsity=0.5, out_dir=tmp_path,
              progress=False, checkpoint="some")


def test_checkpoint_default_is_full_on_cpu_and_weights_on_gpu():
    from layerprune.checkpoint import checkpoint_mode
    assert checkpoint_mode(None, "cpu") == "full" and checkpoint_mode(None, None) == "full"
    assert checkpoint_mode(None, "cuda") == "weights" and checkpoint_mode("full", "cuda") == "full"


def test_timers_synchronize_a_cuda_device_at_both_ends_of_a_stage(monkeypatch):
    """A stage's time on a GPU is only its own once queued kernels have finished: Timers(cuda) synchronizes."""
    from layerprune.passes import Timers
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    t = Timers(torch.device("cuda", 0))
    with t("solve"):
        assert len(calls) == 1
    assert len(calls) == 2 and calls[0] == torch.device("cuda", 0)
    t.now()
    assert len(calls) == 3
    calls.clear()
    with Timers("cpu")("solve"):
        pass
    assert calls == [] and Timers().sync is None


def test_checkpoint_with_other_settings_is_refused(tmp_path):
    model = tiny_model("llama")
    prune(model, calibration=calib(), method="wanda", sparsity=0.5, out_dir=tmp_path, progress=False,
          checkpoint_every=0)
    with pytest.raises(UserError, match="other settings"):
        prune(tiny_model("llama"), calibration=calib(), method="wanda", sparsity=0.6, out_dir=tmp_path, resume=True,
              progress=False)


# --- CLI: saved run round trip ----------------------------------------------------------------------------------

@pytest.fixture
def tiny_model_dir(tmp_path):
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_cli_prune_save_reload_eval(tmp_path, tiny_model_dir, text_corpus, capsys):
    out = tmp_path / "run"
    args = ["prune", "--model", str(tiny_model_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "4",
            "--seqlen", "32", "--data-dir", str(text_corpus), "--out", str(out), "--max-windows", "6"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "dense" in table and "sparsegpt uniform" in table
    rec = json.loads((out / "layerprune.json").read_text())
    assert rec["calibration"]["nsamples"] == 4 and rec["seed"] == 0
    assert abs(rec["measured_sparsity"] - 0.5) < 1e-3
    assert not (out / ".checkpoint").exists()
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)  # stock loader
    assert measure_sparsity(m)["overall"] == pytest.approx(rec["measured_sparsity"])
    res = tmp_path / "eval.json"
    assert main(["eval", str(out), "--seqlen", "32", "--max-windows", "6", "--data-dir", str(text_corpus),
                 "--out", str(res)]) == 0
    ppl = json.loads(res.read_text())["results"][0]["ppl"]
    assert ppl == pytest.approx(rec["eval"]["after"]["wikitext2"]["ppl"], rel=1e-6)
    # an existing run is never overwritten without --force
    before = (out / "layerprune.json").read_text()
    assert main(args) == 2
    assert "already holds a layerprune run" in capsys.readouterr().err
    assert (out / "layerprune.json").read_text() == before
    assert main(args + ["--resume"]) == 2  # finished run: nothing to resume


def test_cli_prune_bad_input_leaves_nothing(tmp_path, tiny_model_dir, text_corpus, capsys):
    base = ["prune", "--model", str(tiny_model_dir), "--data-dir", str(text_corpus), "--seqlen", "32"]
    cases = [(["--sparsity", "1.5"], "outside"), (["--nm", "3:3"], "N:M"), (["--method", "foo"], "unknown solver"),
             (["--nsamples", "100000"], "holds only")]
    for extra, msg in cases:
        out = tmp_path / ("o" + str(abs(hash(tuple(extra)))))
        assert main(base + extra + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg.lower() in err.lower(), err
        assert not out.exists()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_statistics_pass_stops_before_the_last_hooked_linear_computes(family):
    """collect() reads inputs only: a batch stops at the last hooked linear's call, before its product runs (the
    down projection's, for the whole-block stage), and the statistics equal those of a full forward with hooks."""
    from layerprune.passes import ActivationBuffer, Timers, make_collect

    model = tiny_model(family, layers=2)
    a = get_adapter(model)
    hidden, kwargs = capture_inputs(model, a, calib(6, 16), torch.device("cpu"), torch.float32, 2)
    block = a.blocks(model)[0]
    groups = [g[0] for stage in a.stages(False) for g in stage]
    ran = {n: 0 for n in groups}
    handles = [block.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: ran.__setitem__(n, ran[n] + 1))
               for n in groups]
    buf = ActivationBuffer(hidden.clone(), "none", torch.device("cpu"))
    got = make_collect(block, buf, kwargs[0], 2, torch.float32, Timers())(groups, {"hessian", "sq_norm"})
    for h in handles:
        h.remove()
    assert min(ran.values()) == 0 and max(ran.values()) == 3  # 3 batches: the last linear called never computed
    with HookSet({n: block.get_submodule(n) for n in groups}, {"hessian", "sq_norm"}) as hs:
        args, kw = kwargs[0]
        for s in range(0, hidden.shape[0], 2):
            block(hidden[s:s + 2], *args, **kw)
    for n in groups:
        want = hs.collectors[n].stats()
        assert torch.equal(got[n].hessian, want.hessian) and torch.equal(got[n].sq_norm, want.sq_norm), n
