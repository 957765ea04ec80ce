"""Fleet-wide predictive prewarming (docs/prediction.md#prewarming-once-per-fleet), against a real Redis.

``prewarm_predictions`` computes each predicted query at or above the threshold with ``selection_fn``
and stores it under ``key_fn(query)``, the key a real request uses, once per fleet:

* the entry is written to Redis only (not the prewarming process's L1), marked ``w`` until its first
  Redis hit, which counts ``prewarm_useful`` in the shard's stats and ``prewarming.useful`` fleet-wide
  once the reader's bookkeeping reports it (touch.lua; the tests send it with ``flush_bookkeeping()``);
* outcomes: ``completed``, ``cached`` (already there), ``busy`` (another worker holds the fill lease),
  ``refused`` (written or deleted meanwhile: the other write stays), ``failed`` (raised or timed out:
  counted, never raised, nothing written, lease given back), ``below_threshold`` (never computed);
* at most ``prewarm_concurrency`` selection calls run at once;
* the counters add up per process and fleet-wide (and clear_patterns keeps them all);
* an entry past its absolute or idle ttls, not yet swept, is prewarmed again, and a request refills a
  prewarmed entry that expired (regressions: these failed at commit 672370a).

Every single-process test runs on both front ends (sync warmer: its ``prewarm_predictions`` is a
coroutine driven here with ``asyncio.run``; async warmer with an ``AsyncMultiLevelCache``) and with
sync and async selection functions. Concurrency is made deterministic with events and barriers,
never sleeps; the only real wait is the one ``prewarm_timeout`` test (0.2 s). The warmers run with
``background=False`` (each record and prediction a round trip: what the model holds is what the test
set up); prewarming from the background rounds is tested in tests/test_model_background.py.

The two acceptance tests run several spawned OS processes against one Redis, as
test_multiprocess.py does: four processes prewarming one prediction at the same moment compute each
entry once; four processes each recording a quarter of a Markov-chain workload predict as well as
one process that saw all of it, and much better than one that saw only a quarter.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import random
import threading
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import pytest

from victor_rcache import AsyncMultiLevelCache, MultiLevelCache, Prediction, PrewarmReport
from victor_rcache import AsyncPredictiveCacheWarmer as AsyncBackgroundWarmer
from victor_rcache import PredictiveCacheWarmer as BackgroundWarmer
from victor_rcache.keys import KeySpace
from victor_rcache.tiers import TierCore

from .helpers import Backend, Client, FakeClock, guard_slots
from .test_multiprocess import run_processes

PredictiveCacheWarmer = partial(BackgroundWarmer, background=False)
AsyncPredictiveCacheWarmer = partial(AsyncBackgroundWarmer, background=False)
TIERS: dict[str, Any] = {"shards": 4, "l1_size": 64, "l2_size": 256, "l3_size": 256}
FRONTS = ("sync", "async")
KINDS = ("sync", "async")
WAIT = 10.0  # seconds any event or barrier wait may last before the test fails (never reached when correct)
FIXED_TIME = 1_700_000_000.0  # the warmers' wall clock in the learning test: one hour-of-day bucket throughout

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]
Selection = Callable[[Any], Any]


# ----------------------------------------------------------------------------- single-process helpers


class Worker:
    """One worker of the fleet: a cache and its warmer (sync or async) behind awaitable methods."""

    def __init__(self, front: str, cache: MultiLevelCache | AsyncMultiLevelCache,
                 warmer: PredictiveCacheWarmer | AsyncPredictiveCacheWarmer) -> None:
        self.front = front
        self.cache = cache
        self.warmer = warmer

    @property
    def tiers(self) -> TierCore:
        return self.cache._core

    async def _call(self, result: Any) -> Any:
        return await result if self.front == "async" else result

    async def prewarm(self, prediction: Prediction, selection: Selection, **kwargs: Any) -> PrewarmReport:
        return await self.warmer.prewarm_predictions(prediction, selection, **kwargs)

    async def record(self, query: str, session: str) -> None:
        await self._call(self.warmer.record_query(query, ["tool"], session=session))

    async def predict(self, current: str, **kwargs: Any) -> Prediction:
        result: Prediction = await self._call(self.warmer.predict_next_queries(current, **kwargs))
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(self.warmer.get_statistics())
        return result

    async def get(self, key: str, default: Any = None) -> Any:
        return await self._call(self.cache.get(key, default))

    async def put(self, key: str, value: Any, ttl: float | None = None) -> None:
        await self._call(self.cache.put(key, value, ttl))

    async def metrics(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(self.cache.get_metrics())
        return result

    async def flush_bookkeeping(self) -> None:
        """Send this worker's buffered bookkeeping now: a reported hit of a prewarmed entry is what counts
        it useful (touch.lua), so the fleet counters include this worker's reads only after this."""
        await self._call(self.cache.flush_bookkeeping())


