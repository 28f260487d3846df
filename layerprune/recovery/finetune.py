"""`layerprune finetune`: recovery of a saved run directory, mask fixed, merged and saved with its record.

Steps: load the run's weights, record the masks M = (W != 0) of every block linear, measure PPL, train (LoRA or all
weights, ``recovery/train.py``) on calibration-pool windows with the LM loss, or against a dense teacher's logits
(``--teacher``, the KL divergence of ``recovery/distill.py``), re-apply M, check that the zero pattern is exactly M
again, measure PPL, save (to a new run directory, or over the old one when asked to). Structure is never changed:
a SlimGPT run keeps its per-block widths, a depth-pruned run its blocks. With ``checkpoint_every`` the training state
is saved every N steps in the output's ``.checkpoint`` folder and ``resume`` continues it.
"""
import json
import shutil
import time
from pathlib import Path

from layerprune.errors import UserError
from layerprune.outputs import CHECKPOINT_NAME, finish_dir, prepare_dir
from layerprune.recovery.lora import masks_of

IN_PLACE_HINT = "pass --out DIR for a new run directory, or --force to overwrite RUN_DIR in place"
def output_dir(run_dir, out=None, force=False, resume=False):
    """Where the finetuned run goes; raises before any work when that would overwrite something without force, or
    when ``resume`` finds no checkpoint to continue."""
    from layerprune.record import read_record

    run_dir = Path(run_dir)
    if resume and force:
        raise UserError("--resume continues an interrupted finetuning and --force starts it over: pass one of them")
    read_record(run_dir)  # UserError unless it is a run directory
    if out is None or Path(out).resolve() == run_dir.resolve():
        if resume:
            if not (run_dir / CHECKPOINT_NAME / "state.json").is_file():
                raise UserError(f"{run_dir} has no finetuning checkpoint to resume: drop --resume")
            return run_dir
        if not force:
            raise UserError(f"finetuning would overwrite the run in {run_dir}: {IN_PLACE_HINT}")
        return run_dir
    out = Path(out)
    prepare_dir(out, force, resume, inputs=[run_dir], create=False)  # refuses before any work; replaces only a run
    return out


def _work_dir(run_dir, out, force, resume):
    """The folder the checkpoint and the finished run are written to: RUN_DIR itself in place (its files are only
    replaced at the end), otherwise --out or its staging twin (swapped in by finish_dir)."""
    if out == run_dir:
        return run_dir
    return prepare_dir(out, force, resume, inputs=[run_dir])


def _ppl(model, tok, datasets, seqlen, data_dir, max_windows):
    from layerprune.evaluation.perplexity import evaluate_ppl

    return {ds: evaluate_ppl(model, tok, ds, seqlen, data_dir, max_windows, 8, progress=False).to_dict()
            for ds in datasets}


def _save(model, tok, run_dir, work, out, record):
    from layerprune.record import save_run

    if work != run_dir:
        save_run(model, tok, work, record)  # removes the finetuning checkpoint in work
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
    shutil.rmtree(run_dir / CHECKPOINT_NAME, ignore_errors=True)


def _logit_rows(model):
    """The number of logits the model gives per position (rows of its output embedding)."""
    return model.get_output_embeddings().weight.shape[0]


def check_teacher(student, teacher, teacher_spec, student_tok=None, teacher_tok=None):
    """One-line UserError unless the teacher's logits and tokenizer match the student's (same ids, same tokens)."""
    ns, nt = _logit_rows(student), _logit_rows(teacher)
    if ns != nt:
        raise UserError(f"the teacher {teacher_spec} has {nt} logits per token and the student {ns}: distillation "
                        "needs the same vocabulary; pass the dense model the run was pruned from")
    if student_tok is not None and teacher_tok is not None:
        vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
        if vs != vt:
            diff = len(set(vs.items()) ^ set(vt.items()))
            raise UserError(f"the teacher {teacher_spec}'s tokenizer differs from the run's ({diff} token-id pairs "
                            "differ): distillation needs the same tokenizer; pass the dense model the run was "
                            "pruned from")


