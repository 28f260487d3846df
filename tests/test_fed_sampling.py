"""FedLP issue 32: clients sampled by partition ID (seeded by seed and round, the same in every scheme), hetero depths
by partition, personal heads for shallow LoRA clients (kept in the client's state, never sent), reproducible records."""
import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("peft")

from conftest import FakeGrid  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from layerprune.errors import UserError  # noqa: E402
from layerprune.federated import FedLPStrategy, Layout, layout_of, shared_state  # noqa: E402
from layerprune.federated import lora as L  # noqa: E402
from layerprune.federated.apps import client_round, partition_reply  # noqa: E402
from layerprune.federated.run import FedConfig  # noqa: E402
from layerprune.federated.strategy import sample_partitions  # noqa: E402


@pytest.fixture(autouse=True)
def task_identity(flower_task_identity):
    """Messages built outside a running Flower app need a process identity (conftest.flower_task_identity)."""


def tiny_llama(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).float().eval()


LAYOUT = Layout("model.layers", ("model.norm",), 2)
G = {"model.embed_tokens.weight": np.ones((4, 3), np.float32), "model.layers.0.w": np.ones((2, 2), np.float32),
     "model.layers.1.w": np.ones((2, 2), np.float32), "model.norm.weight": np.ones(3, np.float32)}


def planned(strategy, grid, rnd):
    msgs = list(strategy.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in G.items()}), ConfigRecord(), grid))
    return sorted((int(m.content["config"]["partition-id"]), m.metadata.dst_node_id, int(m.content["config"]["depth"]))
                  for m in msgs)


def test_sampling_is_by_partition_and_round_not_by_node_id():
    assert sample_partitions(range(10), 3, 0, 1) == sample_partitions(range(9, -1, -1), 3, 0, 1)
    draws = [sample_partitions(range(10), 3, 0, r) for r in range(1, 9)]
    assert len({tuple(d) for d in draws}) > 4 and all(len(set(d)) == 3 for d in draws)
    assert draws != [sample_partitions(range(10), 3, 1, r) for r in range(1, 9)]  # the seed matters
    # the same partitions in two schemes although Flower gave the partitions other node IDs
    pids = list(range(10))
    rng = np.random.default_rng(5)
    ids_a, ids_b = [int(x) for x in rng.permutation(10_000)[:10]], [int(x) for x in rng.permutation(10_000)[:10]]
    depths = [1, 2, 1, 2, 2, 1, 1, 2, 1, 2]
    a = FedLPStrategy(LAYOUT, "fedavg", fraction_train=0.3, min_train_nodes=3, min_available_nodes=10, seed=7)
    b = FedLPStrategy(LAYOUT, "hetero", depths=depths, fraction_train=0.3, min_train_nodes=3, min_available_nodes=10,
                      seed=7)
    ga, gb = FakeGrid(ids_a, pids), FakeGrid(list(reversed(ids_b)), list(reversed(pids)))
    for rnd in range(1, 6):
        pa, pb = planned(a, ga, rnd), planned(b, gb, rnd)
        assert [p for p, _, _ in pa] == [p for p, _, _ in pb] == sample_partitions(pids, 3, 7, rnd)
        assert all(node == ga.nodes[pid] for pid, node, _ in pa)  # each message goes to that partition's node
        assert all(depth == depths[pid] for pid, _, depth in pb)  # hetero depth: a function of the partition
        assert all(depth == 2 for _, _, depth in pa)
    assert ga.queries == 10  # every node asked once for its partition, not every round


def test_duplicate_or_missing_partition_ids():
    s = FedLPStrategy(LAYOUT, "fedavg", min_train_nodes=2, min_available_nodes=2)
    with pytest.raises(ValueError, match="both report partition-id 0"):
        planned(s, FakeGrid([1, 2], [0, 0]), 1)
    s = FedLPStrategy(LAYOUT, "hetero", depths=[1], min_train_nodes=2, min_available_nodes=2)
    with pytest.raises(ValueError, match="partition 1 has no depth"):
        planned(s, FakeGrid([1, 2]), 1)
    ctx = Context(run_id=1, node_id=3, node_config={"partition-id": 4, "num-partitions": 9}, state=RecordDict(),
                  run_config={})
    msg = Message(content=RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), dst_node_id=3,
                  message_type="query")
    m = next(iter(partition_reply(msg, ctx).content.metric_records.values()))
    assert m["partition-id"] == 4 and m["num-partitions"] == 9


