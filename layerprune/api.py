"""The Python API: the same power as the CLI.

A whole run, as ``layerprune prune`` does it (load, calibrate, prune, save with record, recipe and model card,
evaluate before and after), in one call:

    from layerprune import PruneConfig, RunConfig, run_prune
    record = run_prune(RunConfig(model="smollm2-135m", out="runs/wanda50", max_windows=40,
                                 prune=PruneConfig(method="wanda", sparsity=0.5, nsamples=32, seqlen=512)))
    record = run_prune(model="smollm2-135m", out="runs/wanda50", method="wanda", sparsity=0.5)  # the same, keywords

A model already in memory, pruned in place:

    from layerprune import load_model, prune, evaluate_ppl
    model, tok = load_model("smollm2-135m")
    record = prune(model, tok, method="wanda", sparsity=0.5, allocation="dlp", nsamples=32, seqlen=512)
    print(evaluate_ppl(model, tok, "wikitext2", seqlen=512, max_windows=40).ppl)
"""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import distributed
from .allocation import get_allocator
from .config import CHECKPOINT_EVERY_S, DTYPES, PruneConfig, RunConfig
from .data import calibration_set
from .data.calibration import CalibrationSet
from .engine import preflight, prune_model
from .errors import UserError
from .models.info import measure_sparsity
from .reconstruct import check as check_reconstruct
from .record import versions
from .search import Auto  # noqa: F401 (registers the 'auto' allocator: a choice step before the run)
from .solvers import get_solver

log = logging.getLogger(__name__)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``name`` as a torch device, checked (None: cuda when present, else cpu)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for but no CUDA device is present: use --device cpu")
    return dev


def _config(cls, config, settings: dict):
    """``config`` or one built from keyword ``settings`` (not both), validated."""
    if config is not None and settings:
        raise UserError(f"pass a {cls.__name__} or keyword settings ({', '.join(sorted(settings))}), not both: "
                        f"use dataclasses.replace(config, ...) to change a config")
    if config is None:
        if cls is RunConfig:
            config = RunConfig.from_settings(**settings)
        else:
            known = {f.name for f in dataclasses.fields(PruneConfig)}
            unknown = sorted(set(settings) - known)
            if unknown:
                raise TypeError(f"prune() got unknown setting(s) {', '.join(unknown)}; PruneConfig has "
                                f"{', '.join(sorted(known))}")
            config = PruneConfig(**settings)
    if not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
    config.validate()
    cfg = config.prune if cls is RunConfig else config
    get_solver(cfg.method)  # the method's and the allocation's names and options, before any work
    get_allocator(cfg.allocation, **cfg.allocation_options)
    cfg.reconstruct_options = check_reconstruct(cfg.reconstruct, cfg.reconstruct_options)
    return config


def prune(model, tokenizer=None, config: PruneConfig | None = None, *, calibration=None, data_dir=None, device=None,
          out_dir: Path | None = None, resume: bool = False, store=None, progress: bool = True,
          block_stats: list[float] | None = None, checkpoint: str | None = None,
          checkpoint_every: float = CHECKPOINT_EVERY_S, **settings) -> dict:
    """Prune ``model`` in place and return the run record (a dict, JSON-serialisable).

    ``config``: a PruneConfig, or its fields as keywords (``method="wanda", sparsity=0.5, ...``), not both.
    The calibration windows are drawn from the config's ``calib``/``nsamples``/``seqlen``/``seed`` (defaults c4, 128,
    2048 capped at the model's maximum, 0; needs ``tokenizer``), or given as ``calibration`` (a CalibrationSet or a
    LongTensor [n, seqlen]) with those settings left unset: giving both is refused.
    ``block_stats``: the allocator's per-block statistics if already computed (``allocation.plan.allocation_statistics``
    on the same model and calibration): the dense pre-pass is skipped.
    ``checkpoint``: with ``out_dir``, what is kept to resume (full, weights or none; ``checkpoint.checkpoint_mode``),
    committed at most every ``checkpoint_every`` seconds (0: after every block).
    An allocation that is chosen per model (``allocation="auto"``: candidates scored by a proxy on the WikiText-2
    validation split, which needs ``tokenizer`` and the data directory) is chosen first; the record's
    ``allocation_auto`` says what was tried, the proxy values and why the choice was made.
    """
    cfg = _config(PruneConfig, config, settings)
    out_dir = Path(out_dir) if out_dir is not None else None
    if calibration is not None and cfg.calibration_given():
        raise UserError(f"calibration given twice: as calibration= and as {', '.join(cfg.calibration_given())}; "
                        "pass one of them")
    _check_choice(cfg, tokenizer is not None)
    t0 = time.perf_counter()
    if calibration is None:
        if tokenizer is None:
            raise UserError("prune() needs a tokenizer to draw calibration windows, or pass calibration=")
        from .evaluation.perplexity import check_seqlen

        c = cfg.calibration_settings()
        calibration = calibration_set(tokenizer, c["calib"], c["nsamples"], check_seqlen(model, c["seqlen"]),
                                      c["seed"], data_dir)
    t_calib = time.perf_counter() - t0
    return _prune(model, tokenizer, cfg, calibration, t_calib, data_dir=data_dir, device=device, out_dir=out_dir,
                  resume=resume, store=store, progress=progress, block_stats=block_stats, checkpoint=checkpoint,
                  checkpoint_every=checkpoint_every)


