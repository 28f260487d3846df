"""FedLP over LoRA adapters: masked merge, depth views, client rounds, a simulation that saves a pruned run, deploy."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("peft")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from layerprune.errors import UserError  # noqa: E402
from layerprune.federated import FedLPStrategy, record_bytes, shared_state  # noqa: E402
from layerprune.federated import lora as L  # noqa: E402
from layerprune.federated.apps import client_round  # noqa: E402
from layerprune.federated.run import FedConfig  # noqa: E402
from layerprune.recovery import masks_of  # noqa: E402


@pytest.fixture(autouse=True)
def task_identity(flower_task_identity):
    """Messages built outside a running Flower app need a process identity (conftest.flower_task_identity)."""


def tiny_llama(layers=3, seed=0, prune=0.0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float().eval()
    if prune:
        with torch.no_grad():
            for m in masks_of(model):
                w = model.get_submodule(m).weight
                w.mul_(torch.rand_like(w) >= prune)
    return model


def random_adapters(model, rank=2, seed=0):
    """Adapters with B != 0 (peft starts B at 0, which would make every merge a no-op)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in L.initial_adapters(model, rank, 2.0 * rank).items()}


def test_initial_adapters_cover_every_block_linear_and_leave_the_model():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ad = L.initial_adapters(model, 4, 8.0)
    layout = L.lora_layout(model)
    assert {layout.unit(k) for k in ad} == {"block.0", "block.1", "block.2"}
    assert len(ad) == 2 * len(masks_of(model)) == 2 * 3 * 7
    assert all(torch.count_nonzero(v) == 0 for k, v in ad.items() if ".lora_B." in k)  # merged model = base at round 0
    assert not any("lora" in n for n, _ in model.named_modules()) and not hasattr(model, "peft_config")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dense_merge_matches_peft_and_masked_merge_keeps_zeros_exactly():
    model = tiny_llama(prune=0.5)
    masks = masks_of(model)
    base = L.base_weights(model)
    ad = random_adapters(model)
    x = torch.randint(0, 64, (2, 10))
    pm = L.attach(tiny_llama(prune=0.5), 2, 4.0)
    L.load_adapters(pm, ad)
    with torch.no_grad():
        want = pm(input_ids=x).logits
    L.merge_adapters(model, base, ad, 4.0 / 2, masks=None)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-4, atol=1e-5)
    assert L.zero_pattern_check(model, masks)["pruned_now_nonzero"] > 0  # the dense delta refills pruned weights
    L.merge_adapters(model, base, ad, 2.0, masks=masks)
    check = L.zero_pattern_check(model, masks)
    assert check["pruned_now_nonzero"] == 0 and check["kept_now_zero"] == 0
    assert masks_of(model).keys() == masks.keys() and all(torch.equal(masks_of(model)[k], m) for k, m in masks.items())
    name = next(iter(masks))
    A, B = L.adapter_pairs(ad)[name]
    w = model.get_submodule(name).weight
    torch.testing.assert_close(w[masks[name]], (base[name] + 2.0 * B @ A)[masks[name]])
    L.merge_adapters(model, base, {}, 2.0, masks)  # no adapters: the base comes back
    assert all(torch.equal(model.get_submodule(n).weight, base[n]) for n in base)
    with pytest.raises(ValueError, match="lack their A or B"):
        L.merge_adapters(model, base, {k: v for k, v in ad.items() if ".lora_A." in k}, 2.0)


def test_depth_view_runs_a_prefix_and_restores_the_model():
    from layerprune.federated.depth import prefix_model

    model = tiny_llama(layers=3)
    prefix = prefix_model(model.config, 1)
    assert prefix.load_state_dict(shared_state(model), strict=False).missing_keys in ([], ["lm_head.weight"])
    pm = L.attach(model, 2, 4.0)
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad(), L.depth_view(pm, 1):
        assert model.config.num_hidden_layers == 1
        got = pm(input_ids=x).logits  # B = 0: the adapters add nothing yet
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    with torch.no_grad():
        torch.testing.assert_close(got, prefix.eval()(input_ids=x).logits, rtol=1e-5, atol=1e-6)


TRAIN = {"local_steps": 2, "batch_size": 2, "seqlen": 8, "lr": 1e-2, "seed": 0, "lora_rank": 2, "lora_alpha": 4.0}
IDS = torch.arange(300) % 64


def lora_msg(adapters, depth, scheme="fedavg", keep=0.5):
    conf = ConfigRecord({"server-round": 1, "scheme": scheme, "keep-prob": keep, "depth": depth})
    return RecordDict({"arrays": ArrayRecord.from_torch_state_dict(adapters), "config": conf})


