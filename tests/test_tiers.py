"""Tier behaviour of MultiLevelCache against a real Redis (docs/design.md#tiers, #values-and-keys, #invariants)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from victor_rcache import MultiLevelCache, ValueTooLargeError
from victor_rcache.keys import KeySpace

from .helpers import Client, FakeClock, check_invariants, flush_scripts, read_namespace, server_ms

Make = Callable[..., MultiLevelCache]
Flush = Callable[[], None]


def entry_id(key: str) -> bytes:
    return key.encode()


def test_put_then_get_in_this_process_is_an_l1_hit(make_cache: Make) -> None:
    cache = make_cache()
    cache.put("read the file", {"tools": ["read", "search"]})
    assert cache.get("read the file") == {"tools": ["read", "search"]}
    m = cache.get_metrics()
    assert (m["l1"]["hits"], m["l2"]["hits"], m["combined"]["total_misses"]) == (1, 0, 0)


def test_another_process_gets_an_l2_hit_from_redis(make_cache: Make) -> None:
    writer, reader = make_cache(), make_cache()
    writer.put("q", [1, 2, 3])
    assert reader.get("q") == [1, 2, 3]
    m = reader.get_metrics()
    assert (m["l1"]["hits"], m["l2"]["hits"], m["l2"]["misses"]) == (0, 1, 0)


def test_cached_none_is_a_hit_and_default_marks_a_miss(make_cache: Make) -> None:
    cache, other = make_cache(), make_cache()
    cache.put("nothing", None)
    sentinel = object()
    assert other.get("nothing", sentinel) is None
    assert other.get("absent", sentinel) is sentinel
    m = other.get_metrics()
    assert (m["combined"]["total_hits"], m["combined"]["total_misses"]) == (1, 1)


def test_values_round_trip_with_their_types(make_cache: Make) -> None:
    cache, other = make_cache(), make_cache()
    value = {"t": (1, "x", b"\x00\xff"), "f": 1.5, "n": None, "b": True, "l": [{"k": -7}], 3: "int key"}
    cache.put("v", value)
    assert other.get("v") == value
    assert isinstance(other.get("v")["t"], tuple)


def test_mutating_a_returned_value_changes_nothing_for_others(make_cache: Make) -> None:
    cache = make_cache()
    cache.put("m", {"tools": ["a"]})
    first = cache.get("m")
    first["tools"].append("mutated")
    assert cache.get("m") == {"tools": ["a"]}


def test_l2_hit_fills_l1_only_once_the_entry_is_hot(make_cache: Make) -> None:
    writer, reader = make_cache(promote_after=3), make_cache(promote_after=3)
    writer.put("hot", "v")
    for _ in range(2):
        assert reader.get("hot") == "v"
        assert reader._core.l1.get(b"hot") is None
        reader.flush_bookkeeping()  # the fleet's hit count `n` grows when the hit's bookkeeping arrives
    assert reader.get("hot") == "v"  # third fleet-wide hit, two of them counted: copied into this L1
    assert reader._core.l1.get(b"hot") is not None
    assert reader.get("hot") == "v"
    m = reader.get_metrics()
    assert (m["l1"]["hits"], m["l2"]["hits"], m["l1"]["promotions"]) == (1, 3, 1)


def test_l2_overflow_demotes_least_recently_used_to_l3(make_cache: Make, raw: Client, namespace: str,
                                                       clock: FakeClock) -> None:
    cache = make_cache(shards=1, l2_size=3, l3_size=10, clock=clock)
    for key in ("a", "b", "c"):
        cache.put(key, key)
        clock.advance(1)
    reader = make_cache(shards=1, l2_size=3, l3_size=10, clock=clock)
    assert reader.get("a") == "a"
    reader.flush_bookkeeping()  # the hit's LRU stamp: "a" is now the most recent
    clock.advance(1)
    cache.put("d", "d")
    state = check_invariants(raw, namespace, 1, 3, 10)
    assert state.l2_ids == {b"a", b"c", b"d"}
    assert state.l3_ids == {b"b"}
    assert cache.get_metrics()["l2"]["demotions"] == 1


def test_l3_overflow_evicts_least_recently_used(make_cache: Make, raw: Client, namespace: str,
                                                clock: FakeClock) -> None:
    cache = make_cache(shards=1, l2_size=1, l3_size=2, clock=clock)
    for key in ("a", "b", "c", "d"):
        cache.put(key, key)
        clock.advance(1)
    state = check_invariants(raw, namespace, 1, 1, 2)
    assert (state.l2_ids, state.l3_ids) == ({b"d"}, {b"b", b"c"})
    assert cache.get_metrics("fleet")["l3"]["evictions"] == 1
    assert make_cache(shards=1, l2_size=1, l3_size=2, clock=clock).get("a") is None


def test_l3_entry_moves_to_l2_after_promote_after_fleet_hits(make_cache: Make, raw: Client,
                                                             namespace: str, clock: FakeClock) -> None:
    settings = {"shards": 1, "l2_size": 1, "l3_size": 5, "promote_after": 3, "clock": clock}
    writer = make_cache(**settings)
    writer.put("cold", 1)
    clock.advance(1)
    writer.put("newer", 2)  # pushes "cold" down to L3
    readers = [make_cache(**settings) for _ in range(3)]
    assert read_namespace(raw, namespace, 1).tier_of(b"cold") == 3
    for n, reader in enumerate(readers, start=1):
        clock.advance(1)
        assert reader.get("cold") == 1
        reader.flush_bookkeeping()  # hit counts and promotions are applied with the hit's bookkeeping
        expected_tier = 2 if n == 3 else 3
        assert read_namespace(raw, namespace, 1).tier_of(b"cold") == expected_tier
    check_invariants(raw, namespace, 1, 1, 5)
    assert read_namespace(raw, namespace, 1).tier_of(b"newer") == 3  # made room for the promoted one
    fleet = writer.get_metrics("fleet")
    assert (fleet["l3"]["hits"], fleet["l2"]["promotions"], fleet["l2"]["demotions"]) == (3, 1, 2)


def test_idle_l2_entry_moves_to_l3_then_leaves_after_l3_ttl(make_cache: Make, raw: Client, namespace: str,
                                                             clock: FakeClock) -> None:
    settings = {"shards": 1, "l2_size": 10, "l3_size": 10, "l1_ttl": 5, "l2_ttl": 60, "l3_ttl": 600,
                "clock": clock}
    cache = make_cache(**settings)
    cache.put("idle", "v")
    clock.advance(59)
    other = make_cache(**settings)
    assert other.get("idle") == "v"  # a hit resets the idle time...
    other.flush_bookkeeping()  # ...once its bookkeeping arrives
    assert read_namespace(raw, namespace, 1).tier_of(b"idle") == 2
    clock.advance(60)
    # With a test clock idle times are applied by sweeps (Redis expires keys in real time only): a
    # read's bookkeeping sweeps its shard.
    assert other.get("absent") is None
    other.flush_bookkeeping()
    assert read_namespace(raw, namespace, 1).tier_of(b"idle") == 3
    clock.advance(599)
    assert other.get("idle") == "v"  # still in L3, and the hit restarts its L3 idle time
    other.flush_bookkeeping()
    assert read_namespace(raw, namespace, 1).tier_of(b"idle") == 3
    clock.advance(600)
    assert other.get("absent") is None
    other.flush_bookkeeping()  # this sweep finds it idle for l3_ttl
    assert other.get("idle") is None
    other.flush_bookkeeping()
    state = check_invariants(raw, namespace, 1, 10, 10)
    assert state.tier_of(b"idle") == 0
    assert other.get_metrics()["combined"]["total_expirations"] == 1


def test_idle_ttl_applies_to_the_key_being_read_without_a_sweep(make_cache: Make, raw: Client,
                                                                 namespace: str) -> None:
    """On the server's clock an entry's idle deadline is its Redis expiry: once it passes, a plain read
    misses with no script having swept the shard, and the miss's bookkeeping removes the index entry."""
    settings = {"shards": 1, "l2_ttl": 0.05, "l3_ttl": 0.05}
    make_cache(**settings).put("k", 1)
    space = KeySpace(namespace, 1)
    touched = raw.zscore(space.shard_keys[0].l2, b"k")
    assert touched is not None
    deadline = time.monotonic() + 10
    while server_ms(raw) <= touched + 100:  # a deadline poll on Redis's clock: past l2_ttl + l3_ttl
        assert time.monotonic() < deadline, "the server's clock did not pass the idle deadline"
    # No script has run on the shard since the put (the writer reads nothing): the index still names it.
    assert read_namespace(raw, namespace, 1).tier_of(b"k") == 2
    reader = make_cache(**settings)
    assert reader.get("k") is None
    reader.flush_bookkeeping()  # the miss tells the shard; the index member of dropped data is removed
    state = check_invariants(raw, namespace, 1, 10_000, 100_000)
    assert state.tier_of(b"k") == 0