def test_hetero_without_personal_heads_sends_the_global_exit_every_round():
    s = FedLPStrategy(LAYOUT, "hetero", depths=[1, 2], personal_heads=False, min_train_nodes=2, min_available_nodes=2)
    for rnd in (1, 2):
        msgs = {m.metadata.dst_node_id: m for m in s.configure_train(
            rnd, ArrayRecord({k: Array(v) for k, v in G.items()}), ConfigRecord(), FakeGrid([8, 9]))}
        assert "model.norm.weight" in msgs[8].content["arrays"]  # the shallow client exits through the global exit
        assert not msgs[8].content["config"]["personal-exit"] and msgs[8].content["config"]["shallow"]
        assert "model.norm.weight" not in s.plan[8]["allowed"]  # ... and may not send it back
    model = tiny_llama()
    layout = layout_of(model)
    full = shared_state(model)
    sent = {k: v for k, v in full.items() if layout.unit(k) in ("embed", "block.0", "exit")}
    conf = ConfigRecord({"server-round": 1, "scheme": "hetero", "keep-prob": 1.0, "depth": 1, "shallow": True,
                         "personal-exit": False})
    state = RecordDict()
    out = client_round(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(sent), "config": conf}), state,
                       model.config, torch.arange(200) % 64, {**TRAIN, "lora_rank": 0}, 0)
    assert set(out["arrays"].keys()) == {k for k in full if layout.unit(k) in ("embed", "block.0")}
    assert not state.array_records


TRAIN = {"local_steps": 2, "batch_size": 2, "seqlen": 8, "lr": 1e-2, "seed": 0, "lora_rank": 2, "lora_alpha": 4.0,
         "head_steps": 2}
IDS = torch.arange(300) % 64


def lora_msg(adapters, depth, rnd=1, personal=True):
    conf = ConfigRecord({"server-round": rnd, "scheme": "hetero", "keep-prob": 1.0, "depth": depth,
                         "personal-exit": personal, "shallow": True})
    return RecordDict({"arrays": ArrayRecord.from_torch_state_dict(adapters), "config": conf})


def test_personal_exit_starts_as_the_identity_and_restores_the_model():
    model = tiny_llama()
    pm = L.attach(model, 2, 4.0)
    x = torch.randint(0, 64, (1, 8))
    norm = model.model.norm
    with torch.no_grad():
        want = pm(input_ids=x).logits
        with L.personal_exit(pm) as pe:
            assert model.model.norm is pe and isinstance(pe, L.PersonalExit)
            torch.testing.assert_close(pm(input_ids=x).logits, want, rtol=0, atol=0)
            pe.translator.bias.fill_(0.3)
            assert not torch.allclose(pm(input_ids=x).logits, want)
    assert model.model.norm is norm
    assert L.personal_params(model) == 16 * 16 + 16 + 16
    head = model.lm_head
    with torch.no_grad(), L.personal_exit(pm, kind="head-lora", rank=2, alpha=4.0) as pe:
        assert model.model.norm is pe and model.lm_head.head is head
        torch.testing.assert_close(pm(input_ids=x).logits, want, rtol=0, atol=0)  # B = 0: the base exit
        pe.B.fill_(0.1)
        assert not torch.allclose(pm(input_ids=x).logits, want)
    assert model.lm_head is head and model.model.norm is norm
    assert L.personal_params(model, "head-lora", 2) == 2 * (16 + 64) + 16
    cost = L.client_cost(model, 1, 2, 100, personal=True, head_tokens=50)
    plain = L.client_cost(model, 1, 2, 100)
    assert cost["personal_params"] == 288 and plain["personal_params"] == 0 and cost["head_fit_flops"] > 0
    assert cost["train_flops_per_round"] == plain["train_flops_per_round"] + 3 * 2 * 16 * 16 * 100


