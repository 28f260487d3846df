"""Disk offload: lazy loading, block round trips through disk, and the streaming sharded save."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from layerprune.errors import UserError
from layerprune.models.adapters import get_adapter
from layerprune.offload import (DiskStore, MemoryStore, current_rss_mb, load_model_lazy, peak_rss_mb,
                                read_safetensors, resolve_safetensors_dir)

N_BLOCKS = 3


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=N_BLOCKS,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
        return LlamaForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=N_BLOCKS, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


@pytest.fixture(params=[("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)],
                ids=["llama-single", "llama-sharded", "gpt2-single", "gpt2-sharded"])
def saved(request, tmp_path):
    kind, sharded = request.param
    src = tmp_path / "src"
    _tiny(kind).save_pretrained(src, **({"max_shard_size": "20KB"} if sharded else {}))
    assert (src / "model.safetensors.index.json").is_file() == sharded
    return src


def _ids():
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


def _modify(model, i: int) -> None:
    """Zero the first half of every linear weight of block i (a stand-in for pruning), scale its norms."""
    block = get_adapter(model).blocks(model)[i]
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.dim() == 2:
                p[: p.shape[0] // 2] = 0
            else:
                p.mul_(1.5)


def test_lazy_load_matches_full_load(saved):
    ref = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    model, tok, store = load_model_lazy(saved, torch.float32)
    assert tok is None and isinstance(store, DiskStore)
    ad = get_adapter(model)
    # blocks hold no storage; the rest is real and equal to the full load, buffers included
    for k, t in model.state_dict().items():
        if k.startswith(ad.blocks_path + "."):
            assert t.device.type == "meta", k
        else:
            assert torch.equal(t, ref.state_dict()[k]), k
    for (k, b), (k2, b2) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert k == k2 and b.dtype == b2.dtype and torch.equal(b, b2), k
    assert (model.lm_head.weight is ad.embeddings(model)[0].weight) == ref.config.tie_word_embeddings
    for i in range(N_BLOCKS):
        store.onload(model, i, "cpu")
    assert torch.equal(_logits(model), _logits(ref))


def test_dtype_cast_on_lazy_load(saved):
    ref = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16).eval()
    model, _, store = load_model_lazy(saved, "bfloat16")
    for i in range(N_BLOCKS):
        store.onload(model, i, "cpu")
    sd = model.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert all(torch.equal(t, ref.state_dict()[k]) for k, t in sd.items())
    assert torch.equal(_logits(model), _logits(ref))


def test_offload_keeps_modified_block(saved):
    model, _, store = load_model_lazy(saved, torch.float32)
    ad = get_adapter(model)
    store.onload(model, 1, "cpu")
    _modify(model, 1)
    want = {k: t.clone() for k, t in ad.blocks(model)[1].state_dict().items()}
    store.offload(model, 1)
    block = ad.blocks(model)[1]
    assert all(t.device.type == "meta" for t in block.state_dict().values())
    assert store.block_file(1).is_file() and store.modified == {1}
    with pytest.raises(RuntimeError):
        store.offload(model, 1)  # already off
    store.onload(model, 1, "cpu")
    got = block.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # an untouched block still comes from the source checkpoint
    store.onload(model, 0, "cpu")
    ref = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    ref0 = ad.blocks(ref)[0].state_dict()
    assert all(torch.equal(t, ref0[k]) for k, t in ad.blocks(model)[0].state_dict().items())


def test_streaming_save_loads_with_stock_from_pretrained(saved, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    model, _, store = load_model_lazy(saved, torch.float32, work_dir=tmp_path / "work")
    ad = get_adapter(model)
    # block 0: modified and offloaded; block 1: modified and still onloaded; block 2: never touched
    for i in (0, 1):
        store.onload(model, i, "cpu")
        _modify(model, i)
        _modify(ref, i)
    store.offload(model, 0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale")  # an old single-file save must not shadow the shards
    store.save_pretrained(model, out)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    assert len(shards) == N_BLOCKS + 1 and set(index["weight_map"].values()) == set(shards)
    tied = ref.config.tie_word_embeddings
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()

    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is type(ref)
    want, got = ref.state_dict(), back.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (back.lm_head.weight is ad.embeddings(back)[0].weight) == tied
    assert torch.equal(_logits(back), _logits(ref))


def test_streaming_save_keeps_requested_dtype(saved, tmp_path):
    model, _, store = load_model_lazy(saved, torch.bfloat16)
    store.save_pretrained(model, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in back.state_dict().values())
    ref = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    assert all(torch.equal(t, ref.state_dict()[k]) for k, t in back.state_dict().items())


def test_memory_store_round_trip(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    store = MemoryStore()
    store.onload(model, 2, "cpu")
    _modify(model, 2)
    store.offload(model, 2)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    store.save_pretrained(model, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    want = model.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in back.state_dict().items())
    assert torch.equal(_logits(back), _logits(model))


def test_resolve_and_errors(tmp_path):
    src = tmp_path / "m"
    _tiny("llama").save_pretrained(src)
    assert resolve_safetensors_dir(src) == src
    assert resolve_safetensors_dir(tmp_path) is None  # no config.json
    (src / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    assert resolve_safetensors_dir(src) is None
    with pytest.raises(UserError):
        load_model_lazy(src, torch.float32)
    with pytest.raises(UserError):
        load_model_lazy(tmp_path / "nope", torch.float32)


def test_rss_helpers():
    assert 0 < current_rss_mb() <= peak_rss_mb() + 1


def test_checkpoint_keys_without_base_prefix(tmp_path):
    """Old GPT-2 checkpoints store "h.0.attn..." instead of "transformer.h.0.attn..."."""
    from safetensors.torch import save_file
    ref = _tiny("gpt2").eval()
    src = tmp_path / "legacy"
    ref.config.save_pretrained(src)
    sd = {k.removeprefix("transformer."): t.contiguous() for k, t in ref.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    model, _, store = load_model_lazy(src, torch.float32)
    for i in range(N_BLOCKS):
        store.onload(model, i, "cpu")
    assert torch.equal(_logits(model), _logits(ref))
    store.save_pretrained(model, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert torch.equal(_logits(back), _logits(ref))


def test_read_safetensors_matches_library(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(4, 2, generator=g).bfloat16(),
               "f16": torch.randn(7, generator=g).half(), "i64": torch.arange(6).reshape(2, 3),
               "scalar": torch.tensor(2.5), "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    want, got = load_file(tmp_path / "x.safetensors"), read_safetensors(tmp_path / "x.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k
    assert read_safetensors(tmp_path / "x.safetensors", ["i64"]).keys() == {"i64"}
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
    with pytest.raises(UserError):
        read_safetensors(tmp_path / "cut.safetensors")


def test_prune_with_disk_store_and_checkpoints_matches_in_memory(saved, tmp_path):
    """The CLI's --offload disk path: lazy blocks, per-block checkpoints (written before each block leaves memory),
    streaming save; the result equals an in-memory prune, and a resume from the checkpoint gives the same weights."""
    from layerprune import prune

    x = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2))
    ref = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    prune(ref, calibration=x, method="wanda", sparsity=0.5, progress=False)
    model, _, store = load_model_lazy(saved, torch.float32, work_dir=tmp_path / "work")
    run = tmp_path / "run"
    prune(model, calibration=x, method="wanda", sparsity=0.5, offload="disk", store=store, out_dir=run,
          progress=False, checkpoint_every=0)
    state = json.loads((run / ".checkpoint" / "state.json").read_text())
    assert state["next_block"] == N_BLOCKS
    store.save_pretrained(model, tmp_path / "saved")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    want = ref.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    from safetensors.torch import load_file

    blk = load_file(str(run / ".checkpoint" / "block_0000.safetensors"))
    ref0 = get_adapter(ref).blocks(ref)[0].state_dict()
    assert all(torch.equal(v, ref0[k]) for k, v in blk.items())


def test_bound_store_writes_final_shards_once_and_resumes(saved, tmp_path):
    """DiskStore.bind: pruned blocks are written once, as the run's final shards (the checkpoint holds no block
    copy); the saved run equals an in-memory prune; a run stopped after block 1 resumes from those shards, and a shard
    written after the last commit is not taken as pruned."""
    from safetensors.torch import load_file

    from layerprune import prune

    x = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2))
    ref = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    prune(ref, calibration=x, method="sparsegpt", sparsity=0.5, progress=False)
    want = ref.state_dict()

    run = tmp_path / "run"
    model, _, store = load_model_lazy(saved, torch.float32)
    store.bind(run, torch.float32)
    prune(model, calibration=x, method="sparsegpt", sparsity=0.5, offload="disk", store=store, out_dir=run,
          progress=False, checkpoint_every=0)
    assert not list((run / ".checkpoint").glob("block_*"))  # no second copy of the blocks
    before = {p.name: p.read_bytes() for p in run.glob("model-*.safetensors")}
    assert len(before) == N_BLOCKS
    store.save_pretrained(model, run)
    assert all(run.joinpath(n).read_bytes() == b for n, b in before.items())  # kept in place, not rewritten
    back = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())

    # an interrupted run: block 0 committed; block 1 offloaded (its shard written) but never committed
    from safetensors.torch import save_file

    from layerprune.checkpoint import Checkpoint

    run2 = tmp_path / "run2"
    model2, _, store2 = load_model_lazy(saved, torch.float32)
    store2.bind(run2, torch.float32)
    real, calls = Checkpoint.save, {"n": 0}

    def stop_at_second(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    Checkpoint.save = stop_at_second
    try:
        with pytest.raises(KeyboardInterrupt):
            prune(model2, calibration=x, method="sparsegpt", sparsity=0.5, offload="disk", store=store2,
                  out_dir=run2, progress=False, checkpoint_every=0)
    finally:
        Checkpoint.save = real
    assert json.loads((run2 / ".checkpoint" / "state.json").read_text())["next_block"] == 1
    shard1 = store2.block_file(1)
    assert shard1.is_file()
    save_file({k: torch.full_like(t, 7.0) for k, t in load_file(str(shard1)).items()}, str(shard1))  # not to be used
    model3, _, store3 = load_model_lazy(saved, torch.float32)
    store3.bind(run2, torch.float32)
    prune(model3, calibration=x, method="sparsegpt", sparsity=0.5, offload="disk", store=store3, out_dir=run2,
          resume=True, progress=False)
    store3.save_pretrained(model3, run2)
    back = AutoModelForCausalLM.from_pretrained(run2, dtype=torch.float32)
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma3", "qwen3", "granite"])
def test_structured_prune_under_disk_offload_matches_in_memory_and_resumes(tmp_path, family):
    """SlimGPT changes block shapes: under a bound disk store each pruned block is written once, at its new widths, as
    its final shard; the saved run loads with its per-block widths and equals an in-memory prune; a run stopped after
    block 0 resumes with block 0's widths taken from its shard (its meta skeleton resized), to the same result. Every
    family SlimGPT supports (biases, GQA ratios, a decoupled head_dim)."""
    from conftest import tiny_model

    from layerprune import prune
    from layerprune.checkpoint import Checkpoint
    from layerprune.models.structured import model_widths
    from layerprune.record import save_run

    src = tmp_path / "src"
    dense = tiny_model(family, layers=3)
    dense.save_pretrained(src)
    x = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2))
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    kw = dict(calibration=x, method="slimgpt", sparsity=0.4, allocation="ipr-log", progress=False)
    want_rec = prune(ref, **kw)
    kw["checkpoint_every"] = 0
    want = ref.state_dict()
    widths = model_widths(ref)
    assert len(set(widths)) > 1 and widths[0] != model_widths(dense)[0]  # per-block widths, block 0 pruned

    def run_disk(run, resume=False, stop_at=None):
        model, _, store = load_model_lazy(src, torch.float32)
        store.bind(run, torch.float32)
        real, calls = Checkpoint.save, {"n": 0}

        def save(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
            return real(self, *a, **k)

        Checkpoint.save = save
        try:
            rec = prune(model, offload="disk", store=store, out_dir=run, resume=resume, **kw)
        finally:
            Checkpoint.save = real
        assert model_widths(model) == widths  # the meta skeleton has the pruned widths (what the config is made of)
        save_run(model, None, run, rec, store)  # the CLI's save: config, remote code, record; the checkpoint goes
        return rec

    rec = run_disk(tmp_path / "run")
    assert rec["params"] == want_rec["params"] and rec["structure"] == want_rec["structure"]
    assert len(list((tmp_path / "run").glob("model-*.safetensors"))) == N_BLOCKS + 1
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "run", trust_remote_code=True)  # per-block widths
    assert model_widths(back) == widths
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())

    run2 = tmp_path / "run2"
    with pytest.raises(KeyboardInterrupt):
        run_disk(run2, stop_at=2)
    assert json.loads((run2 / ".checkpoint" / "state.json").read_text())["next_block"] == 1
    run_disk(run2, resume=True)
    back2 = AutoModelForCausalLM.from_pretrained(run2, trust_remote_code=True)
    assert all(torch.equal(v, want[k]) for k, v in back2.state_dict().items())