def test_absolute_ttl_is_never_exceeded_in_any_tier(make_cache: Make, raw: Client, namespace: str,
                                                    clock: FakeClock, flush_all: Flush) -> None:
    settings = {"shards": 1, "l1_ttl": 300, "clock": clock, "promote_after": 1}
    writer, reader = make_cache(**settings), make_cache(**settings)
    writer.put("short", "v", ttl=10)
    assert reader.get("short") == "v"  # hot at once: now in reader's L1 too
    assert reader._core.l1.get(b"short") is not None
    clock.advance(9.999)
    assert writer.get("short") == "v"
    assert reader.get("short") == "v"
    clock.advance(0.001)
    assert writer.get("short") is None  # L1 copies expire with the value
    assert reader.get("short") is None
    assert make_cache(**settings).get("short") is None  # and Redis no longer serves it
    flush_all()  # the reads' bookkeeping sweeps the shard
    state = check_invariants(raw, namespace, 1, 10_000, 100_000)  # no expired leftover allowed
    assert state.tier_of(b"short") == 0
    assert writer.get_metrics("fleet")["combined"]["total_expirations"] == 1


def test_expired_entries_are_swept_by_any_call_on_their_shard(make_cache: Make, raw: Client,
                                                              namespace: str, clock: FakeClock) -> None:
    cache = make_cache(shards=1, clock=clock)
    cache.put_many({f"k{i}": i for i in range(5)}, ttl=30)
    cache.put("forever", 1)
    clock.advance(30)
    assert cache.get("unrelated") is None
    cache.flush_bookkeeping()  # a read's bookkeeping is a call on the shard too
    state = check_invariants(raw, namespace, 1, 10_000, 100_000)  # no expired leftover allowed
    assert state.l2_ids == {b"forever"}
    assert state.shards[0].exp == {}


