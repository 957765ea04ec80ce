"""Adaptive sizing: an LRU that measures what a bigger or smaller size would have done, and resizes.

Two pieces of evidence, both exact for LRU:

* **ghost hits** — the keys of the last ``step`` evictions are remembered (not their values). A miss
  on one of them is a hit a cache ``step`` entries larger would have had.
* **tail hits** — the LRU order is kept as a head followed by a tail of ``step`` entries. A hit in
  the tail is a hit a cache ``step`` entries smaller would have lost.

Per interval (at least ``min_accesses`` requests, else no decision), with hit rate ``h`` over the
interval's ``N`` requests and its standard error ``e = sqrt(target (1 - target) / N)``: **expand**
by ``step`` when ``h < target`` and the ghost hits show a bigger cache would really have hit more
(``ghost_hits / N >= min_gain``); **shrink** by ``step`` when the hit rate without the tail hits is
at least ``target + margin + 2e``; otherwise keep the size.
``step`` is ``step_fraction`` of the current size, and sizes stay within ``[min_size, max_size]``.
On a stationary workload this settles on the smallest size that meets the target (to within a
step) and stays there: a size reached by growing had a smaller neighbour below the target, and a
shrink is only taken when its own evidence says the target still holds.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import ConfigurationError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SegmentedLRU(Generic[K, V]):
    """An LRU map kept as head (most recent) + tail (the ``tail_size`` least recent), so a hit can
    tell whether it came from the tail. Not thread-safe: its owner holds a lock."""

    def __init__(self, capacity: int, tail_size: int = 0) -> None:
        self._head: OrderedDict[K, V] = OrderedDict()  # first = least recent of the head
        self._tail: OrderedDict[K, V] = OrderedDict()  # first = least recent overall
        self.capacity = capacity
        self.tail_size = tail_size

    @property
    def head(self) -> OrderedDict[K, V]:
        """The head segment (least recent first): the whole map while ``tail_size`` is 0."""
        return self._head

    def __len__(self) -> int:
        return len(self._head) + len(self._tail)

    def __contains__(self, key: object) -> bool:
        return key in self._head or key in self._tail

    def items(self) -> Iterator[tuple[K, V]]:
        """Least recent first."""
        yield from list(self._tail.items())
        yield from list(self._head.items())

    def peek(self, key: K) -> V | None:
        got = self._head.get(key)
        return self._tail.get(key) if got is None else got

    def touch(self, key: K) -> tuple[V, bool] | None:
        """Make ``key`` most recent; (value, was it in the tail), or None if absent."""
        if key in self._head:
            self._head.move_to_end(key)
            return self._head[key], False
        if key not in self._tail:
            return None
        value = self._tail.pop(key)
        self._head[key] = value
        self._balance()
        return value, True

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Insert or replace as most recent; returns the entries evicted past ``capacity``."""
        self.pop(key)
        self._head[key] = value
        return self._shrink_to(self.capacity)

    def pop(self, key: K) -> V | None:
        value = self._head.pop(key, None)
        if value is None:
            value = self._tail.pop(key, None)
        if value is not None:
            self._balance()
        return value

    def pop_oldest(self) -> tuple[K, V]:
        if self._tail:
            return self._tail.popitem(last=False)
        return self._head.popitem(last=False)

    def clear(self) -> None:
        self._head.clear()
        self._tail.clear()

    def resize(self, capacity: int, tail_size: int) -> list[tuple[K, V]]:
        """New bounds; returns the entries evicted to fit."""
        self.capacity, self.tail_size = capacity, tail_size
        return self._shrink_to(capacity)

    def _shrink_to(self, capacity: int) -> list[tuple[K, V]]:
        evicted = []
        while len(self) > capacity:
            evicted.append(self.pop_oldest())
        self._balance()
        return evicted

    def _balance(self) -> None:
        """Keep exactly min(tail_size, len) entries in the tail, order preserved."""
        want = min(self.tail_size, len(self))
        while len(self._tail) < want:  # the head's least recent become the tail's most recent
            key, value = self._head.popitem(last=False)
            self._tail[key] = value
        while len(self._tail) > want:  # the tail's most recent become the head's least recent
            key, value = self._tail.popitem(last=True)
            self._head[key] = value
            self._head.move_to_end(key, last=False)


