"""FedLP over LoRA adapters of the whole SmolLM2-135M (all 30 blocks), Flower simulation on CPU (issue 19).

    python -m bench.fedlp_lora --part table      # FedAvg-LoRA, Homo(0.5/0.7), Hetero(u) +- personal heads
    python -m bench.fedlp_lora --part recovery   # federated LoRA recovery of Wanda 60% -> fedlp_lora_recovery.{json,md}
    python -m bench.fedlp_lora --quick           # a smoke run of both parts (tiny settings, nothing written to results)

Table: 10 non-IID clients (Dirichlet(1.0) mix of C4 pool / WikiText-2 valid / PTB valid), 3 sampled a round (the same
partitions in every scheme: sampled by partition ID, seeded by seed and round; checked by ``bench.fedlp_partitions``
and stated in the table), hetero with and without the clients' personal heads, LoRA rank 8 (alpha 16) on every block
linear, base frozen and never sent; the global model is evaluated after each round (WikiText-2 test and C4,
EVAL_WINDOWS x EVAL_SEQLEN). The simulation runs one client at a time on one thread (``sim_cpus=1``), so seconds
per round are sequential client time + the server's evaluation.

Recovery: the Wanda 60% run (calibration 32 x 512 C4 pool seed 0, as bench.lora_recovery; pruned here when --run
does not exist) is the frozen base; clients train LoRA on their private non-IID shards; the server merges
W + M * (s B A) after every round; the final merged model is saved as a run directory, its zero pattern compared with
the source's on disk, and its WikiText-2 PPL measured with the protocol's 40 x 512 windows.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from layerprune.federated.run import FedConfig, load, plot, run_federated

from .common import CACHE, MODEL, RESULTS, code_line, provenance, write_json

TABLE = dict(model=MODEL, clients=10, fraction=0.3, rounds=5, local_steps=3, batch_size=2, seqlen=128, lr=1e-3,
             lora_rank=8, partition="dirichlet", alpha=1.0, docs_per_client=20, max_client_tokens=6000,
             eval_seqlen=256, eval_windows=4, sim_cpus=1, threads=1, seed=0)
QUICK = dict(clients=10, fraction=0.2, rounds=1, local_steps=1, batch_size=1, seqlen=64, eval_windows=1,
             eval_seqlen=128, max_client_tokens=2000)
RECOVERY = dict(TABLE, rounds=6, local_steps=4, eval_sets=("wikitext2",))
RUNS = {"fedavg": dict(scheme="fedavg"), "homo0.5": dict(scheme="homo", keep_prob=0.5),
        "homo0.7": dict(scheme="homo", keep_prob=0.7),
        "hetero": dict(scheme="hetero", depth_flag=None, personal_heads=False),
        "hetero-ph": dict(scheme="hetero", depth_flag=None, personal_heads=True),
        "hetero-ph0": dict(scheme="hetero", depth_flag=None, personal_heads=True, head_steps=0),  # no first fit
        "hetero-phl": dict(scheme="hetero", depth_flag=None, personal_heads=True, personal_head="head-lora")}


def label(c: dict) -> str:
    if c["scheme"] == "homo":
        return f"Homo({c['keep_prob']})"
    if c["scheme"] == "hetero":
        return (f"Hetero({c['depth_flag'] or 'u'})" + (" + personal heads" if c.get("personal_heads") else "")
                + (" (no first fit)" if c.get("personal_heads") and c.get("head_steps") == 0 else "")
                + (" (head LoRA)" if c.get("personal_heads") and c.get("personal_head") == "head-lora" else ""))
    return "FedAvg-LoRA"


def table(args) -> None:
    base = FedConfig(**{**TABLE, **(QUICK if args.quick else {}), "data_dir": args.data_dir, "progress": True})
    if args.rounds:
        base = replace(base, rounds=args.rounds)
    t0 = time.time()
    model, tok = load(base)
    print(f"[fedlp_lora] model loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    names = args.schemes.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown scheme {unknown[0]!r}: use {', '.join(RUNS)}")
    results, out = [], Path(args.out)
    for name in names:
        results.append(run_federated(replace(base, **RUNS[name]), copy.deepcopy(model), tok))
        print(f"[fedlp_lora] {name} done at {time.time() - t0:.0f}s", file=sys.stderr)
        if not args.quick:  # after every run: an interrupted table keeps the rows it finished
            write_json(out / "fedlp_lora.json", {
                "command": " ".join(["python -m bench.fedlp_lora"] + sys.argv[1:]), "settings": asdict(base),
                "wall_s": round(time.time() - t0, 1), "complete": len(results) == len(names),
                "runs": results}, default=str)
    if args.quick:
        print({label(r["config"]): r["summary"]["final_ppl"] for r in results})
        return
    results = ordered(results)
    plot(results, out / "fedlp_lora.png")
    (out / "fedlp_lora.md").write_text(table_md(results, base, time.time() - t0))
    print((out / "fedlp_lora.md").read_text())


def ordered(results: list[dict]) -> list[dict]:
    """Runs in the table's order (that of RUNS), whatever order they ran in."""
    def key(r):
        c = r["config"]
        return next((i for i, kw in enumerate(RUNS.values()) if all(c.get(k) == v for k, v in kw.items())), len(RUNS))
    return sorted(results, key=key)


