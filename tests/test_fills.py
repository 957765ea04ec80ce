"""Conditional fills: a get_or_set whose key changed after its miss never writes (put.lua since_ms).

Each test forces one way the key can change while the loader runs, with the loader itself waiting
for the change, and checks what Redis holds afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from victor_rcache import AsyncMultiLevelCache, MultiLevelCache
from victor_rcache.codec import Envelope, MsgpackCodec
from victor_rcache.keys import KeySpace
from victor_rcache.tiers import feed

from .helpers import Client, FakeClock, check_invariants, read_namespace

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]


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


# ------------------------------------------------------------------- the async front end's fill behind

SMALL: dict[str, Any] = {"shards": 1, "l2_size": 100, "l3_size": 100}


def _lease_key(namespace: str, key: str, shards: int = 1) -> bytes:
    space = KeySpace(namespace, shards)
    return space.lease_key(space.ref(key))


def test_an_async_miss_returns_before_its_fill_lands_and_this_process_reads_it(
        make_async_cache: MakeAsync, raw: Client, namespace: str) -> None:
    calls: list[int] = []

    def loader() -> str:
        calls.append(1)
        return "computed"

    async def scenario() -> tuple[Any, Any, bool, Any, Any]:
        async with make_async_cache(**SMALL) as cache:
            value = await cache.get_or_set("k", loader)
            # Nothing has awaited since the call returned: its fill has not run yet; the lease still
            # holds the fleet's other workers off.
            in_redis, leased = stored(raw, namespace, "k"), raw.exists(_lease_key(namespace, "k")) == 1
            read = await cache.get("k")  # waits for the process's own fill, then serves it
            again = await cache.get_or_set("k", loader)
        return value, in_redis, leased, read, again

    value, in_redis, leased, read, again = asyncio.run(scenario())
    assert (value, in_redis, leased) == ("computed", None, True)
    assert (read, again, calls) == ("computed", "computed", [1])
    assert stored(raw, namespace, "k") == "computed"
    assert raw.exists(_lease_key(namespace, "k")) == 0
    check_invariants(raw, namespace, 1, 100, 100)


def test_another_worker_waits_for_a_fill_still_behind_and_the_loader_runs_once(
        make_async_cache: MakeAsync, raw: Client, namespace: str) -> None:
    calls: list[str] = []

    def loader(name: str) -> Callable[[], str]:
        def load() -> str:
            calls.append(name)
            return f"from {name}"
        return load

    async def scenario() -> tuple[Any, Any]:
        async with make_async_cache(**SMALL) as a, make_async_cache(**SMALL) as b:
            first = await a.get_or_set("k", loader("a"))
            assert stored(raw, namespace, "k") is None  # a's fill is behind: b misses in Redis, finds the lease
            second = await b.get_or_set("k", loader("b"))
        return first, second

    assert asyncio.run(scenario()) == ("from a", "from a")
    assert calls == ["a"]
    assert stored(raw, namespace, "k") == "from a"


def test_close_lands_the_fills_still_behind(make_async_cache: MakeAsync, raw: Client, namespace: str) -> None:
    async def scenario() -> None:
        cache = make_async_cache(**SMALL)
        for i in range(20):
            await cache.get_or_set(f"k{i}", lambda i=i: i)  # type: ignore[misc]
        await cache.close()

    asyncio.run(scenario())
    assert [stored(raw, namespace, f"k{i}") for i in range(20)] == list(range(20))
    assert not raw.keys(_lease_key(namespace, "*"))
    check_invariants(raw, namespace, 1, 100, 100)


def test_a_loop_that_ends_without_close_still_lands_the_fill_and_frees_the_lease(
        make_async_cache: MakeAsync, raw: Client, namespace: str) -> None:
    cache = make_async_cache(**SMALL)

    async def miss() -> Any:
        return await cache.get_or_set("k", lambda: "computed")  # the loop ends right after: its task is cancelled

    assert asyncio.run(miss()) == "computed"
    assert stored(raw, namespace, "k") == "computed"
    assert raw.exists(_lease_key(namespace, "k")) == 0
    asyncio.run(cache.close())


def test_a_put_right_after_a_miss_wins_over_the_fill_behind_it(make_async_cache: MakeAsync, raw: Client,
                                                                namespace: str) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with make_async_cache(**SMALL) as a, make_async_cache(**SMALL) as b:
            await a.get_or_set("k", lambda: "computed")
            await a.put("k", "written")  # the fill, still behind, started before this write: refused
            await a.flush_bookkeeping()
            return await a.get("k"), await b.get("k")

    assert asyncio.run(scenario()) == ("written", "written")
    assert stored(raw, namespace, "k") == "written"
    assert raw.exists(_lease_key(namespace, "k")) == 0