def _chooser(cfg: PruneConfig):
    """The allocator when it chooses the allocation per model before the run (it declares ``choose_for_run``)."""
    allocator = get_allocator(cfg.allocation, **cfg.allocation_options)
    return allocator if hasattr(allocator, "choose_for_run") else None


def _check_choice(cfg: PruneConfig, has_tokenizer: bool) -> None:
    chooser = _chooser(cfg)
    if chooser is not None:  # checked before any work
        chooser.check_run(cfg, has_tokenizer)


def _prune(model, tokenizer, cfg: PruneConfig, calibration, t_calib: float, *, data_dir, device, out_dir, resume,
           store, progress, block_stats, checkpoint=None, checkpoint_every: float = CHECKPOINT_EVERY_S) -> dict:
    if isinstance(calibration, CalibrationSet):
        calib_info = {"source": calibration.source or "given", "nsamples": calibration.nsamples,
                      "seqlen": calibration.seqlen, "seed": calibration.seed, "pool_size": calibration.pool_size,
                      "draws": calibration.draws, "bos": calibration.bos}
        ids = calibration.ids
    else:
        ids = calibration
        calib_info = {"source": "given", "nsamples": ids.shape[0], "seqlen": ids.shape[1], "seed": None}
    chooser, report, run_cfg = _chooser(cfg), None, cfg
    if chooser is not None:
        report = chooser.choose_for_run(model, tokenizer, ids, cfg, data_dir=data_dir, progress=progress,
                                        prune_fn=prune_model, device=device)
        run_cfg = dataclasses.replace(cfg, allocation=report["spec"], allocation_options=report["run_options"])
        block_stats = report["block_stats"]
    record = prune_model(model, ids, run_cfg, device=device, out_dir=out_dir, resume=resume, store=store,
                         progress=progress, block_stats=block_stats, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every)
    record["timings"]["calibration_data"] = t_calib  # drawing the windows, when this call drew them
    record["timings"]["total"] += t_calib
    if report is not None:
        record["allocation_auto"] = {k: v for k, v in report.items() if k not in ("block_stats", "run_options")}
        record["timings"]["auto_choice"] = report["seconds"]["total"]
        record["timings"]["total"] += report["seconds"]["total"]
    record["calibration"] = calib_info
    record["seed"] = calib_info["seed"]
    if cfg.offload != "disk":  # with disk offload the blocks are not in memory; "achieved" per layer says it
        sp = measure_sparsity(model)
        record["measured_sparsity"] = sp["overall"]
        record["measured_block_sparsity"] = sp["per_block"]
    record["versions"] = versions()
    record.setdefault("model", getattr(model, "layerprune_spec", None))
    given = {k: calib_info[s] for k, s in (("calib", "source"), ("nsamples", "nsamples"), ("seqlen", "seqlen"),
                                           ("seed", "seed"))} if isinstance(calibration, CalibrationSet) \
        else {"calibration": f"token ids {ids.shape[0]} x {ids.shape[1]}"}
    record["api_call"] = {"method": cfg.method, "sparsity": None if cfg.nm else cfg.sparsity,  # N:M sets it
                          "nm": f"{cfg.nm[0]}:{cfg.nm[1]}" if cfg.nm else None, "allocation": cfg.allocation,
                          "allocation_options": dict(cfg.allocation_options),
                          "solver_options": dict(cfg.solver_options), **given, "compute_dtype": cfg.compute_dtype,
                          "true_sequential": cfg.true_sequential, "skip": list(cfg.skip),
                          **({"reconstruct": cfg.reconstruct, "reconstruct_options": dict(cfg.reconstruct_options)}
                             if cfg.reconstruct != "none" else {})}
    return record