def test_lora_client_rounds_send_only_their_adapters():
    model = tiny_llama()
    ad = L.initial_adapters(model, 2, 4.0)
    layout = L.lora_layout(model)
    pm = L.attach(tiny_llama(), 2, 4.0)
    base = {k: v.clone() for k, v in pm.base_model.model.state_dict().items() if "lora" not in k}
    out = client_round(lora_msg(ad, 3), RecordDict(), None, IDS, TRAIN, 0, lambda: pm)
    sent = out["arrays"].to_torch_state_dict()
    assert sent.keys() == ad.keys()
    assert any(not torch.equal(sent[k], ad[k]) for k in ad if ".lora_B." in k)  # it trained
    assert out["metrics"]["train-seconds"] > 0 and out["metrics"]["peak-rss-mib"] > 0
    frozen = {k: v for k, v in pm.base_model.model.state_dict().items() if "lora" not in k}
    assert all(torch.equal(v, base[k]) for k, v in frozen.items())  # the base never moves
    # hetero depth 1: downloads and trains block 0 only, and sends exactly that
    prefix = {k: v for k, v in ad.items() if layout.unit(k) == "block.0"}
    out = client_round(lora_msg(prefix, 1), RecordDict(), None, IDS, TRAIN, 1, lambda: pm)
    assert set(out["arrays"].keys()) == set(prefix) and out["metrics"]["depth"] == 1
    assert pm.base_model.model.config.num_hidden_layers == 3
    # homo p = 0.5 over many clients: about half of the blocks, whole blocks only
    counts = []
    for pid in range(40):
        keys = client_round(lora_msg(ad, 3, "homo", 0.5), RecordDict(), None, IDS, dict(TRAIN, local_steps=1), pid,
                            lambda: pm)["arrays"].keys()
        units = {layout.unit(k) for k in keys}
        assert sorted(keys) == sorted(k for k in ad if layout.unit(k) in units)
        counts.append(len(units))
    assert 0.3 < np.mean(counts) / 3 < 0.7
    with pytest.raises(ValueError, match="do not fit"):  # a download with a foreign tensor
        client_round(lora_msg({**ad, "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(2, 16)},
                              3), RecordDict(), None, IDS, TRAIN, 0, lambda: pm)


from conftest import FakeGrid  # noqa: E402


def test_strategy_on_adapters_downloads_adapters_only_and_rejects_bad_replies():
    model = tiny_llama()
    ad = {k: v.numpy() for k, v in L.initial_adapters(model, 2, 4.0).items()}
    layout = L.lora_layout(model)
    s = FedLPStrategy(layout, "hetero", depths=[1, 3], min_train_nodes=2, min_available_nodes=2)
    msgs = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in ad.items()}), ConfigRecord(),
                                  FakeGrid([1, 2])))
    sent = {m.metadata.dst_node_id: m for m in msgs}
    assert {layout.unit(k) for k in sent[1].content["arrays"].keys()} == {"block.0"}
    assert set(sent[2].content["arrays"].keys()) == set(ad)
    full_model = record_bytes(ArrayRecord.from_torch_state_dict(shared_state(model)))
    n_ad = sum(v.size for v in ad.values())
    assert 4 * n_ad <= record_bytes(sent[2].content["arrays"]) < min(full_model, 4 * n_ad + 600 * len(ad))  # no base
    k0 = next(k for k in ad if layout.unit(k) == "block.2")
    bad = RecordDict({"arrays": ArrayRecord({k0: Array(ad[k0])}), "metrics": MetricRecord({"num-examples": 5})})
    good_vals = {k: v + 1 for k, v in ad.items() if layout.unit(k) == "block.0"}
    good = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in good_vals.items()}),
                       "metrics": MetricRecord({"num-examples": 5, "train-seconds": 1.5})})
    out, _ = s.aggregate_train(1, [Message(content=bad, reply_to=sent[1]), Message(content=good, reply_to=sent[2])])
    status = {c["partition"]: c for c in s.history[-1]["clients"]}  # node 1: partition 0, depth 1
    assert status[0]["status"] == "rejected" and "depth-1" in status[0]["reason"]
    assert status[1]["status"] == "ok" and status[1]["train_seconds"] == 1.5
    assert s.history[-1]["partitions"] == [0, 1] and s.history[-1]["depths"] == [1, 3]
    out = {k: v.numpy() for k, v in out.items()}
    assert all(np.array_equal(out[k], good_vals[k]) for k in good_vals)
    assert all(np.array_equal(out[k], ad[k]) for k in ad if k not in good_vals)  # nobody sent: kept


def test_config_refuses_before_work():
    with pytest.raises(UserError, match="--lora-rank"):
        FedConfig(lora_rank=-1)
    with pytest.raises(UserError, match="give --lora-rank"):
        FedConfig(save_dir="x")
    rc = {"lora-rank": 4, "lora-alpha": "", "save-dir": "", "force": False}
    cfg = FedConfig.from_run_config(rc)
    assert cfg.lora_rank == 4 and cfg.lora_alpha_value() == 8.0 and cfg.save_dir is None


class ByteTok:
    def encode(self, text):
        return [b % 64 for b in text.encode("utf-8")]


