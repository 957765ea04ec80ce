"""AsyncMultiLevelCache: the same core as the sync front end, driven by redis.asyncio."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from victor_rcache import AsyncMultiLevelCache, MultiLevelCache
from victor_rcache.tiers import TierCore

from .helpers import Client, FakeClock, check_invariants

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]
DEAD = "redis://127.0.0.1:1/0"  # nothing listens there: these caches never reach a Redis


def test_both_front_ends_expose_the_same_api_over_one_core() -> None:
    # Instances, not classes: `client` is a property of the sync cache and an attribute of the async one.
    sync, asynchronous = MultiLevelCache(DEAD), AsyncMultiLevelCache(DEAD)
    try:
        public = {n for n in dir(sync) if not n.startswith("_")}
        assert public == {n for n in dir(asynchronous) if not n.startswith("_")}
        assert "client" in public
        for name in ("get", "get_many", "put", "put_many", "delete", "invalidate", "get_metrics", "flush_bookkeeping",
                     "close"):
            assert inspect.iscoroutinefunction(getattr(AsyncMultiLevelCache, name))
            assert inspect.signature(getattr(AsyncMultiLevelCache, name)).parameters.keys() == \
                inspect.signature(getattr(MultiLevelCache, name)).parameters.keys()
        assert isinstance(asynchronous._core, TierCore)
        assert isinstance(sync._core, TierCore)
    finally:
        sync.close()
        asyncio.run(asynchronous.close())


def test_async_cache_behaves_like_the_sync_one(make_async_cache: MakeAsync, namespace: str, raw: Client) -> None:
    clock = FakeClock()
    settings: dict[str, Any] = {"shards": 1, "l2_size": 2, "l3_size": 4, "promote_after": 2, "clock": clock}

    async def scenario() -> dict[str, Any]:
        async with make_async_cache(**settings) as a, make_async_cache(**settings) as b:
            await a.put("x", {"v": (1, 2)})
            clock.advance(1)
            await a.put_many({"y": None, "z": [3]}, ttl=60)  # pushes "x" down to L3
            clock.advance(1)
            got = []
            for _ in range(2):
                got.append(await b.get("x"))
                await b.flush_bookkeeping()  # hit counts (and so promotion) grow as the bookkeeping arrives
            got += [await b.get("y", "default"), await b.get("nope", "default")]
            many = await b.get_many(["x", "z", "nope"])
            got.append(await b.get("x"))
            deleted = await a.delete("z")
            metrics = await b.get_metrics()
            await b.flush_bookkeeping()
            fleet = await b.get_metrics("fleet")
            await a.invalidate()
            after = await a.get_many(["x", "y", "z"])  # (b's L1 copies go with cross-process coherence)
        return {"got": got, "many": many, "deleted": deleted, "metrics": metrics, "fleet": fleet, "after": after}

    result = asyncio.run(scenario())
    assert result["got"] == [{"v": (1, 2)}, {"v": (1, 2)}, None, "default", {"v": (1, 2)}]
    assert result["many"] == {"x": {"v": (1, 2)}, "z": [3]}
    assert result["deleted"] is True
    assert result["after"] == {}
    m = result["metrics"]
    # x: two L3 hits, the second of which promotes it, pushing y (the least recently used) down to L3:
    # y is an L3 hit; get_many finds x and z in L2 and copies x, hot now, into b's L1, which serves the
    # last get of x; "nope" misses twice.
    assert (m["l2"]["hits"], m["l3"]["hits"], m["l1"]["hits"], m["combined"]["total_misses"]) == (2, 3, 1, 2)
    assert m["l1"]["promotions"] == 1
    assert result["fleet"]["l2"]["promotions"] == 1
    check_invariants(raw, namespace, 1, 2, 4)


def test_async_and_sync_caches_share_one_namespace(make_cache: Make, make_async_cache: MakeAsync) -> None:
    sync = make_cache()
    sync.put("shared", "from sync")

    async def scenario() -> Any:
        async with make_async_cache() as cache:
            value = await cache.get("shared")
            await cache.put("back", "from async")
            return value

    assert asyncio.run(scenario()) == "from sync"
    assert sync.get("back") == "from async"
