"""Stampede protection against a real Redis and real OS processes (docs/single-flight.md).

* Once per fleet: 50 threads in each of 4 spawned processes call ``get_or_set`` on one missing key;
  the loader (an INCR on a key outside the namespace, ~50 ms of "work", then a wait until every
  other process is seen waiting for the fill lease) runs exactly once and every caller gets that
  one value.
* A process SIGKILLed while it holds the fill lease: another process waits for the lease to expire,
  then computes, fills and releases the lease.
* The stale-fill race, forced with events inside the loader: a fill that started before a put, a
  delete or an ``invalidate()`` is refused by put.lua, the newer state stays in Redis and the reader's
  L1 never holds its stale result. A fill landing between a miss and the lease is read, not recomputed.
* Loader exceptions reach the caller and every caller waiting on the same key, cache nothing, release
  the lease at once, and the next call computes again. A cancelled (async) or interrupted (sync,
  BaseException) leader releases its lease too, and the callers waiting for it compute themselves.
* Loaders may be plain or coroutine functions in both front ends; concurrent callers in one process
  (threads or coroutines) share one computation and get independent copies.
* Early refresh (XFetch): a hit close to its ttl recomputes the value in the background, once for the
  fleet (the lease), never over a value that changed meanwhile (expect_ver), and never when disabled;
  ``refresh_early`` itself is checked with an injected draw.
* Redis unreachable: fail-open ``get_or_set`` returns the loader's value, fail-closed raises
  ``CacheUnavailableError``.

The test code never sleeps a fixed time: it waits on events, barriers, joins and queues with
deadlines, or polls a condition against a deadline. Loaders may sleep: they stand for expensive work.

Every Redis test runs on both backends; spawned workers get the backend (URL, ``cluster`` flag).
"""

from __future__ import annotations

import asyncio
import functools
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from typing import Any, cast

import pytest

from victor_rcache import AsyncMultiLevelCache, CacheUnavailableError, MsgpackCodec, MultiLevelCache, tiers
from victor_rcache.codec import Envelope
from victor_rcache.keys import KeySpace
from victor_rcache.local_redis import free_port
from victor_rcache.stampede import refresh_early
from victor_rcache.tiers import Load, feed

from .helpers import Backend, Client, FakeClock, guard_slots

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]
Result = dict[str, Any]

DEADLINE = 30.0  # seconds any wait in this file may take before the test fails (never hangs)
PROCESSES = 4
THREADS = 50
SHARDS = 16  # the default, which every cache here uses
ENVELOPE = Envelope(MsgpackCodec())
MISSING = object()


class LoaderFailed(RuntimeError):
    """What the failing loaders raise."""


# ------------------------------------------------------------------------------------- helpers


def lease_key(namespace: str, key: str) -> bytes:
    space = KeySpace(namespace, SHARDS)
    return space.lease_key(space.ref(key))


def entry_key(namespace: str, key: str) -> bytes:
    space = KeySpace(namespace, SHARDS)
    return space.entry_key(space.ref(key))


def entry_hash(raw: Client, namespace: str, key: str) -> dict[bytes, bytes]:
    """The entry's data hash as Redis holds it ({} when there is none)."""
    return cast(dict[bytes, bytes], raw.hgetall(entry_key(namespace, key)))


def stored(raw: Client, namespace: str, key: str) -> Any:
    """The value Redis holds for ``key`` (read from the entry hash), or MISSING."""
    payload = entry_hash(raw, namespace, key).get(b"v")
    return MISSING if payload is None else ENVELOPE.unwrap(payload)


