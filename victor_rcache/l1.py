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

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from . import forksafe
from .adaptive import SegmentedLRU, Sizer, SizingRule

if TYPE_CHECKING:
    from .replicas import VersionFence

log = logging.getLogger("victor_rcache")

FLOORS = 4096  # invalidated versions remembered; a racing fill arrives within one round trip
NOT_DECODED: Final[Any] = object()  # L1Entry.decoded until the first hit decodes the payload
NOT_SHARED: Final[Any] = object()  # L1Entry.decoded of a value every hit decodes afresh (it is mutable)


@dataclass(eq=False, slots=True)
class L1Entry:
    """One L1 copy. Its fields never change once stored, except ``decoded`` and ``copy``, set by the
    first hit: the decoded value, and how each hit copies it (None: shared as it is, because nobody can
    mutate it, or with ``copy_on_read=False``); ``decoded`` is :data:`NOT_SHARED` when every hit
    decodes afresh, :data:`NOT_DECODED` before the first hit."""

    payload: bytes
    version: int
    deadline: float  # clock time after which the copy is dropped
    expires_at: float | None = None  # clock time the value's own ttl ends (None: no ttl)
    cost: float = 0.0  # seconds the value took to compute (0: unknown); for early refresh
    shard: int = -1  # the Redis shard it came from (-1: unknown), for shard-wide invalidations
    decoded: Any = field(default=NOT_DECODED, init=False, repr=False)
    copy: Any = field(default=None, init=False, repr=False)  # codec.copier's plan for ``decoded``, or None


class LocalCache:
    """LRU + TTL map from entry id to payload, bounded by ``max_entries``."""

    def __init__(self, max_entries: int, ttl: float | None, clock: Callable[[], float] = time.monotonic,
                 sizing: SizingRule | None = None) -> None:
        self.ttl = ttl
        self.clock = clock
        self._hits, self._reads, self._hits_base = itertools.count(), 0, 0  # see the hits property
        self._reads_lock = threading.Lock()
        self._trust = [True]  # [trusted]: see the property; a list, so serve reads it without a lookup
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
        # With read_from_replicas: hears every version announced to this L1 (replicas.py), once L1 has dropped
        # older copies, so whoever sees the fence raised finds no older copy here.
        self.fence: VersionFence | None = None
        if self._sizer is None:
            self.serve = self._plain_serve()  # type: ignore[method-assign,assignment]
        forksafe.register(self)

    def _after_fork(self) -> None:
        # The parent's copies may be stale by the time the child serves: start empty, with new locks.
        self._lock = threading.Lock()
        self._reads_lock = threading.Lock()
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

    @property
    def trusted(self) -> bool:
        """May copies be served to requests (:meth:`serve`)? The invalidation listener says: not while it
        may have missed a message. (Kept here, where the hit path reads it without a call.)"""
        return self._trust[0]

    @trusted.setter
    def trusted(self, trusted: bool) -> None:
        self._trust[0] = trusted

    def serve(self, key: bytes) -> L1Entry | None:
        """:meth:`get` for a cache request, if copies may be served (:attr:`trusted`): an entry found is
        counted in :attr:`hits`, under the same lock.

        (Without adaptive sizing, an instance attribute made by :meth:`_plain_serve` stands in for this.)"""
        if not self._trust[0]:
            return None
        lock = self._lock
        lock.acquire()  # not `with`: every L1 hit pays this, and `with` costs about twice as much (3.11)
        try:
            entry = self._live(key)
            if entry is not None:
                next(self._hits)
            return entry
        finally:
            lock.release()

    def _plain_serve(self) -> Callable[[bytes], L1Entry | None]:
        """:meth:`serve` without adaptive sizing (no tail segment: the head is the whole LRU), as a closure
        over what it uses, and without the lock: the hottest path of the library.

        Each step is one operation on a C-implemented OrderedDict with bytes keys, which runs whole under
        the GIL; writers keep the lock among themselves. A key another thread removes between the lookup
        and the move just is not moved: the copy was live when it was looked up, and is served as a read
        that came just before the removal would be. Hits are counted by an ``itertools.count`` (atomic);
        :attr:`hits` reads it without moving it (see there)."""
        head, lock, clock, remove = self._head, self._lock, self.clock, self._remove
        trust, tick, move = self._trust, self._hits, self._head.move_to_end

        def serve(key: bytes) -> L1Entry | None:
            if not trust[0]:
                return None
            entry = head.get(key)
            if entry is None:
                return None
            if clock() >= entry.deadline:
                with lock:
                    if head.get(key) is entry:
                        remove(key)
                return None
            try:  # noqa: SIM105 (contextlib.suppress would cost a context manager on every hit)
                move(key)
            except KeyError:  # removed meanwhile by another thread
                pass
            next(tick)
            return entry

        return serve

    @property
    def hits(self) -> int:
        """Entries :meth:`serve` found: the cache's L1 hits. (Read from an ``itertools.count``: taking its
        next value moves it by one more than the hits, which the reads so far make up for.)"""
        with self._reads_lock:
            self._reads += 1
            return next(self._hits) - self._reads + 1 + self._hits_base

    @hits.setter
    def hits(self, value: int) -> None:
        with self._reads_lock:
            self._hits, self._reads, self._hits_base = itertools.count(), 0, value
            if self._sizer is None:
                self.serve = self._plain_serve()  # type: ignore[method-assign,assignment]  # (the new count)

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

    def invalidate(self, key: bytes, version: int, payload: bytes | None = None) -> bool:
        """Another process wrote ``version`` of ``key``: drop an older copy; True if one was dropped (or,
        with ``payload``, replaced).

        ``payload``: the write's announcement carried the value (one without a ttl): an older copy held
        here is replaced by it, as if it had just been read (a fresh ``l1_ttl``); without a copy nothing
        is added, so L1 keeps holding only what this process reads."""
        with self._lock:
            self.unconfirmed.pop(key, None)
            if version > self._floors.get(key, 0):
                self._floors[key] = version
                self._floors.move_to_end(key)
                if len(self._floors) > FLOORS:
                    self._floors.popitem(last=False)
            current = self._data.peek(key)
            changed = current is not None and current.version < version and self._remove(key)
            lives = float("inf") if self.ttl is None else self.ttl
            if current is not None and changed and payload is not None and lives > 0:
                self.total_size += len(payload)
                entry = L1Entry(payload, version, self.clock() + lives, None, current.cost, current.shard)
                self._evicted(self._data.put(key, entry))
        if self.fence is not None:  # after the change: once the fence shows the version, no older copy is here
            self.fence.saw(key, version)
        return changed

    def invalidate_shard(self, shard: int, version: int) -> int:
        """Shard ``shard`` was flushed at ``version``: drop its older copies; returns how many."""
        with self._lock:
            self._shard_floors[shard] = max(version, self._shard_floors.get(shard, 0))
            stale = [k for k, e in self._data.items() if e.shard in (shard, -1) and e.version < version]
            for key in stale:
                self._remove(key)
            for key in [k for k, e in self.unconfirmed.items() if e.shard in (shard, -1)]:
                del self.unconfirmed[key]
        if self.fence is not None:  # (after the drop, as in invalidate)
            self.fence.flushed(shard, version)
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
