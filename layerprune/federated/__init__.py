"""FedLP: federated layer-wise pruning (homogeneous layer dropout, heterogeneous depth prefixes) on Flower.

Full weights, or LoRA adapters only (``FedConfig.lora_rank``, module ``lora``: the base frozen on every client, a
pruned base merged with its mask). Entry point ``run_federated(config) -> dict``; the strategy, apps, partitions and
accounting are importable on their own. Paper: Zhu et al., "FedLP", ICC 2023 (code: Zhuzzq/FedLP).
"""
from .accounting import fedavg_params, hetero_params, homo_params, record_bytes, unit_params
from .depth import Layout, depth_levels, depth_probs, draw_depths, layout_of, prefix_model, shared_state
from .partition import dirichlet_shards, iid_shards
from .run import FedConfig, run_federated
from .strategy import FedLPStrategy, fixed_masks

__all__ = ["FedConfig", "FedLPStrategy", "Layout", "depth_levels", "depth_probs", "dirichlet_shards", "draw_depths",
           "fedavg_params", "fixed_masks", "hetero_params", "homo_params", "iid_shards", "layout_of", "prefix_model",
           "record_bytes", "run_federated", "shared_state", "unit_params"]