def test_lora_personal_head_is_trained_kept_per_partition_and_never_sent():
    model = tiny_llama()
    ad = L.initial_adapters(model, 2, 4.0)
    layout = L.lora_layout(model)
    pm = L.attach(tiny_llama(), 2, 4.0)
    prefix = {k: v for k, v in ad.items() if layout.unit(k) == "block.0"}
    state = RecordDict()
    out = client_round(lora_msg(prefix, 1), state, None, IDS, TRAIN, 3, lambda: pm)
    assert set(out["arrays"].keys()) == set(prefix)  # adapters of block 0 only: nothing personal travels
    assert out["metrics"]["personal-params"] == 288 and out["metrics"]["personal-rounds"] == 1
    head = {k: v.numpy().copy() for k, v in state["personal-head"].items()}
    assert set(head) == {"translator.weight", "translator.bias", "norm.weight"}
    assert np.abs(head["translator.weight"]).max() > 0  # trained (it started at zero)
    assert isinstance(pm.base_model.model.model.norm, type(tiny_llama().model.norm))  # the model's norm is back
    # the next round of this partition starts from its own head, and trains it further
    out = client_round(lora_msg(prefix, 1, rnd=2), state, None, IDS, TRAIN, 3, lambda: pm)
    assert out["metrics"]["personal-rounds"] == 2
    assert not np.array_equal(state["personal-head"]["translator.weight"].numpy(), head["translator.weight"])
    with pytest.raises(ValueError, match="trained at depth 1, not 2"):
        client_round(lora_msg({k: v for k, v in ad.items() if layout.unit(k) in ("block.0", "block.1")}, 2), state,
                     None, IDS, TRAIN, 3, lambda: pm)
    # the head-LoRA form: A, B and the norm kept, B trained away from zero
    st = RecordDict()
    out = client_round(lora_msg(prefix, 1), st, None, IDS, {**TRAIN, "personal_head": "head-lora"}, 4, lambda: pm)
    assert set(st["personal-head"].keys()) == {"A", "B", "norm.weight"} and set(out["arrays"].keys()) == set(prefix)
    assert out["metrics"]["personal-params"] == 2 * (16 + 64) + 16 and st["personal-head"]["B"].numpy().any()
    assert isinstance(pm.base_model.model.lm_head, torch.nn.Linear)  # the shared head is back
    # a head changes what the shared adapters learn, but not which ones are sent
    plain = client_round(lora_msg(prefix, 1, personal=False), RecordDict(), None, IDS, TRAIN, 3, lambda: pm)
    assert set(plain["arrays"].keys()) == set(prefix) and "personal-params" not in plain["metrics"]


def test_personal_heads_config_and_cli_refusals(tmp_path, capfd):
    assert FedConfig(scheme="hetero").personal_heads and not FedConfig(scheme="homo").personal_heads
    assert not FedConfig(scheme="hetero", personal_heads=False).personal_heads
    with pytest.raises(UserError, match="head-lora is a LoRA-mode head"):
        FedConfig(scheme="hetero", personal_head="head-lora")
    with pytest.raises(UserError, match="--personal-heads is for --scheme hetero"):
        FedConfig(scheme="fedavg", personal_heads=True)
    assert FedConfig.from_run_config({"scheme": "hetero", "personal-heads": "false"}).personal_heads is False
    assert FedConfig.from_run_config({"scheme": "hetero", "personal-heads": ""}).personal_heads is True
    from layerprune.cli import main

    for argv, msg in ((["fed", "--scheme", "homo", "--personal-heads"], "--personal-heads is for"),
                      (["fed", "--scheme", "hetero", "--head-steps", "-1"], "--head-steps -1")):
        code = main(argv + ["--out", str(tmp_path)])
        err = [x for x in capfd.readouterr().err.splitlines() if x.strip()]
        assert code == 2 and len(err) == 1 and msg in err[0], err


# --- simulations: the records (Ray start-up dominates, ~20 s each) --------------------------------------------------
class ByteTok:
    def encode(self, text):
        return [b % 64 for b in text.encode("utf-8")]


TIMINGS = {"elapsed_s", "round_seconds", "seconds", "train_seconds", "peak_rss_mib", "client_train_seconds_mean",
           "client_train_seconds_max", "mean_round_seconds", "client_peak_rss_mib", "wall_s"}


def untimed(x):
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [untimed(v) for v in x]
    return x


def simulate(scheme, **kw):
    from layerprune.federated import run_federated

    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran over green hills and rivers".split()
    text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    domains = {"c4": [text(40) for _ in range(30)], "wikitext2": [text(30) for _ in range(30)],
               "ptb": [text(20) for _ in range(30)]}
    cfg = dict(model="tiny", scheme=scheme, clients=5, fraction=0.6, rounds=3, local_steps=2, batch_size=2, seqlen=16,
               lr=1e-2, lora_rank=2, partition="dirichlet", docs_per_client=6, eval_seqlen=16, eval_windows=2,
               sim_cpus=2, progress=False, seed=3, **kw)
    return run_federated(cfg, tiny_llama(layers=4, seed=2), ByteTok(), domains, {"toy": text(200)})