def run_workers(front: str, make_cache: Make, make_async_cache: MakeAsync,
                body: Callable[..., Awaitable[Any]], workers: int = 1,
                cache_settings: dict[str, Any] | None = None, **warmer_settings: Any) -> Any:
    """Run ``body(*workers)`` in a fresh event loop with ``workers`` caches of the test's namespace."""
    settings = {**TIERS, **(cache_settings or {})}

    async def main() -> Any:
        if front == "sync":
            caches = [make_cache(**settings) for _ in range(workers)]  # closed by the fixture
            return await body(*(Worker(front, c, PredictiveCacheWarmer(c, **warmer_settings)) for c in caches))
        async_caches = [make_async_cache(**settings) for _ in range(workers)]
        try:
            return await body(*(Worker(front, c, AsyncPredictiveCacheWarmer(c, **warmer_settings))
                                for c in async_caches))
        finally:
            for c in async_caches:
                await c.close()

    return asyncio.run(main())


def selection(kind: str, fn: Selection) -> Selection:
    """``fn`` itself (a plain function), or a coroutine function that yields once, then does ``fn``."""
    if kind == "sync":
        return fn

    async def selection_async(query: Any) -> Any:
        await asyncio.sleep(0)
        return fn(query)

    return selection_async


def predicted(*queries: str, confidence: float = 0.9) -> Prediction:
    """A prediction as predict_next_queries returns it (the model itself is test_prediction.py's)."""
    return Prediction("now", queries=list(queries), confidences=[confidence] * len(queries),
                      tools=[[] for _ in queries], parts=[(confidence, confidence, confidence) for _ in queries])


class Calls:
    """A thread-safe record of the queries a selection function was called with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queries: list[Any] = []

    def add(self, query: Any) -> None:
        with self._lock:
            self.queries.append(query)

    def value(self, query: Any) -> dict[str, Any]:
        self.add(query)
        return {"computed": query}


@pytest.fixture
def space(namespace: str) -> KeySpace:
    return KeySpace(namespace, TIERS["shards"])


def entry(raw: Client, space: KeySpace, key: str) -> dict[bytes, bytes]:
    """The entry's hash as Redis holds it ({} when there is none)."""
    data: dict[bytes, bytes] = raw.hgetall(space.entry_key(space.ref(key)))
    return data


def lease_held(raw: Client, space: KeySpace, key: str) -> bool:
    return bool(raw.exists(space.lease_key(space.ref(key))))


def shard_stat(raw: Client, space: KeySpace, key: str, name: str) -> int:
    """A counter of the stats hash of the shard ``key`` lives in."""
    return int(raw.hget(space.shard_keys[space.ref(key).shard].stats, name) or 0)


def hits(metrics: dict[str, Any]) -> tuple[int, int, int]:
    return metrics["l1"]["hits"], metrics["l2"]["hits"], metrics["l3"]["hits"]


front_and_kind = pytest.mark.parametrize(("front", "kind"), [(f, k) for f in FRONTS for k in KINDS])


# ----------------------------------------------------------------------- 1. what a prewarm stores


@front_and_kind
def test_prewarmed_entries_serve_the_fleet_and_count_useful_once(front: str, kind: str, make_cache: Make,
                                                                 make_async_cache: MakeAsync, raw: Client,
                                                                 space: KeySpace) -> None:
    """Train, predict, prewarm: each query above the threshold computed once and stored under the query
    itself; not in the prewarming process's L1; its first Redis hit, by whichever worker, counts useful."""
    calls = Calls()
    follow_ups = ["read file"] * 5 + ["search code"] * 4 + ["rare step"]

    async def body(a: Worker, b: Worker) -> dict[str, Any]:
        for i, nxt in enumerate(follow_ups):  # sessions: "open file", then one of the follow-ups
            await a.record("open file", f"s{i}")
            await a.record(nxt, f"s{i}")
        p = await b.predict("open file", top_k=5, min_confidence=0.0)  # any worker predicts the same
        report = await a.prewarm(p, selection(kind, calls.value))  # default threshold: 0.2
        out: dict[str, Any] = {"p": p, "report": report, "stats_after_prewarm": await a.stats()}
        out["marked"] = {q: entry(raw, space, q).get(b"w") for q in ("read file", "search code")}
        out["in_own_l1"] = [a.tiers.l1.peek(space.ref(q).id) is not None for q in ("read file", "search code")]
        # Another worker: an L2 hit, the first one, so it counts.
        out["b_first"] = await b.get("read file")
        out["b_first_hits"] = hits(await b.metrics())
        await b.flush_bookkeeping()  # b reports the hit: the fleet counts it
        out["useful_after_b"] = (await a.stats())["prewarming"]["useful"]
        out["shard_useful"] = shard_stat(raw, space, "read file", "prewarm_useful")
        out["mark_after_hit"] = entry(raw, space, "read file").get(b"w")
        # A second hit (b again, then the prewarming process itself) does not count again.
        await b.get("read file")
        out["a_read"] = await a.get("read file")
        for worker in (a, b):
            await worker.flush_bookkeeping()
        out["useful_after_more"] = (await a.stats())["prewarming"]["useful"]
        # The prewarming process's own first read of an entry reaches Redis, and counts.
        out["a_search"] = await a.get("search code")
        out["a_hits"] = hits(await a.metrics())
        await a.flush_bookkeeping()
        out["final"] = (await b.stats())["prewarming"]
        return out

    r = run_workers(front, make_cache, make_async_cache, body, workers=2)
    p: Prediction = r["p"]
    assert p.queries[:3] == ["read file", "search code", "rare step"], p
    wanted = [q for q, c in zip(p.queries, p.confidences, strict=True) if c >= 0.2]
    assert wanted == ["read file", "search code"], p
    assert sorted(calls.queries) == sorted(wanted)  # each computed once, nothing below the threshold
    assert r["report"] == PrewarmReport(completed=2, below_threshold=len(p) - 2)
    assert r["stats_after_prewarm"]["prewarming"]["completed"] == 2
    assert r["stats_after_prewarm"]["prewarming"]["useful"] == 0
    assert r["marked"] == {"read file": b"1", "search code": b"1"}
    assert r["in_own_l1"] == [False, False]
    assert r["b_first"] == {"computed": "read file"}
    assert r["b_first_hits"] == (0, 1, 0)
    assert r["useful_after_b"] == 1
    assert r["shard_useful"] == 1
    assert r["mark_after_hit"] is None
    assert r["a_read"] == {"computed": "read file"}
    assert r["useful_after_more"] == 1
    assert r["a_search"] == {"computed": "search code"}
    assert r["a_hits"] == (0, 2, 0)  # both of a's reads reached Redis: prewarming filled no L1
    assert r["final"]["completed"] == 2
    assert r["final"]["useful"] == 2
    for name in ("prewarmed", "prewarm_useful"):  # the shards' stats hashes, where the fleet numbers come from
        assert sum(int(raw.hget(sk.stats, name) or 0) for sk in space.shard_keys) == 2, name
    assert not entry(raw, space, "rare step")


