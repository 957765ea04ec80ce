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


def test_both_front_ends_expose_the_same_api_over_one_core() -> None:
    public = {n for n in dir(MultiLevelCache) if not n.startswith("_")}
    assert public == {n for n in dir(AsyncMultiLevelCache) if not n.startswith("_")}
    for name in ("get", "get_many", "put", "put_many", "delete", "invalidate", "get_metrics", "close"):
        assert inspect.iscoroutinefunction(getattr(AsyncMultiLevelCache, name))
        assert inspect.signature(getattr(AsyncMultiLevelCache, name)).parameters.keys() == \
            inspect.signature(getattr(MultiLevelCache, name)).parameters.keys()
    assert isinstance(AsyncMultiLevelCache("redis://127.0.0.1:1/0")._core, TierCore)


def test_async_cache_behaves_like_the_sync_one(make_async_cache: MakeAsync, namespace: str, raw: Client) -> None:
    clock = FakeClock()
    settings: dict[str, Any] = {"shards": 1, "l2_size": 2, "l3_size": 4, "promote_after": 2, "clock": clock}

    async def scenario() -> dict[str, Any]:
        async with make_async_cache(**settings) as a, make_async_cache(**settings) as b:
            await a.put("x", {"v": (1, 2)})
            clock.advance(1)
            await a.put_many({"y": None, "z": [3]}, ttl=60)  # pushes "x" down to L3
            clock.advance(1)
            got = [await b.get("x"), await b.get("x"), await b.get("y", "default"), await b.get("nope", "default")]
            many = await b.get_many(["x", "z", "nope"])
            deleted = await a.delete("z")
            metrics = await b.get_metrics()
            fleet = await b.get_metrics("fleet")
            await a.invalidate()
            after = await a.get_many(["x", "y", "z"])  # (b's L1 copies go with cross-process coherence)
        return {"got": got, "many": many, "deleted": deleted, "metrics": metrics, "fleet": fleet, "after": after}

    result = asyncio.run(scenario())
    assert result["got"] == [{"v": (1, 2)}, {"v": (1, 2)}, None, "default"]
    assert result["many"] == {"x": {"v": (1, 2)}, "z": [3]}
    assert result["deleted"] is True
    assert result["after"] == {}
    m = result["metrics"]
    # x: two L3 hits (the second promotes it and fills b's L1), y: an L2 hit; the promotion pushed z
    # down to L3, so get_many finds x in L1 and z in L3; "nope" misses twice.
    assert (m["l2"]["hits"], m["l3"]["hits"], m["l1"]["hits"], m["combined"]["total_misses"]) == (1, 3, 1, 2)
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
