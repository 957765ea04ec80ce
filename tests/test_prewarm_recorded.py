"""Prewarming without a selection function, and warmers over the tool-selection cache (docs/prediction.md,
docs/tool-selection.md), against a real Redis.

``prewarm_predictions(p)`` with no selection function stores, for each predicted query, the tools the fleet
recorded for it, as a real request would have stored them: the list itself under ``key_fn(query)`` on a
``MultiLevelCache``; on a tool-selection cache, the selection record whose value is that list, under the
query key real requests make (the registry's hash and the selector settings), so the request that was
predicted is a hit. Recorded tools are used only for the registry they were recorded under
(``record_query(..., tools_hash=)``): others are skipped as ``other_registry``, queries with none as
``no_tools``. A selection function recomputes, as before. Every behaviour runs on both front ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest

from victor_rcache import AsyncMultiLevelCache, MultiLevelCache, Prediction, PrewarmReport
from victor_rcache import AsyncPredictiveCacheWarmer as AsyncBackgroundWarmer
from victor_rcache import PredictiveCacheWarmer as BackgroundWarmer
from victor_rcache.errors import ConfigurationError, InvalidArgumentError
from victor_rcache.prediction.tool_selection import (
    NAMESPACES,
    AsyncToolSelectionCache,
    ToolSelectionCache,
    ToolSelectionConfig,
    cached_selection,
    query_key,
    query_key_of_hash,
    tools_hash,
)

from .helpers import FakeClock

FRONTS = ("sync", "async")
TIERS: dict[str, Any] = {"shards": 4, "l1_size": 64, "l2_size": 256, "l3_size": 256}
MISS = object()
TOOLS = [
    {"name": "read", "description": "read a file", "parameters": {"type": "object"}},
    {"name": "search", "description": "search the code", "parameters": {"type": "object"}},
    {"name": "write", "description": "write a file", "parameters": {"type": "object"}},
]
OLD_TOOLS = TOOLS[:2]  # the registry before a deploy added "write"
NOW, OLD = tools_hash(TOOLS), tools_hash(OLD_TOOLS)
OUTCOMES = ("completed", "cached", "busy", "refused", "failed", "no_tools", "other_registry", "over_budget")
# Transitions only: a prediction after a query is what followed it, not also every query of this hour.
TRANSITIONS: dict[str, Any] = {"weights": (1.0, 0.0, 0.0)}

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]

# Each record and prediction a round trip (what the model holds is what the test set up); prewarming from
# the background rounds is tested in tests/test_model_background.py.
PredictiveCacheWarmer = partial(BackgroundWarmer, background=False)
AsyncPredictiveCacheWarmer = partial(AsyncBackgroundWarmer, background=False)


def select_by_name(query: str, tools: Any = None, **config: Any) -> list[str]:
    """A selector: the tools whose name the query mentions (sync; the async tests wrap it)."""
    return [t["name"] for t in tools or [] if t["name"] in query]


def predicted(*queries: str, tools: list[list[str]] | None = None, hashes: list[str | None] | None = None,
              confidence: float = 0.9) -> Prediction:
    """A prediction as predict_next_queries returns it (the model itself is test_prediction.py's)."""
    return Prediction("now", queries=list(queries), confidences=[confidence] * len(queries),
                      tools=tools if tools is not None else [[] for _ in queries],
                      parts=[(confidence, confidence, confidence) for _ in queries],
                      tools_hashes=hashes if hashes is not None else [])


class Front:
    """One warmer and its cache behind awaitable methods, whichever front end runs them."""

    def __init__(self, front: str, warmer: Any) -> None:
        self.front, self.warmer, self.cache = front, warmer, warmer.cache

    async def call(self, result: Any) -> Any:
        return await result if self.front == "async" else result

    async def record(self, query: str, tools: list[Any] | None, session: str, **kwargs: Any) -> None:
        await self.call(self.warmer.record_query(query, tools, session=session, **kwargs))

    async def predict(self, current: str) -> Prediction:
        result: Prediction = await self.call(self.warmer.predict_next_queries(current, top_k=10, min_confidence=0.0,
                                                                              remember=False))
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(self.warmer.get_statistics())
        return result


def run_front(front: str, make_cache: Make, make_async_cache: MakeAsync, body: Callable[[Front], Awaitable[Any]],
              **warmer_settings: Any) -> Any:
    """``body(front)`` in a fresh event loop, with a warmer over a MultiLevelCache of the test's namespace."""
    async def main() -> Any:
        if front == "sync":
            return await body(Front(front, PredictiveCacheWarmer(make_cache(**TIERS), **TRANSITIONS,
                                                                 **warmer_settings)))
        cache = make_async_cache(**TIERS)
        try:
            return await body(Front(front, AsyncPredictiveCacheWarmer(cache, **TRANSITIONS, **warmer_settings)))
        finally:
            await cache.close()

    return asyncio.run(main())


async def train(w: Front, follow_ups: dict[str, tuple[list[str] | None, str | None]]) -> Prediction:
    """Sessions "plan" -> each follow-up (recorded with its tools and tools hash); the prediction after "plan"."""
    for i, (query, (tools, registry)) in enumerate(follow_ups.items()):
        await w.record("plan", ["planner"], f"s{i}")
        await w.record(query, tools, f"s{i}", **({"tools_hash": registry} if registry is not None else {}))
    return await w.predict("plan")


# ------------------------------------------------------------------ a MultiLevelCache warmer, no selection function


@pytest.mark.parametrize("front", FRONTS)
def test_recorded_tools_are_prewarmed_and_a_request_hits_them(front: str, make_cache: Make,
                                                              make_async_cache: MakeAsync) -> None:
    """The tools recorded for each predicted query are stored under key_fn(query): the request that was
    predicted gets them from its get_or_set without computing. A query recorded without tools is skipped."""
    async def body(w: Front) -> tuple[Prediction, PrewarmReport, dict[str, Any]]:
        p = await train(w, {"read it": (["read"], None), "search it": (["search", "read"], None),
                            "think": (None, None)})
        report = await w.warmer.prewarm_predictions(p, min_confidence=0.0)
        return p, report, (await w.stats())["prewarming"]

    p, report, stats = run_front(front, make_cache, make_async_cache, body, key_fn=lambda q: f"tools:{q}")
    assert dict(zip(p.queries, p.tools, strict=True)) == {"read it": ["read"], "search it": ["search", "read"],
                                                          "think": []}
    assert p.tools_hashes == [None, None, None]
    assert report == PrewarmReport(completed=2, no_tools=1)
    assert report.skipped == 1
    assert (stats["completed"], stats["skipped"]) == (2, 1)
    assert stats["process"] == {**dict.fromkeys(OUTCOMES, 0), "completed": 2, "no_tools": 1}
    request = make_cache(**TIERS)  # another worker serving the predicted requests
    computed: list[str] = []
    for query, tools in (("read it", ["read"]), ("search it", ["search", "read"])):
        def compute(q: str = query) -> list[str]:
            computed.append(q)
            return ["computed"]

        assert request.get_or_set(f"tools:{query}", compute) == tools
    assert computed == []
    assert request.get("tools:think", MISS) is MISS


@pytest.mark.parametrize("front", FRONTS)
def test_recorded_tools_of_another_registry_are_never_used(front: str, make_cache: Make,
                                                           make_async_cache: MakeAsync) -> None:
    """Tools recorded under a registry hash are stored only by a prewarm for that hash; a prewarm naming no
    registry uses only tools recorded without one."""
    async def body(w: Front) -> tuple[Prediction, list[PrewarmReport], dict[str, Any]]:
        p = await train(w, {"now": (["write"], NOW), "before": (["read"], OLD), "unsaid": (["search"], None)})
        reports = [await w.warmer.prewarm_predictions(p, min_confidence=0.0, tools_hash=NOW),
                   await w.warmer.prewarm_predictions(p, min_confidence=0.0)]
        return p, reports, (await w.stats())["prewarming"]

    p, (for_now, unstated), stats = run_front(front, make_cache, make_async_cache, body)
    assert dict(zip(p.queries, p.tools_hashes, strict=True)) == {"now": NOW, "before": OLD, "unsaid": None}
    assert for_now == PrewarmReport(completed=1, other_registry=2)
    assert unstated == PrewarmReport(completed=1, other_registry=2)
    reader = make_cache(**TIERS)
    assert (reader.get("now"), reader.get("unsaid"), reader.get("before", MISS)) == (["write"], ["search"], MISS)
    assert stats["process"]["other_registry"] == 4
    assert stats["skipped"] == 4


@pytest.mark.parametrize("front", FRONTS)
def test_a_selection_function_still_recomputes(front: str, make_cache: Make, make_async_cache: MakeAsync) -> None:
    """Given a selection function, recorded tools (and their registry) play no part: each query is computed."""
    async def body(w: Front) -> PrewarmReport:
        p = await train(w, {"a": (["read"], OLD), "b": (None, None)})
        report: PrewarmReport = await w.warmer.prewarm_predictions(p, lambda q: f"computed {q}", min_confidence=0.0,
                                                                   tools_hash=NOW)
        return report

    assert run_front(front, make_cache, make_async_cache, body) == PrewarmReport(completed=2)
    reader = make_cache(**TIERS)
    assert (reader.get("a"), reader.get("b")) == ("computed a", "computed b")


def test_the_sync_prewarm_takes_no_selection_function(make_cache: Make) -> None:
    """PredictiveCacheWarmer.prewarm, for sync callers: the same forms as prewarm_predictions."""
    warmer = PredictiveCacheWarmer(make_cache(**TIERS))
    p = predicted("a", "b", "c", tools=[["read"], ["write"], []], hashes=[NOW, OLD, None])
    assert warmer.prewarm(p, tools_hash=NOW) == PrewarmReport(completed=1, other_registry=1, no_tools=1)
    assert warmer.prewarm(p, str.upper, ttl=60.0) == PrewarmReport(completed=2, cached=1)
    assert [warmer.cache.get(q) for q in "abc"] == [["read"], "B", "C"]

    async def inside_a_loop() -> None:
        with pytest.raises(InvalidArgumentError, match=r"await warmer\.prewarm_predictions"):
            warmer.prewarm(p)

    asyncio.run(inside_a_loop())


def test_a_tools_hash_goes_with_tools(make_cache: Make) -> None:
    warmer = PredictiveCacheWarmer(make_cache(**TIERS))
    with pytest.raises(InvalidArgumentError, match="pass the tools too"):
        warmer.record_query("q", None, tools_hash=NOW)
    for bad in ("", 42):
        with pytest.raises(InvalidArgumentError, match="tools_hash"):
            warmer.record_query("q", ["read"], tools_hash=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="tools_hash"):
            warmer.prewarm(predicted("q"), tools_hash=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="key_config"):
        warmer.prewarm(predicted("q"), key_config={"selector": "sel"})
    with pytest.raises(InvalidArgumentError, match="selection_fn"):
        warmer.prewarm(predicted("q"), "not callable")  # type: ignore[arg-type]


def test_the_latest_record_of_a_query_says_its_registry(make_cache: Make) -> None:
    """A query recorded again replaces its tools and their hash; recorded with no tools, both are kept."""
    warmer = PredictiveCacheWarmer(make_cache(**TIERS), **TRANSITIONS)
    steps = [((["read"], OLD), (["read"], OLD)), ((["write"], NOW), (["write"], NOW)), ((None, None), (["write"], NOW)),
             ((["search"], None), (["search"], None))]
    for (tools, registry), expected in steps:
        warmer.record_query("plan", ["planner"], session="s")
        warmer.record_query("q", tools, session="s", **({"tools_hash": registry} if registry else {}))
        p = warmer.predict_next_queries("plan", remember=False)
        assert (p.queries, p.tools, p.tools_hashes) == (["q"], [expected[0]], [expected[1]])


# ------------------------------------------------------------------ warmers over the tool-selection cache


@pytest.fixture
def make_tools(make_cache: Make, namespace: str, clock: FakeClock) -> Callable[[], ToolSelectionCache]:
    """A ToolSelectionCache (one worker) on this test's backend; each call is another worker."""
    def make() -> ToolSelectionCache:
        caches = {ns: make_cache(namespace=f"{namespace}-{ns}") for ns in NAMESPACES}
        return ToolSelectionCache(ToolSelectionConfig(base=namespace, clock=clock), caches=caches)

    return make


@pytest.fixture
def make_async_tools(make_async_cache: MakeAsync, namespace: str,
                     clock: FakeClock) -> Callable[[], AsyncToolSelectionCache]:
    def make() -> AsyncToolSelectionCache:
        caches = {ns: make_async_cache(namespace=f"{namespace}-{ns}") for ns in NAMESPACES}
        return AsyncToolSelectionCache(ToolSelectionConfig(base=namespace, clock=clock), caches=caches)

    return make


class Tools:
    """One worker of the fleet: a tool-selection cache (sync or async) and a warmer over it, awaitable."""

    def __init__(self, front: str, tc: Any) -> None:
        self.front, self.tc = front, tc
        self.warmer: Any = (PredictiveCacheWarmer if front == "sync" else AsyncPredictiveCacheWarmer)(tc, **TRANSITIONS)
        self.selector_calls: list[str] = []

    async def call(self, result: Any) -> Any:
        return await result if self.front == "async" else result

    def wrap(self, selector: Callable[..., Any] = select_by_name, **options: Any) -> Callable[..., Awaitable[Any]]:
        """cached_selection of ``selector`` (made async for the async front), recording into the warmer."""
        calls = self.selector_calls

        def sync_selector(query: str, tools: Any = None, **config: Any) -> Any:
            calls.append(query)
            return selector(query, tools, **config)

        async def async_selector(query: str, tools: Any = None, **config: Any) -> Any:
            calls.append(query)
            return selector(query, tools, **config)

        wrapped = cached_selection(sync_selector if self.front == "sync" else async_selector, cache=self.tc,
                                   warmer=self.warmer, name="sel", **options)
        return lambda *args, **kwargs: self.call(wrapped(*args, **kwargs))

    async def predict(self, current: str) -> Prediction:
        result: Prediction = await self.call(self.warmer.predict_next_queries(current, top_k=10, min_confidence=0.0,
                                                                              remember=False))
        return result

    async def get_query(self, key: str) -> Any:
        return await self.call(self.tc.get_query(key))

    async def invalidate_queries(self) -> None:
        await self.call(self.tc.invalidate(namespace="query"))

    async def prewarm(self, p: Prediction, selection_fn: Any = None, **kwargs: Any) -> PrewarmReport:
        if self.front == "sync":  # the sync warmer's own sync form, from a worker thread (a loop runs here)
            report: PrewarmReport = await asyncio.to_thread(self.warmer.prewarm, p, selection_fn, 0.0, **kwargs)
            return report
        result: PrewarmReport = await self.warmer.prewarm_predictions(p, selection_fn, 0.0, **kwargs)
        return result


def run_tools(front: str, make_tools: Callable[[], ToolSelectionCache],
              make_async_tools: Callable[[], AsyncToolSelectionCache],
              body: Callable[[Tools], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        if front == "sync":
            return await body(Tools(front, make_tools()))
        async with make_async_tools() as tc:
            return await body(Tools(front, tc))

    return asyncio.run(main())


def record_fields(selection: Any) -> tuple[Any, ...]:
    """What a cached selection holds, less when it was made and how long that took."""
    return selection.value, selection.tools, selection.ttl, selection.metadata


@pytest.mark.parametrize("front", FRONTS)
def test_a_warmer_over_the_tool_selection_cache_prewarms_cached_selection(
        front: str, make_tools: Callable[[], ToolSelectionCache],
        make_async_tools: Callable[[], AsyncToolSelectionCache]) -> None:
    """cached_selection records each query with its tools and registry hash; with no selection function the
    warmer stores for each predicted query the record a real request stores, under its query key (the fleet's
    registered registry, the selector's name): the predicted requests are hits, the selector never runs."""
    async def body(w: Tools) -> dict[str, Any]:
        select = w.wrap()
        for session in ("s1", "s2", "s3"):
            await select("plan the change", TOOLS, session=session)
            await select("read the file" if session != "s3" else "search and write", TOOLS, session=session)
        real = {q: await w.get_query(query_key(q, TOOLS, selector="sel")) for q in ("read the file",
                                                                                   "search and write")}
        p = await w.predict("plan the change")
        await w.invalidate_queries()  # the fleet's entries are gone (say, they expired): prewarm them back
        w.selector_calls.clear()
        report = await w.prewarm(p, key_config={"selector": "sel"})
        prewarmed = {q: await w.get_query(query_key(q, TOOLS, selector="sel")) for q in real}
        answers = [await select(q, TOOLS, session="s4") for q in real]
        return {"p": p, "report": report, "real": real, "prewarmed": prewarmed, "answers": answers,
                "calls": list(w.selector_calls), "warmer": w.warmer}

    r = run_tools(front, make_tools, make_async_tools, body)
    p: Prediction = r["p"]
    assert dict(zip(p.queries, p.tools, strict=True)) == {"read the file": ["read"], "search and write": ["search",
                                                                                                          "write"]}
    assert p.tools_hashes == [NOW, NOW]
    assert r["report"] == PrewarmReport(completed=2)
    for q, real in r["real"].items():
        assert record_fields(r["prewarmed"][q]) == record_fields(real), q
    assert r["answers"] == [["read"], ["search", "write"]]
    assert r["calls"] == []  # every predicted request was a hit
    warmer = r["warmer"]
    assert warmer.tool_selection is not None
    assert warmer.cache is warmer.tool_selection.cache("query")


@pytest.mark.parametrize("front", FRONTS)
def test_the_tool_selection_warmer_serves_direct_lookups(front: str, make_tools: Callable[[], ToolSelectionCache],
                                                         make_async_tools: Callable[[], AsyncToolSelectionCache],
                                                         clock: FakeClock) -> None:
    """With the direct API: record_query(..., tools_hash=), prewarm with the registry named, and get_query of
    query_key(query, tools, **config) is a hit holding the recorded tools, for the namespace's ttl."""
    async def body(w: Tools) -> tuple[PrewarmReport, Any, Any]:
        await w.call(w.warmer.record_query("plan", ["planner"], session="s"))
        await w.call(w.warmer.record_query("read it", ["read"], session="s", tools_hash=NOW))
        p = await w.predict("plan")
        report = await w.prewarm(p, tools_hash=NOW, key_config={"model": "m", "max_tools": 2})
        return (report, await w.get_query(w.tc.query_key("read it", TOOLS, model="m", max_tools=2)),
                await w.get_query(w.tc.query_key("read it", TOOLS)))

    report, hit, other_config = run_tools(front, make_tools, make_async_tools, body)
    assert report == PrewarmReport(completed=1)
    assert hit is not None
    assert (hit.value, hit.tools, hit.ttl, hit.metadata, hit.timestamp) == (["read"], ["read"], 3600.0, {}, clock())
    assert other_config is None  # another selector configuration: another key


@pytest.mark.parametrize("front", FRONTS)
def test_the_tool_selection_warmer_skips_tools_of_another_registry(
        front: str, make_tools: Callable[[], ToolSelectionCache],
        make_async_tools: Callable[[], AsyncToolSelectionCache]) -> None:
    """After a deploy changed the registry, tools selected under the old one are never prewarmed for the new
    one (by default the fleet's registered one); a prewarm naming the old registry prewarms its keys."""
    async def body(w: Tools) -> tuple[PrewarmReport, PrewarmReport, Any, Any]:
        old = w.wrap()
        for session in ("s1", "s2"):
            await old("plan", OLD_TOOLS, session=session)
            await old("read the file" if session == "s1" else "search it", OLD_TOOLS, session=session)
        await w.call(w.warmer.record_query("plan", None, session="s3"))
        await w.call(w.warmer.record_query("unsaid", ["write"], session="s3"))  # no registry hash recorded
        await w.call(w.tc.invalidate_on_tools_change(TOOLS))  # the deploy: the fleet's registry is TOOLS now
        p = await w.predict("plan")
        for_fleet = await w.prewarm(p, key_config={"selector": "sel"})
        for_old = await w.prewarm(p, key_config={"selector": "sel"}, tools_hash=OLD)
        return (for_fleet, for_old, await w.get_query(query_key("read the file", TOOLS, selector="sel")),
                await w.get_query(query_key("read the file", OLD_TOOLS, selector="sel")))

    for_fleet, for_old, new_key, old_key = run_tools(front, make_tools, make_async_tools, body)
    assert for_fleet == PrewarmReport(other_registry=3)
    assert for_old == PrewarmReport(completed=2, other_registry=1)
    assert new_key is None
    assert old_key is not None
    assert old_key.value == ["read"]


@pytest.mark.parametrize("front", FRONTS)
def test_a_selection_that_is_not_its_tool_list_is_prewarmed_only_by_a_selection_function(
        front: str, make_tools: Callable[[], ToolSelectionCache],
        make_async_tools: Callable[[], AsyncToolSelectionCache]) -> None:
    """A selector returning a dict is recorded with its tool names but no registry hash: the names alone
    are not what it returns, so no prewarm stores them; a selection function stores its result as a
    selection record, which the predicted request is served."""
    def select_dict(query: str, tools: Any = None, **config: Any) -> dict[str, Any]:
        return {"tools": select_by_name(query, tools), "why": f"asked {query}"}

    async def body(w: Tools) -> dict[str, Any]:
        select = w.wrap(select_dict)
        await select("plan", TOOLS, session="s")
        await select("read it", TOOLS, session="s")
        p = await w.predict("plan")
        await w.invalidate_queries()
        without = await w.prewarm(p, key_config={"selector": "sel"})
        w.selector_calls.clear()

        def recompute(query: str) -> dict[str, Any]:
            return select_dict(query, TOOLS)

        with_fn = await w.prewarm(p, recompute, key_config={"selector": "sel"})
        stored = await w.get_query(query_key("read it", TOOLS, selector="sel"))
        answer = await select("read it", TOOLS, session="t")
        return {"p": p, "without": without, "with_fn": with_fn, "stored": stored, "answer": answer,
                "calls": list(w.selector_calls)}

    r = run_tools(front, make_tools, make_async_tools, body)
    assert (r["p"].tools, r["p"].tools_hashes) == ([["read"]], [None])
    assert r["without"] == PrewarmReport(other_registry=1)
    assert r["with_fn"] == PrewarmReport(completed=1)
    assert (r["stored"].value, r["stored"].tools) == ({"tools": ["read"], "why": "asked read it"}, ["read"])
    assert r["stored"].selection_latency_ms >= 0.0
    assert r["answer"] == {"tools": ["read"], "why": "asked read it"}
    assert r["calls"] == []


def test_without_any_registry_the_keys_are_those_of_requests_without_tools(
        make_tools: Callable[[], ToolSelectionCache]) -> None:
    """A fleet that registered no tool set: the prewarm's registry is "none", tools_hash(None), the hash of
    selections made without tools."""
    tc = make_tools()
    warmer = PredictiveCacheWarmer(tc, **TRANSITIONS)
    select = cached_selection(lambda query, tools=None, **config: ["answer"], cache=tc, warmer=warmer, name="sel")
    select("plan", session="s")
    select("next step", session="s")
    p = warmer.predict_next_queries("plan", remember=False)
    assert p.tools_hashes == [tools_hash(None)]
    tc.invalidate(namespace="query")
    assert warmer.prewarm(p, key_config={"selector": "sel"}) == PrewarmReport(completed=1)
    hit = tc.get_query(query_key_of_hash("next step", "none", selector="sel"))
    assert hit is not None
    assert hit.value == ["answer"]


def test_warmers_name_the_caches_they_accept(make_tools: Callable[[], ToolSelectionCache],
                                             make_async_tools: Callable[[], AsyncToolSelectionCache],
                                             make_cache: Make, make_async_cache: MakeAsync) -> None:
    tc = make_tools()
    plain = PredictiveCacheWarmer(tc.cache("query"), **TRANSITIONS)
    over_tools = PredictiveCacheWarmer(tc, **TRANSITIONS)
    assert (plain.tool_selection, over_tools.tool_selection) == (None, tc)
    plain.record_query("plan", ["planner"], session="s")
    plain.record_query("read", ["read"], session="s")
    assert over_tools.predict_next_queries("plan", remember=False).queries == ["read"]  # one model, the query cache's

    async def wrong_async() -> None:
        async with make_async_tools() as atc:
            with pytest.raises(ConfigurationError, match="MultiLevelCache or a ToolSelectionCache, not "
                                                         "AsyncToolSelectionCache"):
                PredictiveCacheWarmer(atc)  # type: ignore[arg-type]
            assert AsyncPredictiveCacheWarmer(atc).tool_selection is atc
            with pytest.raises(ConfigurationError, match="AsyncMultiLevelCache or an AsyncToolSelectionCache, not "
                                                         "ToolSelectionCache"):
                AsyncPredictiveCacheWarmer(tc)  # type: ignore[arg-type]

    asyncio.run(wrong_async())
    with pytest.raises(ConfigurationError, match="MultiLevelCache or a ToolSelectionCache, not dict"):
        PredictiveCacheWarmer({})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not MultiLevelCache"):
        AsyncPredictiveCacheWarmer(make_cache(**TIERS))  # type: ignore[arg-type]
