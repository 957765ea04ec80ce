"""Redis clients built from a :class:`CacheConfig`, sync and async, standalone or cluster.

redis-py's own retries are switched off: a cache call must return within its timeout, and
retrying is the resilience layer's decision, not the driver's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, TypeAlias

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
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


SyncClient: TypeAlias = redis.Redis | RedisCluster
AsyncClient: TypeAlias = redis.asyncio.Redis | AsyncRedisCluster


def sync_client(config: CacheConfig) -> SyncClient:
    """A redis-py client for ``config.url`` (raises ConfigurationError on a malformed URL)."""
    build = RedisCluster.from_url if config.cluster else redis.Redis.from_url
    client: SyncClient = _checked(build, config, Retry(NoBackoff(), 0))
    return client


def async_client(config: CacheConfig) -> AsyncClient:
    """A redis.asyncio client for ``config.url``."""
    build = AsyncRedisCluster.from_url if config.cluster else redis.asyncio.Redis.from_url
    client: AsyncClient = _checked(build, config, AsyncRetry(NoBackoff(), 0))
    return client


def cluster_nodes(client: Any) -> Callable[[], list[tuple[str, int]]] | None:
    """For a cluster client, the nodes it knows (the subscriber may use any: PUBLISH reaches all)."""
    if not isinstance(client, (RedisCluster, AsyncRedisCluster)):
        return None
    return lambda: [(str(node.host), int(node.port)) for node in client.get_nodes()]


def subscriber_connections(config: CacheConfig,
                           nodes: Callable[[], list[tuple[str, int]]] | None = None) -> Callable[[], Any]:
    """A factory of fresh, unpooled connections for the invalidation subscriber.

    On a cluster each new connection goes to the next known node in turn, so losing one node
    (a failover) moves the subscription elsewhere instead of retrying a dead address.
    """
    pool: redis.ConnectionPool = _checked(redis.ConnectionPool.from_url, config, Retry(NoBackoff(), 0))
    if nodes is None:
        return pool.make_connection
    turn = itertools.count()

    def connect() -> Any:
        known = nodes() or [(pool.connection_kwargs["host"], pool.connection_kwargs["port"])]
        host, port = known[next(turn) % len(known)]
        return pool.connection_class(**{**pool.connection_kwargs, "host": host, "port": port})

    return connect
