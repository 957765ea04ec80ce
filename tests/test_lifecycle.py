"""A cache's life: built, used from any thread or event loop, closed or collected; and the small promises
around it that a new user meets first (docs/api.md, "Lifecycle").

- an unclosed cache that is garbage-collected releases its threads and connections, with a ResourceWarning;
- a closed cache raises CacheClosedError, never reconnects, and its L1 serves nothing;
- an async cache works under one ``asyncio.run`` after another;
- a plain loader given to the async ``get_or_set`` runs off the event loop;
- a value the loader computed that cannot be stored is returned uncached (fail-open), and ``Uncached``;
- the sync warmer prewarms without asyncio;
- a URL's database must be a number; an integer msgpack cannot hold gets a message that says so;
- a forked child's first subscription logs no "channel is back" warning;
- a process that exits without closing its cache still sends the bookkeeping it buffered.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing as mp
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import (
    AsyncMultiLevelCache,
    CacheClosedError,
    ConfigurationError,
    MultiLevelCache,
    PredictiveCacheWarmer,
    SerializationError,
    Uncached,
    ValueTooLargeError,
)
from victor_rcache.keys import KeySpace

from .helpers import Backend, Client
from .workers import eventually

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]
THREADS = ("victor-rcache-background", "victor-rcache-invalidation")  # one each per process


def cache_threads() -> int:
    return sum(t.name in THREADS for t in threading.enumerate())


@pytest.mark.parametrize("front", ["sync", "async"])
def test_an_unclosed_cache_collected_leaves_no_thread_and_warns(backend: Backend, namespace: str, front: str) -> None:
    gc.collect()  # (what earlier tests left behind goes first)
    before = cache_threads()

    def use_and_drop() -> None:
        if front == "sync":
            cache = MultiLevelCache(backend.url, namespace=namespace, cluster=backend.cluster)
            cache.put("k", 1)
        else:
            cache = AsyncMultiLevelCache(backend.url, namespace=namespace, cluster=backend.cluster)
            asyncio.run(cache.put("k", 1))
        assert cache_threads() == before + 2

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        use_and_drop()
        gc.collect()
        # (released by a thread of its own: the collection may run in a thread holding a lock it needs)
        eventually(lambda: cache_threads() == before, "the collected cache's threads ending")
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning) and "without close()" in str(w.message)
                and namespace in str(w.message)]
    assert len(unclosed) == 1, [str(w.message) for w in caught]


def test_a_closed_cache_raises_and_never_reconnects(make_cache: Make, raw: Client, namespace: str) -> None:
    cache = make_cache(shards=1, l2_size=10, l3_size=10, promote_after=1, coherence=False)
    cache.put("k", "v")
    assert cache.get("k") == "v"  # in L1
    cache.close()
    cache.close()  # again: nothing
    for call in (lambda: cache.get("k"), lambda: cache.put("k", "new"), lambda: cache.get_or_set("x", lambda: 1),
                 lambda: cache.delete("k"), lambda: cache.get_many(["k"])):
        with pytest.raises(CacheClosedError, match="closed; build a new one"):
            call()
    entry = KeySpace(namespace, 1).entry_key(KeySpace(namespace, 1).ref("k"))
    assert raw.hget(entry, "v") is not None
    assert make_cache(shards=1, l2_size=10, l3_size=10).get("k") == "v"


def test_a_closed_async_cache_raises(make_async_cache: MakeAsync) -> None:
    async def scenario() -> None:
        cache = make_async_cache()
        await cache.put("k", "v")
        await cache.close()
        with pytest.raises(CacheClosedError):
            await cache.put("k", "new")
        with pytest.raises(CacheClosedError):
            await cache.get("k")

    asyncio.run(scenario())


def test_an_async_cache_serves_one_asyncio_run_after_another(backend: Backend, namespace: str) -> None:
    cache = AsyncMultiLevelCache(backend.url, namespace=namespace, l1_size=1, cluster=backend.cluster)

    async def first() -> None:
        await cache.put("a", 1)
        assert await cache.get_or_set("b", lambda: 2) == 2

    async def second() -> None:
        await cache.put("c", 3)  # a round trip in a new loop
        assert await cache.get_many(["a", "b", "c"]) == {"a": 1, "b": 2, "c": 3}
        await cache.close()

    asyncio.run(first())
    asyncio.run(second())


def test_a_plain_loader_runs_off_the_event_loop(make_async_cache: MakeAsync) -> None:
    """The loader waits for a signal that only a task of the same loop can give: run on the loop, it would
    block that task for its whole wait and get False."""
    async def scenario() -> None:
        cache = make_async_cache()
        signal = threading.Event()

        def loader() -> bool:
            return signal.wait(5)

        async def give_signal() -> None:
            for _ in range(3):
                await asyncio.sleep(0)
            signal.set()

        got, _ = await asyncio.gather(cache.get_or_set("k", loader), give_signal())
        assert got is True

    asyncio.run(scenario())


@pytest.mark.parametrize("value", [b"x" * 2000, object()], ids=["too large", "not encodable"])
def test_a_computed_value_that_cannot_be_stored_is_returned_uncached(make_cache: Make, raw: Client,
                                                                     namespace: str, value: Any,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    cache = make_cache(shards=1, l2_size=10, l3_size=10, max_value_bytes=1000, fail_open=True)
    calls = []

    def loader() -> Any:
        calls.append(1)
        return value

    assert cache.get_or_set("k", loader) is value
    assert cache.get_or_set("k", loader) is value  # computed again: nothing was kept
    assert len(calls) == 2
    assert cache.get_metrics()["stampede"]["uncached"] == 2
    assert "returned but not cached" in caplog.text
    space = KeySpace(namespace, 1)
    assert raw.exists(space.entry_key(space.ref("k")), space.lease_key(space.ref("k"))) == 0
    strict = make_cache(shards=1, l2_size=10, l3_size=10, max_value_bytes=1000, fail_open=False)
    with pytest.raises((ValueTooLargeError, SerializationError)):
        strict.get_or_set("k", loader)


def test_a_loader_returning_uncached_hands_the_value_back_without_caching_it(make_cache: Make) -> None:
    cache = make_cache()
    assert cache.get_or_set("k", lambda: Uncached("error page")) == "error page"
    assert cache.get("k") is None
    assert cache.get_or_set("k", lambda: "real") == "real"
    assert cache.get("k") == "real"


def test_the_sync_warmer_prewarms_without_asyncio(make_cache: Make) -> None:
    cache = make_cache()
    warmer = PredictiveCacheWarmer(cache, background=False)
    for _ in range(3):
        warmer.record_query("open the file", session="s1")
        warmer.record_query("read the file", session="s1")
        warmer.record_query("open the file", session="s2")  # (another session starts the walk again)
        warmer.record_query("read the file", session="s2")
    prediction = warmer.predict_next_queries("open the file", top_k=1, min_confidence=0.0)
    assert prediction.queries == ["read the file"]
    report = warmer.prewarm(prediction, lambda query: f"tools for {query}")
    assert report.completed == 1
    assert cache.get("read the file") == "tools for read the file"

    async def inside_a_loop() -> None:
        with pytest.raises(Exception, match=r"await warmer\.prewarm_predictions"):
            warmer.prewarm(prediction, lambda query: query)

    asyncio.run(inside_a_loop())


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/abc", "redis://127.0.0.1:6379/0x1"])
def test_a_database_that_is_not_a_number_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="database after the port must be a number"):
        MultiLevelCache(url, namespace="ns")


def test_an_integer_msgpack_cannot_hold_says_so(make_cache: Make) -> None:
    with pytest.raises(SerializationError, match=r"integer outside msgpack's range .* store it as a str"):
        make_cache().put("k", 2**70)


def _child_logs(cache: MultiLevelCache, out: Any) -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.levelname} {record.getMessage()}")

    logging.getLogger("victor_rcache").addHandler(Keep(logging.INFO))
    listener = cache._core.coherence
    for _ in range(500):  # the child's own subscription (a few ms)
        if listener.trusted():
            break
        threading.Event().wait(0.01)
    cache.get("k")
    out.put((listener.trusted(), records))


def test_a_forked_child_logs_no_warning_for_its_first_subscription(make_cache: Make) -> None:
    cache = make_cache()
    cache.put("k", "v")
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_logs, args=(cache, out))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    trusted, records = out.get(timeout=5)
    assert trusted
    assert [r for r in records if r.startswith(("WARNING", "INFO"))] == []


EXITING_WORKER = """
import sys
from victor_rcache import MultiLevelCache, bookkeeping
bookkeeping.WINDOW, bookkeeping.BATCH = 3600.0, 10**9  # nothing goes out before the exit
cache = MultiLevelCache(sys.argv[1], namespace=sys.argv[2], cluster=sys.argv[3] == "1", shards=1,
                        promote_after=10**9)
assert cache.get("k") == "v"  # a Redis hit: its bookkeeping waits in the buffer
"""


def test_a_process_exiting_without_close_still_sends_its_bookkeeping(make_cache: Make, backend: Backend,
                                                                    raw: Client, namespace: str) -> None:
    make_cache(shards=1).put("k", "v")
    done = subprocess.run([sys.executable, "-c", EXITING_WORKER, backend.url, namespace, str(int(backend.cluster))],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert raw.hget(KeySpace(namespace, 1).shard_keys[0].stats, "l2_hits") == b"1"