@contextmanager
def on_device(model, device):
    """The whole model on ``device`` for the duration (an evaluation), then back where it was."""
    home = next(model.parameters()).device
    if home == torch.device(device):
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def evaluate_datasets(model, tok, datasets, seqlen, data_dir, max_windows, batch_size, device=None) -> dict:
    """Perplexity on each dataset (name -> ``PPLResult.to_dict()``), on ``device`` (default: where the model is)."""
    from .evaluation.perplexity import evaluate_ppl

    if not datasets:
        return {}
    with on_device(model, device or next(model.parameters()).device):
        return {ds: evaluate_ppl(model, tok, ds, seqlen, data_dir, max_windows, batch_size).to_dict()
                for ds in datasets}


def run_prune(config: RunConfig | None = None, **settings) -> dict:
    """Everything ``layerprune prune`` does, from one RunConfig (or its fields and PruneConfig's as keywords): check
    the settings and the output directory before any load, load the model (with ``offload="disk"`` its blocks stay on
    disk), draw the calibration windows, evaluate the dense model, prune, save the run (weights, tokenizer,
    ``layerprune.json``, ``recipe.yaml``, model card), evaluate the pruned model. Returns the run record.
    ``resume=True`` continues an interrupted run in ``out``; ``force=True`` replaces a layerprune run there."""
    from .data.corpora import resolve_data_dir as _data_dir
    from .evaluation.perplexity import check_seqlen
    from .models.loading import load_model, load_skeleton
    from .offload import run_disk_need
    from .outputs import RECORD_NAME, check_free_space, finish_dir, prepare_dir, write_text
    from .record import parent_summary, read_record, save_dtype, save_run, write_record
    from .recipe import RECIPE_NAME, build_recipe, dump, model_path, run_recipe

    run = _config(RunConfig, config, settings)
    cfg = run.prune
    data_dir = _data_dir(run.data_dir)
    out = Path(run.out).expanduser()
    inputs = [run.model, *run.inputs]
    device = resolve_device(run.device)
    world = distributed.current()
    if distributed.launched():  # torchrun: N processes, each on its shard of the calibration windows
        world.check(cfg, cfg.calibration_settings()["nsamples"])
        world = distributed.init(device)
        device = world.device
        if world.rank:  # logs, progress, evaluation and every write: rank 0
            logging.getLogger().setLevel(logging.ERROR)
    lead = world.rank == 0
    if lead:  # 1. checks before any load or write
        prepare_dir(out, run.force, run.resume, inputs=inputs, create=False)
    _check_choice(cfg, True)  # the tokenizer comes with the model
    model_spec = run.model if run.parent is None else _replay_parent(run, out)
    inputs[0] = model_spec
    _say(run, f"loading {model_spec} ({run.dtype})")
    skeleton = load_skeleton(model_spec, run.dtype)
    if skeleton is not None:
        preflight(skeleton, cfg)
        del skeleton

    store = None  # 2. load, draw the calibration, check the disk, then write
    if cfg.offload == "disk":  # idle blocks stay on disk from load to save
        from .offload import load_model_lazy

        model, tok, store = load_model_lazy(model_spec, run.dtype)
    else:  # in CPU RAM: the engine moves one block at a time to `device`
        model, tok = load_model(model_spec, run.dtype, use_cache=run.use_cache)
    preflight(model, cfg)  # again, for a model whose config was not at hand before the load
    c = cfg.calibration_settings()
    seqlen = check_seqlen(model, c["seqlen"])
    eval_seqlen = check_seqlen(model, run.eval_seqlen or seqlen)
    _say(run, f"drawing {c['nsamples']} calibration windows of {seqlen} tokens from {c['calib']}")
    t0 = time.perf_counter()
    calib = calibration_set(tok, c["calib"], c["nsamples"], seqlen, c["seed"], data_dir)
    t_calib = time.perf_counter() - t0
    need_out = run_disk_need(model, c["nsamples"], seqlen, DTYPES[cfg.compute_dtype], cfg.offload)
    work = out  # another rank writes nothing: the engine only needs to know that rank 0 checkpoints
    if lead:
        work = prepare_dir(out, run.force, run.resume, inputs=inputs, create=False)
        check_free_space(work, need_out - _du(work), "the checkpoint and the saved run")
        work = prepare_dir(out, run.force, run.resume, inputs=inputs)
    if store is not None and lead:  # pruned blocks go straight to their final shards in the run directory
        store.bind(work, save_dtype(model, run.save_dtype))

    lazy = store is not None  # with disk offload the full model is never in memory: evaluate the saved run
    ev = lambda m, t: evaluate_datasets(m, t, run.eval, eval_seqlen, data_dir, run.max_windows,  # noqa: E731
                                        cfg.batch_size, device)
    before = ev(model, tok) if run.dense_eval and not lazy and lead else {}
    dense_sparsity = None if lazy else measure_sparsity(model)["overall"]
    record = _prune(model, tok, cfg, calib, t_calib, data_dir=data_dir, device=device, out_dir=work,
                    resume=run.resume, store=store, progress=run.progress, block_stats=None, checkpoint=run.checkpoint,
                    checkpoint_every=run.checkpoint_every)
    if not lead:
        return None
    record["model"] = model_spec
    record["command_line"] = run.command_line  # shown in the run's model card
    record["dense_sparsity"] = dense_sparsity
    resolved = {"model": model_path(model_spec), "seqlen": seqlen, "eval_seqlen": eval_seqlen,
                "save_dtype": str(save_dtype(model, run.save_dtype)).removeprefix("torch.")}
    if record["sparsity"] is None:  # a run that sets no sparsity (e.g. depth's drop) records none
        resolved["sparsity"] = record["api_call"]["sparsity"] = None
    parent_dir, parent_recipe = Path(model_spec).expanduser(), None
    if (parent_dir / RECORD_NAME).is_file():  # pruned further: the record and the recipe chain the steps
        record["parent"] = parent_summary(read_record(parent_dir), parent_dir)
        parent_recipe = run_recipe(parent_dir)
        record["parent"]["recipe"] = parent_recipe is not None
    recipe_text = dump(build_recipe(run, resolved, parent_recipe))
    if lazy:
        write_text(work / RECIPE_NAME, recipe_text)
        sp = store.measure_sparsity(model)  # one block at a time
        record["measured_sparsity"], record["measured_block_sparsity"] = sp["overall"], sp["per_block"]
        save_run(model, tok, work, record, store, dtype=run.save_dtype)
        finish_dir(work, out)
        if run.eval or cfg.solver_options.get("wbits") is not None:  # these need the whole pruned model in memory
            model, tok = load_model(str(out), run.dtype)
    if cfg.solver_options.get("wbits") is not None:  # stored dequantized (fp32); this is what packed storage takes
        from .quant import model_size_bytes

        record["quantization"] = model_size_bytes(model, cfg.solver_options["wbits"], cfg.solver_options["groupsize"])
    after = ev(model, tok)
    record["eval"] = {"before": before, "after": after, "seqlen": eval_seqlen, "max_windows": run.max_windows}
    if lazy:
        write_record(out, record)
    else:
        write_text(work / RECIPE_NAME, recipe_text)
        save_run(model, tok, work, record, dtype=run.save_dtype)
        finish_dir(work, out)
    return record