def test_put_replaces_a_value_wherever_it_lives(make_cache: Make, raw: Client, namespace: str,
                                                clock: FakeClock) -> None:
    cache = make_cache(shards=1, l2_size=1, l3_size=5, clock=clock)
    cache.put("x", "old")
    clock.advance(1)
    cache.put("y", "push x down")
    assert read_namespace(raw, namespace, 1).tier_of(b"x") == 3
    clock.advance(1)
    cache.put("x", "new")
    state = check_invariants(raw, namespace, 1, 1, 5)
    assert state.tier_of(b"x") == 2
    assert make_cache(shards=1, l2_size=1, l3_size=5, clock=clock).get("x") == "new"


def test_delete_removes_from_every_tier(make_cache: Make, raw: Client, namespace: str, flush_all: Flush) -> None:
    cache, other = make_cache(), make_cache()
    cache.put("gone", 1)
    assert cache.delete("gone") is True
    assert cache.get("gone") is None
    assert other.get("gone") is None
    assert cache.delete("gone") is False
    flush_all()
    state = check_invariants(raw, namespace, 16, 10_000, 100_000)
    assert not state.l2_ids
    assert not state.l3_ids


def test_invalidate_clears_the_namespace_in_batches_and_nothing_else(make_cache: Make, raw: Client,
                                                                     namespace: str) -> None:
    cache = make_cache(l2_size=2000, l3_size=2000)
    neighbour = make_cache(namespace=namespace + "x")
    raw.set("unrelated", "keep me")
    cache.put_many({f"k{i}": i for i in range(1500)})  # more than one flush batch per shard in total
    neighbour.put("n", 1)
    cache.invalidate()
    state = check_invariants(raw, namespace, 16, 2000, 2000)
    assert not state.l2_ids
    assert not state.l3_ids
    assert not any(s.entries for s in state.shards)
    assert cache.get("k1") is None
    assert raw.get("unrelated") == b"keep me"
    assert neighbour.get("n") == 1
    fleet = cache.get_metrics("fleet")
    assert (fleet["l2"]["entry_count"], fleet["l2"]["total_size"]) == (0, 0)


