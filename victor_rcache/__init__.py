"""victor_rcache: a Redis-backed multi-level cache shared by a fleet of workers.

L1 lives in each process; L2 and L3 live in Redis, moved between by Lua scripts in one round trip.
"""

from .adaptive import AdaptiveLRUCache
from .aio import AsyncMultiLevelCache
from .cache import MultiLevelCache
from .codec import Codec, MsgpackCodec, PickleCodec
from .config import CacheConfig
from .decorator import AsyncCachedFunction, CachedFunction
from .errors import (
    CacheClosedError,
    CacheError,
    CacheUnavailableError,
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidTTLError,
    SerializationError,
    ValueTooLargeError,
)
from .prediction import (
    AsyncPredictiveCacheWarmer,
    AsyncToolSelectionCache,
    Prediction,
    PredictiveCacheWarmer,
    PrewarmReport,
    ToolSelectionCache,
    ToolSelectionConfig,
    WarmerConfig,
    cached_selection,
    get_tool_selection_cache,
)
from .tiers import Uncached

__version__ = "0.2.0"

__all__ = [
    "AdaptiveLRUCache",
    "AsyncCachedFunction",
    "AsyncMultiLevelCache",
    "AsyncPredictiveCacheWarmer",
    "AsyncToolSelectionCache",
    "CacheClosedError",
    "CacheConfig",
    "CacheError",
    "CacheUnavailableError",
    "CachedFunction",
    "Codec",
    "ConfigurationError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "InvalidTTLError",
    "MsgpackCodec",
    "MultiLevelCache",
    "PickleCodec",
    "Prediction",
    "PredictiveCacheWarmer",
    "PrewarmReport",
    "SerializationError",
    "ToolSelectionCache",
    "ToolSelectionConfig",
    "Uncached",
    "ValueTooLargeError",
    "WarmerConfig",
    "__version__",
    "cached_selection",
    "get_tool_selection_cache",
]
