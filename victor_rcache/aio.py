"""AsyncMultiLevelCache: the asyncio front end (redis.asyncio). Same core, same scripts; only I/O differs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar, cast

import redis.asyncio
from redis.exceptions import RedisError

from .cache import CacheBase
from .config import CacheConfig
from .connection import async_client
from .tiers import Batch, Scope, Step, feed, queue

T = TypeVar("T")


class AsyncMultiLevelCache(CacheBase):
    """The coroutine version of :class:`~victor_rcache.MultiLevelCache`; every method is awaited."""

    def __init__(self, redis_url: str | None = None, *, config: CacheConfig | None = None,
                 client: redis.asyncio.Redis | None = None, **settings: Any) -> None:
        super().__init__(redis_url, config=config, **settings)
        self._owns_client = client is None
        self.client = client if client is not None else async_client(self.config)

    async def _drive(self, step: Step[T]) -> T:
        batch, result = feed(step, None)
        while batch is not None:
            batch, result = feed(step, await self._send(batch))
        return cast(T, result)

    async def _send(self, batch: Batch) -> list[Any] | RedisError:
        try:
            replies: list[Any] = await queue(self.client.pipeline(transaction=False), batch).execute(
                raise_on_error=False)
        except RedisError as exc:
            return exc
        return replies

    async def get(self, key: str | bytes, default: Any = None) -> Any:
        return await self._drive(self._core.get(key, default))

    async def get_many(self, keys: Iterable[str | bytes]) -> dict[Any, Any]:
        return await self._drive(self._core.get_many(keys))

    async def put(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        await self._drive(self._core.put(key, value, ttl))

    async def put_many(self, mapping: Mapping[Any, Any], ttl: float | None = None) -> None:
        await self._drive(self._core.put_many(mapping, ttl))

    async def delete(self, key: str | bytes) -> bool:
        return await self._drive(self._core.delete(key))

    async def invalidate(self, key: str | bytes | None = None) -> None:
        await self._drive(self._core.invalidate(key))

    async def get_metrics(self, scope: Scope = "process") -> dict[str, Any]:
        return await self._drive(self._core.metrics(scope))

    async def close(self) -> None:
        await self._drive(self._core.report_counters())
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> AsyncMultiLevelCache:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