def test_key_fn_names_the_key_a_real_request_uses(make_cache: Make, raw: Client, space: KeySpace) -> None:
    """With key_fn the value is stored under key_fn(query), not the query; a request's get_or_set on
    that key is served by the prewarmed value (its loader never runs) and counts it useful."""
    cache, other = make_cache(**TIERS), make_cache(**TIERS)
    warmer = PredictiveCacheWarmer(cache, key_fn=lambda q: f"answer:{q}")
    report = asyncio.run(warmer.prewarm_predictions(predicted("list tools"), lambda q: f"tools for {q}"))
    assert report.completed == 1
    assert entry(raw, space, "answer:list tools")[b"w"] == b"1"
    assert not entry(raw, space, "list tools")
    loads: list[str] = []
    got = other.get_or_set("answer:list tools", lambda: loads.append("ran") or "computed by the request")
    assert got == "tools for list tools"
    assert loads == []
    other.flush_bookkeeping()  # the request's process reports its hit: that counts the prewarm useful
    assert warmer.get_statistics()["prewarming"]["useful"] == 1


def test_prewarm_ttl_bounds_the_prewarmed_entry(make_cache: Make, raw: Client, space: KeySpace,
                                                clock: FakeClock) -> None:
    """prewarm_ttl (or the ttl argument) is the prewarmed entry's absolute time to live."""
    cache = make_cache(**TIERS, clock=clock)
    warmer = PredictiveCacheWarmer(cache, prewarm_ttl=60.0)
    asyncio.run(warmer.prewarm_predictions(predicted("a"), str))
    asyncio.run(warmer.prewarm_predictions(predicted("b"), str, ttl=5.0))
    assert int(entry(raw, space, "a")[b"x"]) == clock.ms + 60_000
    assert int(entry(raw, space, "b")[b"x"]) == clock.ms + 5_000
    clock.advance(6)
    assert cache.get("b") is None
    assert cache.get("a") == "a"


# --------------------------------------------------------------------------------- 2. outcomes


@front_and_kind
def test_an_entry_already_cached_is_not_computed_again(front: str, kind: str, make_cache: Make,
                                                       make_async_cache: MakeAsync, raw: Client,
                                                       space: KeySpace) -> None:
    other = make_cache(**TIERS)
    other.put("theirs", "put by another worker")
    calls = Calls()

    async def body(a: Worker) -> tuple[PrewarmReport, dict[str, Any], Any, Any]:
        await a.put("mine", "put by this worker")  # in this process's L1 as well
        report = await a.prewarm(predicted("theirs", "mine", "new"), selection(kind, calls.value))
        return report, (await a.stats())["prewarming"], await a.get("theirs"), await a.get("mine")

    report, stats, theirs, mine = run_workers(front, make_cache, make_async_cache, body)
    assert report == PrewarmReport(completed=1, cached=2)
    assert report.skipped == 2
    assert calls.queries == ["new"]
    assert (theirs, mine) == ("put by another worker", "put by this worker")
    assert b"w" not in entry(raw, space, "theirs")
    assert not any(lease_held(raw, space, k) for k in ("theirs", "mine", "new"))
    assert (stats["completed"], stats["skipped"]) == (1, 2)
    assert stats["process"] == {"completed": 1, "cached": 2, "busy": 0, "refused": 0, "failed": 0, "no_tools": 0,
                                "other_registry": 0, "over_budget": 0}


