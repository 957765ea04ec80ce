"""get.lua's two paths give one outcome (the fast path of docs/tiers.md#the-read-path, and the review that followed it).

The fast path serves plain hits and misses with a handful of commands; everything else takes the full
path. These tests pin the cases where the two could differ: many ids in one call, counters and entry
fields written by hand, several L3 hits in one call. Each checks what Redis holds afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import MultiLevelCache
from victor_rcache.keys import KeySpace

from .helpers import Client, read_namespace

Make = Callable[..., MultiLevelCache]
MISS = "<miss>"


def stats(raw: Client, namespace: str) -> dict[bytes, bytes]:
    """Shard 0's stats hash (the tests use one shard)."""
    return dict(raw.hgetall(KeySpace(namespace, 1).shard_keys[0].stats))  # type: ignore[arg-type]


def test_a_get_many_of_more_ids_than_lua_can_unpack_is_served(make_cache: Make) -> None:
    """unpack() has a stack limit near 8,000 values: one shard's ids are read in a loop, and a call with
    more ids than the fast path takes goes down the full path, which reads them one by one."""
    settings: dict[str, Any] = {"shards": 1, "l2_size": 20_000, "l3_size": 20_000}
    writer = make_cache(**settings)
    keys = [f"k{i}" for i in range(9000)]
    for lo in range(0, len(keys), 3000):
        writer.put_many({k: i for i, k in enumerate(keys[lo:lo + 3000], start=lo)})
    reader = make_cache(promote_after=10**9, fail_open=False, **settings)
    got = reader.get_many([*keys, "absent"])
    assert got == {k: i for i, k in enumerate(keys)}
    assert reader.get_metrics()["combined"]["total_misses"] == 1


@pytest.mark.parametrize("field", [b"l2_hits", b"misses", b"l1_hits"])
def test_a_counter_written_by_hand_is_reset_not_a_half_written_call(make_cache: Make, raw: Client,
                                                                    namespace: str, field: bytes) -> None:
    """A stats counter that holds no integer (written by hand) would fail HINCRBY midway, after the
    call's earlier writes: it is reset to this call's count instead, and the call is served."""
    make_cache(shards=1).put("k", "v")
    reader = make_cache(shards=1, promote_after=10**9)
    assert reader.get("warm-up", MISS) == MISS  # the shard has swept in this window: fast path from here
    raw.hset(KeySpace(namespace, 1).shard_keys[0].stats, field, "written by hand")
    reader._core._take_l1_deltas = lambda: (1, 0)  # type: ignore[method-assign]  # report an L1 hit too
    assert reader.get("k") == "v"
    assert reader.get("absent", MISS) == MISS
    after = stats(raw, namespace)
    assert after[field].isdigit(), after[field]
    assert int(after[field]) <= 2  # reset to what these calls counted, not added to garbage


@pytest.mark.parametrize(("field", "value"), [(b"s", b"abc"), (b"ver", b"1e3"), (b"ver", b" 7 "), (b"n", b"5.0"),
                                              (b"d", b"0x10"), (b"x", b"1e12")])
def test_an_entry_field_written_by_hand_is_a_miss_on_either_path(make_cache: Make, raw: Client, namespace: str,
                                                                 field: bytes, value: bytes) -> None:
    """The fast path checks entry fields exactly as the full path does: a field that is not a plain
    integer makes the entry corrupt (removed, a counted miss), never a hit with a guessed number."""
    make_cache(shards=1).put("k", "v")
    reader = make_cache(shards=1)
    assert reader.get("warm-up", MISS) == MISS  # the shard has swept in this window: the fast path is open
    space = KeySpace(namespace, 1)
    raw.hset(space.entry_key(space.ref("k")), field, value)
    assert reader.get("k", MISS) == MISS
    assert raw.exists(space.entry_key(space.ref("k"))) == 0
    assert read_namespace(raw, namespace, 1).tier_of(b"k") == 0
    assert reader.get_metrics()["health"]["decode_errors"] == 1


def test_several_l3_hits_in_one_call_count_tail_hits_as_the_full_path_does(make_cache: Make, raw: Client,
                                                                          namespace: str) -> None:
    """A hit counts as a tail hit when fewer than `step` L3 entries were touched less recently at that
    moment of the call; a second L3 hit in the same call sees the first one restamped. One step (L3 of
    10), L3 = {a, b}: both hits are tail hits (b is the least recent once a moved up)."""
    settings: dict[str, Any] = {"shards": 1, "l2_size": 1, "l3_size": 10, "promote_after": 10**9}
    writer = make_cache(**settings)
    for key in ("a", "b", "c"):  # c stays in L2; a, then b, were demoted to L3 (a least recent)
        writer.put(key, key)
    assert read_namespace(raw, namespace, 1).l3_ids == {b"a", b"b"}
    reader = make_cache(**settings)
    assert reader.get("warm-up", MISS) == MISS
    before = int(stats(raw, namespace).get(b"tail_hits", b"0"))
    assert reader.get_many(["a", "b"]) == {"a": "a", "b": "b"}
    assert int(stats(raw, namespace)[b"tail_hits"]) - before == 2
