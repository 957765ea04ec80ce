"""Prediction and prewarming, and the tool-selection cache built on them.

* :mod:`~victor_rcache.prediction.model`: the fleet's shared model of which query comes next
  (transitions, n-grams, time of day) in Redis sorted sets, as I/O-free steps;
* :mod:`~victor_rcache.prediction.warmer`: its sync and async front ends, which record queries,
  predict the next ones and prewarm their results once per fleet;
* :mod:`~victor_rcache.prediction.tool_selection`: the cache agents use for the tools they choose,
  with its own namespaces, keys and prewarming.
"""

from .model import Prediction, WarmerConfig
from .tool_selection import (
    AsyncToolSelectionCache,
    ToolSelectionCache,
    ToolSelectionConfig,
    cached_selection,
    get_tool_selection_cache,
    tools_hash,
)
from .warmer import AsyncPredictiveCacheWarmer, PredictiveCacheWarmer, PrewarmReport

__all__ = [
    "AsyncPredictiveCacheWarmer",
    "AsyncToolSelectionCache",
    "Prediction",
    "PredictiveCacheWarmer",
    "PrewarmReport",
    "ToolSelectionCache",
    "ToolSelectionConfig",
    "WarmerConfig",
    "cached_selection",
    "get_tool_selection_cache",
    "tools_hash",
]
