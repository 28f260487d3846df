"""Depth pruning on SmolLM2-135M: 8 of 30 blocks (25%) removed by each criterion, and the stock reload check.

    python -m bench.depth_table [--criteria shortgpt,sleb] [--drop 8] [--out-dir /tmp/depth/runs]

Protocol (bench/common.py): calibration 32 x 512 C4 pool seed 0 (SLEB: ``--sleb-calib``, by default 8 x 128 of the
same pool: its cost grows with every candidate it scores); WikiText-2 test PPL over 40 x 512. Per criterion:
the removed blocks, every block's criterion value, the criterion's cost (seconds, forward passes), parameters and
PPL; the run is saved (``save_run``) and loaded in a fresh interpreter with only torch + transformers (layerprune
blocked, no PYTHONPATH, working directory outside the repository) through stock ``from_pretrained`` without remote
code; its logits on the first evaluation window and a greedy generation are compared with layerprune's in-memory
model. Writes ``bench/results/depth.json`` (each row with the code's commit), rewritten after every criterion.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import CALIB, EVAL_SEQLEN, EVAL_WINDOWS, MODEL, PROTOCOL, RESULTS, calibration, code_version
from bench.common import wikitext_ppl
from layerprune import calibration_set, load_model, prune
from layerprune.data.bos import bos_id
from layerprune.data.corpora import resolve_data_dir
from layerprune.evaluation.perplexity import tokenize_corpus
from layerprune.record import save_run

NEW_TOKENS = 16
CLEAN = """
import json, sys
sys.modules["layerprune"] = None
import torch
from transformers import AutoModelForCausalLM
run, x_path, out_path = sys.argv[1:]
x = torch.load(x_path)
m = AutoModelForCausalLM.from_pretrained(run).eval()
with torch.no_grad():
    logits = m(x, use_cache=False).logits
    gen = m.generate(x[:, :32], max_new_tokens=%d, do_sample=False, use_cache=True)
torch.save({"logits": logits, "generate": gen, "class": type(m).__module__ + "." + type(m).__name__,
            "layers": m.config.num_hidden_layers,
            "modules": sorted({k.split(".")[0] for k in sys.modules if sys.modules[k] is not None})}, out_path)
""" % NEW_TOKENS


def clean_reload(run: Path, x: torch.Tensor) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(x, Path(tmp) / "x.pt")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1")
        p = subprocess.run([sys.executable, "-c", CLEAN, str(run), str(Path(tmp) / "x.pt"), str(Path(tmp) / "o.pt")],
                           cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        return torch.load(Path(tmp) / "o.pt")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--criteria", default="shortgpt,sleb")
    ap.add_argument("--drop", type=int, default=8)
    ap.add_argument("--out-dir", default="/tmp/depth/runs")
    ap.add_argument("--json", default=str(RESULTS / "depth.json"))
    ap.add_argument("--sleb-calib", default="8x128",
                    help="SLEB's calibration windows NxT (C4 pool, seed 0): it costs 1 + the sum of its candidates "
                         "forward passes (213 for 8 of 30 blocks), hours at 32x512 on 2 threads; 'protocol': 32x512")
    a = ap.parse_args()
    model, tok = load_model(MODEL)
    calib = calibration(tok)
    t0 = time.time()
    dense_ppl = wikitext_ppl(model, tok)
    dense = {"params": sum(p.numel() for p in model.parameters()), "blocks": model.config.num_hidden_layers,
             "wikitext2_ppl": dense_ppl, "eval_seconds": time.time() - t0}
    ids = tokenize_corpus(tok, "wikitext2", resolve_data_dir(None), EVAL_SEQLEN)[0]
    bos = bos_id(tok)
    window = (torch.cat([torch.tensor([bos]), ids[:EVAL_SEQLEN - 1]]) if bos is not None else ids[:EVAL_SEQLEN])[None]
    result = {"protocol": PROTOCOL, "code": code_version(), "model": MODEL, "dense": dense, "rows": [],
              "calibration": CALIB, "eval": {"dataset": "wikitext2", "seqlen": EVAL_SEQLEN, "windows": EVAL_WINDOWS},
              "threads": torch.get_num_threads()}
    for crit in a.criteria.split(","):
        m = copy.deepcopy(model)
        cal = calib
        if crit == "sleb" and a.sleb_calib != "protocol":
            n, t = (int(v) for v in a.sleb_calib.split("x"))
            cal = calibration_set(tok, CALIB["source"], n, t, CALIB["seed"])
        t0 = time.time()
        rec = prune(m, tok, method="depth", calibration=cal, progress=False,
                    solver_options={"drop": a.drop, "criterion": crit})
        prune_s = time.time() - t0
        ppl = wikitext_ppl(m, tok)
        run = Path(a.out_dir) / f"{crit}-drop{a.drop}"
        run.parent.mkdir(parents=True, exist_ok=True)
        rec["model"] = MODEL
        rec["eval"] = {"before": {"wikitext2": {"ppl": dense_ppl}}, "after": {"wikitext2": {"ppl": ppl}},
                       "seqlen": EVAL_SEQLEN, "max_windows": EVAL_WINDOWS}
        save_run(m, tok, run, rec)
        with torch.no_grad():
            logits = m(window, use_cache=False).logits
            m.config.use_cache = True
            gen = m.generate(window[:, :32], max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
        got = clean_reload(run, window)
        cfg = json.loads((run / "config.json").read_text())
        d = rec["depth"]
        result["rows"].append({
            "criterion": crit, "drop": a.drop, "calibration": rec["calibration"], "removed": d["removed"],
            "removal_order": d["removal_order"],
            "values": d["values"], "value_name": d["value_name"], "cost": d["cost"], "prune_seconds": prune_s,
            "params": rec["params"], "removed_fraction_of_block_params": d["removed_fraction"],
            "wikitext2_ppl": ppl, "run_dir": str(run),
            "saved_config": {"model_type": cfg["model_type"], "num_hidden_layers": cfg["num_hidden_layers"],
                             "auto_map": "auto_map" in cfg, "architectures": cfg.get("architectures")},
            "clean_reload": {"class": got["class"], "layers": got["layers"],
                             "layerprune_imported": "layerprune" in got["modules"],
                             "max_abs_logit_diff": float((got["logits"] - logits).abs().max()),
                             "generate_equal": bool(torch.equal(got["generate"], gen))},
        })
        Path(a.json).write_text(json.dumps({"written_by": "layerprune", **result}, indent=1, default=str))
        r = result["rows"][-1]
        print(f"{crit}: removed {d['removed']} PPL {dense_ppl:.2f} -> {ppl:.2f}, params {rec['params']['before']:,} "
              f"-> {rec['params']['after']:,}; criterion {d['cost']['seconds']:.1f}s / {d['cost']['forward_passes']} "
              f"passes; clean reload max |dlogit| {r['clean_reload']['max_abs_logit_diff']:.2e}, generate equal "
              f"{r['clean_reload']['generate_equal']}", flush=True)


if __name__ == "__main__":
    main()
