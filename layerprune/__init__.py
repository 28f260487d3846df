"""layerprune: layer-wise pruning of causal LMs (Wanda, SparseGPT, OWL, DLP, DSA, SlimGPT, FedLP)."""
from .privacy import disable_telemetry

disable_telemetry()  # first: before flwr, ray or huggingface_hub is imported (see privacy.py)


from .api import calibration_set, prune, run_prune  # noqa: E402
from .config import PruneConfig, RunConfig  # noqa: E402
from .evaluation.perplexity import evaluate_ppl, perplexity  # noqa: E402
from .models.info import measure_sparsity, model_info  # noqa: E402
from .models.loading import load_model  # noqa: E402

__all__ = ["PruneConfig", "RunConfig", "calibration_set", "evaluate_ppl", "load_model", "measure_sparsity",
           "model_info", "perplexity", "prune", "run_prune"]
__version__ = "0.1.0"
