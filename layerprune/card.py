"""The model card (``README.md``) of a run directory, in the Hugging Face format, written from the run record.

YAML front matter (``base_model``, ``library_name: transformers``, ``pipeline_tag: text-generation``, ``tags``) and a
body with the method, allocation, sparsity or parameter counts, calibration, the measured perplexity (before/after)
and zero-shot tables when the record has them, the command that made the run, the versions, and how to load it.
The card is generated, never edited by hand: it is rewritten whenever layerprune rewrites the record, as long as it
still carries ``MARK`` (a card without that line is the user's and is left alone).
"""
from __future__ import annotations

import json
from pathlib import Path

CARD_NAME = "README.md"
RECIPE_NAME = "recipe.yaml"  # written beside it by the prune command (cli/recipe.py)
MARK = "<!-- written by layerprune from layerprune.json; rewritten when the record changes (remove this line to keep " \
       "your edits) -->"


def _yaml_str(s: str) -> str:
    return json.dumps(str(s))  # a JSON string is a valid YAML double-quoted scalar


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.4g}"
    return str(x)


def base_model(record: dict) -> str | None:
    """The base model as the user named it: a built-in name becomes its hub id; a hub id or a path stays. A chained
    run's base is the model its first step pruned."""
    from .models.loading import BUILTIN_HUB_IDS

    spec = chain(record)[0].get("model")
    if not spec:
        return None
    return BUILTIN_HUB_IDS.get(spec, spec)


def _is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~"))


def _python_call(record: dict) -> str:
    call = record.get("api_call") or {}
    args = ", ".join(f"{k}={v!r}" for k, v in call.items() if v not in (None, False, {}, [], ()))
    return "layerprune.prune(model, tokenizer" + (f", {args}" if args else "") + ")"


def _ppl_table(ev: dict, columns=("base model", "pruned")) -> list[str]:
    before, after = ev.get("before") or {}, ev.get("after") or {}
    datasets = list(dict.fromkeys([*before, *after]))
    if not datasets:
        return []
    windows = "all windows" if ev.get("max_windows") is None else f"the first {ev['max_windows']} windows"
    lines = [f"Perplexity (lower is better), windows of {ev.get('seqlen')} tokens, {windows}:", "",
             f"| dataset | {columns[0]} | {columns[1]} |", "|---|---|---|"]
    for ds in datasets:
        ppl = lambda side: side.get(ds, {}).get("ppl")  # noqa: E731
        lines.append(f"| {ds} | {_fmt(ppl(before), 2)} | {_fmt(ppl(after), 2)} |")
    return lines + [""]


def _zeroshot_table(zs: dict) -> list[str]:
    tasks = zs.get("tasks") or {}
    if not tasks:
        return []
    lines = ["Zero-shot accuracy of the pruned model (lm-evaluation-harness, "
             f"{zs.get('num_fewshot', 0)}-shot):", "", "| task | examples | acc | acc_norm |", "|---|---|---|---|"]
    for name, r in tasks.items():
        lines.append(f"| {name} | {r.get('n')} | {_fmt(r.get('acc'))} | {_fmt(r.get('acc_norm'))} |")
    lines.append(f"| mean | | {_fmt(zs.get('mean_acc'))} | {_fmt(zs.get('mean_acc_norm'))} |")
    return lines + [""]


def _steps_table(steps: list[dict]) -> list[str]:
    """A chained run: one row per step (the first pruned the base model, each next one the result before it)."""
    lines = ["## Pruning steps", "", "This model was pruned in steps, each from the result of the one before:", "",
             "| step | method | settings | parameters after |", "|---|---|---|---|"]
    for i, r in enumerate(steps, 1):
        opts = r.get("solver_options") or {}
        d = r.get("depth") or {}
        what = (f"removed blocks {d.get('removed')} of {d.get('blocks_before')}" if d
                else f"sparsity {_fmt(r.get('sparsity'), 2)}")
        settings = ", ".join([what] + [f"{k}={v}" for k, v in opts.items() if k != "drop"])
        after = (r.get("params") or {}).get("after")
        lines.append(f"| {i} | {r.get('method')} | {settings} | {f'{after:,}' if after else '-'} |")
    first = (steps[0].get("params") or {}).get("before")
    last = (steps[-1].get("params") or {}).get("after")
    if first and last:
        lines += ["", f"Overall: {first:,} -> {last:,} parameters ({last / first:.3f}x)."]
    return lines + [""]


