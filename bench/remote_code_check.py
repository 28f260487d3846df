"""A SlimGPT ipr-log run (per-block widths) loads where only torch + transformers are installed, and computes what
layerprune computes.

    python -m venv /tmp/cleanvenv && /tmp/cleanvenv/bin/pip install torch==2.13.0 && \\
        /tmp/cleanvenv/bin/pip install transformers==<the version layerprune runs with>
    python -m bench.remote_code_check --python /tmp/cleanvenv/bin/python --run /tmp/slim_iprlog50

Prunes SmolLM2-135M with ``layerprune prune --method slimgpt --sparsity 0.5 --allocation ipr-log`` on the protocol
(calibration 32 x 512 C4 pool seed 0, WikiText-2 test 40 x 512) unless ``--run`` already holds that run. Then, in the
clean interpreter (no layerprune installed there, and imports of it blocked as well, working directory outside the
repository), ``AutoModelForCausalLM.from_pretrained(RUN, trust_remote_code=True)`` loads it; that process computes the
logits of the first evaluation window, the WikiText-2 PPL over the 40 windows with a plain cross-entropy loop, and a
greedy generation. They are compared with layerprune's: the same window through ``layerprune.load_model(RUN)``, the
PPL the prune run measured on its in-memory model (run record), and the same generation. Writes
``bench/results/remote_code.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import CALIB, EVAL_DATASET, EVAL_SEQLEN, EVAL_WINDOWS, MODEL, RESULTS, ROOT, write_json
from layerprune import load_model, perplexity
from layerprune.data.bos import bos_id
from layerprune.data.corpora import resolve_data_dir
from layerprune.evaluation.perplexity import tokenize_corpus

PROMPT = "The history of the city begins"
NEW_TOKENS = 24

# Runs in the clean interpreter: layerprune blocked, only torch + transformers.
CLEAN = """
import importlib.util, json, math, sys
sys.modules["layerprune"] = None
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
run, work = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(sys.argv[3]))
out = {"python": sys.executable, "torch": torch.__version__, "transformers": transformers.__version__,
       "layerprune_installed": importlib.util.find_spec("layerprune") is not None}
model = AutoModelForCausalLM.from_pretrained(run, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(run)
out["class"] = type(model).__module__ + "." + type(model).__name__
out["params"] = sum(p.numel() for p in model.parameters())
windows = torch.load(work + "/windows.pt")
nll = []
with torch.inference_mode():
    for i, x in enumerate(windows):
        logits = model(x[None]).logits
        if i == 0:
            torch.save(logits[0].clone(), work + "/clean_logits0.pt")
        nll.append(F.cross_entropy(logits[0, :-1].float(), x[1:]).item())
    out["ppl"] = math.exp(sum(nll) / len(nll))
    ids = tok(sys.argv[4], return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=int(sys.argv[5]), do_sample=False, use_cache=True)
out["generate_ids"] = gen[0].tolist()
out["generate_text"] = tok.decode(gen[0])
out["layerprune_imported"] = [k for k, v in sys.modules.items() if k.split(".")[0] == "layerprune" and v is not None]
open(work + "/clean.json", "w").write(json.dumps(out))
"""


def prune_command(run: Path, data_dir: Path) -> list[str]:
    return ["layerprune", "prune", "--model", MODEL, "--method", "slimgpt", "--sparsity", "0.5", "--allocation",
            "ipr-log", "--nsamples", str(CALIB["nsamples"]), "--seqlen", str(CALIB["seqlen"]), "--max-windows",
            str(EVAL_WINDOWS), "--data-dir", str(data_dir), "--out", str(run)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", required=True, help="python of a venv with only torch + transformers")
    ap.add_argument("--run", default="/tmp/layerprune-bench-cache/slimgpt_iprlog50",
                    help="the run directory (pruned here when it holds no run)")
    ap.add_argument("--data-dir", default=None, help="data directory (default: as layerprune resolves it)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", default=str(RESULTS / "remote_code.json"))
    args = ap.parse_args()
    run, data_dir = Path(args.run), resolve_data_dir(args.data_dir)
    cmd = prune_command(run, data_dir)
    prune_s = None
    if not (run / "layerprune.json").is_file():
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "layerprune", *cmd[1:]], check=True, cwd=ROOT)
        prune_s = time.time() - t0
    record = json.loads((run / "layerprune.json").read_text())
    config = json.loads((run / "config.json").read_text())

    model, tok = load_model(str(run))
    ids = tokenize_corpus(tok, EVAL_DATASET, data_dir, EVAL_SEQLEN).reshape(-1)
    assert bos_id(tok) is None, "this check builds windows without BOS (as SmolLM2's tokenizer does)"
    windows = ids[: EVAL_WINDOWS * EVAL_SEQLEN].view(EVAL_WINDOWS, EVAL_SEQLEN)
    ours = perplexity(model, ids, EVAL_SEQLEN, EVAL_WINDOWS, progress=False)
    with torch.inference_mode():
        logits0 = model(windows[:1]).logits[0]
        model.config.use_cache = True
        gen = model.generate(tok(PROMPT, return_tensors="pt").input_ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             use_cache=True)[0].tolist()

    with tempfile.TemporaryDirectory(prefix="remote-code-") as work:
        torch.save(windows.clone(), Path(work) / "windows.pt")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(HF_MODULES_CACHE=str(Path(work) / "hf_modules"), HF_HUB_OFFLINE="1",
                   OMP_NUM_THREADS=str(args.threads))
        t0 = time.time()
        p = subprocess.run([args.python, "-c", CLEAN, str(run.resolve()), work, str(args.threads), PROMPT,
                            str(NEW_TOKENS)], cwd=work, env=env, capture_output=True, text=True)
        clean_s = time.time() - t0
        if p.returncode:
            sys.exit(f"the clean interpreter failed:\n{p.stderr[-4000:]}")
        clean = json.loads((Path(work) / "clean.json").read_text())
        clean_logits0 = torch.load(Path(work) / "clean_logits0.pt")
    diff = (clean_logits0 - logits0).abs()
    in_memory = record["eval"]["after"][EVAL_DATASET]["ppl"]
    result = {
        "command": " ".join(cmd), "pruned_here_seconds": prune_s, "prune_seconds_recorded": record["timings"]["total"],
        "run": str(run),
        "config": {k: config.get(k) for k in ("model_type", "auto_map", "layer_heads", "layer_kv_heads",
                                              "layer_intermediate")},
        "params": record["params"],
        "clean_env": {k: clean[k] for k in ("python", "torch", "transformers", "layerprune_installed",
                                            "layerprune_imported", "class", "params")},
        "clean_load_and_eval_seconds": clean_s,
        "logits_window0": {"tokens": EVAL_SEQLEN, "max_abs_diff": diff.max().item(),
                           "mean_abs_diff": diff.mean().item(), "max_abs_logit": logits0.abs().max().item()},
        "ppl": {"clean_transformers_trust_remote_code": clean["ppl"], "layerprune_load_model": ours.ppl,
                "prune_run_in_memory": in_memory, "windows": EVAL_WINDOWS, "seqlen": EVAL_SEQLEN,
                "rel_diff_clean_vs_in_memory": abs(clean["ppl"] - in_memory) / in_memory},
        "generate": {"prompt": PROMPT, "new_tokens": NEW_TOKENS, "equal": clean["generate_ids"] == gen,
                     "clean_text": clean["generate_text"]},
    }
    write_json(Path(args.out), result)
    print(json.dumps({k: result[k] for k in ("clean_env", "logits_window0", "ppl", "generate")}, indent=1))


if __name__ == "__main__":
    main()
