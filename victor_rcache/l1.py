"""L1: the in-process tier. A thread-safe LRU of encoded payloads with a per-entry deadline.

L1 keeps the *encoded* payload, so ``total_size`` is the real number of payload bytes held. The tier
core decodes it on a hit, so a caller mutating what it got back never changes what anyone else gets;
a decoded value nobody can mutate (or any value, with ``copy_on_read=False``) is kept on the entry
(``L1Entry.decoded``) and shared by later hits instead of being decoded again.
Time comes from an injected clock (seconds, monotonic), so TTL tests tick a fake clock instead of
sleeping.

Coherence hooks: :meth:`invalidate` drops a copy older than a version another process wrote, and
remembers that version for a while, so a slow fill that read the old value from Redis before the
message arrived cannot put it back; :meth:`clear` also refuses copies requested before it.

Unconfirmed copies: a value this process wrote while Redis could not confirm the write (down, or its
answer lost) is held aside (:meth:`hold_unconfirmed`), never served by :meth:`serve`: only the
fail-open fallback (:meth:`peek`) uses it, while Redis cannot be asked. It is forgotten as soon as
Redis answers for the key, another process's write of it arrives, or its lifetime ends.

With a :class:`~victor_rcache.adaptive.SizingRule` (``adaptive_l1=True``) the LRU measures what a
bigger or smaller L1 would have done and resizes itself at the rule's interval (adaptive.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from . import forksafe
from .adaptive import SegmentedLRU, Sizer, SizingRule

log = logging.getLogger("victor_rcache")

FLOORS = 4096  # invalidated versions remembered; a racing fill arrives within one round trip
NOT_DECODED: Final[Any] = object()  # L1Entry.decoded until the first hit decodes the payload
NOT_SHARED: Final[Any] = object()  # L1Entry.decoded of a value every hit decodes afresh (it is mutable)


@dataclass(eq=False, slots=True)
class L1Entry:
    """One L1 copy. Its fields never change once stored, except ``decoded``: the tier core's
    decoded value shared by every hit (only values nobody can mutate, unless ``copy_on_read=False``),
    or :data:`NOT_SHARED`, or :data:`NOT_DECODED` before the first hit."""

    payload: bytes
    version: int
    deadline: float  # clock time after which the copy is dropped
    expires_at: float | None = None  # clock time the value's own ttl ends (None: no ttl)
    cost: float = 0.0  # seconds the value took to compute (0: unknown); for early refresh
    shard: int = -1  # the Redis shard it came from (-1: unknown), for shard-wide invalidations
    decoded: Any = field(default=NOT_DECODED, init=False, repr=False)


class LocalCache:
    """LRU + TTL map from entry id to payload, bounded by ``max_entries``."""

    def __init__(self, max_entries: int, ttl: float | None, clock: Callable[[], float] = time.monotonic,
                 sizing: SizingRule | None = None) -> None:
        self.ttl = ttl
        self.clock = clock
        self._counts = [0]  # [hits]: a list, so the serve closure counts without an attribute lookup
        self.evictions = 0
        self.total_size = 0
        self._sizer = None if sizing is None else Sizer(sizing, clock)
        tail = 0 if self._sizer is None else self._sizer.tail_for(max_entries)
        self._data: SegmentedLRU[bytes, L1Entry] = SegmentedLRU(max_entries, tail)
        self._head = self._data.head  # the whole LRU when there is no sizer (no tail): see _plain_serve()
        self._floors: OrderedDict[bytes, int] = OrderedDict()
        self._shard_floors: dict[int, int] = {}
        self.unconfirmed: OrderedDict[bytes, L1Entry] = OrderedDict()  # writes Redis did not confirm
        self._cleared_at = float("-inf")
        self._lock = threading.Lock()
        if self._sizer is None:
            self.serve = self._plain_serve()  # type: ignore[method-assign,assignment]
        forksafe.register(self)

    def _after_fork(self) -> None:
        # The parent's copies may be stale by the time the child serves: start empty, with a new lock.
        self._lock = threading.Lock()
        if self._sizer is None:
            self.serve = self._plain_serve()  # type: ignore[method-assign,assignment]  # (over the new lock)
        self._data.clear()
        self._floors.clear()
        self._shard_floors.clear()
        self.unconfirmed.clear()
        self.total_size = 0

    @property
    def max_entries(self) -> int:
        """The current bound (it moves with ``adaptive_l1``)."""
        return self._data.capacity

    def serve(self, key: bytes) -> L1Entry | None:
        """:meth:`get` for a cache request: an entry found is counted in :attr:`hits`, under the same lock.

        (Without adaptive sizing, an instance attribute made by :meth:`_plain_serve` stands in for this.)"""
        lock = self._lock
        lock.acquire()  # not `with`: every L1 hit pays this, and `with` costs about twice as much (3.11)
        try:
            entry = self._live(key)
            if entry is not None:
                self.hits += 1
            return entry
        finally:
            lock.release()

    def _plain_serve(self) -> Callable[[bytes], L1Entry | None]:
        """:meth:`serve` without adaptive sizing, as a closure over what it uses: the LRU then has no tail
        segment (its head is the whole LRU), and a hit is three dict operations under the lock, with no
        attribute lookup (this is the hottest path of the library)."""
        head, lock, clock, remove, counts = self._head, self._lock, self.clock, self._remove, self._counts

        def serve(key: bytes) -> L1Entry | None:
            lock.acquire()
            try:
                entry = head.get(key)
                if entry is None:
                    return None
                if clock() >= entry.deadline:
                    remove(key)
                    return None
                head.move_to_end(key)
                counts[0] += 1
                return entry
            finally:
                lock.release()

        return serve

    @property
    def hits(self) -> int:
        """Entries :meth:`serve` found: the cache's L1 hits, counted under the L1's own lock."""
        return self._counts[0]

    @hits.setter
    def hits(self, value: int) -> None:
        self._counts[0] = value

    def get(self, key: bytes) -> L1Entry | None:
        """The live entry for ``key`` (now most recently used), or None. Not counted as a hit."""
        with self._lock:
            return self._live(key)

    def _live(self, key: bytes) -> L1Entry | None:
        """(Lock held.) The live entry for ``key``, now most recently used; the adaptive sizer hears of it."""
        found = self._data.touch(key)
        entry = None if found is None else found[0]
        if entry is not None and self.clock() >= entry.deadline:
            self._remove(key)
            entry = None
        sizer = self._sizer
        if sizer is not None:
            if entry is None:
                sizer.miss(key)
            else:
                sizer.hit(found is not None and found[1])
            if sizer.due():
                self._adjust()
        return entry

    def peek(self, key: bytes) -> L1Entry | None:
        """The entry for ``key`` even if untrusted (an unconfirmed write's first), without touching LRU
        order: the fail-open fallback when Redis cannot be asked."""
        with self._lock:
            entry = self.unconfirmed.get(key) or self._data.peek(key)
        return entry if entry is not None and self.clock() < entry.deadline else None

    def hold_unconfirmed(self, key: bytes, payload: bytes, ttl_left: float | None = None,
                         since: float | None = None, shard: int = -1) -> None:
        """Keep aside a value this process wrote but Redis did not confirm (see the module docstring);
        any trusted copy of the key is dropped."""
        start = self.clock() if since is None else since
        lives = min(t for t in (self.ttl, ttl_left, float("inf")) if t is not None)
        expires_at = None if ttl_left is None else start + ttl_left
        with self._lock:
            self._remove(key)
            self.unconfirmed.pop(key, None)
            if lives > 0 and start + lives > self.clock():
                self.unconfirmed[key] = L1Entry(payload, 0, start + lives, expires_at, 0.0, shard)
                while len(self.unconfirmed) > self._data.capacity:
                    self.unconfirmed.popitem(last=False)

    def forget_unconfirmed(self, key: bytes) -> bool:
        """Redis answered for ``key``: an unconfirmed copy of it is not needed any more. True if there was one."""
        if key not in self.unconfirmed:
            return False
        with self._lock:
            return self.unconfirmed.pop(key, None) is not None

    def set(self, key: bytes, payload: bytes, version: int, ttl_left: float | None = None,
            since: float | None = None, cost: float = 0.0, shard: int = -1) -> bool:
        """Store a copy that lives ``l1_ttl`` seconds, or less if the value's own ttl ends sooner.

        Lifetimes count from ``since`` (default: now); callers pass the clock reading taken before
        they asked Redis, so a copy never outlives the value's expiry in Redis. A copy is refused
        when a newer version of the key is already held or was announced by another process, or
        when L1 was cleared after the copy was requested. Returns whether the copy was stored (a stored
        copy replaces an unconfirmed one: Redis has confirmed what the key holds).
        """
        start = self.clock() if since is None else since
        lives = min(t for t in (self.ttl, ttl_left, float("inf")) if t is not None)
        if lives <= 0 or start + lives <= self.clock():
            self.pop(key)
            return False
        expires_at = None if ttl_left is None else start + ttl_left
        entry = L1Entry(payload, version, start + lives, expires_at, cost, shard)
        with self._lock:
            if start < self._cleared_at:
                return False
            current = self._data.peek(key)
            newer = max(current.version if current else 0, self._floors.get(key, 0),
                        self._shard_floors.get(shard, 0))
            if version < newer:
                return False
            self.unconfirmed.pop(key, None)
            self._remove(key)
            self.total_size += len(payload)
            self._evicted(self._data.put(key, entry))
            if self._sizer is not None:
                self._sizer.forget(key)
        return True

    def invalidate(self, key: bytes, version: int) -> bool:
        """Another process wrote ``version`` of ``key``: drop an older copy; True if one was dropped."""
        with self._lock:
            self.unconfirmed.pop(key, None)
            if version > self._floors.get(key, 0):
                self._floors[key] = version
                self._floors.move_to_end(key)
                if len(self._floors) > FLOORS:
                    self._floors.popitem(last=False)
            current = self._data.peek(key)
            if current is not None and current.version < version:
                return self._remove(key)
            return False

    def invalidate_shard(self, shard: int, version: int) -> int:
        """Shard ``shard`` was flushed at ``version``: drop its older copies; returns how many."""
        with self._lock:
            self._shard_floors[shard] = max(version, self._shard_floors.get(shard, 0))
            stale = [k for k, e in self._data.items() if e.shard in (shard, -1) and e.version < version]
            for key in stale:
                self._remove(key)
            for key in [k for k, e in self.unconfirmed.items() if e.shard in (shard, -1)]:
                del self.unconfirmed[key]
            return len(stale)

    def pop(self, key: bytes) -> bool:
        """Drop ``key``'s copy; True if there was one."""
        with self._lock:
            return self._remove(key)

    def clear(self, at: float | None = None) -> None:
        """Drop every copy, and refuse copies requested before ``at`` (default: now)."""
        with self._lock:
            self._data.clear()
            self.unconfirmed.clear()
            self.total_size = 0
            self._cleared_at = self.clock() if at is None else at

    def __len__(self) -> int:
        return len(self._data)

    def adaptive_metrics(self) -> dict[str, Any] | None:
        """The adaptive sizing's state (None unless ``adaptive_l1``)."""
        with self._lock:
            if self._sizer is None:
                return None
            return {**self._sizer.metrics(), "current_size": self._data.capacity}

    def _remove(self, key: bytes) -> bool:
        entry = self._data.pop(key)
        if entry is None:
            return False
        self.total_size -= len(entry.payload)
        return True

    def _evicted(self, entries: list[tuple[bytes, L1Entry]]) -> None:
        for _, entry in entries:
            self.total_size -= len(entry.payload)
        self.evictions += len(entries)
        if self._sizer is not None:
            self._sizer.evicted([key for key, _ in entries])

    def _adjust(self) -> None:
        assert self._sizer is not None
        result, evicted = self._sizer.adjust(self._data, self.total_size)
        for _, entry in evicted:  # the sizer has counted them (and remembers them as ghosts)
            self.total_size -= len(entry.payload)
        self.evictions += len(evicted)
        if result["delta"]:
            sizes = {k: result[k] for k in ("old_size", "new_size")}
            log.info("L1 %s from %d to %d entries: %s", result["adjustment"], result["old_size"], result["new_size"],
                     result["reason"], extra={"event": "l1_resized", **sizes})
