"""layerprune: layer-wise pruning of causal LMs (Wanda, SparseGPT, OWL, DLP, DSA, SlimGPT, FedLP)."""
from .api import calibration_set, prune, run_prune
from .config import PruneConfig, RunConfig
from .evaluation.perplexity import evaluate_ppl, perplexity
from .models.info import measure_sparsity, model_info
from .models.loading import load_model

__all__ = ["PruneConfig", "RunConfig", "calibration_set", "evaluate_ppl", "load_model", "measure_sparsity", "model_info",
           "perplexity", "prune", "run_prune"]
__version__ = "0.1.0"
