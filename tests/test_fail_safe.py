"""Fail-safe (docs/fail-safe.md): a loader that fails is answered with the key's last value, past its ttl,
for the grace period, and never after it, never over a newer value, never for a deleted key.

Most tests use a fake clock (the scripts' clock and the readers' alike), so "past the ttl" and "past the
grace" are steps of the clock, not sleeps; one runs with real processes and Redis's own expiry.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import pytest

from victor_rcache import AsyncMultiLevelCache, MultiLevelCache, ToolSelectionConfig
from victor_rcache.keys import KeySpace

from .helpers import Backend, Client, FakeClock
from .workers import Worker, eventually

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]
SAFE: dict[str, Any] = {"fail_safe": True, "fail_safe_grace": 60.0}


class ModelDown(Exception):
    pass


def failing() -> NoReturn:
    raise ModelDown("rate limited")


def stampede(cache: MultiLevelCache) -> dict[str, int]:
    counts: dict[str, int] = cache.get_metrics()["stampede"]
    return counts


def test_a_failing_loader_gets_the_value_past_its_ttl_within_the_grace_and_the_error_after(
        make_cache: Make, clock: FakeClock, raw: Client, namespace: str) -> None:
    writer, reader = make_cache(clock=clock, **SAFE), make_cache(clock=clock, **SAFE)
    writer.put("k", "last good", ttl=10)
    clock.advance(11)
    assert reader.get("k") is None  # past its ttl: no read serves it
    assert reader.get_or_set("k", failing) == "last good"
    assert stampede(reader)["fail_safe_served"] == 1
    assert reader.get("k") is None, "a stale value went into L1 or back into Redis as live"
    entry = KeySpace(namespace, 16).entry_key(KeySpace(namespace, 16).ref("k"))
    assert raw.hget(entry, "v") is not None  # kept for the grace, not rewritten
    clock.advance(60)  # 61 s past the ttl: the grace (60 s) is over
    with pytest.raises(ModelDown):
        reader.get_or_set("k", failing)
    assert stampede(reader)["fail_safe_served"] == 1


def test_a_succeeding_loader_replaces_the_stale_value(make_cache: Make, clock: FakeClock) -> None:
    cache = make_cache(clock=clock, **SAFE)
    cache.put("k", "old", ttl=10)
    clock.advance(11)
    assert cache.get_or_set("k", lambda: "new", ttl=10) == "new"
    assert make_cache(clock=clock, **SAFE).get("k") == "new"


def test_a_value_written_while_the_loader_ran_wins_over_the_stale_one(make_cache: Make, clock: FakeClock) -> None:
    cache, other = make_cache(clock=clock, **SAFE), make_cache(clock=clock, **SAFE)
    cache.put("k", "stale", ttl=10)
    clock.advance(11)

    def writes_then_fails() -> NoReturn:
        other.put("k", "newer", ttl=10)
        raise ModelDown("down")

    assert cache.get_or_set("k", writes_then_fails) == "newer"
    assert stampede(cache)["fail_safe_served"] == 0


def test_a_key_deleted_while_the_loader_ran_is_not_served_stale(make_cache: Make, clock: FakeClock) -> None:
    cache, other = make_cache(clock=clock, **SAFE), make_cache(clock=clock, **SAFE)
    cache.put("k", "stale", ttl=10)
    clock.advance(11)

    def deletes_then_fails() -> NoReturn:
        other.delete("k")
        raise ModelDown("down")

    with pytest.raises(ModelDown):
        cache.get_or_set("k", deletes_then_fails)


def test_fail_safe_is_per_call_and_needs_a_value_written_with_a_grace(make_cache: Make, clock: FakeClock) -> None:
    """The grace is the writer's (a value written without fail-safe is removed at its ttl); whether a
    failing loader falls back on it is the call's (the setting, or ``fail_safe=``)."""
    plain = make_cache(clock=clock)  # fail_safe off
    plain.put("unkept", "v", ttl=10)
    plain.get_or_set("kept", lambda: "v", ttl=10, fail_safe=True)  # written with the grace
    clock.advance(11)
    with pytest.raises(ModelDown):
        plain.get_or_set("unkept", failing, fail_safe=True)
    with pytest.raises(ModelDown):
        plain.get_or_set("kept", failing)  # this call does not fall back
    assert plain.get_or_set("kept", failing, fail_safe=True) == "v"


def test_a_slow_loader_past_the_soft_timeout_is_answered_stale_and_fills_in_the_background(
        make_cache: Make, clock: FakeClock) -> None:
    cache = make_cache(clock=clock, fail_safe_timeout=0.05, **SAFE)
    cache.put("k", "stale", ttl=10)
    clock.advance(11)
    release = threading.Event()

    def slow() -> str:
        assert release.wait(10)
        return "fresh"

    assert cache.get_or_set("k", slow, ttl=10) == "stale"  # the loader is still waiting
    release.set()
    reader = make_cache(clock=clock, **SAFE)
    eventually(lambda: reader.get("k") == "fresh", "the background fill did not land")


def test_an_async_slow_loader_past_the_soft_timeout_fills_in_the_background(make_async_cache: MakeAsync,
                                                                             clock: FakeClock) -> None:
    async def scenario() -> None:
        cache = make_async_cache(clock=clock, fail_safe_timeout=0.05, **SAFE)
        await cache.put("k", "stale", ttl=10)
        clock.advance(11)
        release = asyncio.Event()

        async def slow() -> str:
            await release.wait()
            return "fresh"

        assert await cache.get_or_set("k", slow, ttl=10) == "stale"
        release.set()
        for _ in range(500):  # the fill runs in this loop: let it
            if await cache.get("k") == "fresh":
                break
            await asyncio.sleep(0.01)
        assert await cache.get("k") == "fresh"
        await cache.close()

    asyncio.run(scenario())


def test_the_tool_selection_cache_enables_fail_safe_for_selections() -> None:
    config = ToolSelectionConfig()
    assert all(config.cache_config(ns).fail_safe for ns in ("query", "context", "rl"))
    assert not ToolSelectionConfig(fail_safe=False).cache_config("query").fail_safe


@pytest.mark.slow
def test_across_processes_the_last_value_is_served_while_the_loader_fails_then_not_after_the_grace(
        backend: Backend, namespace: str) -> None:
    """Real clocks, Redis's own expiry: a worker process writes a value with a 0.3 s ttl; past it, this
    process's failing loader is answered with it; once the 1 s grace is over Redis has removed it, and
    the loader's error comes through."""
    settings: dict[str, Any] = {"fail_safe": True, "fail_safe_grace": 1.0, "shards": 1, "l2_size": 10,
                                "l3_size": 10, "cluster": backend.cluster}
    with Worker(backend.url, namespace, **settings) as writer:
        writer.put("k", "last good", 0.3)
    with MultiLevelCache(backend.url, namespace=namespace, **settings) as reader:
        eventually(lambda: reader.get("k") is None, "the value outlived its ttl", timeout=5)
        assert reader.get_or_set("k", failing) == "last good"

        def loader_error_comes_through() -> bool:
            try:
                reader.get_or_set("k", failing)
            except ModelDown:
                return True
            return False

        eventually(loader_error_comes_through, "the stale value outlived its grace", timeout=10)
