"""ToolSelectionCache (docs/tool-selection.md): round trips, keys that cannot collide, copies, metrics, invalidation
(fleet-wide on a tools change, with two workers), cached_selection sync and async (once per fleet,
exceptions, the prediction model, prewarming), the per-process instance and its environment."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from victor_rcache import AsyncPredictiveCacheWarmer, PredictiveCacheWarmer
from victor_rcache.errors import ConfigurationError
from victor_rcache.prediction.tool_selection import (
    NAMESPACES,
    AsyncToolSelectionCache,
    ToolSelectionCache,
    ToolSelectionConfig,
    cached_selection,
    context_key,
    get_tool_selection_cache,
    normalize_query,
    query_key,
    reset_tool_selection_cache,
    rl_key,
    tools_hash,
)

from .helpers import Backend, FakeClock

LIVENESS = 10.0  # seconds an awaited condition may take; only a hang ever reaches it
ROOT = Path(__file__).resolve().parent.parent
MISS = object()

TOOLS = [
    {"name": "read", "description": "read a file", "parameters": {"type": "object",
                                                                  "properties": {"path": {"type": "string"}}}},
    {"name": "search", "description": "search the code", "parameters": {"type": "object", "properties": {}}},
]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = LIVENESS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.005)


@pytest.fixture
def make_tools(make_cache: Callable[..., Any], namespace: str, clock: FakeClock) -> Callable[..., ToolSelectionCache]:
    """A ToolSelectionCache (one worker) on this test's backend; each call is another worker."""
    def make() -> ToolSelectionCache:
        caches = {ns: make_cache(namespace=f"{namespace}-{ns}") for ns in NAMESPACES}
        return ToolSelectionCache(ToolSelectionConfig(base=namespace, clock=clock), caches=caches)

    return make


@pytest.fixture
def make_async_tools(make_async_cache: Callable[..., Any], namespace: str,
                     clock: FakeClock) -> Callable[..., AsyncToolSelectionCache]:
    def make() -> AsyncToolSelectionCache:
        caches = {ns: make_async_cache(namespace=f"{namespace}-{ns}") for ns in NAMESPACES}
        return AsyncToolSelectionCache(ToolSelectionConfig(base=namespace, clock=clock), caches=caches)

    return make


# ------------------------------------------------------------------------------------------ API


def test_round_trips_in_every_namespace_and_shortcut(make_tools: Callable[..., ToolSelectionCache]) -> None:
    tc = make_tools()
    q = tc.query_key("read the file", TOOLS, model="m", threshold=0.3, max_tools=3)
    c = tc.context_key([{"role": "user", "content": "hi"}], ["edit"])
    r = tc.rl_key("coding", TOOLS)
    tc.put_query(q, ["read"], tools=["read"], selection_latency_ms=7.0, metadata={"why": "test"})
    tc.put_context(c, {"tools": ["search"], "score": 0.5}, tools=["search"])
    tc.put_rl(r, ["read", "search"], tools=["read", "search"], ttl=60)
    got = tc.get_query(q)
    assert got is not None
    assert (got.value, got.tools, got.metadata, got.selection_latency_ms) == (["read"], ["read"], {"why": "test"}, 7.0)
    assert got.ttl == 3600.0
    assert got.hit_count == 1
    assert got.timestamp == tc.config.clock()
    ctx = tc.get_context(c)
    assert ctx is not None
    assert ctx.value == {"tools": ["search"], "score": 0.5}
    assert ctx.ttl == 300.0
    rl = tc.get_rl(r)
    assert rl is not None
    assert rl.value == ["read", "search"]
    assert rl.ttl == 60.0
    assert tc.get(q, namespace="context") is None  # namespaces never see each other
    tc.put("k", "v", namespace="rl")
    assert tc.get("k", "rl") is not None
    assert tc.get("k") is None
    assert tc.get_query(q).hit_count == 2  # type: ignore[union-attr]


