"""Counters and the metrics shape users of the in-process design know.

Per tier: ``hits + misses`` is the number of requests that reached the tier (L1: every get; L2:
L1's misses; L3: L2's misses), so each request is counted once in ``combined`` however deep it
went. Fleet numbers come from the shards' ``stats`` hashes that the scripts keep in Redis; a
process reports its L1 hits there with its next script call (and on close), so fleet L1 numbers
can lag by the calls a process has not yet made.

Latency: a cache with an :class:`Observer` (``cache.set_observer(obs)``) times each public call
and reports ``observe(operation, outcome, seconds)``; without one, nothing is timed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Protocol

from . import forksafe

log = logging.getLogger("victor_rcache")

COUNTERS = ("gets", "l1_hits", "l2_hits", "l3_hits", "misses", "l1_fills", "promotions", "demotions",
            "evictions", "expirations", "puts", "redis_errors", "decode_errors", "script_reloads",
            "loads", "lease_waits", "fills_refused", "refreshes", "refresh_errors", "fail_safe_served", "uncached")
# get_or_set's counters: loader runs, waits for another worker's fill, fills refused, early refreshes, values
# served past their ttl by fail-safe, values returned without being cached (Uncached, or not storable)
STAMPEDE = ("loads", "lease_waits", "fills_refused", "refreshes", "refresh_errors", "fail_safe_served", "uncached")
SOURCES = {1: "l1", 2: "l2", 3: "l3"}  # the outcome of a lookup a tier served (else "miss")


class Observer(Protocol):
    """Receives the latency of every public cache call (see :meth:`~victor_rcache.MultiLevelCache.set_observer`).

    ``operation``: get, get_many, get_or_set, put, put_many, delete, invalidate, invalidate_tags.
    ``outcome``: for get and get_or_set the tier that served the value (``"l1"``, ``"l2"``, ``"l3"``)
    or ``"miss"`` (for get_or_set: this call ran the loader; ``"coalesced"``: it waited for a
    concurrent call of this process that did; ``"stale"``: fail-safe served a value past its ttl);
    ``"ok"`` for the other operations; ``"error"`` whenever the call raised.
    Called in the caller's thread (or task) right after the call; it must be quick and thread-safe.
    """

    def observe(self, operation: str, outcome: str, seconds: float) -> None: ...


class Timing:
    """One observed call: started when made, its outcome set by the core (per call, never shared),
    reported to the observer on exit."""

    __slots__ = ("_started", "observer", "operation", "outcome")

    def __init__(self, observer: Observer, operation: str) -> None:
        self.observer = observer
        self.operation = operation
        self.outcome = "ok"
        self._started = time.perf_counter()

    def __enter__(self) -> Timing:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        seconds = time.perf_counter() - self._started
        try:
            self.observer.observe(self.operation, "error" if exc_type is not None else self.outcome, seconds)
        except Exception:  # a broken observer must not break the cache call it watches
            log.exception("the cache's observer failed", extra={"event": "observer_failed", "op": self.operation})


class NoTiming:
    """The context of an unobserved call: nothing is timed or reported."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


NO_TIMING = NoTiming()


class Counters:
    """Thread-safe process counters.

    ``served``, when given, reads a count of L1 hits kept elsewhere (by the L1 itself, under its
    own lock, so that an L1 hit costs one lock): each of them is a get and an L1 hit too, added to
    ``gets`` and ``l1_hits`` in every snapshot (from one reading, so hits + misses == gets holds).
    """

    def __init__(self, served: Callable[[], int] | None = None) -> None:
        self._values = dict.fromkeys(COUNTERS, 0)
        self._served = served
        self._lock = threading.Lock()
        forksafe.register(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] = self._values.get(name, 0) + delta

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            values = dict(self._values)
        if self._served is not None:
            served = self._served()
            values["gets"] += served
            values["l1_hits"] += served
        return values


def fleet_tally(stats: Iterable[dict[str, int]]) -> dict[str, int]:
    """Sum the shards' stats hashes into the same counters a process keeps."""
    total: dict[str, int] = {}
    for shard in stats:
        for name, value in shard.items():
            total[name] = total.get(name, 0) + value
    tally = {name: total.get(name, 0) for name in COUNTERS}
    tally["l1_evictions"] = total.get("l1_evictions", 0)
    tally["gets"] = tally["l1_hits"] + tally["l2_hits"] + tally["l3_hits"] + tally["misses"]
    return tally


def _tier(hits: int, gets: int, promotions: int, demotions: int, evictions: int,
          size: tuple[int, int] | None) -> dict[str, Any]:
    return {"hits": hits, "misses": gets - hits, "hit_rate": hits / gets if gets else 0.0,
            "promotions": promotions, "demotions": demotions, "evictions": evictions,
            "entry_count": None if size is None else size[0], "total_size": None if size is None else size[1]}


def build_metrics(tally: dict[str, int] | None, l1_size: tuple[int, int] | None,
                  redis_sizes: dict[str, tuple[int, int]] | None, local: dict[str, int],
                  available: bool | None, coherence: dict[str, Any]) -> dict[str, Any]:
    """The metrics dict: l1/l2/l3/combined from ``tally``, plus this process's health, coherence
    and stampede counters.

    ``tally`` is None when fleet counters could not be read; sizes are None when unknown
    (Redis unreachable or not asked, or the fleet's L1 sizes, which live in each process);
    ``available`` is None when Redis was not asked.
    """
    t = tally or dict.fromkeys((*COUNTERS, "l1_evictions"), 0)
    sizes = redis_sizes or {}
    gets = t["gets"]
    l2_gets = gets - t["l1_hits"]
    l3_gets = l2_gets - t["l2_hits"]
    hits = t["l1_hits"] + t["l2_hits"] + t["l3_hits"]
    return {
        "l1": _tier(t["l1_hits"], gets, t["l1_fills"], 0, t["l1_evictions"], l1_size),
        "l2": _tier(t["l2_hits"], l2_gets, t["promotions"], t["demotions"], 0, sizes.get("l2")),
        "l3": _tier(t["l3_hits"], l3_gets, 0, 0, t["evictions"], sizes.get("l3")),
        "combined": {"total_hits": hits, "total_misses": gets - hits, "hit_rate": hits / gets if gets else 0.0,
                     "total_promotions": t["l1_fills"] + t["promotions"], "total_demotions": t["demotions"],
                     "total_evictions": t["l1_evictions"] + t["evictions"],
                     "total_expirations": t["expirations"], "gets": gets, "puts": t["puts"]},
        "health": {"redis_available": available, "redis_errors": local["redis_errors"],
                   "decode_errors": local["decode_errors"], "script_reloads": local["script_reloads"],
                   "fleet_counters": tally is not None},
        "coherence": coherence,
        "stampede": {name: local[name] for name in STAMPEDE},
    }
