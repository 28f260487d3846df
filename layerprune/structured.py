"""Moved to ``layerprune.models.structured``; this alias keeps the old import path working until every caller uses
the new one (saved runs do not need it: ``layerprune_<type>`` configs are found by their model_type)."""
from .models.structured import *  # noqa: F401,F403