@front_and_kind
def test_a_query_another_worker_is_computing_is_busy(front: str, kind: str, make_cache: Make,
                                                     make_async_cache: MakeAsync, raw: Client,
                                                     space: KeySpace) -> None:
    lease = space.lease_key(space.ref("slow query"))
    raw.set(lease, b"another-workers-token", px=30_000)  # as another worker's get_or_set or prewarm holds it
    calls = Calls()

    async def body(a: Worker) -> tuple[PrewarmReport, dict[str, Any]]:
        return await a.prewarm(predicted("slow query"), selection(kind, calls.value)), (await a.stats())["prewarming"]

    report, stats = run_workers(front, make_cache, make_async_cache, body)
    assert report == PrewarmReport(busy=1)
    assert calls.queries == []
    assert raw.get(lease) == b"another-workers-token"  # not taken over, not released
    assert not entry(raw, space, "slow query")
    assert stats["skipped"] == 1
    assert stats["process"]["busy"] == 1


@front_and_kind
def test_a_write_or_delete_while_selecting_wins_and_the_fill_is_refused(front: str, kind: str, make_cache: Make,
                                                                        make_async_cache: MakeAsync, raw: Client,
                                                                        space: KeySpace) -> None:
    other = make_cache(**TIERS)
    calls = Calls()

    def select(query: str) -> str:
        calls.add(query)
        if query == "written":
            other.put(query, "from a request")  # a real request stored a fresher value meanwhile
        else:
            other.delete(query)  # the source of truth changed meanwhile: cache-aside deletes the key
        return "from prewarming"

    async def body(a: Worker) -> tuple[PrewarmReport, dict[str, Any], Any, Any]:
        report = await a.prewarm(predicted("written", "deleted"), selection(kind, select))
        return report, (await a.stats())["prewarming"], await a.get("written"), await a.get("deleted", "absent")

    report, stats, written, deleted = run_workers(front, make_cache, make_async_cache, body)
    assert report == PrewarmReport(refused=2)
    assert sorted(calls.queries) == ["deleted", "written"]
    assert (written, deleted) == ("from a request", "absent")
    assert other.get("written") == "from a request"
    assert b"w" not in entry(raw, space, "written")
    assert not entry(raw, space, "deleted")
    assert not lease_held(raw, space, "written")
    assert not lease_held(raw, space, "deleted")
    assert (stats["completed"], stats["skipped"], stats["process"]["refused"]) == (0, 2, 2)


@front_and_kind
def test_a_failing_selection_is_counted_not_raised(front: str, kind: str, make_cache: Make,
                                                   make_async_cache: MakeAsync, raw: Client, space: KeySpace) -> None:
    calls = Calls()

    def select(query: str) -> dict[str, Any]:
        if query == "bad":
            calls.add(query)
            raise RuntimeError("the tool selection broke")
        return calls.value(query)

    async def body(a: Worker) -> tuple[PrewarmReport, dict[str, Any], bool, PrewarmReport]:
        report = await a.prewarm(predicted("bad", "good"), selection(kind, select))
        stats = (await a.stats())["prewarming"]
        leased = lease_held(raw, space, "bad")
        # The lease was given back: the next prediction of it is computed at once, not "busy".
        again = await a.prewarm(predicted("bad"), selection(kind, calls.value))
        return report, stats, leased, again

    report, stats, leased, again = run_workers(front, make_cache, make_async_cache, body)
    assert report == PrewarmReport(completed=1, failed=1)
    assert sorted(calls.queries) == ["bad", "bad", "good"]
    assert not leased
    assert (stats["failed"], stats["completed"], stats["process"]["failed"]) == (1, 1, 1)
    assert again == PrewarmReport(completed=1)
    assert entry(raw, space, "bad")[b"w"] == b"1"


@front_and_kind
def test_a_selection_slower_than_prewarm_timeout_fails(front: str, kind: str, make_cache: Make,
                                                       make_async_cache: MakeAsync, raw: Client,
                                                       space: KeySpace) -> None:
    """The prewarm gives up after prewarm_timeout (failed, lease released, nothing written); a plain
    function is abandoned (its late result is dropped), a coroutine is cancelled."""
    started, release, finished, cancelled = (threading.Event() for _ in range(4))

    def slow(query: str) -> str:
        started.set()
        release.wait(WAIT)
        finished.set()
        return "too late"

    async def slow_async(query: str) -> str:
        started.set()
        try:
            await asyncio.Event().wait()  # never set: only the timeout ends this
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    async def body(a: Worker) -> tuple[PrewarmReport, dict[str, Any]]:
        report = await a.prewarm(predicted("slow"), slow if kind == "sync" else slow_async)
        return report, (await a.stats())["prewarming"]

    try:
        report, stats = run_workers(front, make_cache, make_async_cache, body, prewarm_timeout=0.2)
        assert started.is_set()
        assert report == PrewarmReport(failed=1)
        assert (stats["failed"], stats["process"]["failed"]) == (1, 1)
        assert not lease_held(raw, space, "slow")
        assert not entry(raw, space, "slow")
        if kind == "async":
            assert cancelled.is_set()
    finally:
        release.set()
    if kind == "sync":
        assert finished.wait(WAIT)
        assert not entry(raw, space, "slow")  # the abandoned call's result went nowhere


