"""The prediction model off the caller's path (docs/prediction.md#off-the-callers-path), against a real Redis.

With ``background=True`` (the default) a warmer's ``record_query`` queues the record and its
``predict_next_queries`` scores from the process's view of the model; the model thread sends the
records and reads the view's pattern sets in rounds (``victor_rcache/prediction/background.py``).
Checked here:

* a caller's record and prediction make no round trip; ``flush()`` (a round now) puts the records in
  Redis, and the records a process made are known to its next answers;
* a prediction from the view equals predict.lua's on the same model (the same formula, the same floats);
* a copy older than ``view_max_age`` is never used; one past half that age is read again by a round
  (a fake monotonic clock, no sleeping);
* the queue is bounded (records dropped and counted), close() sends what waits, Redis down never
  reaches a caller;
* verdicts are judged in the process and reach the fleet's counters;
* automatic prewarming (``prewarm=``): what is predicted and missing is computed once, after the round
  that recorded the query; an unchanged session state is not predicted again; the budget stops
  prewarms nobody reads; ``prewarm_predictions`` looks every query up in one round trip.

Several OS processes learning together in background mode: tests/test_prewarm.py (the fleet learns
together). The model's semantics with each call a round trip: tests/test_prediction.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from victor_rcache import (
    AsyncMultiLevelCache,
    AsyncPredictiveCacheWarmer,
    MultiLevelCache,
    Prediction,
    PredictiveCacheWarmer,
)
from victor_rcache.keys import KeySpace
from victor_rcache.local_redis import free_port
from victor_rcache.periodic import Periodic
from victor_rcache.prediction.background import MAX_RECORDS, RECORDS_WAKE
from victor_rcache.prediction.model import ModelKeys, PrewarmBudget
from victor_rcache.tiers import default_scripts

from . import test_round_trips as round_trips
from .helpers import Client, FakeClock

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]

counting_client = round_trips.counting_client  # the fixture, shared with tests/test_round_trips.py

NOON = 86400.0 * 19_700 + 12 * 3600  # a wall clock stopped at 12:00 UTC: every record in one hour set
QUIET = 60.0  # refresh_interval: the thread runs no round by itself during a test; flush() does (view_max_age
# stays the default 1 s, or as a test sets it: only the stale test's fake clock moves it)
DEAD = f"redis://127.0.0.1:{free_port()}/0"
WAIT = 10.0  # seconds any wait for a background prewarm may last (never reached when correct)

WALKS = [["open", "read", "edit", "save"], ["open", "read", "search", "edit"], ["open", "search", "read", "save"],
         ["read", "edit", "save", "close"], ["open", "read", "edit", "close"]] * 3


def noon() -> float:
    return NOON


def train(warmer: PredictiveCacheWarmer) -> None:
    for i, walk in enumerate(WALKS):
        for query in walk:
            warmer.record_query(query, [f"tool-{query}"], session=f"train-{i}")
    warmer.flush()


@pytest.fixture
def quiet(make_cache: Make) -> Callable[..., PredictiveCacheWarmer]:
    """Background warmers whose thread sleeps for the test: every round is a flush() the test makes."""
    def build(cache: MultiLevelCache | None = None, **settings: Any) -> PredictiveCacheWarmer:
        return PredictiveCacheWarmer(cache or make_cache(), clock=noon, refresh_interval=QUIET, **settings)

    return build


# ------------------------------------------------------------------------ 1. off the caller's path


def test_record_and_predict_make_no_round_trip_and_a_flush_sends_them(
        counting_client: tuple[Client, round_trips.RoundTrips], make_cache: Make, raw: Client,
        quiet: Callable[..., PredictiveCacheWarmer], namespace: str) -> None:
    client, trips = counting_client
    cache = make_cache(client=client)
    warmer = quiet(cache)
    stats = ModelKeys(namespace).stats
    cache.get("warm")  # the client's connection made, the namespace's settings agreed
    warmer.get_statistics()  # and one to the model's node (on a cluster, another one)
    with round_trips.measure(raw, trips) as m:
        for walk in WALKS[:3]:
            for query in walk:
                warmer.record_query(query, ["t"], session="s")
                warmer.predict_next_queries(query, session="s")
    assert m.round_trips == 0
    assert m.sent == []
    assert raw.hget(stats, "records") is None  # nothing reached Redis
    assert warmer._sync is not None
    assert warmer._sync.pending() == 12
    with round_trips.measure(raw, trips) as m:
        warmer.flush()
    assert m.round_trips == 1  # every record and the view's reads: one pipeline
    assert raw.hget(stats, "records") == b"12"
    # The process's own records are in its next answers: "open" was followed by "read" twice, "search" once.
    p = warmer.predict_next_queries("open", session="s2", min_confidence=0.0)
    assert p.queries[:2] == ["read", "search"]


def test_a_prediction_from_the_view_equals_predict_lua(make_cache: Make,
                                                       quiet: Callable[..., PredictiveCacheWarmer]) -> None:
    trainer = quiet()
    train(trainer)
    asking = PredictiveCacheWarmer(make_cache(), clock=noon, background=False)  # predict.lua, a round trip
    viewing = quiet()  # another worker: its view is empty at first
    for walk in WALKS[:5]:
        for current, session in ((walk[0], None), (walk[1], "v"), (walk[2], "v")):
            viewing.predict_next_queries(current, top_k=5, min_confidence=0.0, session=session, remember=False)
        viewing.flush()  # the sets the first questions wanted
    for walk in WALKS[:5]:
        for current in walk:
            want = asking.predict_next_queries(current, top_k=5, min_confidence=0.0, remember=False)
            got = viewing.predict_next_queries(current, top_k=5, min_confidence=0.0, remember=False)
            assert (got.queries, got.confidences, got.parts, got.tools) == (
                want.queries, want.confidences, want.parts, want.tools), current
            assert want.queries


def test_a_copy_past_view_max_age_is_never_used_and_past_half_of_it_is_read_again(
        make_cache: Make, raw: Client, namespace: str) -> None:
    clock = FakeClock()
    other = PredictiveCacheWarmer(make_cache(), clock=noon, background=False)  # another worker, writing
    warmer = PredictiveCacheWarmer(make_cache(), clock=noon, refresh_interval=QUIET, view_max_age=10.0)
    assert warmer._sync is not None
    warmer._sync.clock = clock
    for _ in range(3):
        other.record_query("A", session="x")
        other.record_query("B", session="x")
    assert warmer.predict_next_queries("A").queries == []  # not read yet: wanted
    warmer.flush()
    assert warmer.predict_next_queries("A").queries == ["B"]
    for _ in range(20):  # the fleet now mostly goes A -> C
        other.record_query("A", session="y")
        other.record_query("C", session="y")
    clock.advance(4.9)
    warmer.flush()  # under half its age: nothing wanted, nothing read
    assert warmer.predict_next_queries("A").queries == ["B"]
    clock.advance(0.2)  # past half its age: still answered from, and wanted
    assert warmer.predict_next_queries("A").queries == ["B"]
    warmer.flush()
    assert warmer.predict_next_queries("A").queries[0] == "C"
    clock.advance(10.0)  # past view_max_age: not used at all
    assert warmer.predict_next_queries("A").queries == []
    warmer.flush()
    assert warmer.predict_next_queries("A").queries[0] == "C"


def test_a_backlog_wakes_the_thread_once_per_round_and_no_wake_is_lost(
        quiet: Callable[..., PredictiveCacheWarmer]) -> None:
    """Records past RECORDS_WAKE wake the thread (which otherwise sleeps for the test): the caller's many
    wakes of one backlog are one (the job's flag), and once the thread has taken the round a wake counts
    again, so a second backlog is sent too (never waiting for refresh_interval)."""
    warmer = quiet()
    sync = warmer._sync
    assert sync is not None
    for backlog in (1, 2):
        for i in range(RECORDS_WAKE):  # the last one makes the backlog: it (and each later one) wakes
            warmer.record_query(f"q{i % 7}", session=f"s{backlog}")
        deadline = time.monotonic() + WAIT
        while sync.core.counters.snapshot().get("records", 0) < backlog * RECORDS_WAKE and time.monotonic() < deadline:
            time.sleep(0.005)  # polled: the thread sends them
        assert sync.core.counters.snapshot().get("records", 0) == backlog * RECORDS_WAKE
        assert sync.pending() == 0


def test_a_remembered_answer_is_scored_again_once_a_round_changes_the_view(
        quiet: Callable[..., PredictiveCacheWarmer]) -> None:
    """The same question between rounds is answered from memory; a round that reads the sets again (this
    process's own records) changes the answer at once."""
    warmer = quiet()
    for _ in range(3):
        warmer.record_query("A", session="x")
        warmer.record_query("B", session="x")
    warmer.flush()
    first = warmer.predict_next_queries("A", remember=False)
    assert first.queries == ["B"]
    assert warmer.predict_next_queries("A", remember=False) == first  # remembered: the same answer
    assert warmer.predict_next_queries("A", remember=False).queries is not first.queries  # a fresh object
    for _ in range(20):
        warmer.record_query("A", session="y")
        warmer.record_query("C", session="y")
    warmer.flush()
    assert warmer.predict_next_queries("A", remember=False).queries[0] == "C"


# --------------------------------------------------------------- 2. bounded, closed, Redis failing


def test_a_full_queue_drops_records_and_counts_them(quiet: Callable[..., PredictiveCacheWarmer], raw: Client,
                                                    namespace: str) -> None:
    warmer = quiet(record_queue=3)
    for query in ("a", "b", "c", "d", "e"):
        warmer.record_query(query, session="s")
    assert warmer._core.counters.snapshot()["records_dropped"] == 2
    warmer.flush()
    assert raw.hget(ModelKeys(namespace).stats, "records") == b"3"


def test_close_sends_the_queued_records(quiet: Callable[..., PredictiveCacheWarmer], make_cache: Make,
                                        raw: Client, namespace: str) -> None:
    cache = make_cache()
    warmer = quiet(cache)
    for query in ("a", "b", "c"):
        warmer.record_query(query, session="s")
    cache.close()
    assert raw.hget(ModelKeys(namespace).stats, "records") == b"3"
    assert warmer._sync is not None
    assert warmer._sync.thread.closed


def test_redis_down_never_reaches_a_caller() -> None:
    with MultiLevelCache(DEAD, namespace="down", fail_open=True, connect_timeout=0.2, socket_timeout=0.2) as cache:
        warmer = PredictiveCacheWarmer(cache, refresh_interval=QUIET, prewarm=lambda q: q)
        for query in ("a", "b", "a"):
            warmer.record_query(query, ["t"], session="s")
            assert warmer.predict_next_queries(query, session="s").queries == []
        warmer.flush()
        counts = warmer._core.counters.snapshot()
        assert counts["model_rounds_failed"] >= 1
        assert counts["records_failed"] == 3
        assert counts.get("records", 0) == 0


@pytest.mark.standalone_only(reason="points the one connection pool of a standalone client elsewhere")
def test_a_fail_closed_cache_does_not_raise_from_the_model_thread(make_cache: Make) -> None:
    # Settings no other cache of this process has: its pool (which a process's caches with the same settings
    # share) is its own, with no connection to the good port that another cache opened already.
    cache = make_cache(fail_open=False, socket_timeout=0.4999)
    warmer = PredictiveCacheWarmer(cache, refresh_interval=QUIET)
    cache._io.client.connection_pool.connection_kwargs["port"] = free_port()  # Redis gone from now on
    cache._io.client.connection_pool.disconnect()
    warmer.record_query("a", session="s")
    warmer.flush()  # the round fails: counted, not raised
    assert warmer._core.counters.snapshot()["records_failed"] == 1


def test_a_flush_waits_for_a_round_the_thread_has_in_flight(quiet: Callable[..., PredictiveCacheWarmer],
                                                             raw: Client, namespace: str) -> None:
    """A flush must not return while the model thread is still sending records it took (a fleet test under
    load once counted 256 of 400). Staged: more than a round's worth waits; right after the flush's first
    round, the thread takes the rest and is held inside its send; the flush must wait for it."""
    warmer = quiet()
    sync = warmer._sync
    assert sync is not None
    inside, release = threading.Event(), threading.Event()
    send, first_round = sync._drive_step, sync.thread.flush

    def held(step: Any) -> Any:
        if threading.current_thread() is sync.thread._thread:
            inside.set()
            release.wait(WAIT)
        return send(step)

    def flush_then_let_the_thread_in() -> None:
        sync.thread.flush = first_round  # (once)
        first_round()
        wake()  # the thread's round takes what is left, and is held in its send
        assert inside.wait(WAIT)

    sync._drive_step = held
    sync.thread.flush = flush_then_let_the_thread_in  # type: ignore[method-assign]
    wake, sync.thread.wake = sync.thread.wake, lambda: None  # type: ignore[method-assign]
    records = MAX_RECORDS + 44
    for i in range(records):  # (the thread is not woken by so many waiting: the flush goes first)
        warmer.record_query(f"q{i % 7}", session=f"s{i % 3}")
    flushed = threading.Event()
    flusher = threading.Thread(target=lambda: (warmer.flush(), flushed.set()))
    flusher.start()
    assert inside.wait(WAIT)
    assert not flushed.wait(0.2)  # a bounded look: the flush still waits for the thread's round
    release.set()
    flusher.join(WAIT)
    assert flushed.is_set()
    assert raw.hget(ModelKeys(namespace).stats, "records") == str(records).encode()


# --------------------------------------------------------------------------------- 3. verdicts


def test_verdicts_are_judged_here_and_reach_the_fleets_counters(quiet: Callable[..., PredictiveCacheWarmer],
                                                                raw: Client, namespace: str) -> None:
    warmer = quiet()
    train(warmer)
    assert warmer.predict_next_queries("open", session="u").queries[0] == "read"
    warmer.record_query("open", session="u")  # the prediction was made after "open", before it was recorded
    assert warmer._core.counters.snapshot().get("verdicts", 0) == 0  # so it waits for the next query
    warmer.record_query("read", session="u")  # predicted
    warmer.predict_next_queries("read", session="u")
    warmer.record_query("zebra", session="u")  # not predicted
    local = warmer._core.counters.snapshot()
    assert (local["verdicts"], local["correct"]) == (2, 1)
    stats = warmer.get_statistics()["predictions"]  # sends the verdicts first
    assert (stats["total"], stats["correct"]) == (2, 1)
    assert raw.hget(ModelKeys(namespace).stats, "predictions_total") == b"2"


# --------------------------------------------------------------------------- 4. automatic prewarming


class Selections:
    def __init__(self) -> None:
        self.queries: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, query: str) -> dict[str, str]:
        with self.lock:
            self.queries.append(query)
        return {"tools for": query}


def entry_fields(raw: Client, cache: MultiLevelCache, key: str) -> dict[bytes, bytes]:
    space = KeySpace(cache.config.namespace, cache.config.shards)
    return raw.hgetall(space.entry_key(space.ref(key)))  # type: ignore[return-value]


def test_automatic_prewarming_computes_what_is_predicted_and_missing_once(
        make_cache: Make, raw: Client, quiet: Callable[..., PredictiveCacheWarmer]) -> None:
    train(quiet())
    cache = make_cache()
    cache.put("read", "already there")  # predicted after "open", and cached: skipped
    select = Selections()
    warmer = quiet(cache, prewarm=select, prewarm_min_confidence=0.1)
    warmer.record_query("open", session="s")
    assert select.queries == []  # nothing before the round
    assert warmer.wait_for_prewarms(WAIT)  # the round, its prediction, the prewarm
    assert select.queries == ["search"]  # open -> read (cached), search: computed
    assert entry_fields(raw, cache, "search")[b"w"] == b"1"  # marked prewarmed, in Redis only
    assert cache.get("read") == "already there"
    report = warmer.get_statistics()["prewarming"]["process"]
    assert (report["completed"], report["cached"]) == (1, 1)


def test_an_unchanged_session_state_is_not_predicted_again(quiet: Callable[..., PredictiveCacheWarmer],
                                                           make_cache: Make) -> None:
    train(quiet())
    select = Selections()
    warmer = quiet(make_cache(), prewarm=select, ngram_size=2)  # the state is the last query alone
    warmer.record_query("open", session="s")
    assert warmer.wait_for_prewarms(WAIT)
    warmer.record_query("open", session="s")  # the same state again
    assert warmer.wait_for_prewarms(WAIT)
    assert warmer._core.counters.snapshot()["predictions_skipped"] == 1


def test_async_automatic_prewarming_runs_on_the_recording_loop(make_async_cache: MakeAsync, make_cache: Make,
                                                               quiet: Callable[..., PredictiveCacheWarmer]) -> None:
    train(quiet())
    loops: list[asyncio.AbstractEventLoop] = []

    async def select(query: str) -> str:
        loops.append(asyncio.get_running_loop())
        return f"tools for {query}"

    async def scenario() -> tuple[Any, Any]:
        async with make_async_cache() as cache:
            warmer = AsyncPredictiveCacheWarmer(cache, clock=noon, refresh_interval=QUIET, prewarm=select,
                                                prewarm_min_confidence=0.3)
            await warmer.record_query("open", session="s")
            assert await warmer.wait_for_prewarms(WAIT)
            return await cache.get("read"), asyncio.get_running_loop()

    value, loop = asyncio.run(scenario())
    assert value == "tools for read"
    assert loops == [loop]


def test_the_budget_stops_prewarms_nobody_reads(quiet: Callable[..., PredictiveCacheWarmer],
                                                make_cache: Make) -> None:
    train(quiet())
    select = Selections()
    warmer = quiet(make_cache(), prewarm=select, prewarm_min_confidence=0.0)
    warmer._core.budget.allowance = 2  # two prewarms to learn from; nothing read since
    for i, query in enumerate(("open", "read", "edit", "search")):
        warmer.record_query(query, session=f"s{i}")
        assert warmer.wait_for_prewarms(WAIT)
    counts = warmer._core.counters.snapshot()
    assert counts["prewarm_completed"] == 2 == len(select.queries)
    assert counts["prewarm_over_budget"] >= 2


def test_the_budget_allows_ratio_selections_per_useful_prewarm() -> None:
    budget = PrewarmBudget(1.5, allowance=2)
    assert [budget.reserve() for _ in range(3)] == [True, True, False]
    budget.refund()
    assert budget.reserve()
    assert not budget.reserve()
    budget.update(completed=10, useful=8)  # the fleet's prewarms as read: 10 <= 1.5 * 8 + 2 = 14
    assert [budget.reserve() for _ in range(5)] == [True, True, True, True, False]
    budget.update(completed=40, useful=10)  # mostly wasted: nothing more until reads catch up
    assert not budget.reserve()


@pytest.mark.standalone_only(reason="counts sends: a cluster pipeline sends once per node it reaches")
def test_prewarm_predictions_looks_every_query_up_in_one_round_trip(
        counting_client: tuple[Client, round_trips.RoundTrips], make_cache: Make, raw: Client) -> None:
    client, trips = counting_client
    make_cache().put_many({"a": 1, "b": 2, "c": 3})  # by another worker: not in this process's L1
    cache = make_cache(client=client)
    cache.get("warm")  # the client's connection made, the namespace's settings agreed
    cache.flush_bookkeeping()  # (that miss's bookkeeping sent now, not while measuring)
    warmer = PredictiveCacheWarmer(cache, background=False)
    prediction = Prediction("x", queries=["a", "b", "c"], confidences=[0.5, 0.4, 0.3], tools=[[], [], []],
                            parts=[(0.5, 0.5, 0.5)] * 3)
    with round_trips.measure(raw, trips) as m:
        report = warmer.prewarm(prediction, lambda q: q)
    assert report.cached == 3
    assert m.round_trips == 2  # the three look-ups in one pipeline, then the counters
    assert m.sent == ["HMGET"] * 3 + ["HINCRBY"]  # plain reads: what is cached costs no script


@pytest.mark.standalone_only(reason="counts sends: a cluster pipeline sends once per node it reaches")
def test_prewarm_claims_a_lease_only_for_what_redis_does_not_hold(
        counting_client: tuple[Client, round_trips.RoundTrips], make_cache: Make, raw: Client) -> None:
    client, trips = counting_client
    make_cache().put_many({"a": 1, "b": 2})  # by another worker; c is nowhere
    cache = make_cache(client=client)
    cache.get("warm")
    cache.flush_bookkeeping()
    warmer = PredictiveCacheWarmer(cache, background=False)
    prediction = Prediction("x", queries=["a", "b", "c"], confidences=[0.5, 0.4, 0.3], tools=[[], [], []],
                            parts=[(0.5, 0.5, 0.5)] * 3)
    with round_trips.measure(raw, trips) as m:
        report = warmer.prewarm(prediction, lambda q: f"computed {q}")
    assert (report.cached, report.completed) == (2, 1)
    assert m.sent[:4] == ["HMGET"] * 3 + ["EVALSHA"]  # the look-ups, then one lease: c's
    assert m.evalsha_calls == 1 + 2  # c's lease, then its fill (put.lua and release.lua)
    assert make_cache().get("c") == "computed c"


def test_the_view_script_names_a_key_of_the_wrong_type(raw: Client, namespace: str) -> None:
    """view.lua reads without checking every key's type first; a key of another type still gets its
    VRC_WRONGTYPE error naming it (and nothing is written: the script cannot write)."""
    keys = ModelKeys(namespace)
    good, bad = keys.next(b"A"), keys.next(b"B")
    raw.zadd(good, {b"B": 1.0})
    raw.set(bad, b"written by hand")
    view = default_scripts().view.source
    assert raw.eval(view, 2, keys.tools, good, 1) == [[[b"B", b"1"]], [b"B", None]]
    for key_list, name in (((keys.tools, good, bad), bad), ((bad, good), bad)):
        with pytest.raises(redis.ResponseError, match=f"^VRC_WRONGTYPE {name.decode()} is a string"):
            raw.eval(view, len(key_list), *key_list, 1)


def test_wake_within_brings_a_round_forward_and_what_arrives_meanwhile_shares_it() -> None:
    """An automatic prewarm's record wakes the model thread within PREWARM_DELAY, not at once: a round
    comes long before the job's own wait, and wakes made before it starts give one round, not one each."""
    rounds: list[bool] = []
    fired = threading.Event()

    def work(force: bool) -> None:
        rounds.append(force)
        fired.set()

    job = Periodic("test-wake-within", work, lambda: 3600.0, lambda exc: None).start()
    try:
        job.wake_within(0.2)
        job.wake_within(0.2)  # (a later wake never postpones the round already due)
        job.wake_within(3000.0)
        assert fired.wait(10), "no round within the delay (the job's own wait is an hour)"
        assert rounds == [False]
    finally:
        job.close()
    assert rounds == [False, True]  # close: one last forced round
