"""`layerprune finetune`: LoRA recovery of a saved run directory, mask fixed, merged and saved with its record.

Steps: load the run's weights, record the masks M = (W != 0) of every block linear, measure PPL, train LoRA on
calibration-pool windows (finetune_lora), merge and re-apply M, check that the zero pattern is exactly M again,
measure PPL, save (to a new run directory, or over the old one when asked to).
"""
import shutil
import time
from pathlib import Path

import torch

from layerprune.errors import UserError
from layerprune.outputs import finish_dir, prepare_dir
from layerprune.recovery.lora import finetune_lora, masks_of

IN_PLACE_HINT = "pass --out DIR for a new run directory, or --force to overwrite RUN_DIR in place"


def output_dir(run_dir, out=None, force=False):
    """Where the finetuned run goes; raises before any work when that would overwrite something without force."""
    from layerprune.record import read_record

    run_dir = Path(run_dir)
    read_record(run_dir)  # UserError unless it is a run directory
    if out is None or Path(out).resolve() == run_dir.resolve():
        if not force:
            raise UserError(f"finetuning would overwrite the run in {run_dir}: {IN_PLACE_HINT}")
        return run_dir
    out = Path(out)
    prepare_dir(out, force, inputs=[run_dir], create=False)  # refuses before any work; replaces only a run
    return out


def _ppl(model, tok, datasets, seqlen, data_dir, max_windows):
    from layerprune.evaluation.perplexity import evaluate_ppl

    return {ds: evaluate_ppl(model, tok, ds, seqlen, data_dir, max_windows, 8, progress=False).to_dict()
            for ds in datasets}


def _save(model, tok, run_dir, out, record):
    from layerprune.record import save_run

    if out != run_dir:
        work = prepare_dir(out, force=True, inputs=[run_dir])  # checked before the work; written beside, swapped in
        save_run(model, tok, work, record)
        finish_dir(work, out)
        return
    # in place: write next to it first, then move the files over (the loaded weights may be mapped from the old files)
    tmp = run_dir.parent / f".{run_dir.name}.finetune-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_run(model, tok, tmp, record)
    from layerprune.card import CARD_NAME, replaceable

    for f in tmp.iterdir():
        if f.name == CARD_NAME and not replaceable(run_dir / f.name):  # a README.md the user wrote stays
            f.unlink()
            continue
        f.replace(run_dir / f.name)
    tmp.rmdir()


def finetune_run(run_dir, steps, *, out=None, force=False, lr=1e-4, rank=8, alpha=16, calib="c4", nsamples=128,
                 seqlen=512, batch_size=1, seed=0, eval_datasets=("wikitext2",), max_windows=None, data_dir=None,
                 dtype="float32", device=None, progress=True):
    """LoRA-finetune the pruned model in `run_dir` and save it with its record extended by a "finetune" entry.

    Training windows: `nsamples` x `seqlen` tokens drawn from the calibration pool `calib` with `seed`.
    PPL on `eval_datasets` (seqlen tokens per window, max_windows windows) before and after.
    Every pruned weight is exactly zero after merging (checked; nothing is saved otherwise); a kept weight whose merged
    value is exactly 0.0 (possible in low precision) is counted in "kept_weights_now_zero".
    Returns the new record.
    """
    from layerprune.api import calibration_set
    from layerprune.data.corpora import resolve_data_dir
    from layerprune.evaluation.perplexity import check_seqlen
    from layerprune.models.info import measure_sparsity
    from layerprune.models.loading import load_model
    from layerprune.record import read_record, versions

    run_dir = Path(run_dir)
    out = output_dir(run_dir, out, force)
    record = read_record(run_dir)
    data_dir = resolve_data_dir(data_dir)
    model, tok = load_model(str(run_dir), dtype)
    if device is not None:
        model = model.to(device)
    seqlen = check_seqlen(model, seqlen)
    windows = calibration_set(tok, calib, nsamples, seqlen, seed, data_dir)
    t0 = time.time()
    masks = masks_of(model)
    sp_before = measure_sparsity(model)["overall"]
    before = _ppl(model, tok, eval_datasets, seqlen, data_dir, max_windows)
    info = finetune_lora(model, tok, windows, steps, lr=lr, rank=rank, alpha=alpha, seqlen=seqlen,
                         batch_size=batch_size, seed=seed, progress=progress)
    model.eval()
    after_masks = masks_of(model)
    refilled = sum(int((after_masks[n] & ~m).sum()) for n, m in masks.items())
    if refilled:  # apply_masks makes this impossible; checked because the claim is the point of this command
        raise UserError(f"{refilled} pruned weights are nonzero after merging; nothing was saved")
    kept_zero = sum(int((m & ~after_masks[n]).sum()) for n, m in masks.items())  # kept weights that merged to 0.0
    sp_after = measure_sparsity(model)["overall"]
    after = _ppl(model, tok, eval_datasets, seqlen, data_dir, max_windows)
    record = dict(record)
    record["finetune"] = {
        "source_run": str(run_dir), "method": "lora", **info,
        "calibration": {"source": calib, "nsamples": windows.nsamples, "seqlen": windows.seqlen, "seed": seed},
        "sparsity_before": sp_before, "sparsity_after": sp_after, "mask_identical": kept_zero == 0,
        "kept_weights_now_zero": kept_zero,
        "eval": {"before": before, "after": after, "seqlen": seqlen, "max_windows": max_windows},
        "total_seconds": time.time() - t0,
    }
    record["measured_sparsity"] = sp_after
    record["versions"] = versions() | {"peft": _version("peft")}
    _save(model, tok, run_dir, out, record)
    return record


def _version(pkg):
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None
