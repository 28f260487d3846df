"""FedLP: paper arithmetic, layer-wise aggregation, hetero prefixes, masks, partitions, one simulation."""
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from layerprune.errors import UserError  # noqa: E402
from layerprune.federated import (  # noqa: E402
    FedLPStrategy, Layout, depth_probs, dirichlet_shards, draw_depths, fedavg_params, fixed_masks,
    hetero_params, homo_params, iid_shards, layout_of, record_bytes, shared_state,
)
from layerprune.federated.apps import client_round  # noqa: E402
from layerprune.federated.strategy import masked_sparsity  # noqa: E402

# --- the paper's arithmetic (README of Zhuzzq/FedLP, CIFAR CNN, 551,466 parameters) ---------------------
CNN = 551_466
PREFIX = [10_272, 28_896, 65_952, 140_064, 551_466]


def test_paper_communication_arithmetic():
    assert round(fedavg_params(CNN) / 1e3, 2) == 1102.93
    for p, want in [(0.1, 606.61), (0.3, 716.91), (0.5, 827.20), (0.7, 937.49)]:
        assert round(homo_params(CNN, p) / 1e3, 2) == pytest.approx(want, abs=1e-9)
    assert round(hetero_params(PREFIX, depth_probs(5, 1)) / 1e3, 2) == 169.60
    assert round(hetero_params(PREFIX, depth_probs(5, None)) / 1e3, 2) == 318.66
    # the other README rows follow from the same law
    assert round(hetero_params(PREFIX, depth_probs(5, 3)) / 1e3, 2) == 225.28
    assert round(hetero_params(PREFIX, depth_probs(5, 5)) / 1e3, 2) == 710.80
    assert depth_probs(5, 2) == pytest.approx([0.1, 0.6, 0.1, 0.1, 0.1])
    with pytest.raises(UserError):
        depth_probs(5, 6)


def test_record_bytes_counts_the_payload():
    full = ArrayRecord({"a": Array(np.zeros((64, 64), np.float32)), "b": Array(np.ones(10, np.float32))})
    half = ArrayRecord({"a": full["a"]})
    assert record_bytes(full) > record_bytes(half) >= 64 * 64 * 4
    assert record_bytes(full) - 64 * 64 * 4 - 10 * 4 < 2048  # headers only


# --- strategy on hand-made replies -------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def task_identity(flower_task_identity):
    """Messages built outside a running Flower app need a process identity (conftest.flower_task_identity)."""


LAYOUT = Layout("model.layers", ("model.norm",), 2)


from conftest import FakeGrid  # noqa: E402


def global_arrays(rng):
    return {"model.embed_tokens.weight": rng.standard_normal((4, 3)).astype(np.float32),
            "model.layers.0.w": rng.standard_normal((2, 2)).astype(np.float32),
            "model.layers.1.w": rng.standard_normal((2, 2)).astype(np.float32),
            "model.norm.weight": rng.standard_normal(3).astype(np.float32)}


def start_round(strategy, g, nodes, rnd=1):
    msgs = list(strategy.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in g.items()}), ConfigRecord(),
                                         FakeGrid(nodes)))
    return {m.metadata.dst_node_id: m for m in msgs}


def reply(instr, arrays, n=1):
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})})
    return Message(content=content, reply_to=instr)


def as_np(record):
    return {k: v.numpy() for k, v in record.items()}


@pytest.mark.parametrize("weighted", [True, False])
def test_layerwise_mean_and_keep_previous(weighted):
    rng = np.random.default_rng(0)
    g = global_arrays(rng)
    s = FedLPStrategy(LAYOUT, "homo", 0.5, weighted=weighted, min_train_nodes=3, min_available_nodes=3)
    instr = start_round(s, g, [11, 12, 13])
    assert sorted(instr) == [11, 12, 13]
    a = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()}
    b = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()}
    e, l0, l1, nrm = g
    replies = [reply(instr[11], {e: a[e], l0: a[l0]}, n=1), reply(instr[12], {l0: b[l0], nrm: b[nrm]}, n=3),
               reply(instr[13], {}, n=2)]
    out, metrics = s.aggregate_train(1, replies)
    out = as_np(out)
    wa, wb = (1.0, 3.0) if weighted else (1.0, 1.0)
    np.testing.assert_allclose(out[l0], (wa * a[l0] + wb * b[l0]) / (wa + wb), rtol=1e-6)
    np.testing.assert_array_equal(out[e], a[e])
    np.testing.assert_array_equal(out[nrm], b[nrm])
    np.testing.assert_array_equal(out[l1], g[l1])  # nobody sent block 1
    assert s.history[-1]["kept_previous_units"] == ["block.1"]
    assert metrics["clients-accepted"] == 3