def finetune_run(run_dir, steps, *, out=None, force=False, lr=1e-4, rank=8, alpha=16, calib="c4", nsamples=128,
                 seqlen=512, batch_size=1, seed=0, eval_datasets=("wikitext2",), max_windows=None, data_dir=None,
                 dtype="float32", device=None, progress=True, teacher=None, kd_temperature=1.0, kd_alpha=1.0,
                 kd_topk=None, full=False, checkpoint_every=0, resume=False, command_line=None):
    """Finetune the pruned model in `run_dir` and save it with its record extended by a "finetune" entry.

    Training windows: `nsamples` x `seqlen` tokens drawn from the calibration pool `calib` with `seed`; `steps` steps
    of `batch_size` windows. Loss: the LM loss, or with `teacher` (a model spec: built-in name, directory, GGUF, hub
    id) kd_alpha * KD + (1 - kd_alpha) * LM, KD the KL divergence to the teacher's logits at `kd_temperature`
    (over its top `kd_topk` tokens and the lumped rest when given; ``recovery.distill``). LoRA rank `rank` on every
    block linear, or every weight with `full`. PPL on `eval_datasets` (seqlen tokens per window, max_windows windows)
    before and after. `checkpoint_every` N > 0: training state saved every N steps; `resume` continues it.
    Every pruned weight is exactly zero after training (checked; nothing is saved otherwise); a kept weight whose
    value is exactly 0.0 afterwards (possible in low precision) is counted in "kept_weights_now_zero".
    Returns the new record.
    """
    from layerprune.api import calibration_set
    from layerprune.checkpoint import fingerprint
    from layerprune.data.corpora import resolve_data_dir
    from layerprune.evaluation.perplexity import check_seqlen
    from layerprune.models.info import measure_sparsity
    from layerprune.models.loading import load_model, load_skeleton
    from layerprune.record import read_record, versions
    from layerprune.recovery.distill import check_kd_options, kd_objective
    from layerprune.recovery.train import TrainCheckpoint, lm_loss, train_recovery

    t0 = time.time()
    run_dir = Path(run_dir)
    if checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0 (got {checkpoint_every})")
    if teacher is not None:
        check_kd_options(kd_temperature, kd_alpha, kd_topk)
    out = output_dir(run_dir, out, force, resume)
    record = read_record(run_dir)
    data_dir = resolve_data_dir(data_dir)
    if teacher is not None:  # vocabulary check from the configs alone, before loading any weights
        skel_s, skel_t = load_skeleton(str(run_dir), dtype), load_skeleton(str(teacher), dtype)
        if skel_s is not None and skel_t is not None:
            check_teacher(skel_s, skel_t, teacher)
            check_kd_options(kd_temperature, kd_alpha, kd_topk, _logit_rows(skel_s))
        del skel_s, skel_t
    teacher_model = None
    if teacher is not None:
        teacher_model, teacher_tok = load_model(str(teacher), dtype)
    model, tok = load_model(str(run_dir), dtype)
    if teacher is not None:
        check_teacher(model, teacher_model, teacher, tok, teacher_tok)
        check_kd_options(kd_temperature, kd_alpha, kd_topk, _logit_rows(model))
        teacher_model.requires_grad_(False).eval()
    if device is not None:
        model = model.to(device)
        teacher_model = teacher_model.to(device) if teacher_model is not None else None
    seqlen = check_seqlen(model, seqlen)
    windows = calibration_set(tok, calib, nsamples, seqlen, seed, data_dir)
    kd = None if teacher is None else {"temperature": kd_temperature, "alpha": kd_alpha, "topk": kd_topk}
    settings = json.dumps({"teacher": None if teacher is None else str(teacher), "kd": kd, "full": full,
                           "rank": None if full else rank, "alpha": None if full else alpha, "lr": lr,
                           "batch_size": batch_size, "seed": seed, "calib": calib, "dtype": str(dtype)}, sort_keys=True)
    work = _work_dir(run_dir, out, force, resume)
    ckpt = TrainCheckpoint(work / CHECKPOINT_NAME, fingerprint(model, windows.ids, settings, weights=True))
    state = ckpt.load() if resume else None
    if not resume and work == run_dir:
        ckpt.clear()  # in place with --force: an earlier interrupted finetuning of this run starts over
    masks = masks_of(model)
    sp_before = measure_sparsity(model)["overall"]
    eval_key = [list(eval_datasets), max_windows, seqlen]
    saved_extra = (state or {}).get("extra") or {}
    before = saved_extra["before"] if saved_extra.get("eval_key") == eval_key else \
        _ppl(model, tok, eval_datasets, seqlen, data_dir, max_windows)
    loss_fn = lm_loss if teacher is None else kd_objective(teacher_model, kd_temperature, kd_alpha, kd_topk)
    desc = ("kd-" if teacher is not None else "") + ("full" if full else "lora")
    info = train_recovery(model, windows.ids, steps, loss_fn, full=full, rank=rank, alpha=alpha, lr=lr,
                          batch_size=batch_size, seed=seed, progress=progress, checkpoint=ckpt,
                          checkpoint_every=checkpoint_every, checkpoint_extra={"eval_key": eval_key, "before": before},
                          resume_state=state, desc=desc)
    del teacher_model
    model.eval()
    after_masks = masks_of(model)
    refilled = sum(int((after_masks[n] & ~m).sum()) for n, m in masks.items())
    if refilled:  # apply_masks makes this impossible; checked because the claim is the point of this command
        raise UserError(f"{refilled} pruned weights are nonzero after merging; nothing was saved")
    kept_zero = sum(int((m & ~after_masks[n]).sum()) for n, m in masks.items())  # kept weights that merged to 0.0
    sp_after = measure_sparsity(model)["overall"]
    after = _ppl(model, tok, eval_datasets, seqlen, data_dir, max_windows)
    record = dict(record)
    prev = record.get("finetune")
    record["finetune"] = {
        "source_run": str(run_dir), "method": "full" if full else "lora", "loss": "lm" if teacher is None else "kd",
        "teacher": None if teacher is None else str(teacher), "kd": kd, **info,
        "calibration": {"source": calib, "nsamples": windows.nsamples, "seqlen": windows.seqlen, "seed": seed},
        "sparsity_before": sp_before, "sparsity_after": sp_after, "mask_identical": kept_zero == 0,
        "kept_weights_now_zero": kept_zero,
        "eval": {"before": before, "after": after, "seqlen": seqlen, "max_windows": max_windows},
        "total_seconds": time.time() - t0, "command_line": command_line,
        **({"previous": prev} if prev else {}),
    }
    record["measured_sparsity"] = sp_after
    record["versions"] = versions() | {"peft": _version("peft")}
    _save(model, tok, run_dir, work, out, record)
    return record


def _version(pkg):
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None