def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` once ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.002)  # a polling interval, not a wait for something to happen


def waiting_on_a_future(idents: Iterable[int]) -> bool:
    """True when every thread in ``idents`` is blocked in ``concurrent.futures.Future.result``
    (a single-flight follower waiting for the leader's result)."""
    frames = sys._current_frames()
    for ident in idents:
        frame = frames.get(ident)
        where = set()
        while frame is not None:
            where.add((frame.f_code.co_name, os.path.basename(frame.f_code.co_filename)))
            frame = frame.f_back
        if ("result", "_base.py") not in where:
            return False
    return True


def until_the_others_follow(callers: list[threading.Thread]) -> None:
    """Called by a loader: wait until every other caller waits for this computation (polling)."""
    others = [t.ident for t in callers if t.ident is not None and t.ident != threading.get_ident()]
    assert len(others) == len(callers) - 1, "the callers must all be running before any computes"
    until(lambda: waiting_on_a_future(others), "every other caller to wait for the leader")


def run_together(count: int, call: Callable[[int], None], threads: list[threading.Thread]) -> None:
    """Start ``count`` threads running ``call(i)``, released together once all are running; they are
    added to ``threads`` before any starts."""
    go = threading.Barrier(count, timeout=DEADLINE)

    def run(i: int) -> None:
        go.wait()
        call(i)

    threads.extend(threading.Thread(target=run, args=(i,)) for i in range(count))
    for t in threads:
        t.start()


def started_threads(call: Callable[[], Any]) -> tuple[Any, list[threading.Thread]]:
    """Run ``call``; return its result and the threads it started that are still alive."""
    before = set(threading.enumerate())
    out = call()
    return out, [t for t in threading.enumerate() if t not in before and t.is_alive()]


def join_all(threads: Iterable[threading.Thread]) -> None:
    for t in threads:
        t.join(DEADLINE)
        assert not t.is_alive(), f"thread {t.name} still running after {DEADLINE}s"


# ------------------------------------------------------------ workers (run in spawned processes)


def _report(results: Any, body: Callable[[], Result]) -> None:
    """Run ``body`` and put its result, or the traceback it raised, on the queue."""
    out: Result = {"pid": os.getpid()}
    try:
        out.update(body())
    except BaseException:  # the parent asserts no worker raised and shows the traceback
        out["error"] = traceback.format_exc()
    results.put(out)


def stampede_worker(backend: Backend, namespace: str, key: str, start: Any, waiting: Any, results: Any) -> None:
    """50 threads released together call get_or_set on ``key``; report what each got.

    ``waiting`` counts the processes seen waiting for another one's fill lease; the loader (in
    whichever process computes) returns only once every other process waits, so the fleet lease
    is exercised in every process however the OS schedules them.
    """

    def body() -> Result:
        raw = backend.client()

        def loader() -> dict[str, Any]:
            raw.incr(f"{namespace}-loads")
            time.sleep(0.05)  # stands for an expensive computation
            until(lambda: waiting.value >= PROCESSES - 1, "every other process to wait for the fill lease",
                  timeout=DEADLINE / 3)  # well before the parent gives up on the reports
            return {"by": os.getpid(), "token": uuid.uuid4().hex, "tools": ["read", "search"]}

        go = threading.Barrier(THREADS + 1, timeout=DEADLINE)
        done = threading.Event()
        values: list[Any] = [None] * THREADS
        errors: list[str] = []

        def call(i: int) -> None:
            try:
                go.wait()
                values[i] = cache.get_or_set(key, loader)
            except BaseException:
                errors.append(traceback.format_exc())

        def watch() -> None:  # tells the other processes once this one waits for the lease
            while not done.is_set():
                if cache.get_metrics()["stampede"]["lease_waits"] >= 1:
                    with waiting.get_lock():
                        waiting.value += 1
                    return
                done.wait(0.002)  # polling interval

        try:
            cache = guard_slots(MultiLevelCache(backend.url, namespace=namespace, fail_open=False,
                                                cluster=backend.cluster))
        except BaseException:
            start.abort()  # the other processes must not wait for this one
            raise
        threads = [threading.Thread(target=call, args=(i,)) for i in range(THREADS)]
        watcher = threading.Thread(target=watch)
        try:
            cache.get("warm-up")  # connections and the namespace check happen before the race
            for t in threads:
                t.start()
            start.wait(timeout=DEADLINE)  # every process is up, its threads at their barrier
            watcher.start()
            go.wait()
            for t in threads:
                t.join(DEADLINE)
            assert not any(t.is_alive() for t in threads), "a caller is still waiting"
            return {"values": values, "errors": errors[:3], "stampede": cache.get_metrics()["stampede"]}
        finally:
            go.abort()  # no-op once passed; frees the threads if this process failed before
            done.set()
            if watcher.is_alive():
                watcher.join(DEADLINE)
            cache.close()
            raw.close()

    _report(results, body)


def lease_holder(backend: Backend, namespace: str, key: str, lease_ttl: float, holding: Any) -> None:
    """Take the fill lease for ``key`` and never finish: the parent SIGKILLs this process."""
    cache = guard_slots(MultiLevelCache(backend.url, namespace=namespace, fail_open=False, lease_ttl=lease_ttl,
                                        cluster=backend.cluster))

    def loader() -> str:
        holding.set()  # the lease is held (it is taken before the loader runs)
        threading.Event().wait()  # blocks until the process is killed
        return "never returned"

    cache.get_or_set(key, loader)


def lease_taker(backend: Backend, namespace: str, key: str, lease_ttl: float, ready: Any, go: Any,
                results: Any) -> None:
    """Once told, call get_or_set on ``key``; report the value and the stampede counters."""

    def body() -> Result:
        with guard_slots(MultiLevelCache(backend.url, namespace=namespace, fail_open=False, lease_ttl=lease_ttl,
                                         cluster=backend.cluster)) as cache:
            cache.get("warm-up")
            ready.set()
            if not go.wait(DEADLINE):
                raise TimeoutError("never told to go")
            value = cache.get_or_set(key, lambda: {"by": "taker", "pid": os.getpid()})
            return {"value": value, "stampede": cache.get_metrics()["stampede"]}

    _report(results, body)


def collect(results: Any, procs: list[Any], count: int, within: float = DEADLINE) -> list[Result]:
    """``count`` reports from the queue within ``within`` seconds; fail if a worker died or raised."""
    out: list[Result] = []
    deadline = time.monotonic() + within
    while len(out) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {count} workers reported within {within}s"
        try:
            out.append(results.get(timeout=min(left, 1.0)))
        except queue.Empty:
            dead = [(p.pid, p.exitcode) for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"worker(s) died without reporting: {dead}"
    errors = [r["error"] for r in out if "error" in r]
    assert not errors, "a worker raised:\n" + "\n".join(errors)
    return out


def stop(procs: list[Any], timeout: float = DEADLINE) -> None:
    """Join the started processes, killing any still running after ``timeout`` (0: kill now)."""
    for p in procs:
        if p.pid is None:
            continue
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
            p.join(5)


# ------------------------------------------------------------------------------ once per fleet


@pytest.mark.slow
def test_200_callers_in_4_processes_run_the_loader_exactly_once(backend: Backend, raw: Client,
                                                               namespace: str) -> None:
    ctx = mp.get_context("spawn")
    start, waiting, results = ctx.Barrier(PROCESSES), ctx.Value("i", 0), ctx.Queue()
    procs = [ctx.Process(target=stampede_worker, args=(backend, namespace, "expensive", start, waiting, results),
                         daemon=True) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    try:
        reports = collect(results, procs, PROCESSES)
    except BaseException:
        stop(procs, timeout=0)  # a worker may block on a queue nobody reads any more: kill it
        raise
    stop(procs)
    assert all(p.exitcode == 0 for p in procs)

    assert not [e for r in reports for e in r["errors"]], "a caller raised"
    assert raw.get(f"{namespace}-loads") == b"1"  # the loader ran once, in the whole fleet
    assert sum(r["stampede"]["loads"] for r in reports) == 1
    values = [v for r in reports for v in r["values"]]
    assert len(values) == PROCESSES * THREADS
    first = values[0]
    assert first is not None
    assert all(v == first for v in values)  # every loader call makes a unique token: one computation
    loader_pid = first["by"]
    assert loader_pid in {r["pid"] for r in reports}
    others = [r["stampede"] for r in reports if r["pid"] != loader_pid]
    assert len(others) == PROCESSES - 1
    assert all(o["lease_waits"] >= 1 and o["loads"] == 0 for o in others)  # each waited for the fleet lease
    assert waiting.value == PROCESSES - 1
    assert stored(raw, namespace, "expensive") == first
    assert raw.exists(lease_key(namespace, "expensive")) == 0


@pytest.mark.slow
def test_a_lease_holder_killed_with_sigkill_is_taken_over_after_the_lease_expires(
        backend: Backend, make_cache: Make, raw: Client, namespace: str) -> None:
    ctx = mp.get_context("spawn")
    lease_ttl, key = 1.0, "orphaned"
    holding, ready, go, results = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=lease_holder, args=(backend, namespace, key, lease_ttl, holding), daemon=True)
    taker = ctx.Process(target=lease_taker, args=(backend, namespace, key, lease_ttl, ready, go, results),
                        daemon=True)
    taker.start()
    try:
        assert ready.wait(DEADLINE), f"the taker never got ready (exit code {taker.exitcode})"
        holder.start()  # only now: the 1 s lease must not run out while the taker starts up
        assert holding.wait(DEADLINE), f"the holder never ran its loader (exit code {holder.exitcode})"
        assert raw.get(lease_key(namespace, key)) is not None  # the holder's lease, still running
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(DEADLINE)
        assert holder.exitcode == -signal.SIGKILL
        assert raw.get(lease_key(namespace, key)) is not None  # the dead holder's lease outlives it
        go.set()
        (report,) = collect(results, [taker], 1)
    except BaseException:
        stop([holder, taker], timeout=0)
        raise
    stop([holder, taker])

    expected = {"by": "taker", "pid": taker.pid}
    assert report["value"] == expected
    assert report["stampede"]["lease_waits"] >= 1  # it waited for the dead holder's lease first
    assert report["stampede"]["loads"] == 1
    assert report["stampede"]["fills_refused"] == 0
    assert stored(raw, namespace, key) == expected
    assert raw.exists(lease_key(namespace, key)) == 0  # the taker released its own lease
    assert make_cache().get(key, MISSING) == expected


# ---------------------------------------------------------------------------- stale-fill race


def _put(writer: MultiLevelCache, key: str) -> None:
    writer.put(key, "newer")


def _put_then_delete(writer: MultiLevelCache, key: str) -> None:
    writer.put(key, "newer")
    assert writer.delete(key) is True


def _invalidate(writer: MultiLevelCache, key: str) -> None:
    writer.invalidate()


def _delete_absent(writer: MultiLevelCache, key: str) -> None:
    writer.delete(key)  # cache-aside: the source of truth changed, drop whatever is cached


@pytest.mark.parametrize(("write", "newest"), [
    pytest.param(_put, "newer", id="put"),  # refused: the entry exists
    pytest.param(_put_then_delete, MISSING, id="put-then-delete"),  # refused: the delete's `fence` record
    pytest.param(_invalidate, MISSING, id="invalidate"),  # refused: the shard's `flushed` mark
    pytest.param(_delete_absent, MISSING, id="delete-of-absent-key"),  # refused: the delete's tombstone
])
def test_a_fill_started_before_a_write_is_refused_and_the_newer_state_stays(
        make_cache: Make, raw: Client, namespace: str, write: Callable[[MultiLevelCache, str], None],
        newest: Any) -> None:
    reader, writer = make_cache(), make_cache()
    loading, written = threading.Event(), threading.Event()
    got: list[Any] = []

    def slow_loader() -> str:
        loading.set()
        assert written.wait(DEADLINE), "the writer never wrote"
        return "stale"  # computed from the state before the write

    thread = threading.Thread(target=lambda: got.append(reader.get_or_set("k", slow_loader)))
    thread.start()
    assert loading.wait(DEADLINE), "the reader never ran its loader"
    try:
        write(writer, "k")
        after_write = entry_hash(raw, namespace, "k")
    finally:
        written.set()
    join_all([thread])

    assert got == ["stale"]  # the reader gets its own computation...
    assert stored(raw, namespace, "k") == newest  # ...but Redis keeps the newer state
    assert entry_hash(raw, namespace, "k") == after_write  # version and all: the fill wrote nothing
    stampede = reader.get_metrics()["stampede"]
    assert (stampede["loads"], stampede["fills_refused"]) == (1, 1)
    copy = reader._core.l1.peek(b"k")
    assert copy is None or ENVELOPE.unwrap(copy.payload) != "stale"
    assert reader.get("k", MISSING) == newest
    assert make_cache().get("k", MISSING) == newest
    assert raw.exists(lease_key(namespace, "k")) == 0


def send_lease_call(cache: MultiLevelCache, step: Any, instruction: Any) -> tuple[Any, Any]:
    """Send lease.lua (again, as the core asks after a NOSCRIPT, with the script itself): the core's next
    instruction and its result."""
    lease = cache._core.scripts.lease
    result = None
    while isinstance(instruction, list):
        assert [c[:2] for c in instruction] in ([("EVALSHA", lease.sha)], [("EVAL", lease.source)]), instruction
        instruction, result = feed(step, cache._send(instruction))
    return instruction, result


def test_after_a_miss_one_script_call_looks_again_and_takes_the_fill_lease(make_cache: Make, raw: Client,
                                                                          namespace: str) -> None:
    """A get_or_set miss is a plain read; then lease.lua looks at the entry again and takes the fill lease
    in one atomic step, so no other worker's fill can land between that look and the lease."""
    cache = make_cache()
    cache.get("warm-up", None)  # the once-per-process handshake is done: what follows is get_or_set alone
    step = cache._core.get_or_set("k")
    instruction, _ = feed(step, None)
    assert isinstance(instruction, list)
    assert [c[0] for c in instruction] == ["HMGET"], instruction  # the plain read, nothing else
    instruction, _ = feed(step, cache._send(instruction))
    assert raw.exists(lease_key(namespace, "k")) == 0, "the lease is taken by lease.lua, not by the read"
    instruction, _ = send_lease_call(cache, step, instruction)
    assert raw.pttl(lease_key(namespace, "k")) > 0, "the miss did not take the fill lease"
    assert isinstance(instruction, Load), f"the lease holder should compute next, not {instruction!r}"
    result = None
    while instruction is not None:
        instruction, result = feed(step, cache._do(instruction, lambda: "computed"))
    assert result is not None
    assert result.value == "computed"
    assert raw.exists(lease_key(namespace, "k")) == 0, "the fill released the lease"
    assert make_cache().get("k") == "computed"


def test_a_fill_landing_between_the_miss_and_the_lease_is_read_not_computed(make_cache: Make, raw: Client,
                                                                           namespace: str) -> None:
    cache = make_cache()
    cache.get("warm-up", None)
    step = cache._core.get_or_set("k")
    read, _ = feed(step, None)
    assert isinstance(read, list)
    lease_call, _ = feed(step, cache._send(read))  # the read missed; lease.lua is next
    make_cache().put("k", "filled meanwhile")  # another worker's value lands right then
    instruction, result = send_lease_call(cache, step, lease_call)
    assert instruction is None, f"the value is there: nothing to compute, not {instruction!r}"
    assert result is not None
    assert result.value == "filled meanwhile"
    assert raw.exists(lease_key(namespace, "k")) == 0, "no lease was taken"
    stampede = cache.get_metrics()["stampede"]
    assert (stampede["loads"], stampede["lease_waits"]) == (0, 0)


def hold_the_lease(holder: MultiLevelCache, key: str) -> tuple[Any, Any]:
    """Drive ``holder``'s get_or_set of ``key`` until it holds the fill lease and asks for its loader: the
    operation, and its next instruction (Load), for the test to finish later."""
    step = holder._core.get_or_set(key)
    instruction, _ = feed(step, None)
    while not isinstance(instruction, Load):  # the holder misses and takes the lease
        assert isinstance(instruction, list)
        instruction, _ = feed(step, holder._send(instruction))
    return step, instruction


def finish_the_fill(holder: MultiLevelCache, step: Any, instruction: Any, waiter: Any, done: threading.Event,
                    value: str) -> None:
    """Once ``waiter`` waits for the lease, let ``holder`` compute ``value`` and fill; ``done`` must follow."""
    deadline = time.monotonic() + 5
    while waiter._core.counters.snapshot().get("lease_waits", 0) == 0:  # it found the lease held and waits
        assert time.monotonic() < deadline, "the waiter never waited for the lease"
    while instruction is not None:
        instruction, _ = feed(step, holder._do(instruction, lambda: value))
    assert done.wait(10), "the waiter did not read the holder's value"


def test_a_miss_while_another_worker_holds_the_lease_waits_and_reads_its_value(make_cache: Make, raw: Client,
                                                                              namespace: str) -> None:
    """The other side of the same step: a miss that finds the lease held does not compute; once the holder
    fills, one more lookup reads the value."""
    holder, waiter = make_cache(), make_cache()
    step, instruction = hold_the_lease(holder, "k")
    loads: list[str] = []
    done = threading.Event()

    def wait() -> None:
        loads.append(waiter.get_or_set("k", lambda: "waiter's"))
        done.set()

    thread = threading.Thread(target=wait)
    thread.start()
    finish_the_fill(holder, step, instruction, waiter, done, "holder's")
    thread.join()
    assert loads == ["holder's"]
    assert waiter.get_metrics()["stampede"]["loads"] == 0
    assert raw.exists(lease_key(namespace, "k")) == 0


@pytest.mark.parametrize("front", ["sync", "async"])
def test_a_waiter_is_woken_by_the_fills_announcement_not_by_polling(make_cache: Make, make_async_cache: MakeAsync,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   front: str) -> None:
    """A waiter pays the holder's loader and one message, not a polling interval: with polls an hour
    apart, the waiter still reads the holder's value as soon as the holder's put announces it."""
    monkeypatch.setattr(tiers, "FILL_POLL_WATCHED", 3600.0)
    monkeypatch.setattr(tiers, "FILL_POLL_MAX", 3600.0)
    holder = make_cache()
    step, instruction = hold_the_lease(holder, "k")
    loads: list[str] = []
    done = threading.Event()
    if front == "sync":
        waiter: Any = make_cache()

        def wait() -> None:
            loads.append(waiter.get_or_set("k", lambda: "waiter's"))
            done.set()
    else:
        waiter = make_async_cache()

        def wait() -> None:
            loads.append(asyncio.run(waiter.get_or_set("k", lambda: "waiter's")))
            done.set()

    thread = threading.Thread(target=wait)
    thread.start()
    finish_the_fill(holder, step, instruction, waiter, done, "holder's")  # (polls are an hour apart)
    thread.join()
    assert loads == ["holder's"]


# --------------------------------------------------------------------------- loader exceptions


def test_a_loader_exception_reaches_every_waiting_thread_and_caches_nothing(make_cache: Make, raw: Client,
                                                                           namespace: str) -> None:
    cache = make_cache()
    callers, calls = 8, []
    outcomes: dict[int, BaseException | Any] = {}
    threads: list[threading.Thread] = []

    def failing_loader() -> str:
        calls.append(threading.get_ident())
        try:
            until_the_others_follow(threads)
        except AssertionError as exc:
            raise LoaderFailed(f"test setup failed: {exc}") from None  # the caller's assert reports it
        raise LoaderFailed("the model call failed")

    def call(i: int) -> None:
        try:
            outcomes[i] = cache.get_or_set("k", failing_loader)
        except BaseException as exc:
            outcomes[i] = exc

    run_together(callers, call, threads)
    join_all(threads)

    assert len(calls) == 1, "the loader ran more than once in one process"
    assert len(outcomes) == callers
    assert all(isinstance(o, LoaderFailed) for o in outcomes.values()), outcomes
    assert {str(o) for o in outcomes.values()} == {"the model call failed"}
    assert raw.exists(lease_key(namespace, "k")) == 0  # released at once (lease_ttl is 30 s)
    assert stored(raw, namespace, "k") is MISSING
    assert cache.get("k", MISSING) is MISSING
    assert make_cache().get("k", MISSING) is MISSING

    assert cache.get_or_set("k", lambda: "second try") == "second try"  # the next call computes again
    assert stored(raw, namespace, "k") == "second try"
    assert raw.exists(lease_key(namespace, "k")) == 0


def test_a_loader_exception_reaches_every_waiting_coroutine(make_async_cache: MakeAsync, raw: Client,
                                                            namespace: str) -> None:
    calls: list[int] = []

    async def failing_loader() -> str:
        calls.append(1)
        await asyncio.sleep(0.02)  # the work, during which the other coroutines join
        raise LoaderFailed("the model call failed")

    async def main() -> list[Any]:
        async with make_async_cache() as cache:
            out = await asyncio.gather(*(cache.get_or_set("k", failing_loader) for _ in range(10)),
                                       return_exceptions=True)
            assert raw.exists(lease_key(namespace, "k")) == 0  # released at once (lease_ttl is 30 s)
            assert stored(raw, namespace, "k") is MISSING
            out.append(await cache.get_or_set("k", lambda: "second try"))
            return out

    outcomes = asyncio.run(main())
    assert calls == [1]
    assert all(isinstance(o, LoaderFailed) for o in outcomes[:-1]), outcomes
    assert outcomes[-1] == "second try"
    assert stored(raw, namespace, "k") == "second try"
    assert raw.exists(lease_key(namespace, "k")) == 0


def test_a_cancelled_async_leader_releases_its_fill_lease(make_async_cache: MakeAsync, raw: Client,
                                                          namespace: str) -> None:
    async def main() -> None:
        async with make_async_cache() as cache:
            started = asyncio.Event()

            async def endless_loader() -> str:
                started.set()
                await asyncio.Event().wait()  # until cancelled (an asyncio.timeout around get_or_set)
                return "never"

            task = asyncio.create_task(cache.get_or_set("k", endless_loader))
            await asyncio.wait_for(started.wait(), DEADLINE)
            assert raw.exists(lease_key(namespace, "k")) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert raw.exists(lease_key(namespace, "k")) == 0  # released at once (lease_ttl is 30 s)

    asyncio.run(main())
    assert stored(raw, namespace, "k") is MISSING


def test_a_cancelled_async_leaders_followers_compute_themselves(make_async_cache: MakeAsync, raw: Client,
                                                                 namespace: str) -> None:
    async def main() -> tuple[Any, dict[str, int]]:
        async with make_async_cache() as cache:
            started = asyncio.Event()

            async def endless_loader() -> str:
                started.set()
                await asyncio.Event().wait()  # until cancelled
                return "never"

            leader = asyncio.create_task(cache.get_or_set("k", endless_loader))
            await asyncio.wait_for(started.wait(), DEADLINE)
            follower = asyncio.create_task(cache.get_or_set("k", lambda: "follower's"))
            await asyncio.sleep(0)  # one loop turn: the follower joins the leader's flight and waits
            leader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leader
            value = await asyncio.wait_for(follower, DEADLINE)  # not cancelled: it was not the one cancelled
            return value, (await cache.get_metrics())["stampede"]

    value, stampede = asyncio.run(main())
    assert value == "follower's"
    # two loader runs (the cancelled one counts too); no lease wait: the cancelled leader gave its lease back
    assert (stampede["loads"], stampede["lease_waits"]) == (2, 0)
    assert stored(raw, namespace, "k") == "follower's"
    assert raw.exists(lease_key(namespace, "k")) == 0


class Interrupted(BaseException):
    """Not an Exception: like KeyboardInterrupt or SystemExit reaching a loader."""


def test_an_interrupted_leader_releases_its_lease_and_its_followers_compute_themselves(
        make_cache: Make, raw: Client, namespace: str) -> None:
    cache = make_cache()
    callers, calls = 6, []
    outcomes: dict[int, Any] = {}
    threads: list[threading.Thread] = []
    lock = threading.Lock()

    def loader() -> str:
        with lock:
            calls.append(1)
            first = len(calls) == 1
        if first:
            until_the_others_follow(threads)
            raise Interrupted
        return "computed after the interruption"

    def call(i: int) -> None:
        try:
            outcomes[i] = cache.get_or_set("k", loader)
        except BaseException as exc:
            outcomes[i] = exc

    run_together(callers, call, threads)
    join_all(threads)

    assert len(calls) == 2  # the interrupted computation, then one more for everybody else
    interrupted = [o for o in outcomes.values() if isinstance(o, Interrupted)]
    assert len(interrupted) == 1  # only the interrupted thread sees its interruption
    assert [o for o in outcomes.values() if o is not interrupted[0]] == ["computed after the interruption"] * (
        callers - 1)
    assert cache.get_metrics()["stampede"]["lease_waits"] == 0  # the interrupted leader's lease was gone
    assert stored(raw, namespace, "k") == "computed after the interruption"
    assert raw.exists(lease_key(namespace, "k")) == 0


# -------------------------------------------------------------------------------- loader kinds


def test_sync_cache_runs_plain_and_coroutine_loaders(make_cache: Make, raw: Client, namespace: str) -> None:
    cache = make_cache()

    async def coroutine_loader() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"kind": "coroutine", "items": [1, 2]}

    assert cache.get_or_set("plain", lambda: {"kind": "plain"}) == {"kind": "plain"}
    assert cache.get_or_set("coro", coroutine_loader) == {"kind": "coroutine", "items": [1, 2]}
    assert stored(raw, namespace, "plain") == {"kind": "plain"}
    assert stored(raw, namespace, "coro") == {"kind": "coroutine", "items": [1, 2]}  # the result, not a coroutine

    def must_not_run() -> None:
        raise AssertionError("a hit ran the loader")

    assert make_cache().get_or_set("coro", must_not_run) == {"kind": "coroutine", "items": [1, 2]}
    assert cache.get_metrics()["stampede"]["loads"] == 2


def test_async_cache_runs_coroutine_and_plain_loaders(make_async_cache: MakeAsync, raw: Client,
                                                      namespace: str) -> None:
    async def coroutine_loader() -> list[int]:
        await asyncio.sleep(0)
        return [1, 2, 3]

    def must_not_run() -> None:
        raise AssertionError("a hit ran the loader")

    async def main() -> tuple[Any, ...]:
        async with make_async_cache() as cache:
            a = await cache.get_or_set("coro", coroutine_loader)
            b = await cache.get_or_set("plain", lambda: {"kind": "plain"})
            c = await cache.get_or_set("coro", must_not_run)
            return a, b, c, (await cache.get_metrics())["stampede"]["loads"]

    assert asyncio.run(main()) == ([1, 2, 3], {"kind": "plain"}, [1, 2, 3], 2)
    assert stored(raw, namespace, "coro") == [1, 2, 3]
    assert stored(raw, namespace, "plain") == {"kind": "plain"}


def test_concurrent_coroutines_share_one_load_and_get_independent_copies(make_async_cache: MakeAsync, raw: Client,
                                                                         namespace: str) -> None:
    calls: list[int] = []

    async def loader() -> dict[str, Any]:
        calls.append(1)
        await asyncio.sleep(0.02)  # the work, during which the other coroutines join
        return {"tools": ["read"], "n": len(calls)}

    async def main() -> tuple[list[Any], dict[str, int]]:
        async with make_async_cache() as cache:
            values = await asyncio.gather(*(cache.get_or_set("k", loader) for _ in range(20)))
            return list(values), (await cache.get_metrics())["stampede"]

    values, stampede = asyncio.run(main())
    assert calls == [1]
    assert (stampede["loads"], stampede["lease_waits"]) == (1, 0)  # the others waited in-process, not on Redis
    assert all(v == {"tools": ["read"], "n": 1} for v in values)
    assert len({id(v) for v in values}) == len(values)
    assert len({id(v["tools"]) for v in values}) == len(values)
    values[0]["tools"].append("mutated")
    values[5]["n"] = 99
    assert all(v == {"tools": ["read"], "n": 1} for i, v in enumerate(values) if i not in (0, 5))
    assert stored(raw, namespace, "k") == {"tools": ["read"], "n": 1}


def test_concurrent_threads_share_one_load_and_get_independent_copies(make_cache: Make) -> None:
    cache = make_cache()
    callers, calls = 10, []
    values: dict[int, Any] = {}
    threads: list[threading.Thread] = []

    def loader() -> dict[str, Any]:
        calls.append(1)
        until_the_others_follow(threads)
        return {"tools": ["read"]}

    run_together(callers, lambda i: values.__setitem__(i, cache.get_or_set("k", loader)), threads)
    join_all(threads)

    assert calls == [1]
    assert cache.get_metrics()["stampede"]["lease_waits"] == 0  # the others waited in-process, not on Redis
    assert len(values) == callers
    assert all(v == {"tools": ["read"]} for v in values.values())
    for v in values.values():
        v["tools"].append("mutated by one caller")
    assert all(v == {"tools": ["read", "mutated by one caller"]} for v in values.values())  # no shared lists
    assert cache.get("k") == {"tools": ["read"]}
    assert cache.get_or_set("k", loader) == {"tools": ["read"]}
    assert calls == [1]


# ------------------------------------------------------------------------------- early refresh

TTL = 300_000_000.0  # ~9.5 years: far from expiry, even a huge beta practically never refreshes
BETA = 1e8  # close to expiry (0.5 s left, cost >= 20 ms): refreshes with probability 1 - 2.5e-7
NEAR = TTL - 0.5  # seconds to advance the fake clock to be close to expiry
EARLY: dict[str, Any] = {"early_refresh": True, "early_refresh_beta": BETA, "l2_ttl": None, "l3_ttl": None}


class GatedLoader:
    """First call: a value after 20 ms of "work" (a measurable cost). Later calls (refreshes) block
    until :attr:`gate` opens, so a refresh in progress is visible as a live thread."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, int]:
        with self._lock:
            self.calls.append(len(self.calls) + 1)
            n = len(self.calls)
        if n == 1:
            time.sleep(0.02)  # stands for the computation; get_or_set records its cost in `d`
        elif not self.gate.wait(DEADLINE):
            raise TimeoutError("the gate never opened")
        return {"n": n}


def _fill(cache: MultiLevelCache, raw: Client, namespace: str, loader: GatedLoader) -> dict[bytes, bytes]:
    assert cache.get_or_set("hot", loader, ttl=TTL) == {"n": 1}
    entry = entry_hash(raw, namespace, "hot")
    assert int(entry[b"d"]) >= 20  # the loader's measured cost, in ms
    return entry


def test_early_refresh_recomputes_a_hot_value_once_before_it_expires(make_cache: Make, raw: Client,
                                                                    namespace: str, clock: FakeClock) -> None:
    a, b = make_cache(clock=clock, **EARLY), make_cache(clock=clock, **EARLY)
    loader = GatedLoader()
    before = _fill(a, raw, namespace, loader)

    # Far from expiry: hits (a from L1, b from Redis) start no refresh.
    for cache in (a, b):
        value, refreshing = started_threads(functools.partial(cache.get_or_set, "hot", loader, ttl=TTL))
        assert value == {"n": 1}
        assert refreshing == []
    assert loader.calls == [1]

    # Close to expiry: the first hit starts a background refresh, which takes the lease.
    clock.advance(NEAR)
    value, refreshing = started_threads(functools.partial(a.get_or_set, "hot", loader, ttl=TTL))
    assert value == {"n": 1}  # the hit is served at once; the refresh runs behind it
    assert len(refreshing) == 1
    until(lambda: loader.calls == [1, 2], "the refresh to call the loader")

    # Other hits, in this and another cache, while the refresh runs: no second computation.
    others: list[threading.Thread] = []
    for cache in (b, a, b):
        value, started = started_threads(functools.partial(cache.get_or_set, "hot", loader, ttl=TTL))
        assert value == {"n": 1}
        others += started
    join_all(others)  # any refresh they started found the lease taken (one that got it would still be running)
    assert loader.calls == [1, 2]

    loader.gate.set()
    until(lambda: a.get_metrics()["stampede"]["refreshes"] == 1, "the refresh to complete")
    join_all(refreshing)
    after = entry_hash(raw, namespace, "hot")
    assert ENVELOPE.unwrap(after[b"v"]) == {"n": 2}
    assert int(after[b"ver"]) > int(before[b"ver"])
    assert int(after[b"x"]) > int(before[b"x"])  # a new life, counted from the refresh
    assert b.get_metrics()["stampede"]["refreshes"] == 0
    assert raw.exists(lease_key(namespace, "hot")) == 0
    assert loader.calls == [1, 2]
    assert make_cache(clock=clock).get("hot") == {"n": 2}  # before the old value's expiry


def test_an_early_refresh_does_not_overwrite_a_value_written_meanwhile(make_cache: Make, raw: Client,
                                                                       namespace: str, clock: FakeClock) -> None:
    a, writer = make_cache(clock=clock, **EARLY), make_cache(clock=clock)
    loader = GatedLoader()
    _fill(a, raw, namespace, loader)
    clock.advance(NEAR)
    value, refreshing = started_threads(functools.partial(a.get_or_set, "hot", loader, ttl=TTL))
    assert value == {"n": 1}
    assert len(refreshing) == 1
    until(lambda: loader.calls == [1, 2], "the refresh to call the loader")

    writer.put("hot", {"written": "meanwhile"})  # a new version while the refresh computes
    written = entry_hash(raw, namespace, "hot")
    loader.gate.set()
    join_all(refreshing)

    assert entry_hash(raw, namespace, "hot") == written  # untouched by the refresh
    assert a.get_metrics()["stampede"]["refreshes"] == 0
    assert raw.exists(lease_key(namespace, "hot")) == 0
    copy = a._core.l1.peek(b"hot")
    assert copy is None or ENVELOPE.unwrap(copy.payload) != {"n": 2}
    assert make_cache(clock=clock).get("hot") == {"written": "meanwhile"}


def test_without_early_refresh_a_hit_close_to_expiry_recomputes_nothing(make_cache: Make, raw: Client,
                                                                        namespace: str, clock: FakeClock) -> None:
    settings = {**EARLY, "early_refresh": False}
    a, b = make_cache(clock=clock, **settings), make_cache(clock=clock, **settings)
    loader = GatedLoader()
    before = _fill(a, raw, namespace, loader)
    clock.advance(NEAR)
    for cache in (a, b, a):
        value, refreshing = started_threads(functools.partial(cache.get_or_set, "hot", loader, ttl=TTL))
        assert value == {"n": 1}
        assert refreshing == []  # a refresh would block in the loader: it would still be running
    assert loader.calls == [1]
    assert entry_hash(raw, namespace, "hot")[b"ver"] == before[b"ver"]


def test_a_hit_from_a_call_without_a_ttl_never_refreshes_nor_drops_the_ttl(make_cache: Make, raw: Client,
                                                                           namespace: str, clock: FakeClock) -> None:
    a = make_cache(clock=clock, **EARLY)
    loader = GatedLoader()
    before = _fill(a, raw, namespace, loader)
    clock.advance(NEAR)
    value, refreshing = started_threads(functools.partial(a.get_or_set, "hot", loader))  # no ttl this time
    assert value == {"n": 1}
    assert refreshing == []
    assert loader.calls == [1]
    assert entry_hash(raw, namespace, "hot")[b"x"] == before[b"x"]


def test_async_early_refresh_recomputes_in_a_background_task(make_async_cache: MakeAsync, raw: Client,
                                                             namespace: str) -> None:
    clock = FakeClock()
    calls: list[int] = []

    async def loader() -> dict[str, int]:
        calls.append(1)
        await asyncio.sleep(0.02)  # stands for the computation (a measurable cost)
        return {"n": len(calls)}

    async def main() -> tuple[Any, Any, int]:
        async with make_async_cache(clock=clock, **EARLY) as cache:
            first = await cache.get_or_set("hot", loader, ttl=TTL)
            await cache.flush_bookkeeping()  # its fill lands behind the call: before the clock jumps years ahead
            clock.advance(NEAR)
            hit = await cache.get_or_set("hot", loader, ttl=TTL)
            deadline = time.monotonic() + DEADLINE
            while (await cache.get_metrics())["stampede"]["refreshes"] == 0:
                assert time.monotonic() < deadline, "the background refresh never completed"
                await asyncio.sleep(0.002)  # polling interval
            return first, hit, len(calls)

    assert asyncio.run(main()) == ({"n": 1}, {"n": 1}, 2)
    assert stored(raw, namespace, "hot") == {"n": 2}
    assert raw.exists(lease_key(namespace, "hot")) == 0


def _draw(exponential: float) -> Callable[[], float]:
    """A draw U for which -ln(1 - U) == ``exponential``."""
    return lambda: 1.0 - math.exp(-exponential)


@pytest.mark.parametrize(("ttl_left", "cost", "beta", "e", "expected"), [
    (None, 1.0, 1.0, 5.0, False),  # no ttl: nothing to refresh before
    (1.0, 0.0, 1.0, 5.0, False),  # unknown cost
    (1.0, 1.0, 0.0, 5.0, False),  # beta 0 turns it off
    (2.0, 1.0, 1.0, 2.0, True),  # cost * beta * e == ttl_left: due
    (2.0001, 1.0, 1.0, 2.0, False),  # just short of it
    (2.0, 0.5, 2.0, 2.0, True),  # beta scales the cost
    (2.0, 0.5, 1.0, 2.0, False),
    (10.0, 1.0, 1.0, 0.0, False),  # U = 0: never early
    (1e6, 1.0, 1.0, 20.0, False),  # far from expiry
    (0.001, 1.0, 1.0, 0.01, True),  # nearly expired: even a small draw refreshes
])
def test_refresh_early_is_the_xfetch_test(ttl_left: float | None, cost: float, beta: float, e: float,
                                          expected: bool) -> None:
    assert refresh_early(ttl_left, cost, beta, draw=_draw(e)) is expected


def test_refresh_early_becomes_likelier_as_expiry_nears() -> None:
    for e in (0.1, 0.5, 1.0, 3.0):
        due = [refresh_early(t, 1.0, 1.0, draw=_draw(e)) for t in (5.0, 3.0, 1.0, 0.5, 0.1, 0.01)]
        assert due == sorted(due)  # once due, due for every smaller ttl_left
        assert due[-1]
        assert not due[0]


# ---------------------------------------------------------------------------------- fail-open


def test_fail_open_get_or_set_without_redis_returns_the_loaders_value() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    calls: list[int] = []

    def loader() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    cache = MultiLevelCache(dead, namespace="down", fail_open=True)
    try:
        assert cache.get_or_set("k", loader, ttl=60) == {"n": 1}
        assert cache.get_or_set("k", loader, ttl=60) == {"n": 1}  # this process's own copy
        assert calls == [1]
        assert cache.get_or_set("other", lambda: None) is None
        with pytest.raises(LoaderFailed):  # a loader's own failure still reaches the caller
            cache.get_or_set("failing", lambda: (_ for _ in ()).throw(LoaderFailed("boom")))
        assert cache.get_metrics()["health"]["redis_errors"] >= 1
    finally:
        cache.close()

    async def main() -> Any:
        async with AsyncMultiLevelCache(dead, namespace="down", fail_open=True) as acache:
            return await acache.get_or_set("k", loader)

    assert asyncio.run(main()) == {"n": 2}


def test_fail_closed_get_or_set_without_redis_raises_cache_unavailable() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    calls: list[int] = []

    def loader() -> str:
        calls.append(1)
        return "value"

    cache = MultiLevelCache(dead, namespace="down", fail_open=False)
    try:
        with pytest.raises(CacheUnavailableError, match="fail_open=True"):
            cache.get_or_set("k", loader)
    finally:
        cache.close()  # nothing to report: close() sends nothing

    async def main() -> None:
        async with AsyncMultiLevelCache(dead, namespace="down", fail_open=False) as acache:
            await acache.get_or_set("k", loader)

    with pytest.raises(CacheUnavailableError):
        asyncio.run(main())
    assert calls == []  # nothing computed for a caller who gets an error anyway