def test_bad_replies_are_rejected_with_reason(caplog):
    rng = np.random.default_rng(1)
    g = global_arrays(rng)
    s = FedLPStrategy(LAYOUT, "fedavg", min_train_nodes=3, min_available_nodes=3)
    instr = start_round(s, g, [1, 2, 3, 4])
    good = {k: v + 1 for k, v in g.items()}
    replies = [reply(instr[1], {"model.layers.0.w": np.zeros((3, 2), np.float32)}),
               reply(instr[2], {"model.layers.9.w": np.zeros((2, 2), np.float32)}),
               reply(instr[3], {"model.layers.0.w": np.full((2, 2), np.nan, np.float32)})]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        out, _ = s.aggregate_train(1, replies)
    assert out is None  # nothing accepted: the caller keeps the previous global model
    status = {c["partition"]: c for c in s.history[-1]["clients"]}  # nodes 1..4 hold partitions 0..3
    assert [status[n]["status"] for n in (0, 1, 2, 3)] == ["rejected", "rejected", "rejected", "timeout"]
    assert "shape (3, 2)" in status[0]["reason"] and "unknown key" in status[1]["reason"]
    assert "non-finite" in status[2]["reason"]
    assert "rejected reply from node 1" in caplog.text and "unknown key" in caplog.text
    # one good reply next to a bad one: the result is exactly the good one
    instr = start_round(s, g, [1, 2, 3], rnd=2)
    out, _ = s.aggregate_train(2, [reply(instr[1], good),
                                   reply(instr[2], {**good, "lm_head.weight": g["model.norm.weight"]})])
    for k, v in as_np(out).items():
        np.testing.assert_array_equal(v, good[k])


def test_hetero_prefix_download_and_aggregation():
    rng = np.random.default_rng(2)
    g = global_arrays(rng)
    s = FedLPStrategy(LAYOUT, "hetero", depths=[1, 2], min_train_nodes=2, min_available_nodes=2)
    instr = start_round(s, g, [5, 6])
    sent = {n: set(m.content["arrays"].keys()) for n, m in instr.items()}
    assert sent[5] == {"model.embed_tokens.weight", "model.layers.0.w", "model.norm.weight"}  # exit sent once
    assert sent[6] == set(g)
    assert instr[5].content["config"]["personal-exit"] and not instr[6].content["config"]["personal-exit"]
    a = {k: v * 2 for k, v in g.items()}
    b = {k: v * 4 for k, v in g.items()}
    shallow = {k: a[k] for k in ("model.embed_tokens.weight", "model.layers.0.w")}
    out, _ = s.aggregate_train(1, [reply(instr[5], shallow, n=1), reply(instr[6], b, n=1)])
    out = as_np(out)
    np.testing.assert_allclose(out["model.layers.0.w"], 3 * g["model.layers.0.w"], rtol=1e-6)
    np.testing.assert_allclose(out["model.layers.1.w"], 4 * g["model.layers.1.w"], rtol=1e-6)  # only the deep client
    np.testing.assert_allclose(out["model.norm.weight"], 4 * g["model.norm.weight"], rtol=1e-6)
    # round 2: the shallow client no longer gets the exit and may not send block 1 or the exit
    instr = start_round(s, {k: v for k, v in out.items()}, [5, 6], rnd=2)
    assert set(instr[5].content["arrays"].keys()) == {"model.embed_tokens.weight", "model.layers.0.w"}
    out2, _ = s.aggregate_train(2, [reply(instr[5], {"model.layers.1.w": a["model.layers.1.w"]})])
    assert out2 is None and "depth-1" in s.history[-1]["clients"][0]["reason"]