def test_same_seed_same_partitions_in_every_scheme_and_identical_reruns(tmp_path):
    het = simulate("hetero", depth_flag=None)
    again = simulate("hetero", depth_flag=None)
    avg = simulate("fedavg")
    parts = [r["partitions"] for r in het["rounds"][1:]]
    assert parts == [r["partitions"] for r in avg["rounds"][1:]] == [sample_partitions(range(5), 3, 3, r)
                                                                      for r in (1, 2, 3)]
    assert all(len(p) == 3 for p in parts) and len({tuple(p) for p in parts}) > 1
    for r in het["rounds"][1:]:
        assert r["depths"] == [het["client_depths"][p] for p in r["partitions"]]
        assert [c["partition"] for c in r["clients"]] == r["partitions"]
        assert all(c["status"] == "ok" for c in r["clients"])
        assert "depths" not in avg["rounds"][1]
    assert untimed(het) == untimed(again)  # PPL, bytes, clients: identical apart from timings
    assert het["summary"]["final_ppl"] != avg["summary"]["final_ppl"]
    # personal heads: kept per partition across rounds (Flower's context state), counted apart from communication
    shallow = [c for r in het["rounds"][1:] for c in r["clients"] if c["depth"] < 4]
    assert shallow and all(c["personal_params"] == 288 for c in shallow)
    seen = {}
    for r in het["rounds"][1:]:
        for c in r["clients"]:
            if c["depth"] < 4:
                seen[c["partition"]] = seen.get(c["partition"], 0) + 1
                assert c["personal_rounds"] == seen[c["partition"]]
    assert het["personal"]["partitions"] == sorted(seen) and het["personal"]["params_total"] == 288 * len(seen)
    assert het["personal"]["sent_bytes"] == 0 and avg["personal"] is None
    assert het["lora"]["client_cost"]["1"]["personal_params"] == 288
    assert het["lora"]["client_cost"]["4"]["personal_params"] == 0
    # the bench's check over a JSON of several runs, and its table (issue 32: same partitions in every row)
    import copy

    from bench.fedlp_lora import table_md
    from bench.fedlp_partitions import check, main

    plain = copy.deepcopy(het)
    plain["config"]["personal_heads"], plain["personal"] = False, None
    plain["summary"]["final_ppl"] = {k: v * 1.5 for k, v in het["summary"]["final_ppl"].items()}
    assert check([avg, het, plain]) == []
    md = table_md([avg, plain, het], FedConfig(**{k: v for k, v in het["config"].items()}), 1.0, "Code: test")
    assert "the same in every row" in md and "Hetero(u) + personal heads" in md and "of Hetero's gap closed" in md
    moved = copy.deepcopy(avg)
    moved["rounds"][2]["partitions"] = [0, 1, 2]
    assert "round(s) [2]" in check([het, moved])[0] and "without recorded" in check([{"rounds": [{"round": 1}]}])[0]
    path = tmp_path / "runs.json"
    path.write_text(__import__("json").dumps({"runs": [avg, het, moved]}))
    assert main([str(path)]) == 1
    path.write_text(__import__("json").dumps({"runs": [avg, het]}))
    assert main([str(path)]) == 0


def test_cli_fed_twice_with_one_seed_gives_identical_partitions_and_ppl(tmp_path, text_corpus, capsys):
    """`layerprune fed ... --seed 0` twice (full weights, hetero, personal exits by default): same record apart from
    timings; a third run without personal heads trains the same partitions at the same depths."""
    import json

    from conftest import tiny_model, tiny_tokenizer

    from layerprune.cli import main

    model_dir = tmp_path / "model"
    tiny_model("llama", layers=4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    args = ["fed", "--model", str(model_dir), "--data-dir", str(text_corpus), "--scheme", "hetero", "--clients", "4",
            "--fraction", "0.5", "--rounds", "3", "--local-steps", "1", "--batch-size", "1", "--seqlen", "16",
            "--eval-windows", "2", "--eval-seqlen", "16", "--max-client-tokens", "400", "--seed", "0", "--lr", "1e-3"]
    recs = []
    for i, extra in enumerate(([], [], ["--no-personal-heads"])):
        out = tmp_path / f"out{i}"
        assert main(args + extra + ["--out", str(out)]) == 0
        recs.append(json.loads((out / "fed_hetero.json").read_text()))
    capsys.readouterr()
    a, b, c = recs
    assert a["rounds"][1]["partitions"] and a["config"]["personal_heads"] and not c["config"]["personal_heads"]
    assert [r.get("partitions") for r in a["rounds"]] == [r.get("partitions") for r in c["rounds"]]
    assert [r.get("depths") for r in a["rounds"]] == [r.get("depths") for r in c["rounds"]]
    assert [r["ppl"] for r in a["rounds"]] == [r["ppl"] for r in b["rounds"]]
    strip = lambda r: {**untimed(r), "config": {**r["config"], "out_dir": None}}  # noqa: E731
    assert strip(a) == strip(b)
    shallow = [cl for r in a["rounds"][1:] for cl in r["clients"] if cl["depth"] < 4]
    assert all(cl["personal_params"] == 64 for cl in shallow)  # the final norm (the head is tied to the embedding)
