"""MultiLevelCache: the synchronous front end. It only does I/O; the tiers decide (tiers.py, lua/)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, ClassVar, ParamSpec, TypeVar, cast

from redis.exceptions import RedisError

from . import forksafe
from .bookkeeping import Flusher, ShardBatch
from .coherence import listen
from .config import CacheConfig, redact
from .connection import (
    IO_ERRORS,
    SCRIPT_CALLS,
    SubscriberRoutes,
    SyncClient,
    acquire_sync_client,
    as_redis_error,
    cluster_nodes,
    connection_key,
    goes_alone,
    is_cluster,
    pipeline,
    release_sync_client,
    send_alone,
    send_packed,
)
from .decorator import CachedFunction, KeySpec, TagSpec
from .errors import CacheClosedError, ConfigurationError, InvalidArgumentError
from .metrics import NO_TIMING, Observer, Timing
from .replicas import ReplicaReader, ReplicaReads
from .resilience import Resilience, raise_transient
from .scripts import pack
from .stampede import Flights, LeaderGone
from .tiers import (
    MISS,
    Batch,
    FillLater,
    Got,
    Instruction,
    Loaded,
    Pause,
    Pending,
    Reads,
    Refresh,
    Scope,
    Step,
    TierCore,
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
    """What both front ends share: settings, the tier core, coherence, construction from the environment."""

    _flights: Flights[Any]  # this process's get_or_set computations; each front end makes its own futures
    # get_or_set writes a computed value after the caller has it (Got.fill_later): the async front end,
    # whose event loop runs the write while the caller goes on; the sync one writes before returning.
    FILL_BEHIND: ClassVar[bool] = False

    def __init__(self, redis_url: str | None = None, *, config: CacheConfig | None = None,
                 **settings: Any) -> None:
        self.config = _make_config(redis_url, config, settings)
        self._core = TierCore(self.config)
        self._resilience = self._core.resilience = Resilience(self.config, name=redact(self.config.url))
        self._observer: Observer | None = None

    @property
    def observer(self) -> Observer | None:
        """What receives the latency of every call (see :meth:`set_observer`), or None."""
        return self._observer

    def set_observer(self, observer: Observer | None) -> None:
        """Report every public call's latency to ``observer.observe(operation, outcome, seconds)``.

        ``outcome`` is the tier that served a get or get_or_set (``"l1"``, ``"l2"``, ``"l3"``),
        ``"miss"``, ``"coalesced"`` (get_or_set waited for a concurrent call of this process), ``"ok"``
        for the other operations, or ``"error"`` when the call raised. ``None`` stops the reports: an
        unobserved cache times nothing. ``victor_rcache.contrib.prometheus.register`` sets one.
        """
        if observer is not None and not callable(getattr(observer, "observe", None)):
            raise InvalidArgumentError(f"an observer needs an observe(operation, outcome, seconds) method; "
                                       f"{type(observer).__name__} has none")
        self._observer = observer

    def _timing(self, operation: str) -> AbstractContextManager[Timing | None]:
        """The context that times one call: a :class:`Timing` if observed, else one that does nothing."""
        observer = self._observer
        return NO_TIMING if observer is None else Timing(observer, operation)

    def _start_coherence(self, client: Any) -> None:
        """Subscribe to the namespace's invalidations (waits up to connect_timeout for the first try)."""
        if self.config.coherence:  # on the process's one subscriber for this Redis, shared by its caches
            config = self.config

            def routes() -> SubscriberRoutes:
                return SubscriberRoutes(config, cluster_nodes(client))

            self._core.coherence = listen(connection_key(config), routes, self._core.space.channels, self._core.l1,
                                          config.connect_timeout, clock=self._core.since, namespace=config.namespace)

    def _start_bookkeeping(self, io: SyncIO) -> None:
        """Send this cache's buffered hits and misses in rounds of the process's background thread, through ``io``."""
        core = self._core

        def send(batches: list[ShardBatch]) -> None:
            try:
                io.drive(core.touch(batches))
            except Exception as exc:  # the flusher must never die of a batch: bookkeeping only is lost
                core.book.give_up(batches)
                log.debug("bookkeeping dropped: %s", exc, extra=core.log_fields("bookkeeping_dropped", "touch"))

        self._flusher = Flusher(core.book, send).start()
        self._background_io = io  # what the warmers' model rounds send through, too

    def _flight(self, key: str | bytes, ttl: float | None, write: Write) -> Step[Got]:
        """get_or_set after an L1 miss, once per process: the first concurrent caller for ``key`` leads
        (runs the core's get_or_set); the others wait for its payload (:class:`Wait`) and decode their
        own copy (or share a value that could not be encoded), or try again if the leader was interrupted."""
        flights = self._flights
        flight = self._flight_key(self._core.space.ref(key).id)
        while True:
            future, leader = flights.join(flight)
            if leader:
                break
            try:
                payload = yield Wait(future)
            except LeaderGone:
                continue  # the leader was interrupted: try again, perhaps as the leader
            if isinstance(payload, Got):  # a value the leader could not encode: shared as it is
                return Got(payload.value, None, source="coalesced")
            return Got(self._core.envelope.unwrap(payload), payload, source="coalesced")
        with flights.lead(flight, future) as done:
            got = yield from self._core.get_or_set(key, ttl, l1_checked=True, write=write, behind=self.FILL_BEHIND)
            done(got.payload if got.payload is not None else got)
        return got

    def _flight_key(self, entry_id: bytes) -> Hashable:
        return entry_id

    @classmethod
    def from_env(cls: type[T], **overrides: Any) -> T:
        """A cache configured from ``VICTOR_RCACHE_URL``/``REDIS_URL`` and ``VICTOR_RCACHE_*`` variables."""
        return cls(config=CacheConfig.from_env(**overrides))  # type: ignore[call-arg]

    @property
    def namespace(self) -> str:
        return self.config.namespace