def test_get_many_and_put_many(make_cache: Make) -> None:
    cache, other = make_cache(), make_cache()
    cache.put_many({f"k{i}": i for i in range(50)})
    got = other.get_many([f"k{i}" for i in range(60)] + ["k1"])
    assert got == {f"k{i}": i for i in range(50)}
    m = other.get_metrics()
    assert (m["combined"]["gets"], m["l2"]["hits"], m["combined"]["total_misses"]) == (60, 50, 10)


def test_value_over_max_value_bytes_is_refused_and_nothing_written(make_cache: Make, raw: Client,
                                                                    namespace: str) -> None:
    cache = make_cache(max_value_bytes=100)
    with pytest.raises(ValueTooLargeError, match="max_value_bytes=100"):
        cache.put_many({"small": "ok", "big": "x" * 200})
    assert list(raw.scan_iter(match=namespace + ":*")) == []  # on a cluster: every master
    assert cache.get("small") is None


def test_undecodable_payload_is_a_counted_miss_and_is_removed(make_cache: Make, raw: Client,
                                                              namespace: str) -> None:
    cache = make_cache()
    cache.put("k", "good")
    space = KeySpace(namespace, 16)
    raw.hset(space.entry_key(space.ref("k")), "v", b"\x00garbage")
    reader = make_cache()
    assert reader.get("k", "default") == "default"
    m = reader.get_metrics()
    assert (m["combined"]["total_misses"], m["health"]["decode_errors"]) == (1, 1)
    reader.flush_bookkeeping()  # the reader reports the corrupt entry; its shard's next call removes it
    state = check_invariants(raw, namespace, 16, 10_000, 100_000)
    assert state.tier_of(b"k") == 0


def test_long_and_hash_prefixed_keys_are_stored_under_a_digest(make_cache: Make, raw: Client,
                                                               namespace: str) -> None:
    cache, other = make_cache(), make_cache()
    long_key = "q" * 5000
    cache.put(long_key, 1)
    cache.put("#tag", 2)
    assert (other.get(long_key), other.get("#tag")) == (1, 2)
    other.flush_bookkeeping()
    state = check_invariants(raw, namespace, 16, 10_000, 100_000)
    ids = state.l2_ids
    assert all(i.startswith(b"#") and len(i) == 65 for i in ids)
    originals = {e[b"k"] for s in state.shards for e in s.entries.values()}
    assert originals == {long_key.encode(), b"#tag"}


def test_binary_and_unicode_keys(make_cache: Make) -> None:
    cache, other = make_cache(), make_cache()
    cache.put(b"\xff\xfe\x00bin", "b")
    cache.put("ключ 🔑", "u")
    assert other.get(b"\xff\xfe\x00bin") == "b"
    assert other.get("ключ 🔑") == "u"
    assert other.get("ключ 🔑".encode()) == "u"  # str keys are their UTF-8 bytes


def test_namespaces_do_not_see_each_other(make_cache: Make, namespace: str) -> None:
    a, b = make_cache(), make_cache(namespace=namespace + "b")
    a.put("k", "a")
    assert b.get("k") is None
    b.put("k", "b")
    assert (make_cache().get("k"), make_cache(namespace=namespace + "b").get("k")) == ("a", "b")