@front_and_kind
def test_predictions_below_the_threshold_are_not_computed(front: str, kind: str, make_cache: Make,
                                                          make_async_cache: MakeAsync, raw: Client,
                                                          space: KeySpace) -> None:
    calls = Calls()
    p = Prediction("now", queries=["a", "b", "c", "d", "e"], confidences=[0.9, 0.5, 0.2, 0.19, 0.0])

    async def body(a: Worker) -> list[PrewarmReport]:
        select = selection(kind, calls.value)
        reports = [await a.prewarm(p, select)]  # prewarm_min_confidence: 0.2 by default, inclusive
        reports.append(await a.prewarm(p, select, min_confidence=0.0))
        reports.append(await a.prewarm(p, select, min_confidence=1.0))
        return reports

    default, everything, nothing = run_workers(front, make_cache, make_async_cache, body)
    assert default == PrewarmReport(completed=3, below_threshold=2)
    assert everything == PrewarmReport(completed=2, cached=3)
    assert nothing == PrewarmReport(below_threshold=5)
    assert sorted(calls.queries) == ["a", "b", "c", "d", "e"]

    # The configured threshold applies when the call names none.
    calls.queries.clear()
    p2 = Prediction("now", queries=["f", "g"], confidences=[0.8, 0.6])

    async def configured(a: Worker) -> PrewarmReport:
        return await a.prewarm(p2, selection(kind, calls.value))

    report = run_workers(front, make_cache, make_async_cache, configured, prewarm_min_confidence=0.7)
    assert report == PrewarmReport(completed=1, below_threshold=1)
    assert calls.queries == ["f"]
    assert not entry(raw, space, "g")


def test_a_request_waiting_for_a_prewarm_gets_its_value(make_cache: Make, raw: Client, space: KeySpace) -> None:
    """A get_or_set that misses while a prewarm holds the fill lease waits for it and gets the
    prewarmed value: its own loader never runs, and its read counts the prewarm useful."""
    cache, other = make_cache(**TIERS), make_cache(**TIERS)
    warmer = PredictiveCacheWarmer(cache)
    lease = space.lease_key(space.ref("q"))
    waiting = threading.Event()
    send = other._send

    def spying(batch: list[Any]) -> Any:  # the request has asked for the lease (and not got it)
        replies = send(batch)
        if any(c[0] == "PTTL" and c[1] == lease for c in batch):
            waiting.set()
        return replies

    other._send = spying  # type: ignore[method-assign]
    got: list[Any] = []
    loads: list[str] = []
    request = threading.Thread(target=lambda: got.append(
        other.get_or_set("q", lambda: loads.append("ran") or "computed by the request")))

    def select(query: str) -> str:
        request.start()
        assert waiting.wait(WAIT)
        return "prewarmed"

    report = asyncio.run(warmer.prewarm_predictions(predicted("q"), select))
    request.join(WAIT)
    assert not request.is_alive()
    assert report == PrewarmReport(completed=1)
    assert got == ["prewarmed"]
    assert loads == []
    assert other.get_metrics()["stampede"]["lease_waits"] == 1
    other.flush_bookkeeping()  # the request's process reports its hit of the prewarmed entry
    assert warmer.get_statistics()["prewarming"]["useful"] == 1


# ----------------------------------------------------------------------- 3. bounded concurrency


@front_and_kind
def test_at_most_prewarm_concurrency_selections_run_at_once(front: str, kind: str, make_cache: Make,
                                                            make_async_cache: MakeAsync) -> None:
    """Six predicted queries, prewarm_concurrency=2. The selection calls meet in pairs at a two-party
    barrier: two do run at once (or the barrier breaks and they fail), and a third never joins them.
    Every key is made (key_fn) before the first selection runs: the six leases are asked for in one
    round trip, before anything is computed."""
    lock = threading.Lock()
    running, most_running = [0], [0]
    admitted, finished, admitted_at_first_run = [0], [0], [-1]
    pair = threading.Barrier(2, timeout=WAIT)

    def admit(query: str | bytes) -> str | bytes:
        with lock:
            admitted[0] += 1
        return query

    def enter() -> None:
        with lock:
            if admitted_at_first_run[0] < 0:
                admitted_at_first_run[0] = admitted[0]
            running[0] += 1
            most_running[0] = max(most_running[0], running[0])

    def leave() -> None:
        with lock:
            running[0] -= 1
            finished[0] += 1

    def select(query: str) -> str:
        enter()
        try:
            pair.wait()
            return query
        finally:
            leave()

    async def select_async(query: str) -> str:
        enter()
        try:
            await asyncio.to_thread(pair.wait)
            return query
        finally:
            leave()

    queries = [f"q{i}" for i in range(6)]

    async def body(a: Worker) -> PrewarmReport:
        return await a.prewarm(predicted(*queries), select if kind == "sync" else select_async)

    report = run_workers(front, make_cache, make_async_cache, body, prewarm_concurrency=2, key_fn=admit)
    assert report == PrewarmReport(completed=6)
    assert (most_running[0], running[0]) == (2, 0)
    assert (admitted_at_first_run[0], admitted[0], finished[0]) == (6, 6, 6)


# ------------------------------------------------------------------------------ 4. fleet counters