CLOSED = "this cache was closed; build a new one (close() ends a cache's life: keep one cache per worker)"


def release_resources(flusher: Flusher, core: TierCore, ios: list[SyncIO]) -> None:
    """What close() does: send the buffered bookkeeping, stop the threads, close the connections; from
    then on every call that needs Redis raises CacheClosedError, and L1 serves nothing."""
    if ios and ios[0].closed:
        return  # closed already
    for companion in list(core.companions):  # a warmer's last records go out before the connections close
        companion.close()
    flusher.close()
    core.coherence.close()
    core.l1.trusted = False
    core.l1.clear()
    for io in ios:
        io.closed = True
        io.close()


def release_when_collected(cache: CacheBase, ios: list[SyncIO]) -> weakref.finalize:  # type: ignore[type-arg]
    """Releases an unclosed cache's thread and connections when it is garbage-collected, with a
    ResourceWarning (a cache built per request and never closed would leak them). Not at exit: a worker's
    one cache lives until then, and its bookkeeping is sent by bookkeeping's exit hook."""
    name = f"{type(cache).__name__}(namespace={cache.config.namespace!r})"
    finalizer = weakref.finalize(cache, _release_collected, name, cache._flusher, cache._core, ios)
    finalizer.atexit = False
    return finalizer


def _release_collected(name: str, flusher: Flusher, core: TierCore, ios: list[SyncIO]) -> None:
    warnings.warn(f"{name} was garbage-collected without close(); its thread and connections are released now. "
                  "Call close() (or use `with`/`async with`), and keep one cache per worker", ResourceWarning,
                  stacklevel=1)
    # Not in this thread: a collection runs in whichever thread allocates, which may be one holding a lock
    # the release takes (the shared subscriber's or background thread's own, a pool's, an L1's).
    threading.Thread(target=release_resources, args=(flusher, core, ios), name="victor-rcache-release",
                     daemon=True).start()


