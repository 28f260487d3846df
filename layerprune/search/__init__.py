"""Searches over allocations that run the engine: the DSA function search, the EvoPress level search (``workflow``).
"""
from layerprune.search.workflow import SearchConfig, search_allocation

__all__ = ["SearchConfig", "search_allocation"]
