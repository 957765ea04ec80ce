"""``cache.cached(...)`` (docs/decorator.md): get_or_set behind a function, keyed by its arguments.

The key builder is an interface: other processes, and other versions of a program, must build the same
key for the same call, so its format is pinned here. The fleet promise (computed once per fleet) is
checked with worker processes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import AsyncMultiLevelCache, InvalidArgumentError, MultiLevelCache

from .helpers import Backend, Client
from .workers import Worker

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]


def test_the_default_key_is_the_qualified_name_and_the_bound_arguments_as_canonical_json(make_cache: Make) -> None:
    cache = make_cache()

    @cache.cached()
    def select(query: str, k: int = 3, *, filters: dict[str, Any] | None = None) -> list[str]:
        return [query] * k

    key = f"{__name__}.test_the_default_key_is_the_qualified_name_and_the_bound_arguments_as_canonical_json." \
          "<locals>.select:"
    assert select.key("read", filters={"b": 1, "a": (1, 2)}) == (
        key + '{"filters":{"a":[1,2],"b":1},"k":3,"query":"read"}')
    assert select.key("read") == select.key(query="read") == select.key("read", 3)  # defaults applied
    assert select.key("é") == key + '{"filters":null,"k":3,"query":"é"}'
    assert select.key(b"\x00\xff") == key + '{"filters":null,"k":3,"query":{"$bytes":"00ff"}}'


def test_a_decorated_function_computes_once_and_serves_its_result(make_cache: Make) -> None:
    cache = make_cache()
    calls: list[tuple[str, int]] = []

    @cache.cached(ttl=60)
    def select(query: str, k: int = 3) -> list[str]:
        calls.append((query, k))
        return [query] * k

    assert select("a") == ["a", "a", "a"]
    assert select(query="a", k=3) == ["a", "a", "a"]
    assert select("a", 1) == ["a"]
    assert calls == [("a", 3), ("a", 1)]
    assert select.__name__ == "select"
    assert select.__wrapped__ is not None


def test_invalidate_forgets_one_calls_result(make_cache: Make) -> None:
    cache = make_cache()
    calls: list[str] = []

    @cache.cached()
    def select(query: str) -> str:
        calls.append(query)
        return query.upper()

    select("a"), select("b")
    assert select.invalidate("a") is True
    select("a"), select("b")
    assert calls == ["a", "b", "a"]
    assert select.invalidate("never called") is False


def test_cache_if_false_returns_the_result_without_caching_it(make_cache: Make) -> None:
    cache = make_cache()
    calls: list[str] = []

    @cache.cached(cache_if=lambda result: result != [])
    def select(query: str) -> list[str]:
        calls.append(query)
        return [] if query == "nothing" else [query]

    assert select("nothing") == []
    assert select("nothing") == []
    assert select("x") == ["x"]
    assert select("x") == ["x"]
    assert calls == ["nothing", "nothing", "x"]


def test_key_templates_and_callables_and_tag_templates(make_cache: Make, raw: Client) -> None:
    cache = make_cache()

    @cache.cached(key="tools:{tenant}:{query}", tags=("tenant:{tenant}", "kind:tools"))
    def select(tenant: str, query: str) -> str:
        return f"{tenant}/{query}"

    @cache.cached(key=lambda tenant, query: f"plan:{tenant}:{len(query)}",
                  tags=lambda tenant, query: [f"tenant:{tenant}"])
    def plan(tenant: str, query: str) -> str:
        return f"plan {query}"

    assert select.key("acme", "read") == "tools:acme:read"
    assert plan.key("acme", "read") == "plan:acme:4"
    select("acme", "read"), select("other", "read"), plan("acme", "read")
    assert cache.invalidate_tags("tenant:acme") == 2
    assert cache.get("tools:acme:read") is None
    assert cache.get("plan:acme:4") is None
    assert cache.get("tools:other:read") == "other/read"


def test_a_method_is_keyed_without_its_instance(make_cache: Make) -> None:
    cache = make_cache()
    calls: list[str] = []

    class Planner:
        def __init__(self, name: str) -> None:
            self.name = name

        @cache.cached()
        def plan(self, query: str) -> str:
            calls.append(self.name)
            return f"plan for {query}"

    assert Planner("a").plan("q") == Planner("b").plan("q") == "plan for q"
    assert calls == ["a"]  # shared by every instance
    assert Planner("c").plan.key("q").endswith('.Planner.plan:{"query":"q"}')
    assert Planner("c").plan.invalidate("q") is True


def test_an_argument_with_no_canonical_encoding_asks_for_key(make_cache: Make) -> None:
    cache = make_cache()

    @cache.cached()
    def select(thing: object) -> str:
        return "x"

    with pytest.raises(InvalidArgumentError, match="has no canonical key; pass key="):
        select(object())


def test_each_front_end_decorates_its_own_kind_of_function(make_cache: Make, make_async_cache: MakeAsync) -> None:
    async def coroutine_function() -> int:
        return 1

    def plain() -> int:
        return 1

    with pytest.raises(InvalidArgumentError, match=r"AsyncMultiLevelCache\.cached"):
        make_cache().cached()(coroutine_function)
    with pytest.raises(InvalidArgumentError, match=r"decorate it with MultiLevelCache\.cached"):
        make_async_cache().cached()(plain)


def test_an_async_decorated_function_runs_once_for_concurrent_callers(make_async_cache: MakeAsync) -> None:
    async def scenario() -> None:
        cache = make_async_cache()
        calls: list[str] = []
        started = asyncio.Event()

        @cache.cached(ttl=60, tags=("q:{query}",))
        async def select(query: str) -> str:
            calls.append(query)
            started.set()
            await asyncio.sleep(0.05)  # the work; the other callers arrive meanwhile
            return query.upper()

        results = await asyncio.gather(*(select("a") for _ in range(10)))
        assert results == ["A"] * 10
        assert calls == ["a"]
        assert await select.invalidate("a") is True
        assert await cache.invalidate_tags("q:a") == 0  # already gone with its key
        await cache.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_decorated_call_is_computed_once_per_fleet(backend: Backend, namespace: str, raw: Client) -> None:
    """Four worker processes make the same decorated call at once: one computes (a counter in Redis counts
    the computations), the others wait for its fill and are served its result."""
    counter = f"{namespace}-computations"
    workers = [Worker(backend.url, namespace, cluster=backend.cluster) for _ in range(4)]
    try:
        results: list[Any] = []
        threads = [threading.Thread(target=lambda w=w: results.append(w.call("cached_select", counter, "read")))
                   for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [["read", "file"]] * 4
        assert raw.get(counter) == b"1"
    finally:
        for w in workers:
            w.close()
        raw.delete(counter)
