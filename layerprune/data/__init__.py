"""Corpora for evaluation and the seeded calibration sampler."""
from .calibration import CalibrationSet, get_calibration, sample_windows, tokenize_docs
from .corpora import CORPORA, calibration_pool, corpus_rows, load_text, resolve_data_dir

__all__ = ["CORPORA", "CalibrationSet", "calibration_pool", "corpus_rows", "get_calibration", "load_text",
           "resolve_data_dir", "sample_windows", "tokenize_docs"]