def test_returned_lists_are_copies(make_tools: Callable[..., ToolSelectionCache]) -> None:
    tc = make_tools()
    tc.put_query("k", ["read", "search"], tools=["read", "search"], metadata={"a": [1]})
    first = tc.get_query("k")
    assert first is not None
    first.value.append("write")
    first.tools.clear()
    first.metadata["a"].append(2)
    second = tc.get_query("k")
    assert second is not None
    assert (second.value, second.tools, second.metadata) == (["read", "search"], ["read", "search"], {"a": [1]})
    assert second.value is not first.value
    assert second.tools is not first.tools


# ------------------------------------------------------------------------------------------ keys


def test_keys_cannot_collide() -> None:
    base = query_key("Read  the FILE ", TOOLS, model="m", threshold=0.3, max_tools=3)
    assert base == query_key("read the file", TOOLS, model="m", threshold=0.3, max_tools=3)  # normalized
    assert normalize_query("  Read\tthe\n FILE ") == "read the file"
    others = [
        query_key("read the file", TOOLS, model="n", threshold=0.3, max_tools=3),
        query_key("read the file", TOOLS, model="m", threshold=0.4, max_tools=3),
        query_key("read the file", TOOLS, model="m", threshold=0.3, max_tools=4),
        query_key("read the file", TOOLS[:1], model="m", threshold=0.3, max_tools=3),
        query_key("read the file", None, model="m", threshold=0.3, max_tools=3),
        query_key("read the file", TOOLS, model="m", threshold=0.3, max_tools=3, selector="other"),
        query_key('read the file","x', TOOLS, model="m", threshold=0.3, max_tools=3),  # quoting cannot forge parts
    ]
    assert len({base, *others}) == len(others) + 1
    assert query_key("a", ["x"], model="b|c") != query_key("a|b", ["x"], model="c")
    assert query_key("q", TOOLS) == query_key("q", list(reversed(TOOLS)))  # a tool set: order does not matter


def test_tools_hash_covers_parameter_schemas_and_is_recomputed() -> None:
    registry = json.loads(json.dumps(TOOLS))
    before = tools_hash(registry)
    registry[0]["parameters"]["properties"]["path"]["type"] = "integer"  # only a schema changes, in place
    assert tools_hash(registry) != before  # same list object: nothing memoized by id
    described = json.loads(json.dumps(TOOLS))
    described[1]["description"] = "search the web"
    assert tools_hash(described) != before
    assert tools_hash(json.loads(json.dumps(TOOLS))) == before

    class Tool:
        def __init__(self, schema: dict[str, Any]) -> None:
            self.name, self.description, self.parameters = "read", "read a file", schema

    class Registry:
        def __init__(self, tools: list[Tool]) -> None:
            self._tools = tools

        def list_tools(self) -> list[Tool]:
            return self._tools

    reg = Registry([Tool({"type": "object"})])
    h = tools_hash(reg)
    reg._tools[0].parameters = {"type": "object", "properties": {"x": {}}}
    assert tools_hash(reg) != h


def test_context_and_rl_keys() -> None:
    msgs = [{"role": "user", "content": str(i)} for i in range(5)]
    assert context_key(msgs) == context_key(msgs[2:])  # the last 3 messages
    assert context_key(msgs) != context_key(msgs[1:4])
    assert context_key(msgs, ["edit"]) != context_key(msgs, ["run"]) != context_key(msgs)
    now = 3600.0 * 1000
    assert rl_key("coding", TOOLS, now=now) == rl_key("coding", TOOLS, now=now + 3599)
    assert rl_key("coding", TOOLS, now=now) != rl_key("coding", TOOLS, now=now + 3600)  # next hour
    assert rl_key("coding", TOOLS, now=now) != rl_key("testing", TOOLS, now=now)
    assert rl_key("coding", TOOLS, now=now) != rl_key("coding", TOOLS[:1], now=now)


