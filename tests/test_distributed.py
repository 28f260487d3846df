"""Pruning on 2 gloo processes (layerprune.distributed), launched as torchrun does (RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT in the environment, one thread each) on a tiny llama: every solver gives one process's result, a killed
rank ends the run with one line, a 2-rank resume is bit-identical to an uninterrupted 2-rank run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from layerprune.cli import main
from layerprune.distributed import World

ROOT = Path(__file__).resolve().parents[1]
# rank 1 of a run that dies (SIGKILL) in the propagation of block KILL_AT: a test-side fault, not in the package
KILLER = """
import os, signal, sys
import layerprune.engine as engine
calls = [0]
real = engine.propagate
def propagate(*a, **k):
    if calls[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    calls[0] += 1
    return real(*a, **k)
engine.propagate = propagate
from layerprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from test_bad_input import _write_text_corpus

    w = tmp_path_factory.mktemp("dist")
    _write_text_corpus(w / "data")
    tiny_model("llama", layers=4).save_pretrained(w / "model")
    tiny_tokenizer().save_pretrained(w / "model")
    return w


def _args(ws: Path, out: Path, *extra) -> list[str]:
    return ["prune", "--model", str(ws / "model"), "--data-dir", str(ws / "data"), "--nsamples", "6", "--seqlen", "32",
            "--batch-size", "2", "--eval", "", "--device", "cpu", "--out", str(out), *extra]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], n: int = 2, kill_at: int | None = None, timeout: int = 240, script: str | None = None):
    """n processes with torchrun's environment running the CLI (or ``script``); with ``kill_at`` rank 1 kills itself
    there. [(rc, stderr)] by rank."""
    port, procs = _port(), []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "layerprune", *args] if script is None else [sys.executable, "-c", script, *args]
        if kill_at is not None and rank == 1:
            env["KILL_AT"] = str(kill_at)
            cmd = [sys.executable, "-c", KILLER, *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The block linears' weights of a saved run (one file, or one shard per block under disk offload)."""
    return {k: v for f in sorted(run.glob("*.safetensors")) for k, v in load_file(str(f)).items()
            if "layers" in k and v.dim() == 2}


def _record(run: Path) -> dict:
    return json.loads((run / "layerprune.json").read_text())


def test_shard_and_assign_are_deterministic():
    shards = [World(3, r).shard(8) for r in range(3)]
    assert shards == [slice(0, 3), slice(3, 6), slice(6, 8)]  # disjoint, contiguous, covering, the first ranks larger
    w = World(2, 0)
    assert w.assign([1.0, 5.0, 2.0, 2.0]) == [1, 0, 1, 1]  # longest first, each to the least loaded rank (ties: rank 0)
    assert World().shard(5) == slice(0, 5) and World().assign([3.0, 1.0]) == [0, 0]


CASES = {  # every solver (SlimGPT: block-level, replicated and synced), an allocation with a dense pre-pass, N:M
    "magnitude": dict(method="magnitude", sparsity=0.5), "wanda": dict(method="wanda", sparsity=0.5),
    "sparsegpt": dict(method="sparsegpt", sparsity=0.5),
    "sparsegpt_nm_seq": dict(method="sparsegpt", nm="2:4", true_sequential=True),
    "wanda_owl": dict(method="wanda", sparsity=0.5, allocation="owl"),
    "slimgpt": dict(method="slimgpt", sparsity=0.3)}
# each rank: join the group, prune a fresh copy per case through the Python API; rank 0 saves weights and record
DRIVER = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
from layerprune import api, distributed
logging.disable_progress_bar()
ws, out, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
world = distributed.init("cpu")
tok = AutoTokenizer.from_pretrained(ws + "/model")
calib = api.calibration_set(tok, "c4", 6, 32, 0, ws + "/data")
for name, kw in cases.items():
    m = AutoModelForCausalLM.from_pretrained(ws + "/model").eval()
    rec = api.prune(m, tok, calibration=calib, batch_size=2, progress=False, **kw)
    if world.rank == 0:
        torch.save({k: v for k, v in m.state_dict().items() if "layers" in k}, f"{out}/{name}.pt")
        json.dump(rec, open(f"{out}/{name}.json", "w"), default=str)
distributed.shutdown()
"""


def test_two_ranks_give_one_process_result_for_every_solver(ws, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerprune import api

    res = _launch([str(ws), str(tmp_path), json.dumps(CASES)], script=DRIVER)
    assert [rc for rc, _ in res] == [0, 0], res
    assert res[1][1].strip() == ""  # rank 1 neither logs nor prints
    tok = AutoTokenizer.from_pretrained(ws / "model")
    calib = api.calibration_set(tok, "c4", 6, 32, 0, ws / "data")
    for name, kw in CASES.items():
        m = AutoModelForCausalLM.from_pretrained(ws / "model").eval()
        r1 = api.prune(m, tok, calibration=calib, batch_size=2, progress=False, **kw)
        one = {k: v for k, v in m.state_dict().items() if "layers" in k}
        two = torch.load(tmp_path / f"{name}.pt")
        r2 = json.loads((tmp_path / f"{name}.json").read_text())
        assert one.keys() == two.keys() and all(one[k].shape == two[k].shape for k in one), name
        mats = [k for k in one if one[k].dim() == 2]
        n = sum(one[k].numel() for k in mats)
        masks = sum(int(((one[k] == 0) == (two[k] == 0)).sum()) for k in mats) / n
        close = sum(int(torch.isclose(one[k], two[k], rtol=1e-3, atol=1e-5).sum()) for k in mats) / n
        assert masks >= 0.999 and close >= 0.999, (name, masks, close)
        assert [(r["name"], r["shape"]) for r in r1["layers"]] == [(r["name"], r["shape"]) for r in r2["layers"]]
        assert r2["measured_sparsity"] == pytest.approx(r1["measured_sparsity"], abs=1e-3), name
        assert r1["allocation"]["block"] == pytest.approx(r2["allocation"]["block"], abs=1e-6), name
        d = r2["distributed"]
        assert d["world_size"] == 2 and d["backend"] == "gloo" and len(d["blocks"]) == 4, name
        if kw["method"] != "magnitude":  # the statistics of both shards were summed
            assert d["bytes"]["reduced"] > 0, name
        if kw["method"] == "slimgpt":  # the same heads removed: the structure came from the same statistics
            assert [r.get("heads_removed") for r in r1["layers"]] == [r.get("heads_removed") for r in r2["layers"]]
        else:  # every solve ran on one rank and was broadcast: both ranks contributed weights
            assert d["bytes"]["broadcast"] > 0, name


def test_killed_rank_stops_the_run_with_one_line_and_resume_is_bit_identical(ws, tmp_path):
    args = ["--method", "sparsegpt", "--checkpoint-every", "0"]
    assert [rc for rc, _ in _launch(_args(ws, tmp_path / "full", *args))] == [0, 0]
    (rc0, err0), (rc1, _) = _launch(_args(ws, tmp_path / "cut", *args), kill_at=2)
    assert rc1 == -9 and rc0 == 2
    lines = [x for x in err0.splitlines() if x.strip() and "it/s]" not in x and "block/s" not in x]
    assert "Traceback" not in err0 and len(lines) == 1, err0
    assert lines[0].startswith("layerprune: error: rank 0 of 2: another process of the distributed run stopped")
    state = json.loads((tmp_path / "cut" / ".checkpoint" / "state.json").read_text())
    assert state["next_block"] == 2 and state["world_size"] == 2
    # one process may not continue a 2-process run: one line, before any work
    assert main(_args(ws, tmp_path / "cut", *args, "--resume")) == 2
    res = _launch(_args(ws, tmp_path / "cut", *args, "--resume"))
    assert [rc for rc, _ in res] == [0, 0], res
    assert _record(tmp_path / "cut")["resumed_from_block"] == 2
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_disk_offload_on_two_ranks(ws, tmp_path):
    args = ["--method", "sparsegpt", "--offload", "disk"]
    assert main(_args(ws, tmp_path / "one", *args)) == 0
    res = _launch(_args(ws, tmp_path / "two", *args))
    assert [rc for rc, _ in res] == [0, 0], res
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 4 * 7
    n = sum(v.numel() for v in one.values())
    assert sum(int(((one[k] == 0) == (two[k] == 0)).sum()) for k in one) / n >= 0.999
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())


def test_refusals_come_once_before_any_work(ws, tmp_path):
    res = _launch(_args(ws, tmp_path / "auto", "--allocation", "auto", "--sparsity", "0.5"))
    assert [rc for rc, _ in res] == [2, 2]
    assert res[0][1].strip().startswith("layerprune: error: allocation 'auto' prunes whole copies of the model")
    assert len(res[0][1].strip().splitlines()) == 1 and res[1][1].strip() == ""
    assert not (tmp_path / "auto").exists()


def test_statistics_do_not_depend_on_how_windows_are_grouped():
    """Per-window fp32 products summed in fp64: one batch of 6 windows, batches of 2 and 4, and two 'ranks' of 3
    added in rank order give the same fp32 statistics bit for bit (what makes N processes equal one)."""
    from layerprune.hooks import InputCollector

    x = torch.randn(6, 32, 24) * torch.logspace(-2, 2, 24)  # spread scales: fp32 sums in another order would differ
    want = {"sq_norm", "hessian"}

    def stats(*groups):
        c = InputCollector(want, sample_rows=0)
        for g in groups:
            c.add_batch(g)
        return c

    ref = stats(x).stats()
    for groups in ([x[:2], x[2:4], x[4:]], [x[:4], x[4:]], [x[i:i + 1] for i in range(6)]):
        s = stats(*groups).stats()
        assert torch.equal(s.hessian, ref.hessian) and torch.equal(s.sq_norm, ref.sq_norm)
    a, b = stats(x[:3]), stats(x[3:])  # two shards, summed as World.sum_ordered does (p0 + p1)
    a.sq_sum, a.xtx, a.ntokens = a.sq_sum + b.sq_sum, a.xtx + b.xtx, a.ntokens + b.ntokens
    s = a.stats()
    assert torch.equal(s.hessian, ref.hessian) and torch.equal(s.sq_norm, ref.sq_norm)
    assert s.hessian.dtype == torch.float32 and torch.equal(s.hessian, s.hessian.t())
    fp32 = (x.reshape(-1, 24).t() @ x.reshape(-1, 24)) * (2 / 192)  # the same Hessian to fp32 rounding
    torch.testing.assert_close(s.hessian, fp32, rtol=1e-5, atol=1e-5)
