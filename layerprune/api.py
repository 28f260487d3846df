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
          block_stats: list[float] | None = None) -> dict:
    """Prune ``model`` in place and return the run record (a dict, JSON-serialisable).

    ``calibration`` may be given directly (a CalibrationSet or a LongTensor [n, seqlen]); otherwise
    ``nsamples`` windows of ``seqlen`` tokens are drawn from ``calib`` with ``seed`` like the reference code.
    ``block_stats``: the allocator's per-block statistics if already computed (``allocation.plan.allocation_statistics``
    on the same model and calibration): the dense pre-pass is skipped.
    """
    if isinstance(nm, str):
        nm = parse_nm(nm)
    out_dir = Path(out_dir) if out_dir is not None else None
    cfg = PruneConfig(method=method, sparsity=sparsity, nm=tuple(nm) if nm else None, allocation=allocation,
                      allocation_options=dict(allocation_options or {}), solver_options=dict(solver_options or {}),
                      true_sequential=true_sequential, batch_size=batch_size, compute_dtype=compute_dtype,
                      offload=offload, skip=tuple(skip))
    cfg.validate()
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
    record = prune_model(model, ids, cfg, device=device, out_dir=out_dir, resume=resume, store=store,
                         progress=progress, block_stats=block_stats)
    record["timings"]["calibration_data"] = t_calib
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
                          "compute_dtype": compute_dtype, "true_sequential": true_sequential, "skip": list(skip)}
    return record
