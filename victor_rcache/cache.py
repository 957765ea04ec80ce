"""MultiLevelCache: the synchronous front end. It only does I/O; the tiers decide (tiers.py, lua/)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar, cast

import redis
from redis.exceptions import RedisError

from .config import CacheConfig
from .connection import sync_client
from .errors import ConfigurationError
from .tiers import Batch, Scope, Step, TierCore, feed, queue

T = TypeVar("T")


def _make_config(redis_url: str | None, config: CacheConfig | None, settings: dict[str, Any]) -> CacheConfig:
    if config is not None:
        if redis_url is not None or settings:
            raise ConfigurationError("pass either config= or individual settings, not both")
        return config
    try:
        return CacheConfig(redis_url=redis_url, **settings)
    except TypeError as exc:
        raise ConfigurationError(f"{exc}; see CacheConfig for the settings a cache takes") from None


class CacheBase:
    """What both front ends share: settings, the tier core, and construction from the environment."""

    def __init__(self, redis_url: str | None = None, *, config: CacheConfig | None = None,
                 **settings: Any) -> None:
        self.config = _make_config(redis_url, config, settings)
        self._core = TierCore(self.config)

    @classmethod
    def from_env(cls: type[T], **overrides: Any) -> T:
        """A cache configured from ``VICTOR_RCACHE_URL``/``REDIS_URL`` and ``VICTOR_RCACHE_*`` variables."""
        return cls(config=CacheConfig.from_env(**overrides))  # type: ignore[call-arg]

    @property
    def namespace(self) -> str:
        return self.config.namespace


class MultiLevelCache(CacheBase):
    """A cache with L1 in this process and L2/L3 shared by every process using the same Redis and namespace.

    ``MultiLevelCache(redis_url, namespace=..., l1_size=..., l2_size=..., l3_size=..., l1_ttl=...,
    l2_ttl=..., l3_ttl=..., promote_after=...)``; every setting is described in :class:`CacheConfig`.
    Pass ``client=`` to reuse a redis-py client you already have.
    """

    def __init__(self, redis_url: str | None = None, *, config: CacheConfig | None = None,
                 client: redis.Redis | None = None, **settings: Any) -> None:
        super().__init__(redis_url, config=config, **settings)
        self._owns_client = client is None
        self.client = client if client is not None else sync_client(self.config)

    def _drive(self, step: Step[T]) -> T:
        """Run a core operation: send each batch it yields as one pipeline, feed back the replies."""
        batch, result = feed(step, None)
        while batch is not None:
            batch, result = feed(step, self._send(batch))
        return cast(T, result)

    def _send(self, batch: Batch) -> list[Any] | RedisError:
        try:
            replies: list[Any] = queue(self.client.pipeline(transaction=False), batch).execute(raise_on_error=False)
        except RedisError as exc:
            return exc
        return replies

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` on a miss. A cached ``None`` is a hit."""
        return self._drive(self._core.get(key, default))

    def get_many(self, keys: Iterable[str | bytes]) -> dict[Any, Any]:
        """A dict of the hits among ``keys`` (one round trip for all keys that miss L1)."""
        return self._drive(self._core.get_many(keys))

    def put(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` in L2 and this process's L1; ``ttl`` (seconds) bounds its life in every tier."""
        self._drive(self._core.put(key, value, ttl))

    def put_many(self, mapping: Mapping[Any, Any], ttl: float | None = None) -> None:
        """Store several values in one round trip; all are validated before any is written."""
        self._drive(self._core.put_many(mapping, ttl))

    def delete(self, key: str | bytes) -> bool:
        """Remove ``key`` from every tier; True if some tier held it."""
        return self._drive(self._core.delete(key))

    def invalidate(self, key: str | bytes | None = None) -> None:
        """Remove ``key``, or with no argument every entry of the namespace (in bounded batches)."""
        self._drive(self._core.invalidate(key))

    def get_metrics(self, scope: Scope = "process") -> dict[str, Any]:
        """Per-tier hits, misses, hit rates, movements and sizes, for this process or the whole fleet."""
        return self._drive(self._core.metrics(scope))

    def close(self) -> None:
        """Report this process's last counters and close the connection pool (if the cache made it)."""
        self._drive(self._core.report_counters())
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> MultiLevelCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
