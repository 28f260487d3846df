"""Searches that run the engine to choose an allocation: the proxy (``proxy``), the DSA function search (``dsa``), the
EvoPress level search (``levels``), the Ray evaluator (``ray_search``), ``--allocation auto``'s choice (``auto``, which
registers the ``auto`` allocator) and the ``search-allocation`` workflow (``workflow``). ``allocation/`` keeps the rules
from statistics to sparsities.
"""
from layerprune.search.auto import Auto
from layerprune.search.workflow import SearchConfig, search_allocation

__all__ = ["Auto", "SearchConfig", "search_allocation"]
