"""Prometheus export of a cache's metrics (the optional extra: ``pip install victor-rcache[prometheus]``).

::

    from victor_rcache.contrib.prometheus import serve
    serve(cache, port=9464, warmer=warmer)   # http://host:9464/metrics

``register(cache, registry=..., warmer=...)`` adds the cache to a ``prometheus_client`` registry
(the default one unless given) and returns the :class:`CacheCollector`; ``serve`` does the same and
starts prometheus_client's HTTP server. Nothing of this is imported by ``victor_rcache`` itself,
and ``prometheus_client`` only when one of them is called.

* **Counters and gauges** are read on each scrape from the cache's ``get_metrics()`` in the
  *process* scope, so every worker exports its own and Prometheus sums the fleet (``sum by
  (namespace, tier)``). Process counters, L1 sizes, the circuit breaker and the invalidation channel
  are in memory; L2/L3 entries and bytes (fleet-wide gauges: every worker reports the same value)
  and ``victor_rcache_redis_up`` cost one Redis round trip per scrape, and the warmer's fleet-wide
  accuracy and prewarm counts a second one. ``read_redis=False`` exports memory only: no round
  trip, no Redis-side gauges. An async cache is asked on its event loop (the one running when
  ``register`` was called, or ``loop=``) when the scrape runs in another thread, else from memory.
* **Latency**: ``victor_rcache_operation_seconds{operation, outcome, namespace}``, a histogram fed by
  the observer ``register`` sets on the cache (:meth:`~victor_rcache.MultiLevelCache.set_observer`):
  outcome is the tier that served a get or get_or_set (l1, l2, l3), miss, coalesced, ok or error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..aio import AsyncMultiLevelCache
from ..cache import CacheBase, MultiLevelCache
from ..errors import CacheError, ConfigurationError
from ..prediction.model import PREWARM_OUTCOMES
from ..prediction.warmer import AsyncPredictiveCacheWarmer, PredictiveCacheWarmer

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.metrics_core import Metric

__all__ = ["DEFAULT_BUCKETS", "CacheCollector", "HistogramObserver", "register", "serve"]

log = logging.getLogger("victor_rcache")

INSTALL_HINT = "pip install victor-rcache[prometheus]"
HISTOGRAM = "victor_rcache_operation_seconds"
# From an L1 hit (microseconds) to a call that waited for a timeout or a slow loader (seconds).
DEFAULT_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
TIERS = ("l1", "l2", "l3")

NS, TIER = ("namespace",), ("namespace", "tier")
# name (without victor_rcache_ and _total), type, labels, help
SPEC: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("hits", "counter", TIER, "Requests the tier served in this process (each tier counts the requests that "
                              "reached it: L1 every get, L2 L1's misses, L3 L2's misses)"),
    ("misses", "counter", TIER, "Requests that reached the tier and missed it, in this process"),
    ("promotions", "counter", TIER, "l1: L2/L3 hits copied into this process's L1; l2: L3 -> L2 moves this "
                                    "process's calls made"),
    ("demotions", "counter", TIER, "l2: L2 -> L3 moves this process's calls made"),
    ("evictions", "counter", TIER, "l1: entries this process's L1 dropped (LRU or ttl); l3: entries removed by "
                                   "L3 overflow during this process's calls"),
    ("entries", "gauge", TIER, "Entries held: l1 in this process, l2/l3 in Redis (namespace-wide, the same in "
                               "every worker; absent without read_redis or when Redis is unreachable)"),
    ("bytes", "gauge", TIER, "Bytes of encoded values held (as entries)"),
    ("gets", "counter", NS, "Lookups made by this process (get, get_many keys, get_or_set)"),
    ("puts", "counter", NS, "Values this process stored in Redis"),
    ("expirations", "counter", NS, "Entries removed by ttl or L3 idleness during this process's calls"),
    ("redis_errors", "counter", NS, "Redis calls that failed (timeouts, refused connections, errors)"),
    ("decode_errors", "counter", NS, "Entries that did not decode (counted as misses and removed)"),
    ("script_reloads", "counter", NS, "Lua scripts reloaded after NOSCRIPT (restart, failover, SCRIPT FLUSH)"),
    ("redis_up", "gauge", NS, "1 if this scrape's Redis round trip succeeded, else 0 (absent without read_redis)"),
    ("breaker_state", "gauge", NS, "Circuit breaker to Redis: 0 closed, 1 half_open, 2 open"),
    ("breaker_consecutive_failures", "gauge", NS, "Consecutive failed Redis batches"),
    ("breaker_opens", "counter", NS, "Times the circuit breaker opened"),
    ("breaker_rejected_calls", "counter", NS, "Redis batches not sent because the circuit was open"),
    ("retries", "counter", NS, "Retries of transient Redis errors"),
    ("coherence_channel_up", "gauge", NS, "1 if the invalidation channel is subscribed (L1 trusted), 0 if not "
                                          "(L1 bypassed); absent with coherence=False"),
    ("invalidations_received", "counter", NS, "Invalidation messages this process received"),
    ("l1_flushes", "counter", NS, "Times this process's L1 was flushed because invalidations may have been lost"),
    ("loads", "counter", NS, "Loader runs (get_or_set misses, refreshes, prewarms)"),
    ("lease_waits", "counter", NS, "get_or_set calls that waited for another worker's fill"),
    ("fills_refused", "counter", NS, "Fills refused because the key changed since the miss"),
    ("refreshes", "counter", NS, "Early (XFetch) refreshes stored"),
    ("refresh_errors", "counter", NS, "Early refreshes whose loader failed"),
    ("fail_safe_served", "counter", NS, "get_or_set calls answered with a value past its ttl (fail-safe)"),
    ("uncached", "counter", NS, "Values get_or_set returned without caching them (Uncached, or not storable)"),
    ("prediction_accuracy", "gauge", ("namespace", "scope"), "Share of checked predictions that came true "
                                                             "(scope: process, or fleet from Redis)"),
    ("predictions_made", "counter", NS, "Predictions this process made"),
    ("predictions_checked", "counter", NS, "This process's predictions judged by the session's next query"),
    ("predictions_correct", "counter", NS, "This process's predictions that came true"),
    ("records", "counter", NS, "Queries this process recorded into the model"),
    ("prewarms", "counter", ("namespace", "outcome"), "This process's prewarm attempts by outcome"),
    ("fleet_predictions", "gauge", ("namespace", "kind"), "Fleet-wide predictions (kind: total, correct)"),
    ("fleet_prewarms", "gauge", ("namespace", "kind"), "Fleet-wide prewarms (kind: completed, useful, skipped, "
                                                       "failed)"),
    ("model_patterns", "gauge", NS, "Patterns the shared prediction model holds"),
    ("model_queries", "gauge", NS, "Queries the shared prediction model knows"),
)

_lock = threading.Lock()
_collectors: weakref.WeakKeyDictionary[Any, CacheCollector] = weakref.WeakKeyDictionary()


def _client() -> ModuleType:
    """prometheus_client, or a ConfigurationError that says how to install it."""
    try:
        # the optional extra: imported only when the exporter is used
        import prometheus_client  # noqa: PLC0415
        import prometheus_client.core  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigurationError(f"the Prometheus exporter needs the prometheus-client package: {INSTALL_HINT} "
                                 f"({exc})") from exc
    return prometheus_client


class HistogramObserver:
    """The cache observer that feeds ``victor_rcache_operation_seconds`` for one namespace."""

    __slots__ = ("_children", "_histogram", "namespace")

    def __init__(self, histogram: Histogram, namespace: str) -> None:
        self._histogram = histogram
        self.namespace = namespace
        self._children: dict[tuple[str, str], Any] = {}  # (operation, outcome) -> labelled child

    def observe(self, operation: str, outcome: str, seconds: float) -> None:
        child = self._children.get((operation, outcome))
        if child is None:  # labels() takes a lock and builds a key: once per (operation, outcome)
            child = self._children[operation, outcome] = self._histogram.labels(operation, outcome, self.namespace)
        child.observe(seconds)


@dataclass
class _Source:
    cache: CacheBase
    warmer: PredictiveCacheWarmer | AsyncPredictiveCacheWarmer | None
    read_redis: bool
    loop: asyncio.AbstractEventLoop | None
    observer: HistogramObserver | None


class CacheCollector:
    """A ``prometheus_client`` collector of the caches registered in one registry (one per namespace).

    Each scrape reads every cache's process metrics (see the module's documentation for what costs
    a Redis round trip) and the latency histogram its observer fills.
    """

    def __init__(self, registry: CollectorRegistry, buckets: Sequence[float]) -> None:
        self._pc = _client()
        self._registry = weakref.ref(registry)  # the registry holds the collector: no cycle back, it may go
        self.buckets = tuple(buckets)
        self.histogram: Histogram = self._pc.Histogram(
            HISTOGRAM, "Latency of the cache's public calls, by operation and outcome (the tier that served a get "
                       "or get_or_set: l1, l2, l3; miss; coalesced; ok; error)",
            ("operation", "outcome", "namespace"), registry=None, buckets=self.buckets)
        self._sources: dict[str, _Source] = {}
        self._lock = threading.Lock()
        self.servers: list[Any] = []  # (server, thread) pairs that serve() started

    @property
    def registry(self) -> CollectorRegistry:
        """The registry this collector is registered in."""
        registry = self._registry()
        if registry is None:
            raise ConfigurationError("the registry of this collector no longer exists")
        return registry

    # ------------------------------------------------------------------ registration

    def add(self, cache: CacheBase, warmer: PredictiveCacheWarmer | AsyncPredictiveCacheWarmer | None = None, *,
            read_redis: bool = True, loop: asyncio.AbstractEventLoop | None = None, observe: bool = True) -> None:
        """Export ``cache`` (and ``warmer``'s prediction statistics); see :func:`register`."""
        _check(cache, warmer)
        namespace = cache.namespace
        with self._lock:
            known = self._sources.get(namespace)
            if known is not None and known.cache is not cache:
                raise ConfigurationError(f"this registry already exports a cache of namespace {namespace!r}; a "
                                         "registry exports one cache per namespace (use another registry)")
            observer = known.observer if known is not None else None
            if observe and observer is None:
                if cache.observer is not None:
                    raise ConfigurationError(
                        f"the cache of namespace {namespace!r} already has an observer "
                        f"({type(cache.observer).__name__}); pass observe=False to keep it (no latency histogram "
                        "for this cache), or set_observer(None) first")
                observer = HistogramObserver(self.histogram, namespace)
                cache.set_observer(observer)
            if isinstance(cache, AsyncMultiLevelCache) and loop is None:
                loop = known.loop if known is not None else _running_loop()
            if warmer is None and known is not None:
                warmer = known.warmer
            self._sources[namespace] = _Source(cache, warmer, read_redis, loop, observer)

    def remove(self, cache: CacheBase) -> None:
        """Stop exporting ``cache``; its latency observer is removed."""
        with self._lock:
            source = self._sources.get(cache.namespace)
            if source is None or source.cache is not cache:
                return
            del self._sources[cache.namespace]
        if source.observer is not None and cache.observer is source.observer:
            cache.set_observer(None)

    def close(self) -> None:
        """Stop the HTTP servers :func:`serve` started, leave the registry, remove the caches' observers."""
        for server, _thread in self.servers:
            server.shutdown()
            server.server_close()
        self.servers.clear()
        registry = self._registry()
        with _lock:
            if registry is not None and _collectors.get(registry) is self:
                del _collectors[registry]
                registry.unregister(self)
        for source in list(self._sources.values()):
            self.remove(source.cache)

    # ----------------------------------------------------------------------- scrape

    def describe(self) -> Iterator[Metric]:
        """The metric families (no samples): lets the registry refuse clashing names."""
        yield from _Families(self._pc).all()
        yield from self.histogram.describe()

    def collect(self) -> Iterator[Metric]:
        families = _Families(self._pc)
        with self._lock:
            sources = sorted(self._sources.items())
        for namespace, source in sources:
            families.add_cache(namespace, self._metrics(source))
            if source.warmer is not None:
                families.add_warmer(namespace, self._statistics(source))
        yield from families.all()
        yield from self.histogram.collect()

    def _metrics(self, source: _Source) -> dict[str, Any]:
        asked = _ask(source, "get_metrics") if source.read_redis else None
        if isinstance(asked, dict):
            return asked
        metrics = source.cache._core.local_metrics()
        if asked is False:
            metrics["health"]["redis_available"] = False
        return metrics

    def _statistics(self, source: _Source) -> dict[str, Any]:
        assert source.warmer is not None
        asked = _ask(source, "get_statistics") if source.read_redis else None
        return asked if isinstance(asked, dict) else source.warmer._core.local_statistics()


def _ask(source: _Source, method: str) -> dict[str, Any] | bool | None:
    """Call the cache's (or warmer's) ``method`` through its own front end: its result, False if Redis
    failed a fail-closed cache, None if it cannot be asked from here (an async cache whose loop is not
    running, or is this very thread's)."""
    target: Any = source.warmer if method == "get_statistics" else source.cache
    try:
        if not isinstance(source.cache, AsyncMultiLevelCache):
            result: dict[str, Any] = getattr(target, method)()
            return result
        loop = source.loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return None  # on the loop's own thread, waiting for the loop would wait forever
        config = source.cache.config
        future = asyncio.run_coroutine_threadsafe(getattr(target, method)(), loop)
        try:
            result = future.result(timeout=config.connect_timeout + config.socket_timeout + 0.5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.debug("scrape of namespace %s: the event loop did not answer in time", source.cache.namespace)
            return None
        return result
    except CacheError as exc:  # Redis down and the cache fail-closed: export what memory holds
        log.debug("scrape of namespace %s without Redis: %s", source.cache.namespace, exc)
        return False


class _Families:
    """The metric families of one scrape, filled cache by cache."""

    def __init__(self, pc: ModuleType) -> None:
        self._families: dict[str, Any] = {}
        for name, kind, labels, doc in SPEC:
            family = pc.core.CounterMetricFamily if kind == "counter" else pc.core.GaugeMetricFamily
            self._families[name] = family(f"victor_rcache_{name}", doc, labels=labels)

    def all(self) -> Iterable[Metric]:
        return self._families.values()

    def _add(self, name: str, labels: Sequence[str], value: float | None) -> None:
        if value is not None:
            self._families[name].add_metric(list(labels), value)

    def add_cache(self, ns: str, m: dict[str, Any]) -> None:
        for tier in TIERS:
            t = m[tier]
            for name in ("hits", "misses", "promotions", "demotions", "evictions"):
                self._add(name, (ns, tier), t[name])
            self._add("entries", (ns, tier), t["entry_count"])
            self._add("bytes", (ns, tier), t["total_size"])
        combined, health = m["combined"], m["health"]
        self._add("gets", (ns,), combined["gets"])
        self._add("puts", (ns,), combined["puts"])
        self._add("expirations", (ns,), combined["total_expirations"])
        for name in ("redis_errors", "decode_errors", "script_reloads"):
            self._add(name, (ns,), health[name])
        available = health["redis_available"]
        self._add("redis_up", (ns,), None if available is None else int(available))
        breaker = health.get("breaker")
        if breaker is not None:
            self._add("breaker_state", (ns,), BREAKER_STATES[breaker["state"]])
            self._add("breaker_consecutive_failures", (ns,), breaker["consecutive_failures"])
            self._add("breaker_opens", (ns,), breaker["opens"])
            self._add("breaker_rejected_calls", (ns,), breaker["rejected_calls"])
            self._add("retries", (ns,), breaker["retries"])
        coherence = m["coherence"]
        if coherence["channel"] != "off":
            self._add("coherence_channel_up", (ns,), int(coherence["channel"] == "up"))
        self._add("invalidations_received", (ns,), coherence["invalidations"])
        self._add("l1_flushes", (ns,), coherence["l1_flushes"])
        for name, value in m["stampede"].items():
            self._add(name, (ns,), value)

    def add_warmer(self, ns: str, s: dict[str, Any]) -> None:
        process = s["predictions"]["process"]
        self._add("prediction_accuracy", (ns, "process"), process["accuracy"])
        self._add("predictions_made", (ns,), process["made"])
        self._add("predictions_checked", (ns,), process["checked"])
        self._add("predictions_correct", (ns,), process["correct"])
        self._add("records", (ns,), s["records"]["process"])
        for outcome in PREWARM_OUTCOMES:
            self._add("prewarms", (ns, outcome), s["prewarming"]["process"][outcome])
        if not s["available"]:  # the fleet's numbers were not read: leave them out rather than export zeros
            return
        fleet = s["predictions"]
        self._add("prediction_accuracy", (ns, "fleet"), fleet["accuracy"])
        self._add("fleet_predictions", (ns, "total"), fleet["total"])
        self._add("fleet_predictions", (ns, "correct"), fleet["correct"])
        for kind in ("completed", "useful", "skipped", "failed"):
            self._add("fleet_prewarms", (ns, kind), s["prewarming"][kind])
        self._add("model_patterns", (ns,), s["patterns"]["total"])
        self._add("model_queries", (ns,), s["patterns"]["queries"])


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check(cache: Any, warmer: Any) -> None:
    if not isinstance(cache, (MultiLevelCache, AsyncMultiLevelCache)):
        raise ConfigurationError(f"cache must be a MultiLevelCache or an AsyncMultiLevelCache, not "
                                 f"{type(cache).__name__}")
    if warmer is None:
        return
    if not isinstance(warmer, (PredictiveCacheWarmer, AsyncPredictiveCacheWarmer)):
        raise ConfigurationError(f"warmer must be a PredictiveCacheWarmer or an AsyncPredictiveCacheWarmer, not "
                                 f"{type(warmer).__name__}")
    if warmer.cache is not cache:
        raise ConfigurationError("warmer must be the warmer of this very cache (PredictiveCacheWarmer(cache))")


def register(cache: MultiLevelCache | AsyncMultiLevelCache, registry: CollectorRegistry | None = None,
             warmer: PredictiveCacheWarmer | AsyncPredictiveCacheWarmer | None = None, *, read_redis: bool = True,
             loop: asyncio.AbstractEventLoop | None = None, buckets: Sequence[float] | None = None,
             observe: bool = True) -> CacheCollector:
    """Export ``cache`` (and ``warmer``'s prediction statistics) through ``registry``.

    ``registry``: a ``prometheus_client.CollectorRegistry``, default ``prometheus_client.REGISTRY``.
    One :class:`CacheCollector` serves each registry: registering more caches (one per namespace)
    adds them to it, and it is returned. ``read_redis=False``: no Redis round trip per scrape (no
    L2/L3 sizes, no fleet prediction numbers). ``loop``: the event loop of an async cache, when
    ``register`` is not called from it. ``buckets``: the latency histogram's (seconds), fixed by the
    registry's first registration. ``observe=False`` leaves the cache's observer alone and exports
    no latency for it.
    """
    pc = _client()
    registry = pc.REGISTRY if registry is None else registry
    with _lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = CacheCollector(registry, DEFAULT_BUCKETS if buckets is None else buckets)
            registry.register(collector)
            _collectors[registry] = collector
        elif buckets is not None and tuple(buckets) != collector.buckets:
            raise ConfigurationError(f"this registry's latency histogram already has buckets {collector.buckets}")
    collector.add(cache, warmer, read_redis=read_redis, loop=loop, observe=observe)
    return collector


def serve(cache: MultiLevelCache | AsyncMultiLevelCache, port: int = 9464,
          warmer: PredictiveCacheWarmer | AsyncPredictiveCacheWarmer | None = None,
          registry: CollectorRegistry | None = None, *, addr: str = "0.0.0.0", **options: Any) -> CacheCollector:
    """:func:`register`, then serve the registry on ``http://addr:port/metrics`` (a daemon thread).

    ``options`` are :func:`register`'s. ``collector.close()`` stops the server. The default ``addr``
    listens on every interface, as Prometheus exporters do; pass ``"127.0.0.1"`` to keep it local.
    """
    pc = _client()
    collector = register(cache, registry, warmer, **options)
    started = pc.start_http_server(port, addr=addr, registry=collector.registry)
    if started is not None:  # prometheus-client >= 0.20 returns (server, thread)
        collector.servers.append(started)
    return collector
