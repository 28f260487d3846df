"""Zero-shot accuracy with lm-evaluation-harness on the in-memory model (no save / reload).

The model is wrapped in lm-eval's `HFLM(pretrained=<model>, tokenizer=<tokenizer>)` and scored with
`lm_eval.simple_evaluate(..., num_fewshot=0)`. Every task is multiple choice: the answer is the choice with the highest
log-likelihood given the prompt (acc), or the highest log-likelihood per character of the choice (acc_norm, for the
tasks whose standard lm-eval definition reports it).

Where the data comes from, per task:
- boolq, rte, arc_easy, arc_challenge, openbookqa, piqa: the local files under `data_dir` (layout of
  /work/shared/data/zeroshot). The task configs in `tasks/` copy lm-eval's standard prompts, choices and targets
  and read the files in memory (`tasks/local_data.py`), so no hub call is made and the numbers are comparable.
- hellaswag, winogrande (and any of the above whose local files are missing, and any other lm-eval task name):
  lm-eval's standard task, which downloads from the Hugging Face hub (or reads the local hub cache).
A task that has neither is skipped and listed under "skipped" with the reason, never dropped silently.
"""
import contextlib
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from layerprune.errors import UserError

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = ("boolq", "rte", "arc_easy", "arc_challenge", "openbookqa", "piqa")
# lm-eval's own configs (relative to the installed lm_eval/tasks), used when the local files are missing
HUB_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "rte": "glue/rte/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
}
# the suites of the papers (peers.md section 5/6): unstructured (Wanda/OWL/DLP/DSA) and structured (SlimGPT/LLM-Pruner)
UNSTRUCTURED_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
STRUCTURED_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def zeroshot_dir(data_dir):
    """The folder holding boolq/, rte/, arc/, ...: `data_dir`/zeroshot when it exists (the project data dir),
    else `data_dir`."""
    if data_dir is None:
        return None
    sub = Path(data_dir) / "zeroshot"
    return sub if sub.is_dir() else Path(data_dir)


def local_files(task, data_dir):
    """The local files of `task` under `data_dir`, or None when the task has none there."""
    from layerprune.evaluation.tasks.local_data import FILES

    if data_dir is None or task not in FILES:
        return None
    paths = [Path(data_dir) / p for p in FILES[task]]
    return paths if all(p.is_file() for p in paths) else None


def hub_reachable(timeout=3.0):
    """False when the user asked for offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or the hub host does not
    answer."""
    if any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
           for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline(offline=True):
    """Force huggingface_hub / datasets into offline mode (only cached copies) while inside, then restore."""
    import datasets.config
    import huggingface_hub.constants as hc

    old = hc.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    if offline:
        hc.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = old


def _short(err):
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg[:200]}"


