"""A Redis hit is a plain read; its bookkeeping follows in batches (docs/design.md#the-read-path).

After an L1 miss a get sends one HMGET of the entry, no script; the hit or miss is buffered and sent
later with the others of its shard, one touch.lua call per shard (LRU stamps, hit counts, promotions,
tail hits, the fleet counters, the removal of entries a reader found corrupt). These tests pin what
that split must not lose: a read of many ids is served and all of its bookkeeping applied, a counter
written by hand never makes touch.lua fail halfway through, an entry field written by hand is a counted
miss and is removed, L3 hits reported together count tail hits one after the other, and L1 hits reach
the fleet's counters too. Each test calls ``flush_bookkeeping()`` before it looks at what Redis holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import MultiLevelCache, bookkeeping, tiers
from victor_rcache.keys import KeySpace

from .helpers import Client, check_invariants, read_namespace

Make = Callable[..., MultiLevelCache]
MISS = "<miss>"
COUNTERS = (b"l2_hits", b"misses", b"l1_hits", b"l1_fills")  # what the reads below count in the stats hash


def stats(raw: Client, namespace: str) -> dict[bytes, bytes]:
    """Shard 0's stats hash (the tests use one shard)."""
    return dict(raw.hgetall(KeySpace(namespace, 1).shard_keys[0].stats))  # type: ignore[arg-type]


def entry_key(namespace: str, key: str) -> bytes:
    space = KeySpace(namespace, 1)
    return space.entry_key(space.ref(key))


def test_a_get_many_of_more_ids_than_lua_can_unpack_is_served_and_all_of_it_is_counted(make_cache: Make,
                                                                                      namespace: str) -> None:
    """Lua's unpack() has a stack limit near 8,000 values, and touch.lua takes at most 1,000 hits per call:
    a get_many of 9,000 ids of one shard is served, and all of its hits reach the fleet's counters and the
    entries' hit counts (the bookkeeping is sent in as many touch.lua calls as it takes, none dropped)."""
    settings: dict[str, Any] = {"shards": 1, "l2_size": 20_000, "l3_size": 20_000}
    writer = make_cache(**settings)
    keys = [f"k{i}" for i in range(9000)]
    for lo in range(0, len(keys), 3000):
        writer.put_many({k: i for i, k in enumerate(keys[lo:lo + 3000], start=lo)})
    reader = make_cache(promote_after=10**9, **settings)
    got = reader.get_many([*keys, "absent"])
    assert got == {k: i for i, k in enumerate(keys)}
    assert reader.get_metrics()["combined"]["total_misses"] == 1
    reader.flush_bookkeeping()
    fleet = reader.get_metrics("fleet")
    assert (fleet["l2"]["hits"], fleet["combined"]["total_misses"]) == (9000, 1)
    assert reader.get_metrics()["health"]["bookkeeping"] == {"pending": 0, "dropped_batches": 0}
    space = KeySpace(writer.namespace, 1)
    for key in (keys[0], keys[4500], keys[-1]):
        assert writer.client.hget(space.entry_key(space.ref(key)), "n") == b"1", key


@pytest.mark.parametrize("field", COUNTERS)
def test_a_stats_counter_written_by_hand_is_reset_not_a_half_written_call(make_cache: Make, raw: Client,
                                                                          namespace: str, field: bytes) -> None:
    """A stats counter that holds no integer (written by hand) would fail HINCRBY midway through touch.lua,
    after the call's earlier writes: it is reset to the call's count instead, and the rest of the call
    is applied (the other counters, the entry's LRU stamp)."""
    make_cache(shards=1).put("k", "v")
    reader = make_cache(shards=1, promote_after=1)  # hot at its first Redis hit: copied into L1
    shard = KeySpace(namespace, 1).shard_keys[0]
    raw.hset(shard.stats, field, "written by hand")
    stamped = raw.zscore(shard.l2, b"k")
    assert reader.get("k") == "v"  # an L2 hit, filling L1
    assert reader.get("k") == "v"  # an L1 hit
    assert reader.get("absent", MISS) == MISS
    reader.flush_bookkeeping()
    after = stats(raw, namespace)
    assert {f: after.get(f) for f in COUNTERS} == dict.fromkeys(COUNTERS, b"1"), after
    assert raw.zscore(shard.l2, b"k") > stamped, "the hit's LRU stamp was not applied"