def count_uploads(r: dict) -> int:
    return sum(c["status"] == "ok" for row in r["rounds"] for c in row.get("clients", []))


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[len(xs) // 2] + xs[(len(xs) - 1) // 2]) / 2 if xs else float("nan")


def table_md(results: list[dict], cfg: FedConfig, wall: float, code: str | None = None) -> str:
    ref = next((r for r in results if r["config"]["scheme"] == "fedavg"), None)
    sets = list(results[0]["summary"]["final_ppl"])
    lines = ["| scheme | " + " | ".join(f"{k} PPL (round 0 -> {cfg.rounds})" for k in sets)
             + " | vs FedAvg-LoRA (PPL) | bytes / client / round | predicted | total bytes | vs FedAvg-LoRA "
             "| s / round (median) | client train s (by depth) |", "|---|" + "---|" * (len(sets) + 7)]
    verdict = []
    for r in results:
        c, s = r["config"], r["summary"]
        ppl = " | ".join(f"{s['initial_ppl'][k]:.3f} -> {v:.3f}" for k, v in s["final_ppl"].items())
        rel = ""
        if ref is not None:
            d = {k: v / ref["summary"]["final_ppl"][k] - 1 for k, v in s["final_ppl"].items()}
            rel = ", ".join(f"{100 * x:+.2f}%" for x in d.values())
            if c["scheme"] == "homo":
                save = 1 - s["total_bytes"] / ref["summary"]["total_bytes"]
                want = (1 - c["keep_prob"]) / 2  # (1+p)N of 2N: the adapters are the whole message
                ok_q = all(x <= 0.02 for x in d.values())
                verdict.append(f"- {label(c)}: final PPL {rel} vs FedAvg-LoRA "
                               f"({'within' if ok_q else 'NOT within'} 2%); "
                               f"total communication {100 * save:.1f}% less, predicted (1-p)/2 = {100 * want:.0f}% "
                               f"(the difference is the Bernoulli upload draws of {count_uploads(r)} client replies).")
        by_depth: dict[int, list[float]] = {}
        for row in r["rounds"]:
            for cl in row.get("clients", []):
                if "train_seconds" in cl:
                    by_depth.setdefault(cl["depth"], []).append(cl["train_seconds"])
        dep = ", ".join(f"{d}: {sum(v) / len(v):.1f}" for d, v in sorted(by_depth.items()))
        lines.append(f"| {label(c)} | {ppl} | {rel or '-'} | {s['mean_bytes_per_client_round']:,.0f} | "
                     f"{s['predicted_fp32_bytes_per_client_round']:,.0f} | {s['total_bytes']:,} | "
                     f"{s['bytes_ratio_vs_fedavg']:.3f} | "
                     f"{median([row['round_seconds'] for row in r['rounds'] if 'round_seconds' in row]):.1f} | {dep} |")
    per_round = ["| scheme | " + " | ".join(f"round {i}" for i in range(cfg.rounds + 1)) + " |",
                 "|---|" + "---|" * (cfg.rounds + 1)]
    for r in results:
        cells = [" / ".join(f"{row['ppl'][k]:.2f}" for k in sets) for row in r["rounds"]]
        per_round.append(f"| {label(r['config'])} | " + " | ".join(cells) + " |")
    lo = results[0]["lora"]
    hets = [r for r in results if r["config"]["scheme"] == "hetero"]
    mem = ["| scheme | depth | forward GFLOPs / token | train TFLOPs / client round | personal params | "
           "head fit TFLOPs (first round) | base fp32 MB | adapter params | param memory MB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in hets or results[:1]:
        for d, x in sorted(r["lora"]["client_cost"].items(), key=lambda kv: int(kv[0])):
            mem.append(f"| {label(r['config'])} | {d} | {x['forward_flops_per_token'] / 1e9:.3f} | "
                       f"{x['train_flops_per_round'] / 1e12:.3f} | {x.get('personal_params', 0):,} | "
                       f"{x.get('head_fit_flops', 0) / 1e12:.3f} | {x['base_param_bytes'] / 1e6:.0f} | "
                       f"{x['adapter_params']:,} | {x['param_memory_bytes'] / 1e6:.0f} |")
    from .fedlp_partitions import check, partitions_by_round

    problems = check(results)
    parts = partitions_by_round(results[0])
    deps = next(([row.get("depths") for row in r["rounds"] if row["round"] > 0] for r in hets), None)
    same = ("Sampled partitions per round (" + ("the same in every row, checked by `python -m bench.fedlp_partitions`"
            if not problems else "NOT the same in every row: " + "; ".join(problems)) + "): "
            + ", ".join(f"round {i + 1}: {p}" + (f" at depths {deps[i]}" if deps else "") for i, p in enumerate(parts))
            + ".\n\n")
    ph = next((r for r in hets if r["config"].get("personal_heads")), None)
    h0 = next((r for r in hets if not r["config"].get("personal_heads")), None)
    if ph is not None and h0 is not None and ref is not None:
        for k in sets:
            f, h, p = (x["summary"]["final_ppl"][k] for x in (ref, h0, ph))
            closed = (h - p) / (h - f) if h != f else float("nan")
            verdict.append(f"- {label(ph['config'])} vs {label(h0['config'])}, {k}: {h:.3f} -> {p:.3f} (FedAvg-LoRA "
                           f"{f:.3f}): {100 * closed:.0f}% of Hetero's gap closed"
                           + (f" (target: at least half; {'met' if closed >= 0.5 else 'NOT met'})"
                              if k == "wikitext2" else "") + ".")
        pers = ph.get("personal") or {}
        verdict.append(f"- Personal heads kept on {len(pers.get('partitions', []))} shallow partitions, "
                       f"{pers.get('params_total', 0):,} parameters in all "
                       f"({next(iter(pers.get('params_per_partition', {}).values()), 0):,} each: translator d x d + d "
                       f"and the final norm); never sent, so the bytes are {ph['summary']['total_bytes']:,} vs "
                       f"{h0['summary']['total_bytes']:,} without them.")
    rss = max((r["summary"]["client_peak_rss_mib"] or 0) for r in results)
    head = (f"# FedLP over LoRA adapters: {cfg.model}, all blocks, {cfg.clients} clients ({cfg.partition} alpha "
            f"{cfg.alpha}), {round(cfg.fraction * cfg.clients)} sampled a round, {cfg.rounds} rounds\n\n"
            f"LoRA rank {lo['rank']} alpha {lo['alpha']:g} on every block linear ({lo['adapter_params']:,} adapter "
            f"parameters; the base is frozen and never sent). Local: {cfg.local_steps} AdamW steps "
            f"x {cfg.batch_size} x "
            f"{cfg.seqlen} tokens, lr {cfg.lr}. Evaluation after every round: {cfg.eval_windows} x {cfg.eval_seqlen} "
            f"windows of {' and '.join(sets)}. One client at a time, 1 thread, Flower simulation; {wall / 60:.1f} min "
            f"in all on a 2-core CPU shared with other jobs. Bytes are the serialized ArrayRecords (download + upload) "
            f"per sampled client per round; 'predicted' is the paper's arithmetic in fp32 bytes (FedAvg 2N, Homo "
            f"(1+p)N, Hetero 2E[shared(c)] over adapter parameters N). {code or code_line()}\n\n")
    return (head + same + "\n".join(lines) + "\n\nThe paper's claim (Homo with p in 0.5-0.7 within 2% of FedAvg at "
            "15-25% less communication), and the personal heads (issue 32):\n\n" + "\n".join(verdict)
            + "\n\nSeconds per round (server: send, sequential "
            "client training, aggregate) are medians: the machine is shared, and a run paused by another job shows "
            "one long round in the JSON.\n\nPPL per round (" + " / ".join(sets) + "):\n\n"
            + "\n".join(per_round) + "\n\nCompute and memory per client and round by depth (hetero depths; estimate: "
            "forward 2 x (block-linear weights run + head) per token, training 2 x forward with the base frozen; a "
            "personal head adds its translator, 2 d^2 a token forward and 3 x that to train, and a first-round fit "
            "of the head alone). "
            f"Peak RSS of the simulated client process: {rss:.0f} MiB.\n\n" + "\n".join(mem) + "\n")


def recovery(args) -> None:
    from layerprune import load_model, prune
    from layerprune.models.info import measure_sparsity
    from layerprune.record import read_record, save_run
    from layerprune.recovery import masks_of

    from .common import calibration, wikitext_ppl

    t0 = time.time()
    run = Path(args.run) if args.run else CACHE / "wanda60-run"
    if not (run / "layerprune.json").is_file():
        model, tok = load_model(MODEL)
        rec = prune(model, tok, method="wanda", sparsity=0.6, calibration=calibration(tok), progress=False)
        rec["model"] = MODEL
        run.mkdir(parents=True, exist_ok=True)
        save_run(model, tok, run, rec)
        del model
    src = read_record(run)
    ev = (src.get("eval") or {}).get("after", {}).get("wikitext2", {})
    src_model, tok = load_model(str(run))
    masks_before = masks_of(src_model)
    sp_before = measure_sparsity(src_model)["overall"]
    if ev.get("seqlen") == 512 and ev.get("windows") == 40:
        before, before_from = ev["ppl"], "the source run's record (layerprune prune --eval wikitext2 512 x 40)"
    else:
        before, before_from = wikitext_ppl(src_model, tok), "measured here"
    del src_model
    save = CACHE / f"{run.name}-fedlora-{args.recovery_scheme}"
    cfg = FedConfig(**{**RECOVERY, **(QUICK if args.quick else {}), "model": str(run), "data_dir": args.data_dir,
                       "save_dir": str(save), "force": True, **RUNS[args.recovery_scheme]})
    res = run_federated(cfg)
    saved, _ = load_model(str(save))
    masks_after = masks_of(saved)
    same = masks_after.keys() == masks_before.keys() and all(torch.equal(masks_after[k], m)
                                                              for k, m in masks_before.items())
    sp_after = measure_sparsity(saved)["overall"]
    after = wikitext_ppl(saved, tok, windows=2 if args.quick else 40)
    s = res["summary"]
    out = {"command": " ".join(["python -m bench.fedlp_lora"] + sys.argv[1:]), "source_run": str(run),
           "source": {"method": src.get("method"), "sparsity": src.get("sparsity"),
                      "calibration": src.get("calibration")},
           "ppl_before_40x512": before, "ppl_before_from": before_from, "ppl_after_40x512": after,
           "measured_sparsity_before": sp_before, "measured_sparsity_after": sp_after,
           "zero_pattern_identical_on_disk": same, "saved_dir": str(save), "run": res,
           "code": provenance(), "total_seconds": round(time.time() - t0, 1)}
    if args.quick:
        print({k: v for k, v in out.items() if k != "run"})
        return
    o = Path(args.out)
    write_json(o / "fedlp_lora_recovery.json", out, default=str)
    rounds = " -> ".join(f"{r['ppl']['wikitext2']:.2f}" for r in res["rounds"])
    text = (f"# Federated LoRA recovery of Wanda 60% (SmolLM2-135M)\n\nCommand: `{out['command']}`. Source: "
            f"`layerprune prune --model smollm2-135m --method wanda --sparsity 0.6 --nsamples 32 --seqlen 512` "
            f"(C4 pool seed 0). Federated: {label(res['config'])}, {cfg.clients} non-IID clients ({cfg.partition} "
            f"alpha {cfg.alpha}), {round(cfg.fraction * cfg.clients)} a round, {cfg.rounds} rounds x {cfg.local_steps} "
            f"AdamW steps x {cfg.batch_size} x {cfg.seqlen} tokens, LoRA rank {cfg.lora_rank}, lr {cfg.lr}; the server "
            "merges W + M * (s B A) (M = the source's nonzeros) and saves the result as a run directory.\n\n"
            "| model | measured sparsity | WikiText-2 PPL (40 x 512) |\n|---|---|---|\n"
            f"| Wanda 60% (source run) | {sp_before:.6f} | {before:.2f} |\n"
            f"| + federated LoRA, merged with the mask | {sp_after:.6f} | {after:.2f} |\n\n"
            f"Zero pattern of every block linear identical on disk (source vs saved): {same}. "
            f"Per-round WikiText-2 PPL on the server ({cfg.eval_windows} x {cfg.eval_seqlen}): {rounds}. "
            f"Communication: {s['total_bytes'] / 1e6:.1f} MB in all ({s['mean_bytes_per_client_round'] / 1e6:.2f} MB "
            f"per client and round); the base weights never move. Mean {s['mean_round_seconds']:.0f} s a round; "
            f"bench total {out['total_seconds'] / 60:.1f} min on a shared 2-core CPU. {code_line()}\n")
    (o / "fedlp_lora_recovery.md").write_text(text)
    print(text)


def md_only(args) -> None:
    """Rebuild fedlp_lora.md from fedlp_lora.json (no training)."""
    import json

    data = json.loads((Path(args.out) / "fedlp_lora.json").read_text())
    base = FedConfig(**data["settings"])
    v = data.get("code", {})
    code = f"Code: commit `{str(v.get('commit'))[:12]}`" + (" with uncommitted changes" if v.get("dirty") else "")
    text = table_md(ordered(data["runs"]), base, data["wall_s"], code)
    (Path(args.out) / "fedlp_lora.md").write_text(text)
    print(text)


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["table", "recovery", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="smoke run with tiny settings; writes no results")
    ap.add_argument("--schemes", default="fedavg,hetero,hetero-ph,homo0.5,homo0.7",
                    help=f"comma list out of {', '.join(RUNS)} (run in this order; the table in that of the list)")
    ap.add_argument("--rounds", type=int, default=None, help="override the table's rounds")
    ap.add_argument("--run", default=None, help="Wanda 60%% run directory (default: pruned into the bench cache)")
    ap.add_argument("--recovery-scheme", default="fedavg", choices=list(RUNS))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--md-only", action="store_true", help="rebuild fedlp_lora.md from fedlp_lora.json")
    args = ap.parse_args()
    if args.md_only:
        return md_only(args)
    provenance()  # taken now: what runs is the code at start
    if args.part in ("table", "all"):
        table(args)
    if args.part in ("recovery", "all"):
        recovery(args)


if __name__ == "__main__":
    main()