def test_rl_key_follows_the_injected_clock(make_tools: Callable[..., ToolSelectionCache], clock: FakeClock) -> None:
    tc = make_tools()
    key = tc.rl_key("coding", TOOLS)
    tc.put_rl(key, ["read"])
    clock.advance(3600)
    assert tc.rl_key("coding", TOOLS) != key
    assert tc.get_rl(tc.rl_key("coding", TOOLS)) is None


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_sum_the_latency_saved(make_tools: Callable[..., ToolSelectionCache]) -> None:
    tc = make_tools()
    tc.put_query("a", ["read"], selection_latency_ms=10.0)
    tc.put_context("b", ["read"], selection_latency_ms=2.5)
    for _ in range(3):
        tc.get_query("a")
    tc.get_context("b")
    tc.get_query("missing")
    q = tc.get_metrics("query")
    assert (q["hits"], q["misses"], q["total_latency_saved_ms"]) == (3, 1, 30.0)
    assert q["hit_rate"] == 0.75
    assert q["evictions"] == 0
    total = tc.get_metrics()["total"]
    assert (total["hits"], total["misses"], total["total_latency_saved_ms"]) == (4, 1, 32.5)
    stats = tc.get_stats()
    assert stats["namespaces"]["query"]["entries"] == 1
    assert stats["namespaces"]["context"]["ttl"] == 300.0
    assert stats["namespaces"]["query"]["cache"]["l2"]["entry_count"] == 1


def test_invalidate_returns_the_entries_removed(make_tools: Callable[..., ToolSelectionCache]) -> None:
    tc = make_tools()
    for i in range(5):
        tc.put_query(f"q{i}", [str(i)])
    tc.put_context("c", ["x"])
    tc.put_rl("r", ["x"])
    assert tc.invalidate("q0", "query") == 1
    assert tc.invalidate("q0", "query") == 0
    assert tc.invalidate("c") == 1  # a key without a namespace: looked for in every namespace
    assert tc.invalidate(namespace="query") == 4
    assert tc.get_query("q1") is None
    assert tc.invalidate() == 1  # what is left: the rl entry
    assert tc.get_rl("r") is None


# ------------------------------------------------------------------------------------------ tools change


def test_a_tools_change_invalidates_every_worker(make_tools: Callable[..., ToolSelectionCache]) -> None:
    a, b = make_tools(), make_tools()
    assert a.invalidate_on_tools_change(TOOLS) is False  # first registration: nothing to flush
    assert b.invalidate_on_tools_change(TOOLS) is False  # same tools: nothing changed
    b.put_query("q", ["read"])  # in b's L1 too
    b.put_rl("r", ["read"])
    b.put_context("c", ["read"])
    assert b.get_query("q") is not None
    changed = json.loads(json.dumps(TOOLS))
    changed[0]["parameters"]["required"] = ["path"]  # only a schema changed
    assert b.tools_changed(changed) is True  # the fleet still has the old set: changed differs from it
    assert a.invalidate_on_tools_change(changed) is True
    wait_until(lambda: b.get_query("q") is None, "worker b dropping its query entry")
    wait_until(lambda: b.get_rl("r") is None, "worker b dropping its rl entry")  # another channel
    assert b.get_context("c") is not None  # context does not depend on the tool set
    assert b.tools_changed(TOOLS) is True
    assert b.tools_changed(changed) is False
    assert b.stored_tools_hash() == tools_hash(changed)
    assert b.invalidate_on_tools_change(changed) is False  # b learns of the change: no second flush
    assert a.invalidate_on_tools_change() is True
    assert a.stored_tools_hash() is None


