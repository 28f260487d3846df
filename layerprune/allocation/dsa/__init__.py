"""DSA: discovered sparsity-allocation functions (functions.py) and their search (search.py)."""
from layerprune.allocation.dsa.functions import (DSA, PRESETS, AllocationFunction, InvalidCandidate, StageCache,
                                                 allocate, dsa_mapping, evaluate, evaluate_blocks, parse,
                                                 random_function, resolve)
from layerprune.allocation.dsa.search import (SearchResult, allocation_fitness, evolutionary_search, plot_curves,
                                              random_search, summarize)

__all__ = ["DSA", "PRESETS", "AllocationFunction", "InvalidCandidate", "StageCache", "allocate", "dsa_mapping",
           "evaluate", "evaluate_blocks", "parse", "random_function", "resolve", "SearchResult", "allocation_fitness",
           "evolutionary_search", "plot_curves", "random_search", "summarize"]
