"""DSA: discovered sparsity-allocation functions (functions.py); their search is ``layerprune.search.dsa``."""
from layerprune.allocation.dsa.functions import (DSA, PRESETS, AllocationFunction, InvalidCandidate, StageCache,
                                                 allocate, dsa_mapping, evaluate, evaluate_blocks, parse,
                                                 random_function, resolve)

__all__ = ["DSA", "PRESETS", "AllocationFunction", "InvalidCandidate", "StageCache", "allocate", "dsa_mapping",
           "evaluate", "evaluate_blocks", "parse", "random_function", "resolve"]