def test_script_flush_is_survived_with_a_transparent_reload(make_cache: Make, raw: Client) -> None:
    cache, other = make_cache(), make_cache()
    cache.put("k", 1)
    flush_scripts(raw)
    assert other.get("k") == 1  # a plain read: no script involved
    other.flush_bookkeeping()  # touch.lua meets NOSCRIPT and is loaded again
    assert other.get_metrics()["health"]["script_reloads"] == 1
    assert other.get_metrics("fleet")["l2"]["hits"] == 1, "the reloaded script applied the bookkeeping"
    flush_scripts(raw)
    reloads = cache.get_metrics()["health"]["script_reloads"]  # whether the first put loaded put.lua
    cache.put("k", 2)
    assert cache.get_metrics()["health"]["script_reloads"] == reloads + 1
    assert make_cache().get("k") == 2


def test_a_worker_with_another_shard_count_is_refused(make_cache: Make) -> None:
    from victor_rcache import ConfigurationError

    make_cache(shards=16).put("k", 1)
    with pytest.raises(ConfigurationError, match="shards=16"):
        make_cache(shards=8).get("k")


def test_l1_copy_expires_after_l1_ttl(make_cache: Make, clock: FakeClock) -> None:
    cache = make_cache(l1_ttl=5, clock=clock)
    cache.put("k", 1)
    clock.advance(4.9)
    assert cache._core.l1.get(b"k") is not None
    clock.advance(0.1)
    assert cache._core.l1.get(b"k") is None
    assert cache.get("k") == 1  # still in Redis


def test_per_tier_and_combined_counts_add_up(make_cache: Make, clock: FakeClock) -> None:
    settings = {"shards": 1, "l2_size": 2, "l3_size": 4, "promote_after": 2, "clock": clock}
    cache, reader = make_cache(**settings), make_cache(**settings)
    for i in range(6):
        cache.put(f"k{i}", i)
        clock.advance(1)
    gets = 0
    for key in ("k5", "k5", "k5", "k0", "k1", "k2", "k2", "k9", "k4"):
        reader.get(key)
        reader.flush_bookkeeping()  # each hit counts towards promotion before the next read
        gets += 1
        clock.advance(1)
    for scope in ("process", "fleet"):
        m = reader.get_metrics(scope)  # type: ignore[arg-type]
        assert m["l1"]["hits"] + m["l1"]["misses"] == gets  # only the reader reads: the fleet counts the same
        assert m["l2"]["hits"] + m["l2"]["misses"] == m["l1"]["misses"]
        assert m["l3"]["hits"] + m["l3"]["misses"] == m["l2"]["misses"]
        c = m["combined"]
        assert c["total_hits"] == m["l1"]["hits"] + m["l2"]["hits"] + m["l3"]["hits"]
        assert c["total_hits"] + c["total_misses"] == c["gets"]
        assert c["total_misses"] == m["l3"]["misses"]
    assert reader.get_metrics()["combined"]["gets"] == gets


def test_metrics_report_entries_and_bytes_from_redis(make_cache: Make, raw: Client, namespace: str) -> None:
    cache = make_cache(shards=2, l2_size=4, l3_size=100)
    cache.put_many({f"k{i}": "x" * i for i in range(10)})
    m = cache.get_metrics()
    state = check_invariants(raw, namespace, 2, 4, 100)
    l2_bytes = sum(len(s.entries[i][b"v"]) for s in state.shards for i in s.l2)
    assert (m["l2"]["entry_count"], m["l2"]["total_size"]) == (len(state.l2_ids), l2_bytes)
    assert m["l3"]["entry_count"] == len(state.l3_ids) == 6
    assert m["l1"]["entry_count"] == 10
    assert m["l1"]["total_size"] == sum(len(cache.config.codec.encode("x" * i)) + 9 for i in range(10))