def _call_loader(loader: Callable[[], Any]) -> Loaded | BaseException:
    """Run a sync loader (or an async one, when no event loop runs in this thread); time it."""
    started = time.perf_counter()
    try:
        value = loader()
        if inspect.isawaitable(value):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                value = asyncio.run(_await(value))
            else:
                if inspect.iscoroutine(value):
                    value.close()  # never awaited, on purpose: say so without a RuntimeWarning
                raise InvalidArgumentError("an async loader cannot run inside a running event loop from the sync "
                                           "cache; use AsyncMultiLevelCache.get_or_set")
    except BaseException as exc:  # handed to the core, which releases the lease and re-raises it
        return exc
    return Loaded(value, time.perf_counter() - started)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _call_loader_within(loader: Callable[[], Any], timeout: float) -> Loaded | BaseException | Pending:
    """Fail-safe's soft timeout: the loader runs in a thread of its own; after ``timeout`` seconds the
    core gets :class:`Pending` (the thread goes on, and its outcome finishes the fill)."""
    job: Future[Loaded] = Future()

    def run() -> None:
        outcome = _call_loader(loader)
        if isinstance(outcome, BaseException):
            job.set_exception(outcome)
        else:
            job.set_result(outcome)

    threading.Thread(target=run, name="victor-rcache-loader", daemon=True).start()
    try:
        return job.result(timeout)
    except FuturesTimeoutError:
        return Pending(job)
    except BaseException as exc:  # the loader's own exception, handed to the core
        return exc


class SyncIO:
    """Does a core operation's I/O on a sync redis-py client: each instruction it yields, its outcome fed back.

    The sync front end's engine, and the bookkeeping flusher's of both front ends (a thread cannot use an
    asyncio client). ``send`` is the batch sender to use (the front end passes its own method, which
    tests may wrap).
    """

    def __init__(self, config: CacheConfig, core: TierCore, resilience: Resilience,
                 client: SyncClient | None = None) -> None:
        self.config = config
        self.core = core
        self.resilience = resilience
        self.owns_client = client is None
        self.closed = False  # set by the cache's close(): every round trip raises CacheClosedError then
        self.stale_client = False  # make self.client (again) before the next round trip
        self.client: SyncClient = client if client is not None else self._first_client()
        forksafe.register(self)

    def _first_client(self) -> SyncClient:
        try:
            return acquire_sync_client(self.config)  # the process's client for this Redis, shared
        except IO_ERRORS as exc:  # a cluster client reads the topology at once, and Redis is down
            self.core.redis_failed("connect", as_redis_error(exc))  # raises when failing closed
            self.stale_client = True  # fail open: made on a later call, once a node answers
            return cast(SyncClient, None)

    def _after_fork(self) -> None:
        # redis-py 8.1 resets a connection pool in a forked child under the pool's lock, which another
        # parent thread may have held at fork(): the child would hang. A client we made is replaced
        # (lazily: a cluster client's constructor does I/O) by the child's own shared one instead.
        self.stale_client = self.stale_client or self.owns_client

    def drive(self, step: Step[T], loader: Callable[[], Any] | None = None,
              send: Callable[[Batch], list[Any] | RedisError] | None = None) -> T:
        """Run a core operation: do each instruction it yields, feed back the outcome.

        Whatever interrupts an instruction goes back into the operation too, so it can give back
        what it holds (a fill lease) before the exception reaches the caller.
        """
        instruction, result = feed(step, None)
        while instruction is not None:
            try:
                outcome = self.do(instruction, loader, send or self.send)
            except BaseException as exc:
                outcome = exc
            instruction, result = feed(step, outcome)
        return cast(T, result)

    def do(self, instruction: Instruction, loader: Callable[[], Any] | None,
           send: Callable[[Batch], list[Any] | RedisError]) -> Any:
        if isinstance(instruction, Pause):
            time.sleep(instruction.seconds)
            return []
        if isinstance(instruction, WaitFill):
            instruction.watch.wait(instruction.seconds)
            return []
        if isinstance(instruction, list):
            return send(instruction)
        if isinstance(instruction, Wait):
            return instruction.future.result()
        assert loader is not None, "only get_or_set asks for the loader"
        if instruction.timeout is not None:
            return _call_loader_within(loader, instruction.timeout)
        return _call_loader(loader)

    def send(self, batch: Batch) -> list[Any] | RedisError:
        """One round trip: the replies (errors Redis answered in place), or the RedisError that stopped it.
        A batch of plain reads (tiers.Reads) goes out as its packed bytes on a standalone client."""
        if self.closed:
            raise CacheClosedError(CLOSED)
        resilience = self.resilience
        refused = resilience.refused()  # the circuit is open: no I/O, no timeout to pay
        if refused is not None:
            return refused
        try:
            if self.stale_client:
                self.client, self.stale_client = acquire_sync_client(self.config), False
            client, started = self.client, resilience.clock()
            # The first attempt is plain code; tenacity is engaged only once it has failed, so a batch that
            # succeeds at once builds nothing.
            try:
                replies = _attempt(client, batch)
            except IO_ERRORS as first:
                for attempt in resilience.retrying(first, started):
                    with attempt:
                        replies = _attempt(client, batch)
        except IO_ERRORS as exc:
            return resilience.settle(as_redis_error(exc))
        except BaseException:  # interrupted (cancelled, KeyboardInterrupt): no verdict on Redis
            resilience.abandon()
            raise
        return resilience.settle(replies)

    def close(self) -> None:
        if self.owns_client and self.client is not None and not self.stale_client:
            release_sync_client(self.config, self.client)  # the last cache out closes it


