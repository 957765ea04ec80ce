"""Redis down: fail-open callers keep working on L1; fail-closed callers get one typed error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import AsyncMultiLevelCache, CacheUnavailableError, MultiLevelCache
from victor_rcache.local_redis import LocalRedisCluster, LocalRedisServer, free_port

DEAD = f"redis://127.0.0.1:{free_port()}/0"


def test_fail_open_cache_without_redis_never_raises_and_keeps_its_own_writes() -> None:
    cache = MultiLevelCache(DEAD, namespace="down")
    assert cache.get("k", "default") == "default"
    cache.put("k", {"v": 1})
    # Its own write, which Redis never confirmed: kept aside and served while Redis cannot be asked.
    assert cache.get("k") == {"v": 1}
    cache.put_many({"a": 1, "b": 2})
    assert cache.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
    assert cache.delete("k") is True
    assert cache.get("k") is None
    cache.invalidate()
    assert cache.get("a") is None
    m = cache.get_metrics()
    assert m["health"]["redis_available"] is False
    assert m["health"]["redis_errors"] >= 6
    assert m["l2"]["entry_count"] is None
    assert m["combined"]["total_hits"] + m["combined"]["total_misses"] == m["combined"]["gets"]
    cache.close()


@pytest.mark.parametrize("call", [
    lambda c: c.get("k"), lambda c: c.put("k", 1), lambda c: c.get_many(["k"]), lambda c: c.put_many({"k": 1}),
    lambda c: c.delete("k"), lambda c: c.invalidate(), lambda c: c.get_metrics(),
])
def test_fail_closed_cache_raises_cache_unavailable(call: Callable[[MultiLevelCache], Any]) -> None:
    cache = MultiLevelCache(DEAD, namespace="down", fail_open=False)
    with pytest.raises(CacheUnavailableError, match="fail_open=True"):
        call(cache)


def test_async_fail_open_without_redis() -> None:
    async def scenario() -> tuple[Any, Any]:
        async with AsyncMultiLevelCache(DEAD, namespace="down") as cache:
            missing = await cache.get("k", "default")
            await cache.put("k", 1)
            return missing, await cache.get("k")

    assert asyncio.run(scenario()) == ("default", 1)


def test_cache_resumes_when_redis_comes_back_on_the_same_port(namespace: str) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    cache, other = MultiLevelCache(url, namespace=namespace), MultiLevelCache(url, namespace=namespace)
    with LocalRedisServer(port=port):
        cache.put("before", 1)
        assert other.get("before") == 1
    assert other.get("during", "miss") == "miss"  # Redis is gone: a miss, not an error
    cache.put("during", 2)
    assert cache.get("during") == 2  # its own unconfirmed write, while Redis cannot be asked
    with LocalRedisServer(port=port):  # restarted empty: scripts must be reloaded transparently
        assert other.get("during", "miss") == "miss"
        # Redis answers for the key now: its answer wins over the write it never confirmed.
        assert cache.get("during", "miss") == "miss"
        cache.put("after", 3)
        assert other.get("after") == 3
        assert other.get_metrics()["health"]["redis_available"] is True
    cache.close()
    other.close()


def test_a_cluster_cache_built_while_redis_is_down_fails_open_and_resumes_when_a_node_answers() -> None:
    """A cluster client reads the topology when it is made: with no node up, the cache still starts
    (fail-open) and makes its client on a later call, once a node answers."""
    with LocalRedisCluster(masters=3, replicas=0) as cluster:
        url = cluster.url
        nodes = list(cluster.nodes)
        for node in nodes:
            node.kill()
        cache = MultiLevelCache(url, namespace="late", cluster=True, socket_timeout=0.2, connect_timeout=0.2,
                                breaker_cooldown=0.05)
        assert cache.get("k", "miss") == "miss"
        cache.put("k", "mine")
        assert cache.get("k") == "mine"  # its own unconfirmed write, while no node can be asked
        with pytest.raises(CacheUnavailableError, match="connect"):
            MultiLevelCache(url, namespace="late", cluster=True, fail_open=False, socket_timeout=0.2)
        for node in nodes:
            node.start()
        cluster.wait_until_ok(timeout=30)
        deadline = time.monotonic() + 10
        while cache.get_metrics()["health"]["redis_available"] is not True:
            assert time.monotonic() < deadline, "the cache never made its cluster client"
        cache.put("k", "shared")
        other = MultiLevelCache(url, namespace="late", cluster=True)
        assert other.get("k") == "shared"
        other.close()
        cache.close()
