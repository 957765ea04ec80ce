"""AsyncMultiLevelCache: the asyncio front end (redis.asyncio). Same core, same scripts; only I/O differs."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from redis.exceptions import RedisError

from .cache import CLOSED, CacheBase, SyncIO, release_resources, release_when_collected
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
from .decorator import AsyncCachedFunction, KeySpec, TagSpec
from .errors import CacheClosedError
from .metrics import Timing
from .replicas import AsyncReplicaReader, ReplicaReads
from .resilience import Resilience, raise_transient
from .scripts import pack
from .stampede import Flights
from .tiers import (
    MISS,
    Batch,
    FillLater,
    Instruction,
    Loaded,
    Pause,
    Pending,
    Reads,
    Refresh,
    Scope,
    Step,
    Wait,
    WaitFill,
    Write,
    feed,
    queue,
)

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger("victor_rcache")


class AsyncMultiLevelCache(CacheBase):
    """The coroutine version of :class:`~victor_rcache.MultiLevelCache`; every method is awaited (so is
    ``get_metrics``, which may read Redis).

    ``get_or_set`` accepts a coroutine function or a plain function as the loader. The cache may be used
    from any event loop, one after another (each ``asyncio.run``) or at once in several threads: each
    loop gets a redis.asyncio client of its own, since a client's connections belong to the loop that
    made them. (A client passed as ``client=`` is used as it is: it must suit every loop it is used in.)
    """

    FILL_BEHIND = True  # a miss's write runs on the loop after its caller has the value (_fill_behind)

    def __init__(self, redis_url: str | None = None, *, config: CacheConfig | None = None,
                 client: AsyncClient | None = None, **settings: Any) -> None:
        super().__init__(redis_url, config=config, **settings)
        self._owns_client = client is None
        self._client: AsyncClient = client if client is not None else async_client(self.config)
        self._client_loop: asyncio.AbstractEventLoop | None = None  # the loop self._client belongs to
        self._loop_clients: dict[asyncio.AbstractEventLoop, AsyncClient] = {}  # other loops running at once
        self._closed = False
        self._flights: Flights[asyncio.Future[bytes]] = Flights(lambda: asyncio.get_running_loop().create_future())
        self._refreshing: set[asyncio.Task[Any]] = set()
        self._filling: dict[Hashable, asyncio.Task[None]] = {}  # fills behind (see _fill_behind), per loop and entry
        # read_from_replicas: plain reads go to a replica (replicas.py); the core decides, per batch.
        self._replicas = self._core.replicas = (AsyncReplicaReader(self.config) if self.config.read_from_replicas
                                                else None)
        self._start_coherence(self._client)
        # Bookkeeping goes out from a thread, which needs a sync client (and a breaker) of its own.
        self._bookkeeping_io = SyncIO(self.config, self._core, Resilience(self.config, name=redact(self.config.url)))
        self._start_bookkeeping(self._bookkeeping_io)
        self._finalizer = release_when_collected(self, [self._bookkeeping_io])

    @property
    def client(self) -> AsyncClient:
        """The redis.asyncio client of the running event loop (or the one passed as ``client=``)."""
        if not self._owns_client:
            return self._client
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._client  # outside any loop: it connects in the first loop that uses it
        if loop is self._client_loop:
            return self._client
        return self._client_of(loop)

    def _client_of(self, loop: asyncio.AbstractEventLoop) -> AsyncClient:
        if self._client_loop is None or self._client_loop.is_closed():
            if self._client_loop is not None:  # its loop has ended, and its connections with it
                self._client = async_client(self.config)
            self._client_loop = loop
            return self._client
        self._loop_clients = {lp: c for lp, c in self._loop_clients.items() if not lp.is_closed()}
        client = self._loop_clients.get(loop)
        if client is None:
            client = self._loop_clients[loop] = async_client(self.config)
        return client

    def _flight_key(self, entry_id: bytes) -> Hashable:
        return id(asyncio.get_running_loop()), entry_id  # a flight's future belongs to its loop

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
        if instruction.timeout is None:
            return await _run_loader(loader)
        job = asyncio.get_running_loop().create_task(_run_loader(loader))
        try:
            await asyncio.wait((job,), timeout=instruction.timeout)
        except BaseException:  # cancelled while waiting: so is the loader
            job.cancel()
            raise
        return job.result() if job.done() else Pending(job)

    async def _send(self, batch: Batch) -> list[Any] | RedisError:
        if self._closed:
            raise CacheClosedError(CLOSED)
        if batch.__class__ is ReplicaReads and self._replicas is not None:
            return await self._replicas.send(batch)
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
        if self._filling and await self._filled(key):  # this process's own fill of it is on its way
            value = core.get_from_l1(key)
            if value is not MISS:
                return value
        if not core.ready_done or core.replicas is not None:  # (replica reads take the fence's way)
            return await self._drive(core.get_from_redis(key, default, trace))
        ref = core.space.ref(key)
        sent_at = core.since()
        replies = await self._send(core.reads(ref))
        if isinstance(replies, RedisError):
            return core.read_failed(ref, replies, default, trace)
        value = core.took_all((ref,), replies, sent_at, trace=trace)  # (took, without its call)
        return default if value is MISS else value

    async def get_many(self, keys: Iterable[str | bytes]) -> dict[Any, Any]:
        with self._timing("get_many"):
            if self._filling:  # reads see this process's own fills
                keys = list(keys)
                for key in keys:
                    await self._filled(key)
            return await self._drive(self._core.get_many(keys))

    async def get_or_set(self, key: str | bytes, loader: Callable[[], Any], ttl: float | None = None, *,
                         tags: Iterable[str | bytes] = (), fail_safe: bool | None = None) -> Any:
        """:meth:`MultiLevelCache.get_or_set`, awaited. A coroutine function's loader is awaited; a plain
        function runs in a thread (``asyncio.to_thread``), so a slow loader never blocks the event loop.
        A computed value is returned before its fill lands: the fill runs as a task of this loop, and
        this process's reads of the key wait for it (docs/single-flight.md)."""
        if self._observer is None:
            return await self._get_or_set(key, loader, ttl, self._core.write_options(ttl, tags, fail_safe), None)
        with self._timing("get_or_set") as timing:  # (a bad ttl or tag is an observed error too)
            return await self._get_or_set(key, loader, ttl, self._core.write_options(ttl, tags, fail_safe), timing)

    async def _get_or_set(self, key: str | bytes, loader: Callable[[], Any], ttl: float | None, write: Write,
                          timing: Timing | None) -> Any:
        got = self._core.get_or_set_from_l1(key, ttl, write)  # an L1 hit needs no flight and no generator
        if got is None and self._filling and await self._filled(key):
            got = self._core.get_or_set_from_l1(key, ttl, write)
        if got is None:
            got = await self._drive(self._flight(key, ttl, write), loader)
        if timing is not None:
            timing.outcome = got.source
        if got.refresh is not None:
            self._refresh_in_background(got.refresh, loader)
        if got.fill_later is not None:
            if isinstance(got.fill_later.job, Loaded):
                self._fill_behind(got.fill_later)
            else:
                self._fill_in_background(got.fill_later)
        return got.value

    def _fill_behind(self, job: FillLater) -> None:
        """Write what a miss computed after its caller has the value: the fill (put.lua, with the lease's
        release in the same round trip) runs as a task of this loop, off the caller's path. Until it is
        done, the fleet's other workers wait on the lease as before, and this process's reads of the key
        wait for it (:meth:`_filled`), so they see their own fill. close() and flush_bookkeeping() wait
        for every fill; a task cancelled first (its loop ending) writes through the bookkeeping's
        connection instead, so the lease is never left to expire."""
        flight = self._flight_key(job.ref.id)

        def finished(task: asyncio.Task[None]) -> None:
            if self._filling.get(flight) is task:
                del self._filling[flight]
            if task.cancelled():  # (started or not) a fill sent twice is refused the second time: harmless
                with contextlib.suppress(Exception):
                    self._bookkeeping_io.drive(self._core.fill_later(job, job.job))

        task = asyncio.get_running_loop().create_task(self._drive(self._core.fill_later(job, job.job)))
        self._filling[flight] = task
        task.add_done_callback(finished)

    async def _filled(self, key: str | bytes) -> bool:
        """Wait for this process's pending fill of ``key`` (in this loop), if any; True if there was one."""
        task = self._filling.get(self._flight_key(self._core.space.ref(key).id))
        if task is None:
            return False
        await asyncio.wait((task,))  # its outcome is its own (logged); a cancelled caller is still cancelled
        return True

    async def _fills_done(self) -> None:
        """Wait for every pending fill of the running loop."""
        loop = asyncio.get_running_loop()
        pending = [t for t in list(self._filling.values()) if t.get_loop() is loop]
        if pending:
            await asyncio.wait(pending)

    def _fill_in_background(self, job: FillLater) -> None:
        """Finish a fill whose loader (a task) outlived fail-safe's soft timeout, once it is done."""
        loader_task: asyncio.Task[Loaded] = job.job

        def finish(done: asyncio.Task[Loaded]) -> None:
            outcome: Loaded | BaseException = (asyncio.CancelledError() if done.cancelled()
                                               else done.exception() or done.result())
            self._background(self._drive(self._core.fill_later(job, outcome)))

        self._refreshing.add(loader_task)
        loader_task.add_done_callback(self._refreshing.discard)
        loader_task.add_done_callback(finish)

    def _background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    def _refresh_in_background(self, job: Refresh, loader: Callable[[], Any]) -> None:
        async def run() -> None:
            try:
                await self._drive(self._core.refresh(job), loader)
            except Exception:  # a background refresh must never take the worker down
                log.exception("early refresh of %r failed", job.key,
                              extra=self._core.log_fields("refresh_failed", "refresh"))

        self._background(run())

    async def put(self, key: str | bytes, value: Any, ttl: float | None = None, *,
                  tags: Iterable[str | bytes] = ()) -> None:
        with self._timing("put"):
            await self._drive(self._core.put(key, value, ttl, tags))

    async def put_many(self, mapping: Mapping[Any, Any], ttl: float | None = None, *,
                       tags: Iterable[str | bytes] = ()) -> None:
        with self._timing("put_many"):
            await self._drive(self._core.put_many(mapping, ttl, tags))

    async def delete(self, key: str | bytes) -> bool:
        with self._timing("delete"):
            return await self._drive(self._core.delete(key))

    async def invalidate(self, key: str | bytes | None = None) -> None:
        with self._timing("invalidate"):
            await self._drive(self._core.invalidate(key))

    def cached(self, ttl: float | None = None, *, key: KeySpec = None, tags: TagSpec = (),
               cache_if: Callable[[R], bool] | None = None,
               fail_safe: bool | None = None) -> Callable[[Callable[P, Awaitable[R]]], AsyncCachedFunction[P, R]]:
        """:meth:`MultiLevelCache.cached` for coroutine functions."""
        def decorate(fn: Callable[P, Awaitable[R]]) -> AsyncCachedFunction[P, R]:
            return AsyncCachedFunction(fn, self, ttl, key, tags, cache_if, fail_safe)

        return decorate

    async def invalidate_tags(self, *tags: str | bytes) -> int:
        with self._timing("invalidate_tags"):
            return await self._drive(self._core.invalidate_tags(tags))

    async def get_metrics(self, scope: Scope = "process") -> dict[str, Any]:
        return await self._drive(self._core.metrics(scope))

    async def flush_bookkeeping(self) -> None:
        """:meth:`MultiLevelCache.flush_bookkeeping`: send the buffered bookkeeping now (in a thread), after
        every fill still on its way (see ``get_or_set``)."""
        await self._fills_done()
        await asyncio.to_thread(self._flusher.flush)

    async def close(self) -> None:
        """:meth:`MultiLevelCache.close`; the connections closed are those of the running loop (a loop
        that has ended took its own connections with it)."""
        if self._closed:
            return
        await self._fills_done()  # the fills behind this loop's calls are writes the callers made: they land
        self._finalizer.detach()
        for task in list(self._refreshing):
            task.cancel()
        await asyncio.to_thread(release_resources, self._flusher, self._core, [self._bookkeeping_io])
        self._closed = True
        if self._replicas is not None:
            await self._replicas.close()
        if self._owns_client:
            client = self.client
            await client.aclose()

    async def __aenter__(self) -> AsyncMultiLevelCache:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


async def _run_loader(loader: Callable[[], Any]) -> Loaded:
    """Run a loader, timed: a coroutine function is awaited; a plain function runs in a thread (a slow one
    must not block the event loop), and what it returns is awaited if it is awaitable."""
    started = time.perf_counter()
    if inspect.iscoroutinefunction(loader):
        value = await loader()
    else:
        value = await asyncio.to_thread(loader)
        if inspect.isawaitable(value):
            value = await value
    return Loaded(value, time.perf_counter() - started)


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