@pytest.mark.parametrize("front", FRONTS)
def test_prewarm_counters_per_process_and_fleet_wide(front: str, make_cache: Make, make_async_cache: MakeAsync,
                                                     raw: Client, space: KeySpace) -> None:
    other = make_cache(**TIERS)
    other.put("q-cached", "already there")
    raw.set(space.lease_key(space.ref("q-busy")), b"another-workers-token", px=30_000)

    def select(query: str) -> str:
        if query == "q-bad":
            raise ValueError("no tools for that")
        if query == "q-refused":
            other.put(query, "from a request")
        return f"tools for {query}"

    async def body(a: Worker, b: Worker, c: Worker) -> dict[str, Any]:
        ra = await a.prewarm(predicted("q1", "q2", "q-cached", "q-bad"), select)
        rb = await b.prewarm(predicted("q1", "q2", "q-busy", "q-refused"), select)
        await c.get("q1")  # a useful prewarm; q2 is never asked for
        await c.get("q1")
        await c.flush_bookkeeping()  # c reports its hits: the first one counts the prewarm useful
        return {"a": (ra, await a.stats()), "b": (rb, await b.stats()), "c": await c.stats()}

    r = run_workers(front, make_cache, make_async_cache, body, workers=3)
    (ra, sa), (rb, sb), sc = r["a"], r["b"], r["c"]
    assert ra == PrewarmReport(completed=2, cached=1, failed=1)
    assert rb == PrewarmReport(cached=2, busy=1, refused=1)
    assert (ra.skipped, rb.skipped) == (1, 4)
    fleet = {"completed": 2, "useful": 1, "skipped": 5, "failed": 1}
    for stats in (sa, sb, sc):
        assert {k: stats["prewarming"][k] for k in fleet} == fleet
    none = dict.fromkeys(("completed", "cached", "busy", "refused", "failed", "no_tools", "other_registry",
                          "over_budget"), 0)
    assert sa["prewarming"]["process"] == {**none, "completed": 2, "cached": 1, "failed": 1}
    assert sb["prewarming"]["process"] == {**none, "cached": 2, "busy": 1, "refused": 1}
    assert sc["prewarming"]["process"] == none
    assert sc["available"] is True


def test_clear_patterns_keeps_every_prewarm_counter(make_cache: Make) -> None:
    """clear_patterns forgets what was learned, not the fleet's history: the prewarming counters all
    stay. (They live in two places, the shards' stats and the model's: none may be reset alone.)"""
    cache = make_cache(**TIERS)
    warmer = PredictiveCacheWarmer(cache)
    cache.put("cached", 1)

    def select(query: str) -> str:
        if query == "bad":
            raise RuntimeError("broken")
        return query

    asyncio.run(warmer.prewarm_predictions(predicted("good", "bad", "cached"), select))
    cache.get("good")
    cache.flush_bookkeeping()  # the hit of the prewarmed entry is reported: it counts useful
    keys = ("completed", "useful", "skipped", "failed")
    before = {k: warmer.get_statistics()["prewarming"][k] for k in keys}
    assert before == {"completed": 1, "useful": 1, "skipped": 1, "failed": 1}
    warmer.clear_patterns()
    after = {k: warmer.get_statistics()["prewarming"][k] for k in keys}
    assert after == before


def test_an_expired_entry_is_prewarmed_again(make_cache: Make, clock: FakeClock) -> None:
    """An entry past its absolute ttl that no call has swept yet is not "cached": the predicted query is
    computed, and the request it was predicted for gets it. (Both the skip decision and the fill's
    refusal check must see the expiry: the sweep of the expired entry is no write that fences the fill.)"""
    cache, other = make_cache(**TIERS, clock=clock), make_cache(**TIERS, clock=clock)
    warmer = PredictiveCacheWarmer(cache)
    other.put("q", "old value", ttl=1.0)
    clock.advance(5)  # q has expired; no call on its shard has swept it yet
    calls = Calls()
    report = asyncio.run(warmer.prewarm_predictions(predicted("q"), calls.value))
    assert other.get("q") == {"computed": "q"}, f"the predicted request missed after {report}"
    assert report == PrewarmReport(completed=1)


def test_an_entry_idle_past_its_tiers_ttls_is_prewarmed_again(make_cache: Make, clock: FakeClock) -> None:
    """Likewise an entry idle past l2_ttl + l3_ttl, gone for every reader though not swept yet."""
    settings = {**TIERS, "clock": clock, "l1_ttl": 1.0, "l2_ttl": 10.0, "l3_ttl": 10.0}
    cache, other = make_cache(**settings), make_cache(**settings)
    warmer = PredictiveCacheWarmer(cache)
    other.put("q", "old value")
    clock.advance(25)  # idle past l2_ttl + l3_ttl: gone for every reader; no call on its shard has swept it yet
    calls = Calls()
    report = asyncio.run(warmer.prewarm_predictions(predicted("q"), calls.value))
    assert other.get("q") == {"computed": "q"}, f"the predicted request missed after {report}"
    assert report == PrewarmReport(completed=1)


def test_a_request_refills_a_prewarmed_entry_after_its_ttl(make_cache: Make, clock: FakeClock) -> None:
    """A prewarmed entry with prewarm_ttl expires; the next request's get_or_set computes the value and
    stores it, so the request after that is a hit."""
    cache, other = make_cache(**TIERS, clock=clock), make_cache(**TIERS, clock=clock)
    warmer = PredictiveCacheWarmer(cache, prewarm_ttl=1.0)
    assert asyncio.run(warmer.prewarm_predictions(predicted("q"), str)) == PrewarmReport(completed=1)
    clock.advance(5)  # the prewarmed entry has expired; nothing has swept it yet
    assert other.get_or_set("q", lambda: "computed by the request") == "computed by the request"
    assert other.get_metrics()["stampede"]["fills_refused"] == 0
    assert cache.get("q") == "computed by the request"


