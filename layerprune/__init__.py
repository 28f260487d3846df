"""layerprune: layer-wise pruning of causal LMs (Wanda, SparseGPT, OWL, DLP, DSA, SlimGPT, FedLP)."""
from .api import calibration_set, prune
from .evaluation.perplexity import evaluate_ppl, perplexity
from .models.info import measure_sparsity, model_info
from .models.loading import load_model

__all__ = ["calibration_set", "evaluate_ppl", "load_model", "measure_sparsity", "model_info", "perplexity", "prune"]
__version__ = "0.1.0"
