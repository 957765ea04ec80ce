"""Conditional fills: a get_or_set whose key changed after its miss never writes (put.lua since_ms).

Each test forces one way the key can change while the loader runs, with the loader itself waiting
for the change, and checks what Redis holds afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from victor_rcache import MultiLevelCache
from victor_rcache.codec import Envelope, MsgpackCodec
from victor_rcache.keys import KeySpace
from victor_rcache.tiers import feed

from .helpers import Client, FakeClock, check_invariants, read_namespace

Make = Callable[..., MultiLevelCache]


def stored(raw: Client, namespace: str, key: str, shards: int = 1) -> Any:
    space = KeySpace(namespace, shards)
    payload = raw.hget(space.entry_key(space.ref(key)), "v")
    return None if payload is None else Envelope(MsgpackCodec()).unwrap(payload)


def test_a_value_that_expired_while_the_loader_ran_still_refuses_the_fill(make_cache: Make, raw: Client,
                                                                          namespace: str, clock: FakeClock) -> None:
    settings = {"shards": 1, "clock": clock}
    reader, writer = make_cache(**settings), make_cache(**settings)

    def loader() -> str:
        writer.put("k", "newer", ttl=1)  # written after the reader's miss...
        clock.advance(2)  # ...and expired before the reader fills
        assert writer.get("unrelated") is None
        writer.flush_bookkeeping()  # the read's bookkeeping sweeps the shard: the expired entry goes
        assert read_namespace(raw, namespace, 1).tier_of(b"k") == 0
        return "computed from the old state"

    assert reader.get_or_set("k", loader) == "computed from the old state"
    assert stored(raw, namespace, "k") is None
    assert reader.get_metrics()["stampede"]["fills_refused"] == 1


def test_a_loader_slower_than_the_record_horizon_does_not_fill(make_cache: Make, raw: Client, namespace: str,
                                                               clock: FakeClock) -> None:
    settings = {"shards": 1, "clock": clock, "l1_ttl": 1, "lease_ttl": 1}  # records kept 1 s

    def slow() -> str:
        clock.advance(5)
        return "late"

    cache = make_cache(**settings)
    assert cache.get_or_set("k", slow) == "late"
    assert stored(raw, namespace, "k") is None  # nothing could vouch that the key did not change meanwhile
    assert cache.get_metrics()["stampede"]["fills_refused"] == 1
    assert cache.get_or_set("k", lambda: "prompt") == "prompt"
    assert stored(raw, namespace, "k") == "prompt"


def test_a_worker_with_a_short_l1_ttl_cannot_drop_fence_records_a_longer_one_needs(
        make_cache: Make, raw: Client, namespace: str, clock: FakeClock) -> None:
    """A shard keeps its `fence` records as long as the longest-lived worker needs (the largest memory
    any worker sent), not as long as the worker that happens to sweep it."""
    holder = make_cache(shards=1, clock=clock)  # l1_ttl 300 s: its fills may answer misses that old
    hasty = make_cache(shards=1, clock=clock, l1_ttl=1, lease_ttl=1)  # would keep records for 1 s only
    holder.put("warm", 1)  # a call of the holder's on the shard: it records its longer memory

    def loader() -> str:
        hasty.delete("k")  # the source of truth changed: fills that started before are refused
        clock.advance(5.0)  # past hasty's 1 s, far within the holder's 300 s
        hasty.put("other", 2)  # sweeps the shard with hasty's settings
        return "stale"

    assert holder.get_or_set("k", loader) == "stale"
    assert stored(raw, namespace, "k") is None
    assert holder.get_metrics()["stampede"]["fills_refused"] == 1


def test_fence_records_dropped_past_the_bound_still_refuse_older_fills(make_cache: Make, raw: Client,
                                                                       namespace: str, clock: FakeClock) -> None:
    settings = {"shards": 1, "clock": clock, "l2_size": 2, "l3_size": 2}
    reader, writer = make_cache(**settings), make_cache(**settings)

    def loader() -> str:
        writer.put("k", "newer")
        clock.advance(1)
        writer.delete("k")  # k's fence record...
        clock.advance(1)
        for start in range(0, 1200, 300):  # ...is pushed out by 1,200 later deletes
            for i in range(start, start + 300):
                writer.delete(f"d{i}")
        return "stale"

    assert reader.get_or_set("k", loader) == "stale"
    reader.flush_bookkeeping()  # its miss's bookkeeping too: what follows reads Redis's settled contents
    state = read_namespace(raw, namespace, 1)
    assert b"k" not in state.shards[0].fence
    assert int(state.shards[0].stats[b"fence_floor"]) >= clock.ms - 1000
    assert stored(raw, namespace, "k") is None
    check_invariants(raw, namespace, 1, 2, 2)


def test_an_undecodable_entry_is_replaced_only_if_nothing_newer_came(make_cache: Make, raw: Client,
                                                                     namespace: str, clock: FakeClock) -> None:
    settings = {"shards": 1, "clock": clock}
    reader, writer = make_cache(**settings), make_cache(**settings)
    writer.put("k", "good")
    space = KeySpace(namespace, 1)
    raw.hset(space.entry_key(space.ref("k")), "v", b"\x00garbage")
    clock.advance(1)

    def loader() -> str:
        writer.put("k", "newer")
        return "stale"

    assert reader.get_or_set("k", loader) == "stale"
    assert stored(raw, namespace, "k") == "newer"


def test_versions_keep_growing_after_redis_lost_its_data(make_cache: Make, raw: Client, namespace: str) -> None:
    cache = make_cache(shards=1, coherence=False)
    cache.put("k", "v1")
    space = KeySpace(namespace, 1)
    before = int(raw.hget(space.entry_key(space.ref("k")), "ver") or 0)
    for key in raw.scan_iter(match=f"{namespace}:*"):
        if not key.endswith(b":config"):
            raw.delete(key)  # what FLUSHDB or a restart without persistence leaves
    cache.delete("absent")  # the first version after the loss comes from a delete
    cache.put("k", "v2")
    assert int(raw.hget(space.entry_key(space.ref("k")), "ver") or 0) > before
    assert cache.get("k") == "v2"  # this process reads its own write, not its older L1 copy


def test_a_read_racing_with_this_process_own_delete_is_not_stored(make_cache: Make) -> None:
    me = make_cache(shards=1, promote_after=1, coherence=False)  # no message: only the caller itself acts
    me.put("k", "v1")
    me._core.l1.pop(b"k")
    step = me._core.get("k")
    batch, _ = feed(step, None)  # the read is on its way: Redis has answered, the reply is in flight...
    assert isinstance(batch, list)
    replies = me._send(batch)
    assert me.delete("k") is True  # ...when this process deletes the key
    instruction, value = feed(step, replies)
    assert instruction is None
    assert value == "v1"  # that read returns what it found,
    assert me._core.l1.get(b"k") is None  # but its copy is refused
    assert me.get("k") is None


def test_a_read_racing_with_invalidate_is_not_stored(make_cache: Make) -> None:
    me = make_cache(shards=1, promote_after=1, coherence=False)  # no message: only the caller itself acts
    me.put("k", "v1")
    me._core.l1.pop(b"k")
    step = me._core.get("k")
    batch, _ = feed(step, None)
    assert isinstance(batch, list)
    replies = me._send(batch)
    me.invalidate()
    feed(step, replies)
    assert me._core.l1.get(b"k") is None
    assert me.get("k") is None