# ------------------------------------------------------- 5. four processes prewarm each entry once

FLEET = 4
STEPS = [f"step-{i}" for i in range(6)]
_PREWARMER: dict[str, Any] = {}  # a prewarming worker process's shared state (set in that process)


def _arrive(query: str | bytes) -> str | bytes:
    """key_fn of the prewarming workers: the query itself, noting that this process is about to try it."""
    arrivals, cond = _PREWARMER["arrivals"], _PREWARMER["cond"]
    with cond:
        arrivals[STEPS.index(str(query))] += 1
        cond.notify_all()
    return query


def _select_once_per_fleet(query: str) -> dict[str, Any]:
    """Counts its call in Redis, then waits until every process has reached this query's prewarm."""
    _PREWARMER["client"].hincrby(_PREWARMER["counter"], query, 1)
    _PREWARMER["calls"].append(query)
    arrivals, cond, i = _PREWARMER["arrivals"], _PREWARMER["cond"], STEPS.index(query)
    with cond:
        if not cond.wait_for(lambda: arrivals[i] >= FLEET, timeout=WAIT):
            _PREWARMER["alone"].append(query)
    return {"query": query, "by": os.getpid()}


def prewarm_worker(backend: Backend, namespace: str, counter: str, arrivals: Any, cond: Any, start: Any,
                   done: Any, results: Any) -> None:
    out: dict[str, Any] = {"pid": os.getpid()}
    try:
        client = backend.client()
        _PREWARMER.update(arrivals=arrivals, cond=cond, client=client, counter=counter, calls=[], alone=[])
        cache = guard_slots(MultiLevelCache(backend.url, namespace=namespace, fail_open=False,
                                            cluster=backend.cluster, **TIERS))
        try:
            warmer = PredictiveCacheWarmer(cache, key_fn=_arrive, prewarm_concurrency=len(STEPS),
                                           prewarm_timeout=2 * WAIT)
            p = warmer.predict_next_queries("plan", top_k=len(STEPS), min_confidence=0.1)
            cache.get("warm-up")  # connected and ready, as a worker serving traffic is: the prewarms start together
            start.wait(WAIT)  # every process predicted: they prewarm at the same moment
            report = asyncio.run(warmer.prewarm_predictions(p, _select_once_per_fleet, min_confidence=0.1))
            done.wait(WAIT)  # every process's prewarm is over: each reads every prewarmed value
            out.update(queries=p.queries, report=asdict(report), calls=_PREWARMER["calls"],
                       alone=_PREWARMER["alone"], values={q: cache.get(q) for q in p.queries},
                       metrics=cache.get_metrics(), process=warmer.get_statistics()["prewarming"]["process"])
        finally:
            cache.close()
            client.close()
    except BaseException:  # the parent shows the traceback; the others must not wait for this one
        start.abort()
        done.abort()
        out["error"] = traceback.format_exc()
    results.put(out)


def test_four_processes_prewarming_one_prediction_compute_each_entry_once(backend: Backend, raw: Client,
                                                                          namespace: str, make_cache: Make) -> None:
    trainer = PredictiveCacheWarmer(make_cache(**TIERS))
    for i, step in enumerate(STEPS):  # "plan" is followed by each step once: six predictions above 0.1
        trainer.record_query("plan", ["planner"], session=f"train-{i}")
        trainer.record_query(step, ["tool"], session=f"train-{i}")
    counter = f"{namespace}-selection-calls"  # outside the namespace, a key of its own
    ctx = mp.get_context("spawn")
    arrivals, cond = ctx.Array("i", len(STEPS)), ctx.Condition()
    start, done = ctx.Barrier(FLEET), ctx.Barrier(FLEET)
    try:
        results = run_processes([(prewarm_worker, (backend, namespace, counter, arrivals, cond, start, done))
                                 for _ in range(FLEET)])
        calls = {k.decode(): int(v) for k, v in raw.hgetall(counter).items()}
    finally:
        raw.delete(counter)

    assert all(sorted(r["queries"]) == sorted(STEPS) for r in results), [r["queries"] for r in results]
    assert calls == dict.fromkeys(STEPS, 1)  # every predicted entry computed exactly once, fleet-wide
    assert sorted(q for r in results for q in r["calls"]) == sorted(STEPS)
    assert [q for r in results for q in r["alone"]] == []  # every selection overlapped all four prewarms
    reports = [r["report"] for r in results]
    assert sum(rep["completed"] for rep in reports) == len(STEPS)
    assert sum(rep["cached"] + rep["busy"] + rep["refused"] for rep in reports) == (FLEET - 1) * len(STEPS)
    assert sum(rep["failed"] + rep["below_threshold"] for rep in reports) == 0
    by_pid = {r["pid"]: set(r["calls"]) for r in results}
    for r in results:
        assert r["process"]["completed"] == r["report"]["completed"]
        for q in STEPS:  # every process reads every value, from Redis: none was in any L1
            value = r["values"][q]
            assert value is not None, (r["pid"], q)
            assert value["query"] == q, (r["pid"], q, value)
            assert q in by_pid[value["by"]], f"{q} was read as computed by {value['by']}, which did not compute it"
        assert hits(r["metrics"]) == (0, len(STEPS), 0)
    stats = trainer.get_statistics()["prewarming"]
    assert {k: stats[k] for k in ("completed", "useful", "skipped", "failed")} == {
        "completed": len(STEPS), "useful": len(STEPS), "skipped": (FLEET - 1) * len(STEPS), "failed": 0}
    print("reports:", reports)