def test_depth_draws_follow_the_law():
    d = draw_depths(4000, [1, 2, 3, 4, 5], 1, seed=0)
    assert d == draw_depths(4000, [1, 2, 3, 4, 5], 1, seed=0)
    assert abs(d.count(1) / 4000 - 0.6) < 0.03 and abs(d.count(4) / 4000 - 0.1) < 0.02


# --- clients on a tiny LLaMA --------------------------------------------------------------------------------
def tiny_llama(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt", "gpt2"])
def test_truncation_keeps_the_first_blocks(family):
    """--num-blocks: the adapter keeps the first n blocks in place and the config follows (gemma3: its layer_types);
    a fresh model of the truncated config (a hetero client's prefix) holds exactly those tensors and computes the
    same."""
    from conftest import tiny_model

    from layerprune.federated.depth import prefix_model
    from layerprune.federated.run import truncate_blocks

    model = tiny_model(family, layers=4, real=True).float()
    config, dense = model.config.to_dict(), shared_state(model)
    assert truncate_blocks(model, 2) is model and layout_of(model).n_blocks == model.config.num_hidden_layers == 2
    if family == "gemma3":
        assert model.config.layer_types == config["layer_types"][:2]
    kept = shared_state(model)
    assert {layout_of(model).unit(k) for k in kept} == {"embed", "block.0", "block.1", "exit"}
    assert all(torch.equal(v, dense[k]) for k, v in kept.items())
    prefix = prefix_model(type(model.config)(**config), 2)
    assert prefix.config.to_dict() == model.config.to_dict() and prefix.load_state_dict(kept, strict=False)[1] == []
    x = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(prefix.eval()(x).logits, model.eval()(x).logits, rtol=0, atol=0)
    with pytest.raises(UserError, match="--num-blocks 3 is outside 1..2"):
        truncate_blocks(model, 3)


def test_unsupported_family_is_refused_without_fallback():
    model = tiny_llama()
    model.config.model_type = "mystery"  # LLaMA paths, but no adapter claims it
    with pytest.raises(UserError, match="architecture 'mystery' is not supported"):
        layout_of(model)


def test_flower_app_components_exist():
    """The deployment app definition names the deploy module's apps (imports: deploy -> run -> apps)."""
    import importlib
    import tomllib
    from pathlib import Path

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    import layerprune.federated as fed

    toml = tomllib.loads((Path(fed.__file__).parent / "flwr_app" / "pyproject.toml").read_text())
    comp = toml["tool"]["flwr"]["app"]["components"]
    for key, cls in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, attr = comp[key].split(":")
        assert isinstance(getattr(importlib.import_module(module), attr), cls)


def train_msg(state, depth, scheme="fedavg", **cfg):
    conf = ConfigRecord({"server-round": 1, "scheme": scheme, "keep-prob": 0.5, "depth": depth, **cfg})
    return RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state), "config": conf})


TRAIN = {"local_steps": 2, "batch_size": 2, "seqlen": 8, "lr": 1e-2, "seed": 0}
IDS = torch.arange(200) % 64


def test_shallow_client_keeps_its_exit_personal():
    model = tiny_llama()
    layout = layout_of(model)
    assert layout == Layout("model.layers", ("model.norm",), 3)
    full = shared_state(model)
    assert "lm_head.weight" not in full  # tied: travels with the embedding
    prefix = {k: v for k, v in full.items() if layout.unit(k) in ("embed", "block.0", "exit")}
    state = RecordDict()
    out = client_round(train_msg(prefix, 1, **{"personal-exit": True, "exit-init": True}),
                       state, model.config, IDS, TRAIN, 0)
    keys = set(out["arrays"].keys())
    assert keys == {k for k in full if layout.unit(k) in ("embed", "block.0")}
    assert set(state["personal"].keys()) == {"model.norm.weight"}
    norm = state["personal"]["model.norm.weight"].numpy()
    assert not np.array_equal(norm, full["model.norm.weight"].numpy())  # trained locally, kept locally