@dataclass(frozen=True)
class SizingRule:
    """The evidence rule's settings (see the module docstring)."""

    min_size: int = 100
    max_size: int = 2000
    target_hit_rate: float = 0.6
    adjustment_interval: float = 300.0  # seconds between decisions
    min_accesses: int = 200  # requests an interval needs before it decides anything
    step_fraction: float = 0.1  # a step is this fraction of the current size (at least 1 entry)
    min_gain: float = 0.01  # ghost hits per request that make growing worth it
    margin: float = 0.02  # a shrink must keep the hit rate this far above the target

    def __post_init__(self) -> None:
        def need(ok: bool, problem: str) -> None:
            if not ok:
                raise ConfigurationError(problem)

        for name in ("min_size", "max_size", "min_accesses"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name}={v!r} must be a whole number >= 1")
        need(self.min_size <= self.max_size, f"min_size={self.min_size} must not exceed max_size={self.max_size}")
        for name, lo, hi in (("target_hit_rate", 0.0, 1.0), ("step_fraction", 0.001, 1.0), ("min_gain", 0.0, 1.0),
                             ("margin", 0.0, 1.0)):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi,
                 f"{name}={v!r} must be a number from {lo:g} to {hi:g}")
        need(isinstance(self.adjustment_interval, (int, float)) and math.isfinite(self.adjustment_interval)
             and self.adjustment_interval > 0, f"adjustment_interval={self.adjustment_interval!r} must be > 0 seconds")

    def step(self, size: int) -> int:
        return max(1, round(size * self.step_fraction))


@dataclass
class Interval:
    """Evidence gathered since the last decision."""

    hits: int = 0
    misses: int = 0
    tail_hits: int = 0
    ghost_hits: int = 0
    evictions: int = 0

    @property
    def accesses(self) -> int:
        return self.hits + self.misses


def decide(rule: SizingRule, size: int, seen: Interval) -> tuple[str, int, str]:
    """``(adjustment, new_size, reason)`` for a cache of ``size`` entries after interval ``seen``.

    A hit rate measured over ``n`` requests is only known to about one standard error,
    ``sqrt(t(1 - t) / n)`` at the target ``t``: shrinking needs the hit rate without the tail
    ``margin`` plus two standard errors above the target, so noise alone does not shrink a cache
    that just grew to meet it (and growing again would follow: oscillation).
    """
    n, step, target = seen.accesses, rule.step(size), rule.target_hit_rate
    if n < rule.min_accesses:
        return "none", size, f"only {n} requests since the last decision (< min_accesses={rule.min_accesses})"
    h = seen.hits / n
    gain, without_tail = seen.ghost_hits / n, (seen.hits - seen.tail_hits) / n
    error = math.sqrt(target * (1 - target) / n)
    if h < target:
        if size >= rule.max_size:
            return "none", size, f"hit rate {h:.1%} < target {target:.1%}, but already at max_size={rule.max_size}"
        if gain < rule.min_gain:
            return "none", size, (f"hit rate {h:.1%} < target {target:.1%}, but only {seen.ghost_hits} misses "
                                  f"({gain:.1%}) were on the {step} keys evicted last: a bigger cache would not help")
        new = min(rule.max_size, size + step)
        return "expand", new, (f"hit rate {h:.1%} < target {target:.1%}; {seen.ghost_hits} misses ({gain:.1%}) were "
                               f"on the {step} keys evicted last: {new - size} more entries would have hit them")
    floor = target + rule.margin + 2 * error
    if size > rule.min_size and without_tail >= floor:
        new = max(rule.min_size, size - step)
        return "shrink", new, (f"hit rate {h:.1%} >= target {target:.1%}; without the {seen.tail_hits} hits in the "
                               f"{step} least recent entries it would be {without_tail:.1%}, still >= {floor:.1%}: "
                               f"{size - new} entries can go")
    return "none", size, (f"hit rate {h:.1%} >= target {target:.1%}; "
                          f"without the {seen.tail_hits} hits in the {step} least recent entries it would be "
                          f"{without_tail:.1%} (< {floor:.1%} needed to shrink): keep the size")