# ---------------------------------------------------------------------- 6. the fleet learns together

STATES = 40
SESSION_LENGTH = 10
OBSERVATIONS = 400  # N: the fleet's four processes record N/4 each, about 2.5 per state


def fixed_clock() -> float:
    return FIXED_TIME


def markov_chain(seed: int) -> dict[int, tuple[list[int], list[float]]]:
    """Each state's 3 or 4 successors with skewed probabilities (0.5, 0.25, 0.15, 0.10, normalized)."""
    rng = random.Random(seed)
    chain = {}
    for s in range(STATES):
        k = rng.choice((3, 4))
        weights = [0.5, 0.25, 0.15, 0.10][:k]
        chain[s] = (rng.sample([t for t in range(STATES) if t != s], k), [w / sum(weights) for w in weights])
    return chain


def walk(chain: dict[int, tuple[list[int], list[float]]], rng: random.Random, length: int) -> list[str]:
    state = rng.randrange(STATES)
    out = [state]
    for _ in range(length - 1):
        successors, weights = chain[state]
        state = rng.choices(successors, weights)[0]
        out.append(state)
    return [f"state-{s}" for s in out]


def record_worker(backend: Backend, namespace: str, sessions: list[tuple[str, list[str]]], background: bool,
                  start: Any, results: Any) -> None:
    out: dict[str, Any] = {"pid": os.getpid()}
    try:
        cache = MultiLevelCache(backend.url, namespace=namespace, fail_open=False, cluster=backend.cluster, **TIERS)
        try:
            warmer = BackgroundWarmer(cache, clock=fixed_clock, background=background)
            start.wait(WAIT)  # the fleet's four processes record at the same time
            for session, queries in sessions:
                for q in queries:
                    warmer.record_query(q, ["tool"], session=session)
            out.update(namespace=namespace, records=warmer.get_statistics()["records"]["process"])
        finally:
            cache.close()
    except BaseException:
        start.abort()
        out["error"] = traceback.format_exc()
    results.put(out)


@pytest.mark.parametrize("background", [False, True], ids=["round-trips", "background"])
def test_four_processes_learn_together(backend: Backend, namespace: str, make_cache: Make, background: bool) -> None:
    """Four processes each recording N/4 observations (disjoint sessions) predict as well as one
    process that recorded all N, and clearly better than one that recorded only its N/4: with each
    record a round trip, and with records sent by the model thread (the default)."""
    chain = markov_chain(seed=1)
    rng = random.Random(101)
    per_process = OBSERVATIONS // FLEET // SESSION_LENGTH
    quarters = [[(f"p{p}-s{i}", walk(chain, rng, SESSION_LENGTH)) for i in range(per_process)]
                for p in range(FLEET)]
    fleet_ns, alone_ns, all_ns = f"{namespace}-fleet", f"{namespace}-alone", f"{namespace}-all"
    jobs: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
    start = mp.get_context("spawn").Barrier(FLEET + 2)
    jobs += [(record_worker, (backend, fleet_ns, quarter, background, start)) for quarter in quarters]
    jobs.append((record_worker, (backend, alone_ns, quarters[0], background, start)))
    jobs.append((record_worker, (backend, all_ns, [s for quarter in quarters for s in quarter], background, start)))
    results = run_processes(jobs)
    recorded = {ns: sum(r["records"] for r in results if r["namespace"] == ns) for ns in (fleet_ns, alone_ns, all_ns)}
    assert recorded == {fleet_ns: OBSERVATIONS, alone_ns: OBSERVATIONS // FLEET, all_ns: OBSERVATIONS}

    held_out = walk(chain, random.Random(999), 301)
    accuracy: dict[str, float] = {}
    for ns in (fleet_ns, alone_ns, all_ns):
        evaluator = PredictiveCacheWarmer(make_cache(namespace=ns, **TIERS), clock=fixed_clock)
        assert evaluator.get_statistics()["records"]["total"] == recorded[ns]  # the fleet-wide counter
        right = 0
        for current, actual in itertools.pairwise(held_out):
            p = evaluator.predict_next_queries(current, top_k=5, min_confidence=0.0, session=None)
            right += actual in p.queries
        accuracy[ns] = right / (len(held_out) - 1)
    fleet, alone, everything = accuracy[fleet_ns], accuracy[alone_ns], accuracy[all_ns]
    print(f"top-5 accuracy: fleet of {FLEET} x {OBSERVATIONS // FLEET} = {fleet:.3f}, "
          f"one process x {OBSERVATIONS} = {everything:.3f}, one process x {OBSERVATIONS // FLEET} = {alone:.3f}")
    assert fleet >= everything - 0.03
    assert fleet >= alone + 0.15
