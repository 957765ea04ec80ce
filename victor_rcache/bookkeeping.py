"""Deferred bookkeeping: what a Redis hit leaves to do, buffered per process and sent in batches.

A Redis hit is one plain read of the entry (``HMGET``); the LRU stamp, the fleet hit count, a
promotion from L3 to L2, the entry's next idle deadline, and the fleet counters are applied later,
by one ``touch.lua`` call per shard carrying every hit and miss of that shard since the last one::

    reader (any thread or task)            this cache's rounds, on the process's background thread
    ───────────────────────────            ────────────────────────────────
    events.append((kind, shard, id, x))    every WINDOW seconds, or at once when a batch's worth waits:
      (a lock-free deque append)             collect(): events -> per-shard batches + process counters
                                             due():     a batch per shard with work
                                             touch.lua per shard (one round trip), events counted

So the caller's path takes no lock and makes no round trip for bookkeeping, and Redis runs one
script per batch instead of one per hit. What this costs in meaning, and is documented
(docs/design.md): LRU order, hit counts, idle deadlines and promotion lag the reads by at most one
window plus a round trip; the fleet's counters in Redis lag the same way; a process that dies loses
its buffered touches (never a value). A batch that fails is dropped and counted: bookkeeping only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import forksafe
from .metrics import Counters
from .periodic import Periodic

WINDOW = 0.1  # seconds: the longest a reported hit waits before it is sent
COUNTS_INTERVAL = 1.0  # seconds: how often L1 counters go alone, when no batch carries them
MAX_IDS = 512  # distinct hits one touch.lua call carries (the script's limit is 1000)
# Events waiting that wake the flusher at once, and events of a shard that make its batch due before its
# window ends. Every touch.lua call pays a fixed cost (its prelude, the sweep check, the counters) and every
# round one of this process's threads, so bigger batches cost Redis and the process less per event; the
# window bounds the lag in time either way. A cache that gathers fleet-sizing evidence (adaptive_redis)
# sends batches of EVIDENCE_BATCH: its tail hits are ranked in an LRU order that lags the reads by the
# events still buffered, and at 512 (then the only size) the order was too stale for the evidence: the
# fleet-sizing test's L3 stopped growing (failed 6 runs in 8).
BATCH = 512
EVIDENCE_BATCH = 64

# Event kinds (the first item of an event tuple).
MISS, L2_HIT, L3_HIT, CORRUPT = 0, 2, 3, 5
# Flags of a hit: it filled this process's L1; the entry carried the prewarm mark; its fleet count (as read)
# is below where counts stop mattering, so the hit is counted; its Redis expiry is an idle step behind.
FILLED, PREWARMED, COUNTED, EXPIRING = 1, 2, 4, 8


@dataclass
class ShardBatch:
    """One shard's bookkeeping waiting to be sent: the items of one touch.lua call."""

    shard: int
    started: float  # when its first event was collected (monotonic seconds)
    events: int = 0
    hits: dict[bytes, int] = field(default_factory=dict)  # id -> Redis hits
    tiers: dict[bytes, int] = field(default_factory=dict)  # id -> the tier its last hit found it in
    counted: dict[bytes, int] = field(default_factory=dict)  # id -> hits to add to its fleet count
    expiring: dict[bytes, int] = field(default_factory=dict)  # id -> tier: its Redis expiry is to move
    prewarmed: set[bytes] = field(default_factory=set)  # ids whose hit found the prewarm mark
    missed: dict[bytes, int] = field(default_factory=dict)  # id -> misses
    corrupt: dict[bytes, bytes] = field(default_factory=dict)  # id -> the `ver` field the reader saw
    counts: dict[str, int] = field(default_factory=dict)  # fleet counters: l2_hits, l3_hits, misses, l1_fills

    def items(self) -> list[bytes | int | str]:
        """touch.lua's triples (kind, id, number) after the counts. A hit whose hits all count (a first hit's
        usual case) goes as one ``2n``/``3n`` item, not a ``2``/``3`` and an ``n`` (half the arguments)."""
        out: list[bytes | int | str] = []
        tiers, counted = self.tiers, self.counted
        partly: list[bytes] = []  # ids with fewer hits counted than stamped: an `n` item of their own
        for entry_id, n in self.hits.items():
            k = counted.get(entry_id)
            if k == n:
                out += ["2n" if tiers[entry_id] == L2_HIT else "3n", entry_id, n]
                continue
            out += ["2" if tiers[entry_id] == L2_HIT else "3", entry_id, n]
            if k is not None:
                partly.append(entry_id)
        for entry_id in partly:
            out += ["n", entry_id, counted[entry_id]]
        for entry_id, tier in self.expiring.items():
            out += ["e", entry_id, tier]
        for entry_id in self.prewarmed:
            out += ["w", entry_id, 0]
        for entry_id, n in self.missed.items():
            out += ["m", entry_id, n]
        for entry_id, seen in self.corrupt.items():
            out += ["c", entry_id, seen]
        return out

    def split(self, limit: int = MAX_IDS) -> list[ShardBatch]:
        """This batch as batches of at most ``limit`` distinct hits each (touch.lua takes 1000 at most): an
        entry's count and expiry records go with its stamp; misses, prewarm marks, corrupt entries and the
        counters ride on the first."""
        if len(self.hits) <= limit:
            return [self]
        ids = list(self.hits)
        parts = []
        for start in range(0, len(ids), limit):
            part = ShardBatch(self.shard, self.started)
            for entry_id in ids[start:start + limit]:
                part.hits[entry_id] = self.hits[entry_id]
                part.tiers[entry_id] = self.tiers[entry_id]
                if entry_id in self.counted:
                    part.counted[entry_id] = self.counted[entry_id]
                if entry_id in self.expiring:
                    part.expiring[entry_id] = self.expiring[entry_id]
            parts.append(part)
        first = parts[0]
        first.events, first.prewarmed, first.missed = self.events, self.prewarmed, self.missed
        first.corrupt, first.counts = self.corrupt, self.counts
        return parts

    def due(self, now: float, batch: int) -> bool:
        """Send it now: ``batch`` events (enough to pay for a script call), or its oldest waited a window."""
        return self.events >= batch or len(self.hits) >= MAX_IDS or now - self.started >= WINDOW