def test_a_tools_change_in_another_process_invalidates_this_one(make_tools: Callable[..., ToolSelectionCache],
                                                                backend: Backend, namespace: str) -> None:
    tc = make_tools()
    tc.invalidate_on_tools_change(TOOLS)
    tc.put_query("q", ["read"])
    assert tc.get_query("q") is not None
    script = (
        "import sys, json\n"
        "from victor_rcache.prediction.tool_selection import ToolSelectionCache, ToolSelectionConfig\n"
        f"cfg = ToolSelectionConfig.from_env({{}}, redis_url={backend.url!r}, cluster={backend.cluster!r}, "
        f"base={namespace!r}, fail_open=False)\n"
        "with ToolSelectionCache(cfg) as tc:\n"
        "    print(tc.invalidate_on_tools_change(json.loads(sys.argv[1])))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(TOOLS[:1])], capture_output=True, text=True,
                          timeout=60, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    wait_until(lambda: tc.get_query("q") is None, "this process dropping the entry another process flushed")
    assert tc.tools_changed(TOOLS)


# ------------------------------------------------------------------------------------------ cached_selection


class Counting:
    """A selector that counts its calls and takes a while (standing for a model call)."""

    def __init__(self, cost: float = 0.2, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.cost, self.fail = cost, fail
        self.lock = threading.Lock()

    def __call__(self, query: str, tools: Any = None, **config: Any) -> list[str]:
        with self.lock:
            self.calls.append(query)
        time.sleep(self.cost)
        if self.fail:
            raise RuntimeError("selector failed")
        return [t["name"] for t in tools or [] if t["name"] in query.lower()][: config.get("max_tools", 3)]


def test_cached_selection_computes_once_per_fleet(make_tools: Callable[..., ToolSelectionCache]) -> None:
    workers = [make_tools(), make_tools()]
    selector = Counting()
    wrapped = [cached_selection(selector, cache=w) for w in workers]
    barrier = threading.Barrier(8)
    results: list[Any] = []

    def call(i: int) -> None:
        barrier.wait()
        results.append(wrapped[i % 2]("Read the file", TOOLS, max_tools=2))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert selector.calls == ["Read the file"]
    assert results == [["read"]] * 8
    assert wrapped[0]("read   the FILE", TOOLS, max_tools=2) == ["read"]  # normalized: a hit
    assert wrapped[0]("read the file", TOOLS, max_tools=3) == ["read"]
    assert len(selector.calls) == 2
    total = sum(w.get_metrics("query")["misses"] for w in workers)
    assert total == 2
    saved = workers[0].get_metrics("query")["total_latency_saved_ms"] + workers[1].get_metrics("query")[
        "total_latency_saved_ms"]
    assert saved > 0
    result = wrapped[1]("read the file", TOOLS, max_tools=2)
    result.append("mutated")
    assert wrapped[1]("read the file", TOOLS, max_tools=2) == ["read"]


def test_cached_selection_propagates_exceptions_and_caches_nothing(
        make_tools: Callable[..., ToolSelectionCache]) -> None:
    tc = make_tools()
    selector = Counting(cost=0.0, fail=True)
    wrapped = cached_selection(selector, cache=tc, name="failing")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="selector failed"):
            wrapped("read", TOOLS)
    assert len(selector.calls) == 2
    assert tc.get_query(query_key("read", TOOLS, selector="failing")) is None
    selector.fail = False
    assert wrapped("read", TOOLS) == ["read"]
    assert tc.get_query(query_key("read", TOOLS, selector="failing")) is not None


def test_cached_selection_records_queries_and_prewarms(make_tools: Callable[..., ToolSelectionCache]) -> None:
    tc = make_tools()
    warmer = PredictiveCacheWarmer(tc.cache("query"))
    selector = Counting(cost=0.0)
    wrapped = cached_selection(selector, cache=tc, warmer=warmer, prewarm=True, name="sel")
    for session in ("s1", "s2", "s3"):
        wrapped("read the file", TOOLS, session=session)
        wrapped("Search the code", TOOLS, session=session)
    warmer.flush()  # the records reach Redis, and the warmer's view of what follows them
    p = warmer.predict_next_queries("read the file", session="probe", remember=False)
    assert p.queries[:1] == ["search the code"]  # recorded, normalized
    assert tc.wait_for_prewarms(LIVENESS)  # none of the earlier prewarms may refill after the flush
    assert tc.invalidate(namespace="query") >= 2
    selector.calls.clear()
    wrapped("read the file", TOOLS, session="s4")  # predicts "search the code" and prewarms it
    key = query_key("search the code", TOOLS, selector="sel")
    wait_until(lambda: tc.cache("query").get(key, MISS) is not MISS, "the prewarmed selection")
    assert tc.wait_for_prewarms(LIVENESS)
    assert "search the code" in selector.calls
    assert tc.prewarm["completed"] >= 1
    calls = len(selector.calls)
    assert wrapped("search the code", TOOLS, session="s4") == ["search"]
    assert len(selector.calls) == calls  # served from the prewarmed entry


def test_sync_wrapper_checks_its_tools_against_the_fleet(make_tools: Callable[..., ToolSelectionCache]) -> None:
    a, b = make_tools(), make_tools()
    wa, wb = cached_selection(Counting(cost=0.0), cache=a), cached_selection(Counting(cost=0.0), cache=b)
    wa("read", TOOLS)
    wb("read", TOOLS)
    b.put_rl("r", ["read"])
    assert b.stored_tools_hash() == tools_hash(TOOLS)
    wa("read", TOOLS[:1])  # a's registry changed: the fleet's query and rl entries go
    wait_until(lambda: b.get_rl("r") is None, "the rl entry flushed by a's tools change")


def test_cached_selection_async(make_async_tools: Callable[..., AsyncToolSelectionCache]) -> None:
    calls: list[str] = []

    async def select(query: str, tools: Any = None, **config: Any) -> list[str]:
        calls.append(query)
        await asyncio.sleep(0.2)
        if "boom" in query:
            raise ValueError("boom")
        return [t["name"] for t in tools if t["name"] in query]

    async def scenario() -> None:
        async with make_async_tools() as a, make_async_tools() as b:
            warmer = AsyncPredictiveCacheWarmer(a.cache("query"))
            wa = cached_selection(select, cache=a, warmer=warmer, prewarm=True, name="async-sel")
            wb = cached_selection(select, cache=b, name="async-sel")
            results = await asyncio.gather(*(w("search the code", TOOLS, session="s") for w in (wa, wb) * 4))
            assert results == [["search"]] * 8
            assert calls == ["search the code"]
            got = await b.get_query(query_key("search the code", TOOLS, selector="async-sel"))
            assert got is not None
            assert got.selection_latency_ms > 0
            for _ in range(2):
                with pytest.raises(ValueError, match="boom"):
                    await wa("boom", TOOLS)
            assert calls.count("boom") == 2
            assert await a.get_query(query_key("boom", TOOLS, selector="async-sel")) is None
            for session in ("s1", "s2"):
                await wa("read the file", TOOLS, session=session)
                await wa("search the code", TOOLS, session=session)
            assert await a.wait_for_prewarms(LIVENESS)  # none of the earlier prewarms may refill after the flush
            await a.invalidate(namespace="query")
            calls.clear()
            await wa("read the file", TOOLS, session="s3")
            assert await a.wait_for_prewarms(LIVENESS)
            assert "search the code" in calls
            assert a.prewarm["completed"] >= 1
            m = await a.get_metrics()
            assert m["total"]["hits"] + m["total"]["misses"] >= 1

    asyncio.run(scenario())


def test_wrappers_refuse_a_mismatched_cache(make_tools: Callable[..., ToolSelectionCache]) -> None:
    async def select(query: str, tools: Any = None) -> list[str]:
        return []

    with pytest.raises(ConfigurationError):
        cached_selection(select, cache=make_tools())
    with pytest.raises(ConfigurationError):
        cached_selection(Counting(), cache=make_tools(), prewarm=True)


# ------------------------------------------------------------------------------------------ per process


@pytest.fixture
def env_instance(backend: Backend, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VICTOR_RCACHE_URL", backend.url)
    monkeypatch.setenv("VICTOR_RCACHE_CLUSTER", "1" if backend.cluster else "0")
    monkeypatch.setenv("VICTOR_RCACHE_TOOLS_NAMESPACE", namespace)
    monkeypatch.setenv("VICTOR_RCACHE_TOOLS_CONTEXT_TTL", "42")
    monkeypatch.setenv("VICTOR_RCACHE_TOOLS_QUERY_L2_SIZE", "320")
    reset_tool_selection_cache()
    yield
    reset_tool_selection_cache()


@pytest.mark.usefixtures("env_instance")
def test_one_instance_per_process_configured_from_the_environment(namespace: str) -> None:
    first = get_tool_selection_cache()
    assert get_tool_selection_cache() is first
    assert first.config.base == namespace
    assert first.config.namespaces["context"].ttl == 42.0
    assert first.config.namespaces["query"].ttl == 3600.0
    assert first.cache("query").config.l2_size == 320
    assert first.cache("context").namespace == f"{namespace}-context"
    first.put_context("c", ["read"])
    selection = first.get_context("c")
    assert selection is not None
    assert selection.ttl == 42.0
    wrapped = cached_selection(Counting(cost=0.0))  # no cache=: the process's instance
    assert wrapped("read", TOOLS) == ["read"]
    assert first.get_metrics("query")["misses"] == 1
    reset_tool_selection_cache()
    assert get_tool_selection_cache() is not first


@pytest.mark.standalone_only(reason="fork semantics do not depend on the backend")
@pytest.mark.usefixtures("env_instance")
def test_a_forked_child_gets_its_own_instance(backend: Backend) -> None:
    parent = get_tool_selection_cache()
    parent.put_query("q", ["read"])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own instance, which still reads the fleet's entries
        try:
            child = get_tool_selection_cache()
            ok = child is not parent and child.get_query("q") is not None
            os.write(write, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 16)
    os.waitpid(pid, 0)
    assert answer == b"ok"
    assert get_tool_selection_cache() is parent


def test_bad_environment_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="VICTOR_RCACHE_TOOLS_QUERY_TTL"):
        ToolSelectionConfig.from_env({"VICTOR_RCACHE_TOOLS_QUERY_TTL": "soon"})
    with pytest.raises(ConfigurationError):
        ToolSelectionConfig.from_env({"VICTOR_RCACHE_TOOLS_RL_TTL": "-1"})
    cfg = ToolSelectionConfig.from_env({"VICTOR_RCACHE_TOOLS_RL_L1_SIZE": "7"}, redis_url="redis://x:1/0")
    assert cfg.cache_config("rl").l1_size == 7
    assert cfg.cache.redis_url == "redis://x:1/0"


# ------------------------------------------------------------------------------------------ the example


def test_the_example_answers_with_its_fallback_selector() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VICTOR_RCACHE_URL", "REDIS_URL")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "semantic_tool_selector.py"), "--fallback"],
                          capture_output=True, text=True, timeout=120, env=env, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "private redis-server" in out
    assert "fallback (keyword overlap)" in out
    assert "'read the file config.py'" in out
    assert "['read_file'" in out
    assert "query cache: 2 hits, 4 misses" in out


def test_two_tool_sets_in_one_process_do_not_flush_each_other(make_tools: Callable[..., ToolSelectionCache]) -> None:
    """Two agents of one process with different tool sets: each set is registered once, not on every
    alternation (which flushed the fleet's query namespace each time: a cache that never hit)."""
    cache = make_tools()
    selector = Counting()
    select = cached_selection(selector, cache=cache)
    other_tools = [*TOOLS, {"name": "write", "description": "write a file", "parameters": {}}]
    for _ in range(5):
        select("read the file", TOOLS)
        select("read the file", other_tools)
    # T1; T2 (registering the second set flushes the fleet once); T1 again; from then on only hits.
    assert len(selector.calls) == 3


def test_a_schema_given_as_a_model_class_is_hashed_by_its_json_schema() -> None:
    class ArgsModel:  # what LangChain tools carry as args_schema (a pydantic model class)
        @classmethod
        def model_json_schema(cls) -> dict[str, Any]:
            return {"type": "object", "properties": {"path": {"type": "string"}}}

        def model_dump(self) -> dict[str, Any]:
            raise AssertionError("a class is never dumped as an instance")

    class Tool:
        name, description, args_schema = "read", "read a file", ArgsModel

    assert tools_hash([Tool()]) == tools_hash([Tool()])

    class Opaque:
        pass

    class Broken:
        name, description, args_schema = "read", "read a file", Opaque

    from victor_rcache.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="JSON schema"):
        tools_hash([Broken()])


def test_a_bad_size_in_any_namespace_is_refused_before_any_cache_is_built(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VICTOR_RCACHE_TOOLS_RL_L1_SIZE", "0")
    before = threading.active_count()
    with pytest.raises(ConfigurationError, match="l1_size"):
        ToolSelectionCache(ToolSelectionConfig.from_env(redis_url="redis://127.0.0.1:1/0"))
    assert threading.active_count() == before  # no invalidation listener was left running
