"""AsyncMultiLevelCache: the asyncio front end (redis.asyncio). Same core, same scripts; only I/O differs."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar, cast

from redis.exceptions import RedisError

from .cache import CacheBase, SyncIO
from .coherence import FillWatch
from .config import CacheConfig, redact
from .connection import (
    IO_ERRORS,
    SCRIPT_CALLS,
    AsyncClient,
    as_redis_error,
    async_client,
    goes_alone,
    is_cluster,
    send_alone_async,
    send_packed_async,
)
from .metrics import Timing
from .resilience import Resilience, raise_transient
from .scripts import pack
from .stampede import Flights
from .tiers import MISS, Batch, Instruction, Loaded, Pause, Reads, Refresh, Scope, Step, Wait, WaitFill, feed, queue

T = TypeVar("T")
log = logging.getLogger("victor_rcache")


class AsyncMultiLevelCache(CacheBase):
    """The coroutine version of :class:`~victor_rcache.MultiLevelCache`; every method is awaited.

    ``get_or_set`` accepts a coroutine function or a plain function as the loader.
    """

    def __init__(self, redis_url: str | None = None, *, config: CacheConfig | None = None,
                 client: AsyncClient | None = None, **settings: Any) -> None:
        super().__init__(redis_url, config=config, **settings)
        self._owns_client = client is None
        self.client: AsyncClient = client if client is not None else async_client(self.config)
        self._flights: Flights[asyncio.Future[bytes]] = Flights(lambda: asyncio.get_running_loop().create_future())
        self._refreshing: set[asyncio.Task[Any]] = set()
        self._start_coherence(self.client)
        # Bookkeeping goes out from a thread, which needs a sync client (and a breaker) of its own.
        self._bookkeeping_io = SyncIO(self.config, self._core, Resilience(self.config, name=redact(self.config.url)))
        self._start_bookkeeping(self._bookkeeping_io)

    async def _drive(self, step: Step[T], loader: Callable[[], Any] | None = None) -> T:
        instruction, result = feed(step, None)
        while instruction is not None:
            try:
                outcome = await self._do(instruction, loader)
            except BaseException as exc:  # cancellation included: the operation gives back its lease
                outcome = exc
            instruction, result = feed(step, outcome)
        return cast(T, result)

    async def _do(self, instruction: Instruction, loader: Callable[[], Any] | None) -> Any:
        if isinstance(instruction, Pause):
            await asyncio.sleep(instruction.seconds)
            return []
        if isinstance(instruction, WaitFill):
            await _woken(instruction.watch, instruction.seconds)
            return []
        if isinstance(instruction, list):
            return await self._send(instruction)
        if isinstance(instruction, Wait):
            return await asyncio.shield(instruction.future)
        assert loader is not None, "only get_or_set asks for the loader"
        started = time.perf_counter()
        value = loader()
        if inspect.isawaitable(value):
            value = await value
        return Loaded(value, time.perf_counter() - started)

    async def _send(self, batch: Batch) -> list[Any] | RedisError:
        refused = self._resilience.refused()  # the circuit is open: no I/O, no timeout to pay
        if refused is not None:
            return refused
        try:
            client, started = self.client, self._resilience.clock()
            # As in the sync front end: a plain first attempt, tenacity only once it has failed.
            try:
                replies = await _attempt(client, batch)
            except IO_ERRORS as first:
                async for attempt in self._resilience.async_retrying(first, started):
                    with attempt:
                        replies = await _attempt(client, batch)
        except IO_ERRORS as exc:
            return self._resilience.settle(as_redis_error(exc))
        except BaseException:  # interrupted (cancelled, KeyboardInterrupt): no verdict on Redis
            self._resilience.abandon()
            raise
        return self._resilience.settle(replies)

    async def get(self, key: str | bytes, default: Any = None) -> Any:
        if self._observer is None:  # no generator, no timing
            value = self._core.get_from_l1(key)
            return value if value is not MISS else await self._read(key, default)
        with self._timing("get") as timing:
            value = self._core.get_from_l1(key, timing)
            return value if value is not MISS else await self._read(key, default, timing)

    async def _read(self, key: str | bytes, default: Any, trace: Timing | None = None) -> Any:
        """:meth:`MultiLevelCache._read`, awaited: one plain read after an L1 miss."""
        core = self._core
        if not core.ready_done:
            return await self._drive(core.get_from_redis(key, default, trace))
        ref = core.space.ref(key)
        sent_at = core.since()
        replies = await self._send(core.reads(ref))
        if isinstance(replies, RedisError):
            return core.read_failed(ref, replies, default, trace)
        value = core.took(ref, replies[0], sent_at, trace=trace)
        return default if value is MISS else value

    async def get_many(self, keys: Iterable[str | bytes]) -> dict[Any, Any]:
        with self._timing("get_many"):
            return await self._drive(self._core.get_many(keys))

    async def get_or_set(self, key: str | bytes, loader: Callable[[], Any], ttl: float | None = None) -> Any:
        if self._observer is None:
            return await self._get_or_set(key, loader, ttl, None)
        with self._timing("get_or_set") as timing:
            return await self._get_or_set(key, loader, ttl, timing)

    async def _get_or_set(self, key: str | bytes, loader: Callable[[], Any], ttl: float | None,
                          timing: Timing | None) -> Any:
        got = self._core.get_or_set_from_l1(key, ttl)  # an L1 hit needs no flight and no generator
        if got is None:
            got = await self._drive(self._flight(key, ttl), loader)
        if timing is not None:
            timing.outcome = got.source
        if got.refresh is not None:
            self._refresh_in_background(got.refresh, loader)
        return got.value

    def _refresh_in_background(self, job: Refresh, loader: Callable[[], Any]) -> None:
        async def run() -> None:
            try:
                await self._drive(self._core.refresh(job), loader)
            except Exception:  # a background refresh must never take the worker down
                log.exception("early refresh of %r failed", job.key,
                              extra=self._core.log_fields("refresh_failed", "refresh"))

        task = asyncio.get_running_loop().create_task(run())
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def put(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        with self._timing("put"):
            await self._drive(self._core.put(key, value, ttl))

    async def put_many(self, mapping: Mapping[Any, Any], ttl: float | None = None) -> None:
        with self._timing("put_many"):
            await self._drive(self._core.put_many(mapping, ttl))

    async def delete(self, key: str | bytes) -> bool:
        with self._timing("delete"):
            return await self._drive(self._core.delete(key))

    async def invalidate(self, key: str | bytes | None = None) -> None:
        with self._timing("invalidate"):
            await self._drive(self._core.invalidate(key))

    async def get_metrics(self, scope: Scope = "process") -> dict[str, Any]:
        return await self._drive(self._core.metrics(scope))

    async def flush_bookkeeping(self) -> None:
        """:meth:`MultiLevelCache.flush_bookkeeping`: send the buffered bookkeeping now (in a thread)."""
        await asyncio.to_thread(self._flusher.flush)

    async def close(self) -> None:
        for task in list(self._refreshing):
            task.cancel()
        await asyncio.to_thread(self._flusher.close)
        self._bookkeeping_io.close()
        self._core.coherence.close()
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> AsyncMultiLevelCache:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


async def _woken(watch: FillWatch, seconds: float) -> None:
    """Wait until ``watch`` is set (the listener's thread calls back into this loop) or ``seconds`` pass."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake() -> None:  # in the listener's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(_resolve, woken)

    watch.on_set(wake)
    try:
        await asyncio.wait((woken,), timeout=seconds)
    finally:
        woken.cancel()  # (a wake-up that comes later finds it done)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _attempt(client: AsyncClient, batch: Batch) -> list[Any]:
    """One try of a batch: plain reads already packed as they are (standalone, not a single-connection
    client), a lone command as is, several as a pipeline (a transient error raised)."""
    if not is_cluster(client) and getattr(client, "connection", 1) is None:  # (not a single-connection one)
        if isinstance(batch, Reads):
            return await send_packed_async(client, batch.packed)  # type: ignore[arg-type]  # (standalone)
        if all(command[0] in SCRIPT_CALLS for command in batch):  # no redis-py reply callback to apply
            return await send_packed_async(client, [pack(c) for c in batch])  # type: ignore[arg-type]
    if goes_alone(client, batch):
        return await send_alone_async(client, batch[0])
    return raise_transient(await queue(client.pipeline(transaction=False), batch).execute(raise_on_error=False))