def render(record: dict, remote_code: bool | None = None, recipe: str | None = None) -> str:
    """The card text for a run record. ``remote_code``: whether the run ships model code (per-block widths); by
    default read from the record. ``recipe``: the name of the run's recipe file, when it has one."""
    method = record.get("method") or "unknown"
    alloc = record.get("allocation") or {}
    alloc_name = alloc.get("name", "uniform") if isinstance(alloc, dict) else str(alloc)
    if remote_code is None:
        remote_code = bool((record.get("saved") or {}).get("remote_code"))
    base = base_model(record)
    structure = record.get("structure") or {}
    params = record.get("params") or {}
    structured = bool(structure) or (params.get("after") is not None and params.get("after") != params.get("before"))
    nm = record.get("nm")
    nm_text = f"{nm[0]}:{nm[1]}" if isinstance(nm, (list, tuple)) and len(nm) == 2 else None

    tags = ["layerprune", "pruned", method]
    if nm_text:
        tags.append("n:m-sparsity")
    elif structured:
        tags.append("structured-pruning")
    else:
        tags.append("unstructured-sparsity")
    if alloc_name != "uniform":
        tags.append(alloc_name.split(":")[0])
    front = ["---"]
    if base:
        front.append(f"base_model: {_yaml_str(base)}")
    front += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {_yaml_str(t)}" for t in dict.fromkeys(tags)]
    front.append("---")
    steps = chain(record)
    methods = " then ".join(str(r.get("method")) for r in steps)
    title = f"{Path(base).name if base and _is_local(base) else (base or 'A model')} pruned with {methods}"
    depth = record.get("depth") or {}
    target = f"{nm_text} (N pruned of every M)" if nm_text else _fmt(record.get("sparsity"), 2)
    rows = [("method", method + (f" ({', '.join(f'{k}={v}' for k, v in record['solver_options'].items())})"
                                 if record.get("solver_options") else "")),
            ("allocation", alloc_name + (f" ({', '.join(f'{k}={v}' for k, v in alloc['options'].items())})"
                                         if isinstance(alloc, dict) and alloc.get("options") else ""))]
    blocks = alloc.get("block") if isinstance(alloc, dict) else None
    if blocks:
        rows.append(("per-block targets", f"{min(blocks):.3f} to {max(blocks):.3f} over {len(blocks)} blocks"))
    if depth:
        rows.append(("blocks removed", f"{len(depth.get('removed', []))} of {depth.get('blocks_before')} by "
                                       f"{depth.get('criterion')}: {depth.get('removed')} "
                                       f"({_fmt(depth.get('removed_fraction'), 3)} of the block parameters)"))
        cost = depth.get("cost") or {}
        rows.append(("criterion cost", f"{cost.get('forward_passes')} forward passes over the calibration windows, "
                                       f"{_fmt(cost.get('seconds'), 1)} s"))
    elif not nm_text or record.get("sparsity") is not None:
        rows.append(("target sparsity", target + (" of the block linears' parameters" if not nm_text else "")))
    if structured and params:
        rows.append(("parameters", f"{params['before']:,} -> {params['after']:,} "
                                   f"({params['after'] / params['before']:.3f}x)"))
        if record.get("layers"):
            from .record_rows import block_sparsity

            rows.append(("achieved sparsity", f"{block_sparsity(record)['overall']:.4f} of the block linears' "
                                              "parameters removed"))
        if structure:
            rows.append(("block widths", "query heads " + ",".join(map(str, structure.get("heads", [])))
                         + "; KV heads " + ",".join(map(str, structure.get("kv_heads", [])))
                         + "; FFN channels " + ",".join(map(str, structure.get("intermediate", [])))))
    elif record.get("measured_sparsity") is not None:
        rows.append(("measured sparsity", f"{record['measured_sparsity']:.4f} of all weights"))
    cal = record.get("calibration") or {}
    if cal:
        bos = {True: ", BOS per window", False: ""}.get(cal.get("bos"), "")
        rows.append(("calibration", f"{cal.get('source')}: {cal.get('nsamples')} x {cal.get('seqlen')} tokens, "
                                    f"seed {cal.get('seed')}{bos}"))
    saved = record.get("saved") or {}
    rows.append(("compute / saved dtype", f"{record.get('compute_dtype', '-')} / {saved.get('dtype', '-')}"))
    if (record.get("timings") or {}).get("total") is not None:
        rows.append(("pruning time", f"{record['timings']['total']:.1f} s"))
    if record.get("finetune"):
        ft = record["finetune"]
        kd = f", distilled from {ft['teacher']}" if ft.get("loss") == "kd" else ""
        rows.append(("recovery", f"{ft.get('method', 'lora')} finetuning, {ft.get('steps', '?')} steps{kd}"))

    body = ["", MARK, "", f"# {title}", "",
            "Pruned layer by layer with layerprune. This card is generated from the run record `layerprune.json` "
            "beside it, which also holds every layer's target and achieved sparsity and reconstruction error.", "",
            "## Pruning", "", "| | |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in rows]
    body.append("")
    if len(steps) > 1:
        body += _steps_table(steps)
    ev = record.get("eval") or {}
    zs = record.get("zeroshot") or {}
    if ev.get("before") or ev.get("after") or zs.get("tasks"):
        body += ["## Evaluation", ""] + _ppl_table(ev) + _zeroshot_table(zs)
    if record.get("evals"):
        body += ["Evaluated later (`layerprune eval`):", "", "| dataset | protocol | window tokens | windows | ppl |",
                 "|---|---|---|---|---|"]
        body += [f"| {ds} | {e.get('protocol')} | {r.get('seqlen')} | {r.get('windows')} | {_fmt(r.get('ppl'), 2)} |"
                 for e in record["evals"] for ds, r in e.get("results", {}).items()] + [""]
    if (record.get("finetune") or {}).get("eval"):
        how = "LoRA" if record["finetune"].get("method", "lora") == "lora" else "full"
        how += " distillation" if record["finetune"].get("loss") == "kd" else ""
        body += [f"After {how} recovery:", ""] + _ppl_table(record["finetune"]["eval"], ("pruned", "recovered"))
        if record["finetune"].get("command_line"):
            body += ["", "```bash", record["finetune"]["command_line"], "```", ""]

    body += ["## How it was made", ""]
    if record.get("command_line"):
        body += ["```bash", record["command_line"], "```"]
    else:
        body += ["Python API:", "", "```python", _python_call(record), "```"]
    if recipe:
        body += ["", f"`{recipe}` beside this card holds its settings: "
                 f"`layerprune prune --recipe {recipe} --out NEW_DIR` "
                 "reruns it" + (" with every earlier step (they are replayed into NEW_DIR.parent first)."
                                if len(steps) > 1 and all(r.get("recipe", True) for r in steps[:-1]) else ".")]
    v = record.get("versions") or {}
    commit = v.get("layerprune_commit")
    body += ["", f"layerprune {v.get('layerprune', 'unknown')}"
             + (f" (commit {commit['commit'][:12]}{', with uncommitted changes' if commit.get('dirty') else ''})"
                if isinstance(commit, dict) and commit.get("commit") else "")
             + f", torch {v.get('torch', '-')}, transformers {v.get('transformers', '-')}.", ""]

    body += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if remote_code:
        body += ['model = AutoModelForCausalLM.from_pretrained("THIS_DIR", trust_remote_code=True)',
                 'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")', "```", "",
                 ("Its decoder blocks all have the same widths, but the family's stock config refuses them "
                  f"({structure['stock_config_refused']})" if structure.get("stock_config_refused") else
                  "Its decoder blocks have different widths, which no stock config describes")
                 + ": the directory ships `configuration_layerprune.py` and `modeling_layerprune.py` "
                 "(they import only torch and "
                 "transformers; read them before trusting them), and `trust_remote_code=True` loads them. "
                 "`layerprune.load_model(\"THIS_DIR\")` loads it without remote code."]
        if structure.get("stock_config_refused"):
            body += ["", "`layerprune export THIS_DIR --to gguf` writes the family's stock llama.cpp architecture "
                     "(llama.cpp reads any head count)."]
    else:
        body += ['model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
                 'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")', "```", ""]
        if structured:
            body.append("A stock config describes the smaller blocks: any runtime that reads it gets the smaller, "
                        "faster model.")
        else:
            body.append("The pruned weights are stored as zeros in dense tensors: the files are as large as the base "
                        "model's, and stock runtimes run it no faster.")
    return "\n".join(front + body) + "\n"


def replaceable(p: Path) -> bool:
    """Whether the card file ``p`` may be (re)written: absent, or a card layerprune wrote (it carries ``MARK``)."""
    p = Path(p)
    if not p.exists():
        return True
    try:
        return MARK in p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def write_card(out: Path, record: dict) -> bool:
    """Write (or refresh) ``out/README.md`` from the record, unless a README.md there is not ours (no ``MARK``).
    Returns whether it was written."""
    p = Path(out) / CARD_NAME
    if not replaceable(p):
        return False
    tmp = p.with_name(f".{CARD_NAME}.tmp")
    recipe = RECIPE_NAME if (Path(out) / RECIPE_NAME).is_file() else None
    tmp.write_text(render(record, recipe=recipe), encoding="utf-8")
    tmp.replace(p)
    return True


def chain(record: dict) -> list[dict]:
    """The steps of a chained run, first first: its ancestors (``parent`` records) then itself."""
    steps = []
    r = record
    while isinstance(r, dict):
        steps.append(r)
        r = r.get("parent")
    return steps[::-1]