class Sizer:
    """The evidence of one LRU (ghosts, interval counters) and its decisions; owners hold a lock.

    The owner reports hits (from the tail or not), misses and evictions, and calls :meth:`adjust`
    when :meth:`due`; :meth:`adjust` resizes the owner's :class:`SegmentedLRU`.
    """

    def __init__(self, rule: SizingRule, clock: Callable[[], float]) -> None:
        self.rule = rule
        self.clock = clock
        self.interval = Interval()
        self.totals = Interval()
        self.adjustments = 0
        self.last_result: dict[str, Any] | None = None
        self._ghosts: OrderedDict[Hashable, None] = OrderedDict()
        self._size = rule.min_size
        self._started = clock()

    def tail_for(self, size: int) -> int:
        self._size = size
        return self.rule.step(size)

    def hit(self, in_tail: bool) -> None:
        self._count(hits=1, tail_hits=int(in_tail))

    def miss(self, key: Hashable) -> None:
        ghost = key in self._ghosts  # a cache one step bigger would still hold it
        if ghost:
            del self._ghosts[key]
        self._count(misses=1, ghost_hits=int(ghost))

    def evicted(self, keys: list[Hashable]) -> None:
        for key in keys:
            self._ghosts[key] = None
        if keys:
            self._count(evictions=len(keys))
            self._trim()

    def forget(self, key: Hashable) -> None:
        """``key`` was written again: it is no ghost any more."""
        self._ghosts.pop(key, None)

    def due(self) -> bool:
        return self.clock() - self._started >= self.rule.adjustment_interval

    def adjust(self, lru: SegmentedLRU[Any, Any], memory_usage: int) -> tuple[dict[str, Any], list[Any]]:
        """Decide, resize ``lru``; returns the result dict and the entries evicted by shrinking."""
        seen, old = self.interval, lru.capacity
        adjustment, new, reason = decide(self.rule, old, seen)
        evicted = lru.resize(new, self.tail_for(new))
        if new != old:
            self.adjustments += 1
        self.evicted([key for key, _ in evicted])
        self._trim()
        n = seen.accesses
        result = {"adjustment": adjustment, "old_size": old, "new_size": new, "delta": new - old, "reason": reason,
                  "metrics": {"hit_rate": seen.hits / n if n else 0.0, "memory_usage": memory_usage,
                              "eviction_rate": seen.evictions / n if n else 0.0, "accesses": n,
                              "ghost_hits": seen.ghost_hits, "tail_hits": seen.tail_hits}}
        self.interval = Interval()
        self._started = self.clock()
        self.last_result = result
        return result, evicted

    def metrics(self) -> dict[str, Any]:
        return {"enabled": True, "adjustments": self.adjustments, "last_adjustment": self.last_result,
                "target_hit_rate": self.rule.target_hit_rate, "min_size": self.rule.min_size,
                "max_size": self.rule.max_size}

    def _count(self, **deltas: int) -> None:
        for name, d in deltas.items():
            setattr(self.interval, name, getattr(self.interval, name) + d)
            setattr(self.totals, name, getattr(self.totals, name) + d)

    def _trim(self) -> None:
        while len(self._ghosts) > self.rule.step(self._size):
            self._ghosts.popitem(last=False)