def test_masks_survive_local_training_and_aggregation():
    model = tiny_llama(seed=1)
    layout = layout_of(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and layout.unit(n).startswith("block."):
                p.mul_(torch.rand_like(p) > 0.5)
    state = shared_state(model)
    masks = fixed_masks(state, layout)
    assert masks is not None and fixed_masks(shared_state(tiny_llama()), layout) is None  # dense: no masks
    init = {k: v.numpy().copy() for k, v in state.items()}
    s0 = masked_sparsity(init, masks)
    assert 0.45 < s0 < 0.55
    s = FedLPStrategy(layout, "fedavg", masks=masks, min_train_nodes=2, min_available_nodes=2)
    instr = start_round(s, init, [1, 2])
    r1 = client_round(train_msg(state, 3, masks=True), RecordDict(), model.config, IDS, TRAIN, 0)
    sent = as_np(r1["arrays"])
    assert any(not np.array_equal(sent[k], init[k]) for k in masks)  # it did train
    assert masked_sparsity(sent, masks) == s0
    leaky = {k: v + 0.5 for k, v in init.items()}  # a client that ignored the masks
    out, _ = s.aggregate_train(1, [reply(instr[1], sent, n=5), reply(instr[2], leaky, n=5)])
    assert masked_sparsity(as_np(out), masks) == s0 == s.history[-1]["masked_sparsity"]


# --- partitions ---------------------------------------------------------------------------------------------
def test_partitions_are_reproducible():
    docs = [f"doc{i}" for i in range(23)]
    shards = iid_shards(docs, 4, seed=3)
    assert sorted(sum(shards, [])) == sorted(docs) and [len(x) for x in shards] == [6, 6, 6, 5]
    assert shards == iid_shards(docs, 4, seed=3) and shards != iid_shards(docs, 4, seed=4)
    domains = {"c4": [f"c{i}" for i in range(30)], "wiki": [f"w{i}" for i in range(30)],
               "ptb": [f"p{i}" for i in range(5)]}
    a, ca = dirichlet_shards(domains, 5, alpha=0.3, docs_per_client=12, seed=7)
    b, cb = dirichlet_shards(domains, 5, alpha=0.3, docs_per_client=12, seed=7)
    assert a == b and ca == cb and a != dirichlet_shards(domains, 5, alpha=0.3, docs_per_client=12, seed=8)[0]
    for shard, count in zip(a, ca):
        assert len(shard) == 12 == sum(count.values())
        assert all(sum(d.startswith(n[0]) for d in shard) == count[n] for n in domains)
    with pytest.raises(UserError):
        iid_shards(docs[:2], 3)


# --- one end-to-end simulation (Ray start-up dominates: ~20 s) -----------------------------------------------
class ByteTok:
    def encode(self, text):
        return [b % 64 for b in text.encode("utf-8")]


def test_simulation_drops_failing_client_and_homo_moves_less(tmp_path):
    from layerprune.federated import run_federated

    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran over green hills and rivers".split()
    text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    domains = {"c4": [text(40) for _ in range(12)]}
    model = tiny_llama(layers=3, seed=2)
    full_bytes = record_bytes(ArrayRecord.from_torch_state_dict(shared_state(model)))
    res = run_federated(dict(scheme="homo", keep_prob=0.5, clients=3, rounds=2, local_steps=2, batch_size=2, seqlen=16,
                             lr=1e-2, eval_seqlen=16, eval_windows=4, fail_clients=(2,), out_dir=str(tmp_path),
                             progress=False), model, ByteTok(), domains, {"toy": text(200)})
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["accepted"] == 2 and len(r["clients"]) == 3
        failed = [c for c in r["clients"] if c["status"] == "failed"]
        assert len(failed) == 1 and "injected failure" in failed[0]["reason"] and failed[0]["up_bytes"] == 0
        assert all(c["down_bytes"] == full_bytes or abs(c["down_bytes"] - full_bytes) < 1024 for c in r["clients"])
        assert r["fedavg_bytes"] == sum(c["fedavg_bytes"] for c in r["clients"])
    ok = [c for r in rounds[1:] for c in r["clients"] if c["status"] == "ok"]
    assert all(c["up_bytes"] <= full_bytes + 1024 for c in ok) and sum(c["up_bytes"] for c in ok) < len(ok) * full_bytes
    s = res["summary"]
    assert s["total_bytes"] < s["fedavg_equivalent_bytes"]
    assert all(np.isfinite(v) for v in s["final_ppl"].values())
    assert (tmp_path / "fed_homo.json").is_file() and (tmp_path / "fed_homo.png").stat().st_size > 1000