def _replay_parent(run: RunConfig, out: Path) -> str:
    """Run a chained run's parent step into ``OUT.parent`` (or reuse the run there when it holds the recipe that step
    replays and ``force`` is off); returns that directory, the model of this step."""
    from .outputs import RECORD_NAME
    from .recipe import run_recipe

    step = out.with_name(out.name + ".parent")
    parent = dataclasses.replace(run.parent, out=step)
    have = run_recipe(step) if (step / RECORD_NAME).is_file() else None
    if have is not None and not run.force and parent.replays is not None and _same_step(have, parent.replays):
        _say(run, f"reusing the parent step in {step} (it holds this recipe's parent run)")
        return str(step)
    _say(run, f"replaying the parent step into {step}")
    try:
        run_prune(parent)
    except UserError as e:
        raise UserError(f"the parent step ({step}) failed: {e}; nothing was written to {out}") from None
    return str(step)


def _same_step(a: dict, b: dict) -> bool:
    """Two recipes of the same step (a replayed chain's model moves: a step with a parent is compared without it)."""
    strip = lambda r: {k: v for k, v in r.items() if k != "model" or "parent" not in r}  # noqa: E731
    return strip(a) == strip(b)


def _say(run: RunConfig, what: str) -> None:
    """What the run is doing before its first progress bar: a line on a terminal (progress on), else a log line (a
    log or a captured stderr keeps one line per error)."""
    import sys

    if run.progress and sys.stderr.isatty():
        print(f"layerprune: {what} ...", file=sys.stderr, flush=True)
    else:
        log.info(what)


def _du(folder: Path) -> int:
    """Bytes already under ``folder`` (a resumed run's checkpoint counts toward what it needs)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).is_dir() else 0