def default_sizeof(value: object) -> int:
    """Bytes a value holds: its length for bytes/str, else ``sys.getsizeof`` (shallow)."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    return sys.getsizeof(value)


class AdaptiveLRUCache:
    """An in-process LRU cache that resizes itself from evidence (see the module docstring).

    ``put``/``get`` as a dict-like cache; ``should_adjust()`` says an interval has passed and
    ``adjust_size()`` decides; ``auto_adjust=True`` makes ``get``/``put`` do both themselves.
    Thread-safe.
    """

    def __init__(self, initial_size: int = 500, max_size: int = 2000, min_size: int = 100,
                 target_hit_rate: float = 0.6, adjustment_interval: float = 300.0, *, min_accesses: int = 200,
                 step_fraction: float = 0.1, min_gain: float = 0.01, margin: float = 0.02,
                 auto_adjust: bool = False, sizeof: Callable[[Any], int] = default_sizeof,
                 clock: Callable[[], float] = time.monotonic) -> None:
        rule = SizingRule(min_size, max_size, target_hit_rate, adjustment_interval, min_accesses, step_fraction,
                          min_gain, margin)
        if not (isinstance(initial_size, int) and min_size <= initial_size <= max_size):
            raise ConfigurationError(f"initial_size={initial_size!r} must be a whole number from min_size={min_size} "
                                     f"to max_size={max_size}")
        self.auto_adjust = auto_adjust
        self._sizeof = sizeof
        self._sizer = Sizer(rule, clock)
        self._lru: SegmentedLRU[Hashable, tuple[Any, int]] = SegmentedLRU(initial_size,
                                                                           self._sizer.tail_for(initial_size))
        self._bytes = 0
        self._lock = threading.RLock()

    @property
    def size(self) -> int:
        """The current capacity, in entries."""
        return self._lru.capacity

    @property
    def rule(self) -> SizingRule:
        return self._sizer.rule

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            found = self._lru.touch(key)
            if found is None:
                self._sizer.miss(key)
                value = default
            else:
                (value, _), in_tail = found
                self._sizer.hit(in_tail)
            self._maybe_adjust()
            return value

    def put(self, key: Hashable, value: Any) -> None:
        nbytes = self._sizeof(value)  # first: if it raises, nothing has changed
        with self._lock:
            old = self._lru.peek(key)
            if old is not None:
                self._bytes -= old[1]
            self._bytes += nbytes
            self._sizer.forget(key)
            self._evicted(self._lru.put(key, (value, nbytes)))
            self._maybe_adjust()

    def delete(self, key: Hashable) -> bool:
        with self._lock:
            old = self._lru.pop(key)
            if old is None:
                return False
            self._bytes -= old[1]
            return True

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: object) -> bool:
        return key in self._lru

    def should_adjust(self) -> bool:
        """True once ``adjustment_interval`` has passed since the last decision."""
        return self._sizer.due()

    def adjust_size(self) -> dict[str, Any]:
        """Decide from the interval's evidence, resize, and start a new interval."""
        with self._lock:
            result, evicted = self._sizer.adjust(self._lru, self._bytes)
            for _, (_, nbytes) in evicted:
                self._bytes -= nbytes
            result["metrics"]["memory_usage"] = self._bytes
            return result

    def get_metrics(self) -> dict[str, Any]:
        with self._lock:
            t, n = self._sizer.totals, self._sizer.totals.accesses
            return {
                "size": {"current": self.size, "min": self.rule.min_size, "max": self.rule.max_size,
                         "entries": len(self._lru), "utilization": len(self._lru) / self.size},
                "performance": {"hits": t.hits, "misses": t.misses, "hit_rate": t.hits / n if n else 0.0,
                                "evictions": t.evictions, "eviction_rate": t.evictions / n if n else 0.0,
                                "ghost_hits": t.ghost_hits, "tail_hits": t.tail_hits},
                "memory_usage": self._bytes, "memory_usage_unit": "bytes of the values held (sizeof)",
                "adaptive": self._sizer.metrics(),
            }

    def _evicted(self, entries: list[tuple[Hashable, tuple[Any, int]]]) -> None:
        for _, (_, nbytes) in entries:
            self._bytes -= nbytes
        self._sizer.evicted([key for key, _ in entries])

    def _maybe_adjust(self) -> None:
        if self.auto_adjust and self.should_adjust():
            self.adjust_size()