class Bookkeeping:
    """A process's buffered bookkeeping of one cache (sans-I/O: the flusher sends what :meth:`due` gives)."""

    def __init__(self, counters: Counters, clock: Callable[[], float] = time.monotonic,
                 wake: Callable[[], None] | None = None) -> None:
        self.counters = counters
        self.clock = clock
        self.wake = wake  # called (rarely: once per batch of events) to wake the flusher early
        # Whether touch.lua gathers fleet-sizing evidence from this cache's batches (set by the core): they
        # then go in batches of EVIDENCE_BATCH events, else BATCH (see there).
        self.evidence = False
        # Whether counters kept elsewhere (the L1's hits and evictions) have news for Redis: set by the core.
        self.unreported: Callable[[], bool] = lambda: False
        self.dropped = 0  # batches that could not be sent (bookkeeping lost, never values)
        self._init_state()
        forksafe.register(self)

    def _init_state(self) -> None:
        self.events: deque[tuple[int, int, bytes, Any]] = deque()
        self._pending: dict[int, ShardBatch] = {}
        self._lock = threading.Lock()
        self._woken = False
        self._collected_at = self.clock()  # events waiting now arrived after this

    def _after_fork(self) -> None:
        # The child's copy of the parent's buffer is the parent's to send: start empty.
        self._init_state()

    # ---------------------------------------------------------------- the caller's side (no lock)

    def miss(self, shard: int, entry_id: bytes) -> None:
        self.events.append((MISS, shard, entry_id, 0))
        self.wake_if_due()

    def corrupt(self, shard: int, entry_id: bytes, seen_version: bytes) -> None:
        """A read found the entry unusable (counted as a miss and a decode error); touch.lua removes it."""
        self.events.append((CORRUPT, shard, entry_id, seen_version))
        self.wake_if_due()

    def batch(self) -> int:
        """Events that make a batch due, and wake the flusher (read at call time: tests change the constants)."""
        return EVIDENCE_BATCH if self.evidence else BATCH

    def wake_if_due(self) -> None:
        """Wake the flusher if a batch's worth of events waits. Redis hits are appended to :attr:`events` by the reader
        itself, ``(tier, shard, id, flags)`` (tier 2 or 3; flags: FILLED, PREWARMED, COUNTED, EXPIRING), then
        this is called once per batch of reads (TierCore.took_all), not once per hit."""
        waiting = len(self.events)
        if waiting >= (EVIDENCE_BATCH if self.evidence else BATCH) and not self._woken and self.wake is not None:
            self._woken = True
            self.wake()

    # ------------------------------------------------------------------------ the flusher's side

    def collect(self) -> None:
        """Move the waiting events into the per-shard batches and the process counters."""
        with self._lock:
            self._woken = False
            events = self.events
            counts = {"gets": 0, "l2_hits": 0, "l3_hits": 0, "misses": 0, "l1_fills": 0, "decode_errors": 0}
            pending = self._pending
            # A batch counts its age from the collection before this one: its events arrived after it.
            since, self._collected_at = self._collected_at, self.clock()
            while events:
                try:
                    kind, shard, entry_id, extra = events.popleft()
                except IndexError:  # emptied by another collector meanwhile
                    break
                batch = pending.get(shard)
                if batch is None:
                    batch = pending[shard] = ShardBatch(shard, since)
                batch.events += 1
                counts["gets"] += 1
                if kind in (MISS, CORRUPT):
                    counts["misses"] += 1
                    _add(batch.counts, "misses", 1)
                    if kind == MISS:
                        batch.missed[entry_id] = batch.missed.get(entry_id, 0) + 1
                    else:
                        counts["decode_errors"] += 1
                        batch.corrupt[entry_id] = extra
                    continue
                name = "l2_hits" if kind == L2_HIT else "l3_hits"
                counts[name] += 1
                _add(batch.counts, name, 1)
                batch.hits[entry_id] = batch.hits.get(entry_id, 0) + 1
                batch.tiers[entry_id] = kind
                if extra:
                    if extra & FILLED:
                        counts["l1_fills"] += 1
                        _add(batch.counts, "l1_fills", 1)
                    if extra & PREWARMED:
                        batch.prewarmed.add(entry_id)
                    if extra & COUNTED:
                        batch.counted[entry_id] = batch.counted.get(entry_id, 0) + 1
                    if extra & EXPIRING:
                        batch.expiring[entry_id] = kind
            self.counters.add(**counts)

    def due(self, force: bool = False) -> list[ShardBatch]:
        """The batches to send now (all of them with ``force``), taken out of the buffer."""
        now = self.clock()
        with self._lock:
            size = self.batch()
            batches = [b for b in self._pending.values() if force or b.due(now, size)]
            for batch in batches:
                del self._pending[batch.shard]
        return [part for batch in batches for part in batch.split()]

    def next_due(self) -> float | None:
        """Seconds until the oldest waiting batch is due (None: nothing waits)."""
        with self._lock:
            if not self._pending:
                return None
            oldest = min(b.started for b in self._pending.values())
        return max(0.0, oldest + WINDOW - self.clock())

    def pending(self) -> int:
        """Events and batched ids not sent yet (for tests and metrics)."""
        with self._lock:
            return len(self.events) + sum(len(b.hits) + len(b.missed) + len(b.corrupt) for b in self._pending.values())

    def give_up(self, batches: list[ShardBatch]) -> None:
        """Batches that could not be sent: counted and forgotten (bookkeeping only)."""
        self.dropped += len(batches)


