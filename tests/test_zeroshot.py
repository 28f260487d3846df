"""Zero-shot through lm-eval on a tiny random Llama and a byte-level tokenizer, with 5 local examples per task."""
import json

import pytest
import torch

pytest.importorskip("lm_eval")

from layerprune.errors import UserError
from layerprune.evaluation.tasks import local_data
from layerprune.evaluation.zeroshot import LOCAL_TASKS, zeroshot

N = 5


def tiny_tokenizer():
    """Byte-level BPE with no merges: every text encodes offline, one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>")


def tiny_model(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=vocab - 1, bos_token_id=vocab - 1)
    return LlamaForCausalLM(cfg).eval()


def write_data(root, skip=()):
    """N examples per task in the upstream formats of /work/shared/data/zeroshot."""
    def jsonl(rel, rows):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))

    if "boolq" not in skip:
        jsonl("boolq/val.jsonl", [{"question": f"is {i} even", "passage": f"number {i}", "label": i % 2 == 0}
                                  for i in range(N)])
    if "rte" not in skip:
        jsonl("rte/val.jsonl", [{"premise": f"a cat {i}", "hypothesis": "a cat", "idx": i,
                                 "label": ["entailment", "not_entailment"][i % 2]} for i in range(N)])
    for name, f in (("arc_easy", "ARC-Easy-Test"), ("arc_challenge", "ARC-Challenge-Test")):
        if name not in skip:
            jsonl(f"arc/{f}.jsonl", [{"id": f"q{i}", "answerKey": "ABCD"[i % 4], "question": {
                "stem": f"what is {i}?",
                "choices": [{"text": f"opt {c * k}", "label": c} for k, c in enumerate("ABCD", 1)]}}
                for i in range(N)])
    if "piqa" not in skip:
        jsonl("piqa/dev.jsonl", [{"id": str(i), "goal": f"open jar {i}", "sol1": "twist lid", "sol2": "eat lid"}
                                 for i in range(N)])
        (root / "piqa/dev-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(N)))
    if "openbookqa" not in skip:
        (root / "openbookqa").mkdir(parents=True, exist_ok=True)
        lines = ["ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key"]
        for i in range(N):
            ch = "(A) sun (B) moon light (C) rock (D) a tree"
            lines.append(f"{i}\tWhat shines {i}?\t{ch}\tWhat shines {i}? {ch}\t{'ABCD'[i % 4]}")
        (root / "openbookqa/test.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_local_readers_standard_layout(tmp_path):
    d = write_data(tmp_path)
    assert local_data.load_boolq(d)["validation"]["label"] == [1, 0, 1, 0, 1]
    rte = local_data.load_rte(d)["validation"]
    assert rte[1] == {"sentence1": "a cat 1", "sentence2": "a cat", "label": 1} and rte[0]["label"] == 0
    obqa = local_data.load_openbookqa(d)["test"]
    assert obqa[1]["choices"] == {"text": ["sun", "moon light", "rock", "a tree"], "label": list("ABCD")}
    assert obqa[1]["answerKey"] == "B" and obqa[1]["question_stem"] == "What shines 1?"
    arc = local_data.load_arc_easy(d)["test"]
    assert arc[2]["question"] == "what is 2?" and arc[2]["choices"]["label"].index(arc[2]["answerKey"]) == 2
    assert local_data.load_piqa(d)["validation"]["label"] == [0, 1, 0, 1, 0]


def test_zeroshot_tiny_llama(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    write_data(tmp_path / "zeroshot", skip=("piqa",))  # project data dir layout: <data>/zeroshot/boolq/...
    tasks = list(LOCAL_TASKS) + ["hellaswag"]
    out = zeroshot(model, tok, tasks, data_dir=tmp_path, limit=3, batch_size=4, offline=True)
    done = [t for t in LOCAL_TASKS if t != "piqa"]
    assert list(out["tasks"]) == done
    assert set(out["skipped"]) == {"piqa", "hellaswag"}  # piqa files missing here, hellaswag never local; no hub
    assert "no local files" in out["skipped"]["piqa"] and "hub offline" in out["skipped"]["hellaswag"]
    for name, row in out["tasks"].items():
        assert 0.0 <= row["acc"] <= 1.0 and row["n"] == 3 and row["source"] == f"local:{tmp_path / 'zeroshot'}"
        assert ("acc_norm" in row) == (name in ("arc_easy", "arc_challenge", "openbookqa"))
    assert out["mean_acc"] == pytest.approx(sum(r["acc"] for r in out["tasks"].values()) / len(done))
    assert out["limit"] == 3 and out["num_fewshot"] == 0 and out["seconds"] > 0
    assert not model.training


def test_zeroshot_bad_input(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    with pytest.raises(UserError):
        zeroshot(model, tok, [], data_dir=tmp_path)
    with pytest.raises(UserError):
        zeroshot(model, tok, ["boolq"], data_dir=tmp_path, limit=0)


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_local_config_matches_standard_task(name):
    """Prompt, choices, target, output type and metrics equal lm-eval's own config of the same task."""
    from pathlib import Path

    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    from layerprune.evaluation.zeroshot import HUB_YAML, TASKS_DIR

    std = load_yaml(Path(lm_eval.tasks.__file__).parent / HUB_YAML[name], resolve_func=False)
    ours = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=False)
    for key in ("task", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice"):
        assert ours[key] == std[key], key
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in std["metric_list"]]
    split = std.get("test_split") or std["validation_split"]  # lm-eval scores test when there is one
    assert (ours.get("test_split") or ours["validation_split"]) == split