def _attempt(client: SyncClient, batch: Batch) -> list[Any]:
    """One try of a batch: plain reads already packed as they are (standalone), a lone command as is,
    several as a pipeline (a transient error raised)."""
    if not is_cluster(client):
        if isinstance(batch, Reads):
            return send_packed(client, batch.packed)  # type: ignore[arg-type]  # (a standalone client)
        if all(command[0] in SCRIPT_CALLS for command in batch):  # no redis-py reply callback to apply
            return send_packed(client, [pack(command) for command in batch])  # type: ignore[arg-type]
    if goes_alone(client, batch):
        return send_alone(client, batch[0])
    return raise_transient(queue(pipeline(client), batch).execute(raise_on_error=False))


class MultiLevelCache(CacheBase):
    """A cache with L1 in this process and L2/L3 shared by every process using the same Redis and namespace.

    ``MultiLevelCache(redis_url, namespace=..., l1_size=..., l2_size=..., l3_size=..., l1_ttl=...,
    l2_ttl=..., l3_ttl=..., promote_after=...)``; every setting is described in :class:`CacheConfig`.
    Pass ``cluster=True`` for a Redis Cluster, or ``client=`` to reuse a redis-py client (``Redis`` or
    ``RedisCluster``) you already have.
    """

    def __init__(self, redis_url: str | None = None, *, config: CacheConfig | None = None,
                 client: SyncClient | None = None, **settings: Any) -> None:
        super().__init__(redis_url, config=config, **settings)
        self._io = SyncIO(self.config, self._core, self._resilience, client)
        # read_from_replicas: plain reads go to a replica (replicas.py); the core decides, per batch.
        self._replicas = self._core.replicas = ReplicaReader(self.config) if self.config.read_from_replicas else None
        self._flights: Flights[Future[bytes]] = Flights(Future)
        self._start_coherence(self.client)
        self._start_bookkeeping(self._io)
        self._finalizer = release_when_collected(self, [self._io])

    @property
    def client(self) -> SyncClient:
        """The redis-py client the cache uses (made from the URL, or the one passed as ``client=``)."""
        return self._io.client

    def _drive(self, step: Step[T], loader: Callable[[], Any] | None = None) -> T:
        return self._io.drive(step, loader, self._send)

    def _do(self, instruction: Instruction, loader: Callable[[], Any] | None) -> Any:
        return self._io.do(instruction, loader, self._send)

    def _send(self, batch: Batch) -> list[Any] | RedisError:
        if batch.__class__ is ReplicaReads and self._replicas is not None and not self._io.closed:
            return self._replicas.send(batch)
        return self._io.send(batch)

    def _read(self, key: str | bytes, default: Any, trace: Timing | None = None) -> Any:
        """``get`` after an L1 miss: one plain read (the hot path: no generator), or the full way the first
        time (the namespace's settings not yet agreed with the fleet)."""
        core = self._core
        if not core.ready_done or core.replicas is not None:  # (replica reads take the fence's way)
            return self._drive(core.get_from_redis(key, default, trace))
        ref = core.space.ref(key)
        sent_at = core.since()
        replies = self._send(core.reads(ref))
        if isinstance(replies, RedisError):
            return core.read_failed(ref, replies, default, trace)
        value = core.took_all((ref,), replies, sent_at, trace=trace)  # (took, without its call)
        return default if value is MISS else value

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` on a miss. A cached ``None`` is a hit."""
        if self._observer is None:  # no generator, no timing
            value = self._core.get_from_l1(key)
            return value if value is not MISS else self._read(key, default)
        with self._timing("get") as timing:
            value = self._core.get_from_l1(key, timing)
            return value if value is not MISS else self._read(key, default, timing)

    def get_many(self, keys: Iterable[str | bytes]) -> dict[Any, Any]:
        """A dict of the hits among ``keys`` (one round trip for all keys that miss L1)."""
        with self._timing("get_many"):
            return self._drive(self._core.get_many(keys))

    def get_or_set(self, key: str | bytes, loader: Callable[[], Any], ttl: float | None = None, *,
                   tags: Iterable[str | bytes] = (), fail_safe: bool | None = None) -> Any:
        """The value under ``key``; on a miss ``loader()`` computes it once per process and once per fleet.

        Concurrent callers in this process wait for the first one; other processes wait for the
        worker holding the fill lease. A loader exception reaches every waiting caller and nothing
        is cached; with ``fail_safe`` (default: the setting) the value the key had past its ttl is
        served instead, within ``fail_safe_grace`` (docs/fail-safe.md). A loader returning
        ``Uncached(value)`` hands ``value`` back without caching it. ``tags`` go with the value written.
        ``loader`` may be a plain function or return an awaitable (run with asyncio.run).
        """
        if self._observer is None:
            return self._get_or_set(key, loader, ttl, self._core.write_options(ttl, tags, fail_safe), None)
        with self._timing("get_or_set") as timing:  # (a bad ttl or tag is an observed error too)
            return self._get_or_set(key, loader, ttl, self._core.write_options(ttl, tags, fail_safe), timing)

    def _get_or_set(self, key: str | bytes, loader: Callable[[], Any], ttl: float | None, write: Write,
                    timing: Timing | None) -> Any:
        got = self._core.get_or_set_from_l1(key, ttl, write)  # an L1 hit needs no flight and no generator
        if got is None:
            got = self._drive(self._flight(key, ttl, write), loader)
        if timing is not None:
            timing.outcome = got.source
        if got.refresh is not None:
            self._refresh_in_background(got.refresh, loader)
        if got.fill_later is not None:
            self._fill_in_background(got.fill_later)
        return got.value

    def _fill_in_background(self, job: FillLater) -> None:
        """Finish a fill whose loader outlived fail-safe's soft timeout, in the loader's thread, once done."""
        def finish(done: Future[Loaded]) -> None:
            failed = done.exception()
            try:
                self._drive(self._core.fill_later(job, failed if failed is not None else done.result()))
            except Exception:  # nobody waits for it: it must not raise into a thread
                log.exception("the background fill of %r failed", job.ref.key[:100],
                              extra=self._core.log_fields("fill_failed", "get_or_set"))

        job.job.add_done_callback(finish)

    def _refresh_in_background(self, job: Refresh, loader: Callable[[], Any]) -> None:
        def run() -> None:
            try:
                self._drive(self._core.refresh(job), loader)
            except Exception:  # a background refresh must never take the worker down
                log.exception("early refresh of %r failed", job.key,
                              extra=self._core.log_fields("refresh_failed", "refresh"))

        threading.Thread(target=run, name="victor-rcache-refresh", daemon=True).start()

    def put(self, key: str | bytes, value: Any, ttl: float | None = None, *, tags: Iterable[str | bytes] = ()) -> None:
        """Store ``value`` in L2 and this process's L1; ``ttl`` (seconds) bounds its life in every tier;
        ``tags`` are names :meth:`invalidate_tags` removes it by."""
        with self._timing("put"):
            self._drive(self._core.put(key, value, ttl, tags))

    def put_many(self, mapping: Mapping[Any, Any], ttl: float | None = None, *,
                 tags: Iterable[str | bytes] = ()) -> None:
        """Store several values in one round trip; all are validated before any is written."""
        with self._timing("put_many"):
            self._drive(self._core.put_many(mapping, ttl, tags))

    def delete(self, key: str | bytes) -> bool:
        """Remove ``key`` from every tier and every process's L1; True if some tier held it."""
        with self._timing("delete"):
            return self._drive(self._core.delete(key))

    def invalidate(self, key: str | bytes | None = None) -> None:
        """Remove ``key``, or with no argument every entry of the namespace (in bounded batches)."""
        with self._timing("invalidate"):
            self._drive(self._core.invalidate(key))

    def cached(self, ttl: float | None = None, *, key: KeySpec = None, tags: TagSpec = (),
               cache_if: Callable[[R], bool] | None = None,
               fail_safe: bool | None = None) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
        """Decorate a function so its results are cached, with get_or_set's promises (once per process,
        once per fleet); keys come from its arguments (docs/decorator.md). ``tags`` and ``key`` may be
        templates of the arguments (``"tenant:{tenant}"``) or callables; ``cache_if(result)`` False
        returns a result without caching it; the function gains ``.key(...)`` and ``.invalidate(...)``."""
        def decorate(fn: Callable[P, R]) -> CachedFunction[P, R]:
            return CachedFunction(fn, self, ttl, key, tags, cache_if, fail_safe)

        return decorate

    def invalidate_tags(self, *tags: str | bytes) -> int:
        """Remove every entry carrying any of ``tags``, from every tier and every process's L1; returns how
        many entries were removed (docs/tags.md)."""
        with self._timing("invalidate_tags"):
            return self._drive(self._core.invalidate_tags(tags))

    def get_metrics(self, scope: Scope = "process") -> dict[str, Any]:
        """Per-tier hits, misses, hit rates, movements and sizes, for this process or the whole fleet."""
        return self._drive(self._core.metrics(scope))

    def flush_bookkeeping(self) -> None:
        """Send this process's buffered bookkeeping (LRU touches, hit counts, fleet counters) to Redis now.

        A background thread sends it every 100 ms (``bookkeeping.WINDOW``) anyway; call this before
        looking at Redis's own view (fleet metrics, the CLI) when it must include this process's reads."""
        self._flusher.flush()

    def close(self) -> None:
        """Send this process's buffered bookkeeping, stop listening and close the connections the cache made.
        The cache cannot be used after this (CacheClosedError); closing again does nothing."""
        self._finalizer.detach()
        release_resources(self._flusher, self._core, [self._io])
        if self._replicas is not None:
            self._replicas.close()

    def __enter__(self) -> MultiLevelCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