def test_only_l2_hits_are_copied_into_l1(make_cache: Make, raw: Client, namespace: str, clock: FakeClock) -> None:
    """L1 holds what is hot fleet-wide: an L2 entry; an L3 hit is not copied, even one that promotes it."""
    settings = {"shards": 1, "l2_size": 1, "l3_size": 5, "promote_after": 1, "clock": clock}
    writer = make_cache(**settings)
    for key in ("a", "b", "c"):
        writer.put(key, key)
        clock.advance(1)  # a and b end up in L3, c in L2
    reader = make_cache(**settings)
    assert reader.get_many(["a", "b"]) == {"a": "a", "b": "b"}  # two L3 hits
    assert (reader._core.l1.get(b"a"), reader._core.l1.get(b"b")) == (None, None)
    reader.flush_bookkeeping()  # both promote, a then b; b's promotion demotes a again
    state = check_invariants(raw, namespace, 1, 1, 5)
    assert state.l2_ids == {b"b"}
    assert reader.get_many(["a", "b"]) == {"a": "a", "b": "b"}  # an L3 hit and an L2 hit
    assert reader._core.l1.get(b"a") is None
    assert reader._core.l1.get(b"b") is not None
    m = reader.get_metrics()
    assert (m["l1"]["promotions"], m["l2"]["hits"], m["l3"]["hits"]) == (1, 1, 3)


def test_lru_order_is_exact_within_a_millisecond(make_cache: Make, raw: Client, namespace: str,
                                                 clock: FakeClock) -> None:
    cache = make_cache(shards=1, l2_size=1, l3_size=3, clock=clock)  # the clock never moves
    cache.put("z-old", 1)
    cache.put("a-new", 2)
    assert read_namespace(raw, namespace, 1).l2_ids == {b"a-new"}  # not decided by the ids' order
    cache.put_many({"m": 3, "c": 4, "x": 5, "b": 6})  # more than both tiers hold: the last written stay
    state = check_invariants(raw, namespace, 1, 1, 3)
    assert (state.l2_ids, state.l3_ids) == ({b"b"}, {b"c", b"x", b"m"})
    scores = sorted(state.shards[0].l3.values())
    assert len(set(scores)) == 3


@pytest.mark.parametrize("start", [1_000_000.0, 1_000_000.0004, 1_000_000.0009999])
def test_no_copy_outlives_the_ttl_at_sub_millisecond_clock_readings(make_cache: Make, start: float) -> None:
    clock = FakeClock(start)
    settings = {"shards": 1, "promote_after": 1, "clock": clock}
    writer, reader = make_cache(**settings), make_cache(**settings)
    # The ttl Redis and every L1 use is 1000 ms. (Redis also expires the key that long after the put
    # in real time: the reads below come well within that.)
    writer.put("k", "v", ttl=1.0005)
    assert writer._core.l1.get(b"k") is not None
    clock.advance(0.003)
    assert reader.get("k") == "v"  # fills reader's L1 with the 997-998 ms left
    assert reader._core.l1.get(b"k") is not None
    clock.now = start + 1.000  # the value's ttl (counted from the put) is over
    assert (writer.get("k"), reader.get("k"), make_cache(**settings).get("k")) == (None, None, None)


def test_signed_caches_share_values_and_refuse_payloads_they_did_not_sign(make_cache: Make, raw: Client,
                                                                          namespace: str) -> None:
    from victor_rcache import ConfigurationError
    from victor_rcache.codec import Envelope, MsgpackCodec

    key = b"s" * 32
    writer, reader = make_cache(signing_key=key), make_cache(signing_key=key)
    writer.put("k", {"v": 1})
    assert reader.get("k") == {"v": 1}
    space = KeySpace(namespace, 16)
    forged = Envelope(MsgpackCodec(), b"x" * 32).wrap({"v": "forged"})  # well-formed, wrong key
    raw.hset(space.entry_key(space.ref("k")), "v", forged)
    assert make_cache(signing_key=key).get("k", "refused") == "refused"
    with pytest.raises(ConfigurationError, match="signing_key"):
        make_cache().get("k")  # an unsigned worker in a signed namespace is refused at once