def test_a_hit_count_written_by_hand_before_the_report_restarts_it_not_a_half_written_call(
        make_cache: Make, raw: Client, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry's hit count `n` written by hand between a read and its report would fail HINCRBY midway
    through touch.lua: it restarts at the reported hits, and the call's counters are applied."""
    # The report must come after the hand-written field: the flusher thread waits for the test's
    # flush_bookkeeping() instead of its window (one event never fills a batch).
    monkeypatch.setattr(bookkeeping, "WINDOW", 3600.0)
    make_cache(shards=1).put("k", "v")
    reader = make_cache(shards=1, promote_after=10**9)
    assert reader.get("k") == "v"
    raw.hset(entry_key(namespace, "k"), "n", "many")
    reader.flush_bookkeeping()
    assert raw.hget(entry_key(namespace, "k"), "n") == b"1"
    assert stats(raw, namespace).get(b"l2_hits") == b"1"
    assert make_cache(shards=1).get("k") == "v", "the entry is intact"


SIZES: dict[str, Any] = {"shards": 1, "l2_size": 100, "l3_size": 100}


@pytest.mark.parametrize(("field", "value"), [(b"ver", b"1e3"), (b"ver", b" 7 "), (b"n", b"5.0"), (b"d", b"0x10"),
                                              (b"x", b"1e12")])
def test_an_entry_field_written_by_hand_is_a_counted_miss_and_is_removed(make_cache: Make, raw: Client,
                                                                         namespace: str, field: bytes,
                                                                         value: bytes) -> None:
    """A field of an entry that is not a plain integer makes the entry corrupt: a counted miss (a decode
    error), never a hit with a guessed number; the reader's report removes it (touch.lua), its bytes too."""
    make_cache(**SIZES).put("k", "v")
    make_cache(**SIZES).put("other", "kept")
    reader = make_cache(**SIZES)
    raw.hset(entry_key(namespace, "k"), field, value)
    assert reader.get("k", MISS) == MISS
    assert reader.get_metrics()["health"]["decode_errors"] == 1
    reader.flush_bookkeeping()
    assert raw.exists(entry_key(namespace, "k")) == 0
    state = check_invariants(raw, namespace, 1, SIZES["l2_size"], SIZES["l3_size"])
    assert state.tier_of(b"k") == 0
    assert state.l2_ids == {b"other"}
    assert reader.get_metrics("fleet")["combined"]["total_misses"] == 1


def test_several_l3_hits_reported_together_count_tail_hits_one_after_the_other(make_cache: Make, raw: Client,
                                                                               namespace: str) -> None:
    """docs/adaptive-sizing.md: a tail hit is a hit an L3 `step` entries smaller would have lost, exact for an
    LRU: hits reported together count as if applied one after the other. A full L3 of 10 (step 1) whose
    least recent entries are k0, then k1: a hit on k0, then one on k1, are both tail hits (an L3 of 9 lacks
    k0; once k0 is back, k1 is its least recent entry, which it lacks next). Tail hits are sizing evidence:
    gathered with adaptive_redis."""
    settings: dict[str, Any] = {"shards": 1, "l2_size": 1, "l3_size": 10, "promote_after": 10**9,
                                "adaptive_redis": True}
    writer = make_cache(**settings)
    for i in range(11):  # k10 stays in L2; k0 .. k9 were demoted to L3 in that order (k0 least recent)
        writer.put(f"k{i}", i)
    (shard,) = read_namespace(raw, namespace, 1).shards
    assert sorted(shard.l3, key=shard.l3.__getitem__) == [f"k{i}".encode() for i in range(10)]
    reader = make_cache(**settings)
    before = stats(raw, namespace)
    assert reader.get_many(["k0", "k1"]) == {"k0": 0, "k1": 1}
    reader.flush_bookkeeping()
    after = stats(raw, namespace)
    assert int(after.get(b"l3_hits", b"0")) - int(before.get(b"l3_hits", b"0")) == 2
    assert int(after.get(b"tail_hits", b"0")) - int(before.get(b"tail_hits", b"0")) == 2


def test_l1_hits_reach_the_fleet_counters_at_flush_bookkeeping(make_cache: Make) -> None:
    """A process's L1 hits are part of the bookkeeping flush_bookkeeping() sends, also when it made no Redis
    read since (they ride on a touch.lua call of their own then)."""
    make_cache(shards=1).put("k", "v")
    reader = make_cache(shards=1, promote_after=1)  # hot at its first Redis hit: copied into L1
    assert reader.get("k") == "v"
    reader.flush_bookkeeping()
    assert reader.get_metrics("fleet")["l1"]["hits"] == 0
    for _ in range(5):
        assert reader.get("k") == "v"
    assert reader.get_metrics()["l1"]["hits"] == 5
    reader.flush_bookkeeping()
    assert reader.get_metrics("fleet")["l1"]["hits"] == 5


def test_a_shard_key_overwritten_by_hand_stops_batches_and_the_next_checked_batch_names_it(
        make_cache: Make, raw: Client, namespace: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """touch.lua checks key types and permissions on a process's first batch of a shard and once a second
    (its header says why that is safe): a batch between checks that meets a key written by hand fails,
    the next batch is checked and refused whole with an error naming the key, and once the key is
    deleted the batches apply again."""
    monkeypatch.setattr(bookkeeping, "WINDOW", 3600.0)  # batches go when the test flushes them
    monkeypatch.setattr(tiers, "CHECKS_INTERVAL", 3600.0)  # only the first batch and those after a failure
    make_cache(shards=1).put("k", "v")
    reader = make_cache(shards=1, promote_after=10**9)  # every get a Redis hit
    shard = KeySpace(namespace, 1).shard_keys[0]

    def read_and_report() -> int:
        assert reader.get("k") == "v"
        reader.flush_bookkeeping()
        return reader._core.book.dropped  # (metrics would read the hand-written hash too)

    assert read_and_report() == 0  # the first batch, checked
    raw.delete(shard.stats)
    raw.set(shard.stats, "written by hand")
    caplog.set_level(logging.DEBUG, logger="victor_rcache")
    assert read_and_report() == 1  # unchecked: stopped by WRONGTYPE
    assert "VRC_WRONGTYPE" not in caplog.text
    before = {key: raw.dump(key) for key in raw.scan_iter(match=f"{namespace}:*")}
    assert read_and_report() == 2  # checked after the failure: refused before any write
    assert f"VRC_WRONGTYPE {shard.stats.decode()} holds a string" in caplog.text
    assert {key: raw.dump(key) for key in raw.scan_iter(match=f"{namespace}:*")} == before
    raw.delete(shard.stats)
    assert read_and_report() == 2  # checked again, and applied
    assert stats(raw, namespace).get(b"l2_hits") == b"1"


def _counts(cache: MultiLevelCache) -> dict[str, int]:
    m = cache.get_metrics()
    return {"gets": m["combined"]["gets"], "l1_hits": m["l1"]["hits"], "l2_hits": m["l2"]["hits"],
            "misses": m["combined"]["total_misses"], "l1_fills": m["l1"]["promotions"],
            "decode_errors": m["health"]["decode_errors"]}


def test_one_get_many_decides_each_entry_as_a_get_of_it_does(make_cache: Make, raw: Client, namespace: str,
                                                             clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """get_many reads its batch in one pass (TierCore.took_all) and get one key (the same code, a batch of
    one): a hit, an entry past its absolute expiry, a hot entry (copied into L1), a field written by hand,
    a key of another type and an absent key come out the same way, with the same counts, and the batch's
    corrupt entries are reported for removal."""
    monkeypatch.setattr(bookkeeping, "WINDOW", 3600.0)  # nothing is reported before the test flushes
    settings: dict[str, Any] = {"shards": 1, "promote_after": 2, "clock": clock}
    writer = make_cache(**settings)
    writer.put_many({"hit": 1, "hot": 2, "corrupt": 3, "wrong": 4})
    writer.put("expired", 5, ttl=5)
    clock.advance(5.0)  # exactly at its expiry: no longer served
    raw.hset(entry_key(namespace, "hot"), "n", "1")  # promote_after - 1 fleet hits: the next hit fills L1
    raw.hset(entry_key(namespace, "corrupt"), "ver", "x7")
    raw.delete(entry_key(namespace, "wrong"))
    raw.set(entry_key(namespace, "wrong"), "a string")
    keys = ["hit", "expired", "hot", "corrupt", "wrong", "absent"]
    batch, single = make_cache(**settings), make_cache(**settings)
    assert batch.get_many(keys) == {"hit": 1, "hot": 2}
    assert {k: v for k in keys if (v := single.get(k, MISS)) != MISS} == {"hit": 1, "hot": 2}
    expected = {"gets": 6, "l1_hits": 0, "l2_hits": 2, "misses": 4, "l1_fills": 1, "decode_errors": 2}
    assert _counts(batch) == _counts(single) == expected
    assert batch.get("hot") == 2
    assert _counts(batch)["l1_hits"] == 1  # the copy the batch made
    batch.flush_bookkeeping()
    assert raw.exists(entry_key(namespace, "corrupt"), entry_key(namespace, "wrong")) == 0
    assert raw.hget(entry_key(namespace, "hit"), "n") == b"1"


def test_a_batch_of_reads_wakes_the_flusher_once_its_events_are_all_buffered(make_cache: Make,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The hits of one get_many are buffered first, then the flusher is woken (if BATCH events wait): not in
    the middle of the batch, where its thread would compete with the reader for the rest of it."""
    monkeypatch.setattr(bookkeeping, "BATCH", 2)
    monkeypatch.setattr(bookkeeping, "WINDOW", 3600.0)  # the flusher collects nothing meanwhile
    writer = make_cache(shards=1)
    writer.put_many({f"k{i}": i for i in range(5)})
    reader = make_cache(shards=1, promote_after=10**9)
    book = reader._core.book
    woken: list[int] = []
    book.wake = lambda: woken.append(len(book.events))
    assert reader.get_many([f"k{i}" for i in range(5)]) == {f"k{i}": i for i in range(5)}
    assert woken == [5]
