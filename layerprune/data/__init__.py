"""Corpora for evaluation and the seeded calibration sampler."""
from .calibration import CalibrationSet, get_calibration, sample_windows, tokenize_docs
from .corpora import CORPORA, calibration_pool, corpus_rows, load_text, resolve_data_dir

__all__ = ["CORPORA", "CalibrationSet", "calibration_pool", "corpus_rows", "get_calibration", "load_text",
           "resolve_data_dir", "sample_windows", "tokenize_docs", "calibration_set"]


def calibration_set(tokenizer, calib: str = "c4", nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                    data_dir=None, bos: bool | None = None) -> CalibrationSet:
    """``bos``: start every window with BOS (True), never (False), or as the tokenizer does (None)."""
    pool = calibration_pool(calib, resolve_data_dir(data_dir))
    cs = get_calibration(tokenizer, pool, nsamples, seqlen, seed, bos=bos)
    cs.source = calib
    return cs

