"""L1: LRU order, TTL on a fake clock, version rule, byte accounting, thread safety (no Redis)."""

from __future__ import annotations

import threading

from victor_rcache.l1 import LocalCache

from .helpers import FakeClock


def test_least_recently_used_entry_is_evicted_first() -> None:
    l1 = LocalCache(2, None, FakeClock())
    l1.set(b"a", b"1", 1)
    l1.set(b"b", b"2", 1)
    assert l1.get(b"a") is not None  # "a" is now the most recent
    l1.set(b"c", b"3", 1)
    assert (l1.get(b"a") is not None, l1.get(b"b"), l1.get(b"c") is not None) == (True, None, True)
    assert l1.evictions == 1


def test_copy_expires_at_l1_ttl_or_the_values_own_ttl_whichever_is_first() -> None:
    clock = FakeClock()
    l1 = LocalCache(10, 5.0, clock)
    l1.set(b"long", b"x", 1)
    l1.set(b"short", b"x", 1, ttl_left=2.0)
    clock.advance(1.999)
    assert l1.get(b"short") is not None
    clock.advance(0.001)
    assert l1.get(b"short") is None
    clock.advance(2.999)
    assert l1.get(b"long") is not None
    clock.advance(0.001)
    assert l1.get(b"long") is None
    assert len(l1) == 0


def test_a_zero_remaining_ttl_stores_nothing() -> None:
    l1 = LocalCache(10, 5.0, FakeClock())
    l1.set(b"k", b"old", 1)
    assert l1.set(b"k", b"x", 2, ttl_left=0.0) is False
    assert l1.get(b"k") is None


def test_an_older_version_never_replaces_a_newer_one() -> None:
    l1 = LocalCache(10, None, FakeClock())
    assert l1.set(b"k", b"new", 7)
    assert l1.set(b"k", b"stale", 6) is False
    assert l1.set(b"k", b"unversioned", 0) is False  # no version is exempt
    entry = l1.get(b"k")
    assert entry is not None
    assert entry.payload == b"new"


def test_an_unconfirmed_write_is_held_aside_for_the_fail_open_fallback_only() -> None:
    """A write Redis did not confirm leaves no trusted copy: reads (``serve``/``get``) miss and go to
    Redis; only the fallback used while Redis cannot be asked (``peek``) sees it, until Redis answers for
    the key, a confirmed copy or another process's write arrives, L1 is cleared, or its lifetime ends."""
    clock = FakeClock()
    l1 = LocalCache(10, 5.0, clock)
    assert l1.set(b"k", b"confirmed", 7)
    l1.hold_unconfirmed(b"k", b"unconfirmed")
    assert (l1.serve(b"k"), l1.get(b"k"), l1.hits) == (None, None, 0), "the older trusted copy went too"
    held = l1.peek(b"k")
    assert held is not None
    assert held.payload == b"unconfirmed"
    l1.forget_unconfirmed(b"k")  # Redis answered for the key
    assert l1.peek(b"k") is None

    l1.hold_unconfirmed(b"a", b"unconfirmed")
    assert l1.set(b"a", b"confirmed", 3)
    confirmed = l1.peek(b"a")
    assert confirmed is not None
    assert confirmed.payload == b"confirmed"
    l1.hold_unconfirmed(b"b", b"unconfirmed")
    assert l1.invalidate(b"b", 9) is False  # no trusted copy to drop, but the unconfirmed one goes
    assert l1.peek(b"b") is None
    l1.hold_unconfirmed(b"c", b"unconfirmed")
    l1.clear()
    assert l1.peek(b"c") is None
    l1.hold_unconfirmed(b"d", b"unconfirmed", ttl_left=1.0)
    clock.advance(0.999)
    assert l1.peek(b"d") is not None
    clock.advance(0.001)
    assert l1.peek(b"d") is None
    assert len(l1) == 0
    assert l1.total_size == 0


def test_total_size_tracks_payload_bytes() -> None:
    l1 = LocalCache(2, None, FakeClock())
    l1.set(b"a", b"12345", 1)
    l1.set(b"b", b"123", 1)
    l1.set(b"a", b"1", 2)
    assert l1.total_size == 4
    l1.set(b"c", b"12", 1)  # evicts "b"
    assert l1.total_size == 3
    l1.pop(b"a")
    assert l1.total_size == 2
    l1.clear()
    assert (l1.total_size, len(l1)) == (0, 0)


def test_concurrent_writers_keep_the_bound_and_the_byte_count() -> None:
    l1 = LocalCache(50, None, FakeClock())
    barrier = threading.Barrier(8)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(2000):
            key = f"k{(i * 7 + t) % 120}".encode()
            l1.set(key, b"x" * (i % 9 + 1), i)
            l1.get(key)
            if i % 13 == 0:
                l1.pop(key)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(l1) <= 50
    assert l1.total_size == sum(len(e.payload) for _, e in l1._data.items())


def test_an_adaptive_l1_grows_from_evidence_and_keeps_its_byte_count() -> None:
    """adaptive_l1: the same rule as AdaptiveLRUCache (tests/test_adaptive.py), on L1's own entries."""
    from victor_rcache.adaptive import SizingRule

    clock = FakeClock()
    l1 = LocalCache(100, None, clock, sizing=SizingRule(min_size=100, max_size=400, min_accesses=50,
                                                         adjustment_interval=10))
    for i in range(3000):  # 105 keys cycling through 100 entries: every miss is on a key just evicted
        key = f"k{i % 105}".encode()
        if l1.get(key) is None:
            l1.set(key, b"x" * 7, 1)
        clock.advance(0.01)
    adaptive = l1.adaptive_metrics()
    assert adaptive is not None
    assert l1.max_entries == 110 == adaptive["current_size"]
    assert adaptive["adjustments"] == 1
    assert l1.total_size == 7 * len(l1) == 7 * 105
    assert LocalCache(100, None, clock).adaptive_metrics() is None


def test_lock_free_hits_stay_exact_while_writers_evict_and_metrics_read() -> None:
    """The plain L1 serves without its lock: with writers evicting and replacing the very keys being read,
    and a reader of ``hits`` in the middle, no serve fails and ``hits`` equals the hits the callers saw."""
    l1 = LocalCache(20, None, FakeClock())
    keys = [f"k{i}".encode() for i in range(40)]
    for i, key in enumerate(keys[:20]):
        l1.set(key, b"v", i + 1)
    stop = threading.Event()
    seen = [0] * 6
    problems: list[BaseException] = []

    def reader(slot: int) -> None:
        try:
            for i in range(20_000):
                if l1.serve(keys[(i * 7 + slot) % 40]) is not None:
                    seen[slot] += 1
        except BaseException as exc:  # the assertion below shows it
            problems.append(exc)

    def writer(offset: int) -> None:
        i = 0
        while not stop.is_set():
            key = keys[(i + offset) % 40]
            l1.set(key, b"v" * (i % 5 + 1), 100 + i)
            if i % 3 == 0:
                l1.pop(keys[(i * 11 + offset) % 40])
            i += 1

    def metrics() -> None:
        while not stop.is_set():
            assert l1.hits >= 0

    readers = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
    others = [threading.Thread(target=writer, args=(o,)) for o in (0, 17)] + [threading.Thread(target=metrics)]
    for th in readers + others:
        th.start()
    for th in readers:
        th.join()
    stop.set()
    for th in others:
        th.join()
    assert problems == []
    assert l1.hits == sum(seen)
    assert len(l1) <= 20
    assert l1.total_size == sum(len(e.payload) for _, e in l1._data.items())