def brute_force_acc(model, tok, docs):
    """acc and acc_norm from scratch: argmax over choices of sum log p(" " + choice | prompt) (norm: / len(choice))."""
    acc = norm = 0
    for prompt, choices, gold in docs:
        ctx = tok(prompt)["input_ids"]
        lls = []
        for c in choices:
            cont = tok(" " + c)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            lls.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        acc += max(range(len(choices)), key=lambda i: lls[i]) == gold
        norm += max(range(len(choices)), key=lambda i: lls[i] / len(choices[i])) == gold
    return acc / len(docs), norm / len(docs)


def test_accuracy_equals_brute_force(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    d = write_data(tmp_path)
    out = zeroshot(model, tok, ["boolq", "arc_easy"], data_dir=d, batch_size=2, offline=True)
    boolq = [(f"number {i}\nQuestion: is {i} even?\nAnswer:", ["no", "yes"], int(i % 2 == 0)) for i in range(N)]
    arc = [(f"Question: what is {i}?\nAnswer:", [f"opt {c * k}" for k, c in enumerate("ABCD", 1)], i % 4)
           for i in range(N)]
    assert out["tasks"]["boolq"]["acc"] == pytest.approx(brute_force_acc(model, tok, boolq)[0])
    acc, norm = brute_force_acc(model, tok, arc)
    assert out["tasks"]["arc_easy"]["acc"] == pytest.approx(acc)
    assert out["tasks"]["arc_easy"]["acc_norm"] == pytest.approx(norm)
    assert out["tasks"]["boolq"]["n"] == N and out["limit"] is None and out["skipped"] == {}


def test_cli_eval_tasks_joins_run_record(tmp_path, monkeypatch, capsys):
    """`layerprune eval RUN --tasks ...`: per-task table, skipped tasks named, results merged into layerprune.json."""
    from layerprune.cli import main
    from layerprune.record import read_record, write_record

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hellaswag: no hub here, never a network probe in CI
    tok = tiny_tokenizer()
    run = tmp_path / "run"
    tiny_model(len(tok)).save_pretrained(run)
    tok.save_pretrained(run)
    write_record(run, {"method": "wanda", "sparsity": 0.5})
    data = tmp_path / "data"
    write_data(data / "zeroshot", skip=("piqa",))
    assert main(["eval", str(run), "--tasks", "boolq,rte,piqa,hellaswag", "--limit", "3", "--data-dir", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "skipped piqa: no local files" in printed and "skipped hellaswag: " in printed
    assert "wikitext2" not in printed  # --tasks alone: no perplexity
    rec = read_record(run)
    assert rec["method"] == "wanda"  # the rest of the record is kept
    zs = rec["zeroshot"]
    assert list(zs["tasks"]) == ["boolq", "rte"] and set(zs["skipped"]) == {"piqa", "hellaswag"}
    assert all(r["n"] == 3 and r["limit"] == 3 for r in zs["tasks"].values())
    # a second call adds a task; the mean covers every task now in the record
    assert main(["eval", str(run), "--tasks", "arc_easy", "--data-dir", str(data)]) == 0
    zs = read_record(run)["zeroshot"]
    assert list(zs["tasks"]) == ["boolq", "rte", "arc_easy"] and zs["tasks"]["arc_easy"]["n"] == N
    assert zs["tasks"]["arc_easy"]["limit"] is None and set(zs["skipped"]) == {"piqa", "hellaswag"}  # still named
    assert zs["mean_acc"] == pytest.approx(sum(r["acc"] for r in zs["tasks"].values()) / 3)
    assert zs["mean_acc_norm"] == pytest.approx(sum(r.get("acc_norm", r["acc"]) for r in zs["tasks"].values()) / 3)
    table = capsys.readouterr().out
    assert "arc_easy" in table and "mean" in table and "all examples" in table
    # a plain model directory gets no record; a bad --tasks / --limit is one line, exit 2
    plain = tmp_path / "plain"
    tiny_model(len(tok)).save_pretrained(plain)
    tok.save_pretrained(plain)
    assert main(["eval", str(plain), "--tasks", "rte", "--limit", "2", "--data-dir", str(data)]) == 0
    assert not (plain / "layerprune.json").exists()
    capsys.readouterr()
    for bad in (["--tasks", " , "], ["--tasks", "rte", "--limit", "0"]):
        assert main(["eval", str(run), *bad, "--data-dir", str(data)]) == 2
        assert capsys.readouterr().err.count("\n") == 1