def _add(counts: dict[str, int], name: str, n: int) -> None:
    counts[name] = counts.get(name, 0) + n


class Flusher(Periodic):
    """The rounds that send one cache's bookkeeping, on the process's one background thread (see
    periodic.py; it never runs a caller's code).

    ``send(batches)`` does the I/O: one touch.lua call per batch, in one round trip; it must not raise
    (a batch it cannot send is given up). A round is due when the oldest batch is, or at once after
    :meth:`wake` (a batch's worth of events waiting); :meth:`flush` sends everything now, from the calling thread
    (``close()``, process exit, tests that look at Redis).
    """

    def __init__(self, book: Bookkeeping, send: Callable[[list[ShardBatch]], None]) -> None:
        self.book = book
        self._send = send
        book.wake = self.wake
        self._counts_sent = book.clock()
        super().__init__("victor-rcache-bookkeeping", self._send_due, self._until_due, self._count_error)

    def _until_due(self) -> float:
        wait = self.book.next_due()
        return WINDOW if wait is None else wait

    def _count_error(self, exc: BaseException) -> None:
        self.book.dropped += 1

    def _send_due(self, force: bool) -> None:
        self.book.collect()
        batches = self.book.due(force)
        now = self.book.clock()
        # L1 hits cost Redis nothing, so a process serving only from L1 has no batch to carry its L1
        # counters: they go alone, at most once per COUNTS_INTERVAL (and when forced).
        counts_due = force or now - self._counts_sent >= COUNTS_INTERVAL
        if batches or (counts_due and self.book.unreported()):
            self._counts_sent = now
            self._send(batches)

    def _after_fork(self) -> None:
        self._counts_sent = self.book.clock()
        super()._after_fork()
