"""victor_rcache: a Redis-backed multi-level cache shared by a fleet of workers.

L1 lives in each process; L2 and L3 live in Redis, moved between by Lua scripts in one round trip.
"""

from .adaptive import AdaptiveLRUCache
from .aio import AsyncMultiLevelCache
from .cache import MultiLevelCache
from .codec import Codec, MsgpackCodec, PickleCodec
from .config import CacheConfig
from .errors import (
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

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLRUCache",
    "AsyncMultiLevelCache",
    "AsyncPredictiveCacheWarmer",
    "AsyncToolSelectionCache",
    "CacheConfig",
    "CacheError",
    "CacheUnavailableError",
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
    "ValueTooLargeError",
    "WarmerConfig",
    "__version__",
    "cached_selection",
    "get_tool_selection_cache",
]
