"""The Python API: the same power as the CLI.

    from layerprune import load_model, prune, evaluate_ppl
    model, tok = load_model("smollm2-135m")
    record = prune(model, tok, method="wanda", sparsity=0.5, allocation="dlp", nsamples=32, seqlen=512)
    print(evaluate_ppl(model, tok, "wikitext2", seqlen=512, max_windows=40).ppl)
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .data import calibration_pool, get_calibration, resolve_data_dir
from .data.calibration import CalibrationSet
from .config import PruneConfig
from .engine import prune_model
from .errors import UserError
from .models.info import measure_sparsity
from .record import versions
from .solvers.nm import parse_nm


def calibration_set(tokenizer, calib: str = "c4", nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                    data_dir=None, bos: bool | None = None) -> CalibrationSet:
    """``bos``: start every window with BOS (True), never (False), or as the tokenizer does (None)."""
    pool = calibration_pool(calib, resolve_data_dir(data_dir))
    return get_calibration(tokenizer, pool, nsamples, seqlen, seed, bos=bos)


def prune(model, tokenizer=None, *, method: str = "wanda", sparsity: float | None = None, nm=None,
          allocation: str = "uniform", allocation_options: dict | None = None, solver_options: dict | None = None,
          calibration: CalibrationSet | torch.Tensor | None = None, calib: str = "c4", nsamples: int = 128,
          seqlen: int = 2048, seed: int = 0, data_dir=None, device=None, offload: str = "none",
          compute_dtype: str = "float32", true_sequential: bool = False, batch_size: int = 8, skip=(),
          out_dir: Path | None = None, resume: bool = False, store=None, progress: bool = True,
          block_stats: list[float] | None = None, checkpoint: str | None = None, reconstruct: str = "none",
          reconstruct_options: dict | None = None) -> dict:
    """Prune ``model`` in place and return the run record (a dict, JSON-serialisable).

    ``calibration`` may be given directly (a CalibrationSet or a LongTensor [n, seqlen]); otherwise
    ``nsamples`` windows of ``seqlen`` tokens are drawn from ``calib`` with ``seed`` like the reference code.
    ``block_stats``: the allocator's per-block statistics if already computed (``allocation.plan.allocation_statistics``
    on the same model and calibration): the dense pre-pass is skipped.
    ``checkpoint``: with ``out_dir``, what is kept to resume (full, weights or none; ``checkpoint.checkpoint_mode``).
    ``reconstruct="block"``: after each block's solve, Adam on the block's output error with the pattern fixed
    (``layerprune.reconstruct``; ``reconstruct_options``: epochs, lr).
    ``allocation="auto"``: the allocation is chosen first (``allocation.auto.choose``: candidates scored by a proxy on
    the WikiText-2 validation split, which needs ``tokenizer`` and the data directory); the record's
    ``allocation_auto`` says what was tried, the proxy values and why the choice was made.
    """
    if isinstance(nm, str):
        nm = parse_nm(nm)
    out_dir = Path(out_dir) if out_dir is not None else None
    cfg = PruneConfig(method=method, sparsity=sparsity, nm=tuple(nm) if nm else None, allocation=allocation,
                      allocation_options=dict(allocation_options or {}), solver_options=dict(solver_options or {}),
                      true_sequential=true_sequential, batch_size=batch_size, compute_dtype=compute_dtype,
                      offload=offload, skip=tuple(skip), reconstruct=reconstruct,
                      reconstruct_options=dict(reconstruct_options or {}))
    cfg.validate()
    auto = allocation.strip().lower() == "auto"
    if auto:  # checked before any work
        _check_auto(cfg, tokenizer, skip)
    t0 = time.perf_counter()
    if calibration is None:
        if tokenizer is None:
            raise UserError("prune() needs a tokenizer to draw calibration windows, or pass calibration=")
        calibration = calibration_set(tokenizer, calib, nsamples, seqlen, seed, data_dir)
    if isinstance(calibration, CalibrationSet):
        calib_info = {"source": calib, "nsamples": calibration.nsamples, "seqlen": calibration.seqlen,
                      "seed": calibration.seed, "pool_size": calibration.pool_size, "draws": calibration.draws, "bos": calibration.bos}
        ids = calibration.ids
    else:
        ids = calibration
        calib_info = {"source": "given", "nsamples": ids.shape[0], "seqlen": ids.shape[1], "seed": seed}
    t_calib = time.perf_counter() - t0
    report = None
    if auto:
        report = _choose_auto(model, tokenizer, ids, cfg, data_dir, batch_size, progress, device)
        cfg.allocation, cfg.allocation_options = report["spec"], {**report["options"], **{
            k: v for k, v in cfg.allocation_options.items() if k in ("lo", "hi")}}
        block_stats = report["block_stats"]
    record = prune_model(model, ids, cfg, device=device, out_dir=out_dir, resume=resume, store=store,
                         progress=progress, block_stats=block_stats, checkpoint=checkpoint)
    record["timings"]["calibration_data"] = t_calib
    if report is not None:
        record["allocation_auto"] = {k: v for k, v in report.items() if k != "block_stats"}
        record["timings"]["auto_choice"] = report["seconds"]["total"]
    record["calibration"] = calib_info
    record["seed"] = calib_info.get("seed", seed)
    if offload != "disk":  # with disk offload the blocks are not in memory; "achieved" per layer says it
        sp = measure_sparsity(model)
        record["measured_sparsity"] = sp["overall"]
        record["measured_block_sparsity"] = sp["per_block"]
    record["versions"] = versions()
    record.setdefault("model", getattr(model, "layerprune_spec", None))
    record["api_call"] = {"method": method, "sparsity": sparsity, "nm": f"{nm[0]}:{nm[1]}" if nm else None,
                          "allocation": allocation, "allocation_options": dict(allocation_options or {}),
                          "solver_options": dict(solver_options or {}),
                          **({k: calib_info[s] for k, s in (("calib", "source"), ("nsamples", "nsamples"),
                                                            ("seqlen", "seqlen"), ("seed", "seed"))}
                             if isinstance(calibration, CalibrationSet)
                             else {"calibration": f"token ids {ids.shape[0]} x {ids.shape[1]}"}),
                          "compute_dtype": compute_dtype, "true_sequential": true_sequential, "skip": list(skip),
                          **({"reconstruct": reconstruct, "reconstruct_options": dict(reconstruct_options or {})}
                             if reconstruct != "none" else {})}
    return record


def _check_auto(cfg: PruneConfig, tokenizer, skip) -> None:
    if tokenizer is None:
        raise UserError("allocation 'auto' scores candidates on WikiText-2 validation text: pass the tokenizer")
    if cfg.nm is not None:
        raise UserError("allocation 'auto' chooses per-block sparsities; it does not combine with N:M: pick an "
                        "allocation yourself for --nm")
    if skip:
        raise UserError("allocation 'auto' prunes every linear in its proxy; it does not combine with --skip")
    if cfg.offload == "disk":
        raise UserError("allocation 'auto' scores candidates on a copy of the model in memory; it does not combine "
                        "with --offload disk")
    if not 0.0 < cfg.sparsity < 1.0:
        raise UserError(f"allocation 'auto' needs a sparsity in (0, 1), got {cfg.sparsity}")


def _choose_auto(model, tokenizer, ids, cfg: PruneConfig, data_dir, batch_size: int, progress: bool,
                 device=None) -> dict:
    from .allocation.auto import choose
    from .data.bos import bos_id
    from .evaluation.perplexity import check_seqlen, tokenize_corpus

    seqlen = check_seqlen(model, None, default=512)  # the search's windows, capped at the model's maximum
    valid = tokenize_corpus(tokenizer, "wikitext2-valid", resolve_data_dir(data_dir), seqlen)
    opts = cfg.allocation_options
    named = {k: opts[k] for k in ("proxy", "finalists", "margin", "budget") if opts.get(k) is not None}  # else defaults
    return choose(model, ids, valid, cfg.sparsity, **named, lo=opts.get("lo", 0.0),
                  hi=opts.get("hi", 0.99), seqlen=seqlen, batch_size=batch_size, bos=bos_id(tokenizer),
                  progress=progress, prune_fn=prune_model, device=device)