def test_deployed_client_trains_lora_on_its_own_base(monkeypatch):
    """The deployment ClientApp (deploy.client_app) with lora-rank: loads the base itself, sends adapters only."""
    import layerprune.federated.run as run
    from layerprune.federated import deploy

    loads = []
    monkeypatch.setattr(run, "load", lambda cfg: loads.append(cfg.model) or (tiny_llama(seed=5), ByteTok()))
    run._LOADED_BASE.clear()
    monkeypatch.setattr(run, "default_domains", lambda d: {"c4": ["the cat sat on a mat " * 20] * 8})
    rc = {"model": "tiny", "lora-rank": 2, "scheme": "fedavg", "clients": 2, "local-steps": 1, "batch-size": 1,
          "seqlen": 8, "max-client-tokens": 400}
    ad = L.initial_adapters(tiny_llama(seed=5), 2, 4.0)
    msg = Message(content=lora_msg(ad, 3), dst_node_id=7, message_type="train")
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                  run_config=rc)
    reply = deploy._deployed_client(msg, ctx)
    assert set(reply.content["arrays"].keys()) == set(ad)
    assert reply.content["metrics"]["num-examples"] > 0
    assert loads == ["tiny"]  # the base the shards were tokenized with is the one LoRA trains on: loaded once


def test_simulation_recovers_a_pruned_run_keeping_its_zeros(tmp_path):
    """10 non-IID clients, 3 sampled a round, one failing; LoRA homo; the merged result is saved as a run whose zero
    pattern is the starting one, exactly."""
    from layerprune.federated import run_federated
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran over green hills and rivers".split()
    text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    domains = {"c4": [text(40) for _ in range(30)], "wikitext2": [text(30) for _ in range(30)],
               "ptb": [text(20) for _ in range(30)]}
    model = tiny_llama(layers=3, seed=2, prune=0.5)
    model.config.vocab_size = 64
    masks = masks_of(model)
    before = L.base_weights(model)
    sp0 = L.zero_pattern_check(model, masks)["sparsity"]
    save = tmp_path / "recovered"
    res = run_federated(dict(model="tiny", scheme="homo", keep_prob=0.5, clients=10, fraction=0.3, rounds=2,
                             local_steps=2, batch_size=2, seqlen=16, lr=1e-2, lora_rank=2, partition="dirichlet",
                             alpha=0.5, docs_per_client=6, eval_seqlen=16, eval_windows=2, fail_clients=(0, 1, 2, 3),
                             out_dir=str(tmp_path), save_dir=str(save), sim_cpus=1, progress=False),
                        model, ByteTok(), domains, {"toy": text(200)})
    rounds = res["rounds"]
    adapter_bytes = record_bytes(ArrayRecord.from_torch_state_dict(L.initial_adapters(tiny_llama(), 2, 4.0)))
    for r in rounds[1:]:
        assert len(r["clients"]) == 3 and r["masked_sparsity"] == sp0
        assert r["zero_pattern"]["pruned_now_nonzero"] == 0
        assert all(abs(c["down_bytes"] - adapter_bytes) < 0.05 * adapter_bytes for c in r["clients"])
        assert all(c["status"] in ("ok", "failed") for c in r["clients"])
    assert sum(c["status"] == "ok" for r in rounds[1:] for c in r["clients"]) >= 1
    assert res["lora"]["fixed_mask"] and res["lora"]["client_cost"]["3"]["adapter_params"] == res["model"]["params"]
    assert res["saved"]["zero_pattern_identical"]
    rec = json.loads((save / "layerprune.json").read_text())
    assert rec["federated_finetune"]["scheme"] == "homo"
    saved = L.load_saved(str(save))  # ByteTok has no files: weights only
    after = masks_of(saved)
    assert all(torch.equal(after[k], m) for k, m in masks.items())
    changed = any(not torch.equal(saved.get_submodule(k).weight, before[k]) for k in masks)
    ok = sum(c["status"] == "ok" for r in rounds[1:] for c in r["clients"])
    assert changed == (ok > 0)
    with pytest.raises(UserError, match="already holds a layerprune run"):
        run_federated(dict(model="tiny", lora_rank=2, save_dir=str(save), progress=False), model, ByteTok(), domains)


@pytest.mark.parametrize("argv,message", [
    (["fed", "--lora-rank", "-1"], "--lora-rank -1"),
    (["fed", "--save", "{tmp}/new"], "give --lora-rank"),
    (["fed", "--lora-rank", "4", "--save", "{tmp}/mine", "--force"], "did not write"),
    (["fed", "--lora-rank", "4", "--fraction", "1.5"], "--fraction"),
    (["fed", "--fail-clients", "a,b"], "--fail-clients"),
])
def test_fed_cli_refuses_in_one_line(tmp_path, capfd, argv, message):
    from layerprune.cli import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = [x for x in capfd.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()
