"""Redis clients built from a :class:`CacheConfig`, sync and async, with the same options.

redis-py's own retries are switched off: a cache call must return within its timeout, and
retrying is the resilience layer's decision, not the driver's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import CacheConfig, redact
from .errors import ConfigurationError


def _options(config: CacheConfig) -> dict[str, Any]:
    url = config.url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(
            f"Redis URL {redact(url)!r} must start with redis://, rediss:// (TLS) or unix://, "
            "e.g. redis://localhost:6379/0"
        )
    return {"socket_timeout": config.socket_timeout, "socket_connect_timeout": config.connect_timeout,
            "decode_responses": False}


def _checked(build: Any, config: CacheConfig, retry: Any) -> Any:
    try:
        return build(config.url, retry=retry, **_options(config))
    except ValueError as exc:
        raise ConfigurationError(f"Redis URL {redact(config.url)!r} is malformed ({exc}); "
                                 "use redis://[user:password@]host:port/db") from exc


def sync_client(config: CacheConfig) -> redis.Redis:
    """A redis-py client for ``config.url`` (raises ConfigurationError on a malformed URL)."""
    client: redis.Redis = _checked(redis.Redis.from_url, config, Retry(NoBackoff(), 0))
    return client


def subscriber_connections(config: CacheConfig) -> Callable[[], Any]:
    """A factory of fresh, unpooled connections for the invalidation subscriber."""
    pool: redis.ConnectionPool = _checked(redis.ConnectionPool.from_url, config, Retry(NoBackoff(), 0))
    return pool.make_connection


def async_client(config: CacheConfig) -> redis.asyncio.Redis:
    """A redis.asyncio client for ``config.url``."""
    client: redis.asyncio.Redis = _checked(redis.asyncio.Redis.from_url, config, AsyncRetry(NoBackoff(), 0))
    return client
