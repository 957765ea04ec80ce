"""The library on a real local Redis Cluster (3 masters with a replica each).

These tests cover what must hold once a namespace's shards live on several nodes: tiers and
invariants, the spread of a namespace over the masters, invalidations published by a script on one
node reaching a subscriber on another, and a miss computed once across caches.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from victor_rcache import AsyncMultiLevelCache, MultiLevelCache
from victor_rcache.keys import KeySpace

from .helpers import check_invariants

Make = Callable[..., MultiLevelCache]


@pytest.fixture
def ns() -> str:
    return "c" + uuid.uuid4().hex[:12]


@pytest.fixture
def raw_cluster(cluster_url: str) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(cluster_url)
    yield client
    client.close()


@pytest.fixture
def make(cluster_url: str, ns: str) -> Iterator[Make]:
    made: list[MultiLevelCache] = []

    def build(**settings: Any) -> MultiLevelCache:
        settings.setdefault("namespace", ns)
        settings.setdefault("fail_open", False)
        cache = MultiLevelCache(cluster_url, cluster=True, **settings)
        made.append(cache)
        return cache

    yield build
    for cache in made:
        cache.close()


def masters(raw_cluster: RedisCluster) -> list[redis.Redis]:
    return [redis.Redis(host=n.host, port=n.port) for n in raw_cluster.get_primaries()]


def test_a_namespace_spreads_over_every_master(make: Make, raw_cluster: RedisCluster, ns: str) -> None:
    cache = make(l2_size=20_000, l3_size=20_000)
    for start in range(0, 10_000, 1_000):
        cache.put_many({f"query {i}": i for i in range(start, start + 1_000)})
    counts = []
    for node in masters(raw_cluster):
        counts.append(sum(1 for _ in node.scan_iter(match=f"{ns}:*:e:*", count=1000)))
        node.close()
    assert sum(counts) == 10_000
    assert len(counts) == 3
    assert max(counts) <= 0.6 * 10_000, f"entries per master: {counts}"


def test_tiers_and_invariants_hold_across_nodes(make: Make, raw_cluster: RedisCluster, ns: str) -> None:
    settings = {"l2_size": 32, "l3_size": 64, "promote_after": 2}
    writer, reader = make(**settings), make(**settings)
    writer.put_many({f"k{i}": {"i": i} for i in range(200)})  # most end in L3 or are evicted
    got = reader.get_many([f"k{i}" for i in range(200)])
    assert got
    assert all(value == {"i": int(key[1:])} for key, value in got.items())
    for key in list(got)[:10]:
        assert reader.get(key) == got[key]
    reader.flush_bookkeeping()  # the reads' tier moves are applied in batches: all of them, and none in flight
    state = check_invariants(raw_cluster, ns, 16, 32, 64)
    assert len(state.l2_ids) + len(state.l3_ids) == 96
    fleet = reader.get_metrics("fleet")
    assert fleet["l2"]["entry_count"] == 32
    assert fleet["l3"]["entry_count"] == 64
    assert fleet["l2"]["demotions"] > 0
    assert fleet["l3"]["evictions"] > 0


def test_a_change_on_one_node_reaches_a_subscriber_on_another(make: Make, raw_cluster: RedisCluster) -> None:
    writer, reader = make(promote_after=1), make(promote_after=1)
    keys = [f"key {i}" for i in range(16)]  # at least one per shard: every master gets some
    space = KeySpace(reader.namespace, 16)
    nodes = {raw_cluster.get_node_from_key(space.entry_key(space.ref(k))).port for k in keys}
    assert len(nodes) == 3
    writer.put_many(dict.fromkeys(keys, "v1"))
    for key in keys:
        assert reader.get(key) == "v1"
        assert reader._core.l1.get(space.ref(key).id) is not None
    writer.put_many(dict.fromkeys(keys, "v2"))
    deadline = time.monotonic() + 0.1
    stale = set(keys)
    while stale and time.monotonic() < deadline:
        stale = {k for k in stale if reader.get(k) != "v2"}
    assert not stale, f"still served the old value after 100 ms: {sorted(stale)}"
    assert reader.get_metrics()["coherence"]["invalidations"] >= 3


def test_invalidate_clears_every_node_and_every_l1(make: Make, raw_cluster: RedisCluster, ns: str) -> None:
    writer, holder = make(), make(promote_after=1)
    writer.put_many({f"k{i}": i for i in range(100)})
    assert len(holder.get_many([f"k{i}" for i in range(100)])) == 100
    writer.invalidate()
    deadline = time.monotonic() + 1.0
    while len(holder._core.l1) and time.monotonic() < deadline:
        holder.get("k0")
    assert len(holder._core.l1) == 0
    state = check_invariants(raw_cluster, ns, 16, 10_000, 100_000)
    assert not state.l2_ids
    assert not state.l3_ids


def test_get_or_set_computes_once_across_caches_on_a_cluster(make: Make) -> None:
    caches = [make(lease_ttl=5) for _ in range(3)]
    loads = []
    barrier = threading.Barrier(12)
    results: list[Any] = []

    def loader() -> str:
        loads.append(1)
        time.sleep(0.05)  # stands for an expensive computation
        return "computed"

    def call(cache: MultiLevelCache) -> None:
        barrier.wait()
        results.append(cache.get_or_set("expensive", loader))

    threads = [threading.Thread(target=call, args=(caches[i % 3],)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == ["computed"] * 12
    assert len(loads) == 1


def test_scripts_are_reloaded_on_every_node_after_script_flush(make: Make, raw_cluster: RedisCluster) -> None:
    cache = make()
    cache.put_many({f"k{i}": i for i in range(50)})
    for node in masters(raw_cluster):
        node.script_flush()
        node.close()
    other = make()
    # Reads are plain commands; the reads' bookkeeping and a rewrite of every key run scripts on every master.
    assert other.get_many([f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}
    other.flush_bookkeeping()
    other.put_many({f"k{i}": -i for i in range(50)})
    assert make().get_many([f"k{i}" for i in range(50)]) == {f"k{i}": -i for i in range(50)}
    assert other.get_metrics()["health"]["script_reloads"] >= 3


def test_the_async_front_end_runs_on_a_cluster(cluster_url: str, ns: str) -> None:
    async def scenario() -> Any:
        async with AsyncMultiLevelCache(cluster_url, cluster=True, namespace=ns, fail_open=False) as a, \
                AsyncMultiLevelCache(cluster_url, cluster=True, namespace=ns, fail_open=False) as b:
            await a.put_many({f"k{i}": i for i in range(30)})
            got = await b.get_many([f"k{i}" for i in range(30)])
            computed = await b.get_or_set("new", lambda: "loaded")
            # b's fill lands behind its call: a finds b's lease, waits for the fill, computes nothing
            seen = await a.get_or_set("new", lambda: "computed twice")
            return got, computed, seen, await a.get("new")

    got, computed, seen, read = asyncio.run(scenario())
    assert got == {f"k{i}": i for i in range(30)}
    assert (computed, seen, read) == ("loaded", "loaded", "loaded")