def load_tasks(tasks, data_dir=None, offline=None):
    """Build lm-eval Task objects.

    Returns (tasks {name: Task}, sources {name: "local:<dir>" | "hub"}, skipped {name: reason}).
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    data_dir = zeroshot_dir(data_dir)
    meta = {"data_dir": str(data_dir)} if data_dir is not None else None
    tm = TaskManager(include_defaults=False, metadata=meta)  # no index of lm-eval's ~15k configs: load by path
    full_tm = None
    builtin = Path(lm_eval.tasks.__file__).parent
    loaded, sources, skipped = {}, {}, {}
    for name in dict.fromkeys(tasks):  # keep order, drop repeats
        if local_files(name, data_dir):
            loaded[name] = tm.load([str(TASKS_DIR / f"{name}.yaml")])["tasks"][name]
            sources[name] = f"local:{data_dir}"
            continue
        if offline is None:
            offline = not hub_reachable()
        why_local = f"no local files under {data_dir}" if name in LOCAL_TASKS else "no local copy"
        spec = str(builtin / HUB_YAML[name]) if name in HUB_YAML and (builtin / HUB_YAML[name]).is_file() else name
        if spec == name:
            full_tm = full_tm or TaskManager(metadata=meta)
            if name not in full_tm.all_subtasks:
                raise UserError(f"unknown zero-shot task {name!r}; use one of {', '.join(HUB_YAML)} "
                                "or an lm-eval task name")
        try:
            with hub_offline(offline):
                loaded[name] = (full_tm if spec == name else tm).load([spec])["tasks"][name]
            sources[name] = "hub"
        except Exception as err:  # the hub (or its cache) has no copy: skip, and say why
            where = "hub offline and not in the local hub cache" if offline else "hub download failed"
            skipped[name] = f"{why_local}; {where} ({_short(err)})"
    return loaded, sources, skipped


def zeroshot(model, tokenizer, tasks, data_dir=None, limit=None, batch_size=8, offline=None, max_length=None):
    """Zero-shot accuracy of `model` on `tasks` (lm-eval names) with lm-eval's HFLM wrapper around the live model.

    data_dir: the project data dir (its zeroshot/ subfolder is used) or the folder with the local task files
        (boolq/, rte/, arc/, openbookqa/, piqa/) itself, or None for hub only.
    limit: at most this many examples per task (lm-eval's --limit, the first ones of the split).
    offline: True = never contact the hub (cached copies only); None = probe the hub once when a task needs it.
    Returns {"tasks": {name: {acc, acc_stderr, [acc_norm, acc_norm_stderr], n, source}}, "mean_acc" (mean of acc over
    the evaluated tasks), "mean_acc_norm" (mean of acc_norm where the task reports it, else acc), "skipped":
    {name: reason}, "limit", "num_fewshot": 0, "seconds", "lm_eval_version"}.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise UserError("no zero-shot tasks given; name at least one, e.g. boolq,rte,arc_easy")
    if limit is not None and limit < 1:
        raise UserError(f"zero-shot limit must be a positive number of examples, got {limit}")
    t0 = time.time()
    loaded, sources, skipped = load_tasks(tasks, data_dir, offline)
    out = {"tasks": {}, "mean_acc": None, "mean_acc_norm": None, "skipped": skipped, "limit": limit, "num_fewshot": 0,
           "lm_eval_version": getattr(lm_eval, "__version__", "")}
    if loaded:
        was_training = model.training
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        with hub_offline(True):  # every dataset is loaded by now; keep lm-eval's model-info lookup off the network
            res = lm_eval.simple_evaluate(model=lm, tasks=list(loaded.values()), num_fewshot=0, limit=limit,
                                          log_samples=False, task_manager=TaskManager(include_defaults=False))
        model.train(was_training)
        for name in loaded:
            r = res["results"][name]
            row = {"acc": r["acc,none"], "acc_stderr": r.get("acc_stderr,none")}
            if "acc_norm,none" in r:
                row.update(acc_norm=r["acc_norm,none"], acc_norm_stderr=r.get("acc_norm_stderr,none"))
            row["n"] = res["n-samples"][name]["effective"]
            row["source"] = sources[name]
            out["tasks"][name] = row
        out["mean_acc"], out["mean_acc_norm"] = _means(out["tasks"])
    out["seconds"] = time.time() - t0
    return out


def _means(rows):
    """(mean acc, mean of acc_norm-where-reported-else-acc) over the task rows, or (None, None) when empty."""
    if not rows:
        return None, None
    n = len(rows)
    return sum(r["acc"] for r in rows.values()) / n, sum(r.get("acc_norm", r["acc"]) for r in rows.values()) / n


def parse_tasks(spec):
    """'boolq, rte,arc_easy' -> ['boolq', 'rte', 'arc_easy'] (order kept, repeats dropped); UserError when empty."""
    tasks = list(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))
    if not tasks:
        raise UserError(f"--tasks {spec!r} names no task: give a comma list such as boolq,rte,arc_easy")
    return tasks


def join_record(record, out):
    """Add a zeroshot() result to a run record: record["zeroshot"]["tasks"] gains (or replaces) the evaluated tasks,
    each row keeping its own limit; the means are recomputed over all tasks now there; "skipped" keeps every task
    skipped by this or an earlier call (latest reason) until a call evaluates it."""
    zs = record.setdefault("zeroshot", {"tasks": {}})
    for name, row in out["tasks"].items():
        zs["tasks"][name] = {**row, "limit": out["limit"], "seconds_run": out["seconds"]}
    skipped = {**zs.get("skipped", {}), **out["skipped"]}
    zs["skipped"] = {k: v for k, v in skipped.items() if k not in zs["tasks"]}
    zs["mean_acc"], zs["mean_acc_norm"] = _means(zs["tasks"])
    zs.update(num_fewshot=out["num_fewshot"], lm_eval_version=out["lm_eval_version"])
    return record


def format_table(out):
    """Per-task table (n, acc, acc_norm, source), the two means, and one line per skipped task with its reason."""
    head = f"{'task':14s} {'n':>6s} {'acc':>7s} {'acc_norm':>8s}  source"
    lines = [head, "-" * len(head)]
    for name, r in out["tasks"].items():
        norm = f"{r['acc_norm']:8.4f}" if "acc_norm" in r else f"{'-':>8s}"
        lines.append(f"{name:14s} {r['n']:6d} {r['acc']:7.4f} {norm}  {r['source']}")
    if out["tasks"]:
        lines.append(f"{'mean':14s} {'':6s} {out['mean_acc']:7.4f} {out['mean_acc_norm']:8.4f}  "
                     "(acc_norm column: acc_norm where reported, else acc)")
    lim = "all examples" if out.get("limit") is None else f"the first {out['limit']} examples of each task"
    lines.append(f"0-shot, {lim}; {out.get('seconds', 0):.0f}s")
    for name, why in out["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)
