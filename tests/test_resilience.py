"""Resilience against real redis-server processes (docs/design.md#failure-behaviour, docs/failure.md).

Every test runs its own private ``redis-server`` (LocalRedisServer) and kills, freezes or restarts it:

* **SIGKILL under load.** Four spawned worker processes run a mixed workload (get, put, get_many,
  delete, get_or_set) while the server is SIGKILLed, run ~1 s of their own iterations against the dead
  port, and go on while a new server starts on the same port. No exception reaches a caller, every call
  returns within ``socket_timeout + 50 ms``, and every worker reads a marker written after the restart
  from Redis within 2 s of it; each worker's metrics show the outage (errors, the breaker opening) and
  the invalidation channel back up, and the workers reloaded the scripts into the new server (scripts
  are per server: whichever worker first runs one reloads it, so the count is the fleet's, not each's).
* **SIGSTOP for 3 s.** Calls return within their deadline, the circuit opens and then rejects calls
  without I/O (only the threshold calls and one probe per cool-down pay a timeout); SIGCONT closes it
  and the cache serves from Redis again.
* **Retries.** A connection killed while a command is in flight (CLIENT KILL) is retried and the call
  succeeds with no error counted; a WRONGTYPE (a shard key overwritten by hand) is not retried and
  is no outage: a write to that shard fails open (counted) or raises ``CacheUnavailableError`` when
  failing closed, its bookkeeping is dropped, plain reads and the other shards go on. Sync and async:
  tenacity is engaged only once a batch's first attempt has failed (a script answering READONLY once);
  a batch that fails every attempt gives the breaker one verdict, and one interrupted while it pauses
  before a retry (KeyboardInterrupt, cancellation) gives none and does not keep the next call from
  probing.
* **The breaker isolates a dead Redis.** After ``breaker_threshold`` failures no call opens a connection
  (a listening socket put on the port afterwards sees none) and each call counts one rejection.
* **Recovery.** After a restart with an empty dataset the channel resubscribes, L1 has been flushed, and
  a value another cache wrote after the restart is what the first cache reads, never its old L1 copy.
* **Regressions** of bugs these tests found: a cancelled half-open probe wedged the breaker for good; a
  get_or_set waiting on another worker's fill paid two timeouts when Redis froze; a caller waited for the
  invalidation listener's re-subscription (network I/O under the lock every L1 read takes).

Ports: servers and dead addresses use a free port *below* the kernel's ephemeral range. A client
connecting to a dead port inside that range can, rarely, be given that very port as its own and connect
to itself (TCP self-connect), which would both fake a server and keep the port from the restart.

The only sleeps are a worker loop's pacing, loops that run for the stated duration against a dead or
frozen server, and waiting out one breaker cool-down; everything else waits on events or polls with a
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import queue
import random
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import ReadOnlyError, RedisError
from tenacity import AsyncRetrying, Retrying

from victor_rcache import AsyncMultiLevelCache, CacheUnavailableError, MultiLevelCache, resilience
from victor_rcache.coherence import RECONNECT_MAX, SILENCE
from victor_rcache.keys import KeySpace
from victor_rcache.local_redis import LocalRedisServer

from .helpers import FakeClock

MISS = "<miss>"
Result = dict[str, Any]


def quiet_port() -> int:
    """A port nobody is bound to, below the ephemeral range (no client is ever given it as its own)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


@contextlib.contextmanager
def private_server() -> Iterator[LocalRedisServer]:
    server = LocalRedisServer(port=quiet_port())  # an explicit port: start() never moves it elsewhere
    try:
        yield server.start()
    finally:
        server.stop()


def restart(server: LocalRedisServer) -> None:
    """Start a new, empty redis-server on the port the killed one used."""
    port = server.port
    server.start()
    assert server.port == port, "the restarted server must listen on the same port"


def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until it holds; return how long that took (fail after ``timeout`` seconds)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} did not happen within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - started


def health(cache: MultiLevelCache) -> dict[str, Any]:
    return dict(cache.get_metrics()["health"])


def breaker(cache: MultiLevelCache) -> dict[str, Any]:
    return dict(health(cache)["breaker"])


# ====================================================================== 1. SIGKILL under load (processes)

WORKERS = 4
SOCKET_TIMEOUT = 0.5  # the defaults, stated: what CALL_BOUND is about
CONNECT_TIMEOUT = 0.5
BREAKER_THRESHOLD = 5
BREAKER_COOLDOWN = 1.0
CALL_BOUND = SOCKET_TIMEOUT + 0.05  # every call returns within its timeout + 50 ms (docs/failure.md#retries)
SERVE_BOUND = 2.0  # all workers serve from Redis again within 2 s
CHANNEL_BOUND = RECONNECT_MAX + 1.0  # the subscriber's reconnect backoff is capped at RECONNECT_MAX
OUTAGE = 1.0  # seconds of their own iterations each worker runs against the dead port
WARMUP = 50  # iterations against the live server before a worker says it is ready
PACE = 0.002  # a worker's pause between iterations (2 cores for 4 workers, the parent and Redis)
KEYS = [f"k{i}" for i in range(16)]
MARKER_KEY = "marker-after-restart"  # never read or written by a worker before the restart: no L1 copy
DEADLINE = 60.0


@dataclass
class Signals:
    """What the parent and the workers share (spawn pickles it for each worker)."""

    ready: list[Any]  # per worker: warmed up against the live server
    outage_done: list[Any]  # per worker: ran OUTAGE seconds of iterations against the dead port
    served: list[Any]  # per worker: read the marker from Redis
    channel_up: list[Any]  # per worker: its invalidation channel is up again
    killed: Any
    restarted: Any
    stop: Any
    killed_at: Any  # mp.Value("d"): time.monotonic() when the server was dead (system-wide on Linux)
    restarted_at: Any  # mp.Value("d"): time.monotonic() when the new server answered


def _value(key: str, worker: int, n: int) -> dict[str, Any]:
    return {"k": key, "by": worker, "n": n}


def mixed_workload_worker(url: str, namespace: str, worker: int, marker: str, sig: Signals,
                          results: Any) -> None:
    """Run the mixed workload until told to stop; time every call and keep every exception."""
    out: Result = {"worker": worker, "pid": os.getpid(), "errors": [], "wrong": [], "calls": 0,
                   "max_call": 0.0, "max_op": "", "outage_calls": 0}
    try:
        rng = random.Random(worker)
        cache = MultiLevelCache(url, namespace=namespace, fail_open=True, socket_timeout=SOCKET_TIMEOUT,
                                connect_timeout=CONNECT_TIMEOUT, breaker_threshold=BREAKER_THRESHOLD,
                                breaker_cooldown=BREAKER_COOLDOWN, promote_after=2)

        def timed(op: str, call: Callable[[], Any]) -> Any:
            started = time.perf_counter()
            try:
                return call()
            except Exception:  # must never happen: recorded, asserted on by the parent
                out["errors"].append(f"{op}: {traceback.format_exc()}")
                return None
            finally:
                took = time.perf_counter() - started
                out["calls"] += 1
                if took > out["max_call"]:
                    out["max_call"], out["max_op"] = took, op

        def check(key: str, got: Any) -> None:
            if got is not None and not (isinstance(got, dict) and got.get("k") == key):
                out["wrong"].append((key, got))

        n = 0
        while not sig.stop.is_set():
            n += 1
            key, op = rng.choice(KEYS), rng.random()
            if op < 0.25:
                timed("put", lambda: cache.put(key, _value(key, worker, n)))  # noqa: B023 (called at once)
            elif op < 0.55:
                check(key, timed("get", lambda: cache.get(key)))  # noqa: B023
            elif op < 0.70:
                chosen = rng.sample(KEYS, 4)
                for k, got in (timed("get_many", lambda: cache.get_many(chosen)) or {}).items():  # noqa: B023
                    check(k, got)
            elif op < 0.80:
                timed("delete", lambda: cache.delete(key))  # noqa: B023
            else:
                check(key, timed("get_or_set", lambda: cache.get_or_set(key, lambda: _value(key, worker, -n))))  # noqa: B023

            if n == WARMUP:
                out["ready_metrics"] = timed("get_metrics", cache.get_metrics)
                sig.ready[worker].set()
            if sig.killed.is_set() and not sig.outage_done[worker].is_set():
                out["outage_calls"] += 1
                if time.monotonic() - sig.killed_at.value >= OUTAGE:
                    out["outage_metrics"] = timed("get_metrics", cache.get_metrics)
                    sig.outage_done[worker].set()
            if sig.restarted.is_set():
                if "served_after" not in out:
                    if timed("get", lambda: cache.get(MARKER_KEY)) == marker:
                        out["served_after"] = time.monotonic() - sig.restarted_at.value
                        sig.served[worker].set()
                elif "channel_up_after" not in out:
                    metrics = timed("get_metrics", cache.get_metrics)
                    if metrics and metrics["coherence"]["channel"] == "up":
                        out["channel_up_after"] = time.monotonic() - sig.restarted_at.value
                        sig.channel_up[worker].set()
            time.sleep(PACE)
        out["final_metrics"] = timed("get_metrics", cache.get_metrics)
        cache.close()
    except BaseException:
        out["crash"] = traceback.format_exc()
    results.put(out)


def _wait_for(events: list[Any], what: str, procs: list[Any], results: Any, deadline: float) -> None:
    """Wait until every event is set; fail at once if a worker died (with its traceback)."""
    for event in events:
        while not event.wait(timeout=0.05):
            gone = [p for p in procs if not p.is_alive()]
            if gone:
                reports = []
                with contextlib.suppress(queue.Empty):
                    while True:
                        reports.append(results.get(timeout=0.5))
                pytest.fail(f"worker(s) {[p.pid for p in gone]} ended before '{what}': {reports}")
            assert time.monotonic() < deadline, f"not every worker reached '{what}' in time"


def test_sigkill_under_a_four_process_load_then_restart_on_the_same_port(namespace: str) -> None:
    ctx = mp.get_context("spawn")

    def events() -> list[Any]:
        return [ctx.Event() for _ in range(WORKERS)]

    sig = Signals(ready=events(), outage_done=events(), served=events(), channel_up=events(),
                  killed=ctx.Event(), restarted=ctx.Event(), stop=ctx.Event(),
                  killed_at=ctx.Value("d", 0.0), restarted_at=ctx.Value("d", 0.0))
    results = ctx.Queue()
    marker = f"written after the restart {os.getpid()} {time.time()}"
    with private_server() as server:
        procs = [ctx.Process(target=mixed_workload_worker, args=(server.url, namespace, w, marker, sig, results))
                 for w in range(WORKERS)]
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + DEADLINE
            _wait_for(sig.ready, "ready", procs, results, deadline)

            server.kill()
            sig.killed_at.value = time.monotonic()
            sig.killed.set()
            _wait_for(sig.outage_done, "outage done", procs, results, deadline)

            before_start = time.monotonic()
            restart(server)
            sig.restarted_at.value = restarted_at = time.monotonic()
            sig.restarted.set()
            with MultiLevelCache(server.url, namespace=namespace, fail_open=False) as writer:
                writer.put(MARKER_KEY, marker)
            _wait_for(sig.served, "served the marker", procs, results, deadline)
            _wait_for(sig.channel_up, "channel up", procs, results, deadline)
            sig.stop.set()

            reports: list[Result] = []
            while len(reports) < WORKERS:
                assert time.monotonic() < deadline, "not every worker reported"
                with contextlib.suppress(queue.Empty):
                    reports.append(results.get(timeout=0.5))
            for p in procs:
                p.join(timeout=max(0.1, deadline - time.monotonic()))
                assert p.exitcode == 0, f"worker {p.pid} exited with {p.exitcode}"
        finally:
            sig.stop.set()
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)

    reports.sort(key=lambda r: r["worker"])
    # Scripts live in the server, shared by every connection: whichever worker first runs one on the new
    # server reloads it (the others then find it there). Only the workers run scripts (their writes, leases
    # and bookkeeping).
    reloads = [r["final_metrics"]["health"]["script_reloads"] - r["outage_metrics"]["health"]["script_reloads"]
               for r in reports if "final_metrics" in r and "outage_metrics" in r]
    print(f"script reloads after the restart, per worker: {reloads}")
    for r in reports:
        print(f"worker {r['worker']}: {r['calls']} calls ({r['outage_calls']} in the outage), max call "
              f"{r['max_call'] * 1000:.1f} ms ({r['max_op']}), served the marker {r.get('served_after', -1):.3f} s "
              f"and channel up {r.get('channel_up_after', -1):.3f} s after the restart "
              f"(server start took {restarted_at - before_start:.3f} s); "
              f"outage breaker {r.get('outage_metrics', {}).get('health', {}).get('breaker')}; "
              f"final health {r.get('final_metrics', {}).get('health')}")

    for r in reports:
        w = f"worker {r['worker']}"
        assert "crash" not in r, f"{w} crashed:\n{r['crash']}"
        assert not r["errors"], f"{w}: exceptions reached the caller:\n" + "\n".join(r["errors"])
        assert not r["wrong"], f"{w} read values of other keys: {r['wrong'][:5]}"
        assert r["max_call"] <= CALL_BOUND, (
            f"{w}: a {r['max_op']} took {r['max_call']:.3f} s, over socket_timeout + 50 ms = {CALL_BOUND} s")
        assert r["served_after"] <= SERVE_BOUND, (
            f"{w} served from Redis {r['served_after']:.3f} s after the restart, over {SERVE_BOUND} s")
        assert r["channel_up_after"] <= CHANNEL_BOUND, f"{w}: channel up only after {r['channel_up_after']:.3f} s"

        ready, outage, final = (r[f"{phase}_metrics"]["health"] for phase in ("ready", "outage", "final"))
        assert ready["redis_errors"] == 0, f"{w} was not healthy before the kill"
        assert ready["redis_available"], f"{w} was not healthy before the kill"
        assert r["outage_metrics"]["coherence"]["channel"] == "down", f"{w} trusted L1 with the channel dead"
        assert outage["redis_errors"] > 0, f"{w} counted no Redis errors in the outage"
        # Each outage call is one failed batch until the breaker opens: enough of them must open it.
        assert r["outage_calls"] >= BREAKER_THRESHOLD, f"{w} made only {r['outage_calls']} calls in the outage"
        assert outage["breaker"]["opens"] >= 1, f"{w}: the breaker never opened: {outage['breaker']}"
        assert outage["breaker"]["rejected_calls"] > 0, f"{w}: the open breaker rejected nothing"
        assert final["redis_available"], f"{w}: {final}"
        assert final["breaker"]["state"] == "closed", f"{w}: {final}"
    assert sum(reloads) >= 1, "no worker reloaded a script into the restarted (empty) server"


# ======================================================================== 2. SIGSTOP for 3 seconds

FREEZE = 3.0  # Redis frozen (SIGSTOP) for 3 s


def test_a_frozen_redis_costs_each_call_its_deadline_at_most_and_opens_the_circuit(namespace: str) -> None:
    timeout, connect, threshold, cooldown = 0.2, 0.2, 3, 0.5
    bound = timeout + connect + 0.05
    with private_server() as server:
        assert server.process is not None
        pid = server.process.pid
        # promote_after is never reached: the cache has no L1 copy, every get of "k" asks Redis.
        cache = MultiLevelCache(server.url, namespace=namespace, fail_open=True, socket_timeout=timeout,
                                connect_timeout=connect, breaker_threshold=threshold, breaker_cooldown=cooldown,
                                promote_after=1_000_000)
        writer = MultiLevelCache(server.url, namespace=namespace, fail_open=False)
        try:
            writer.put("k", "v")
            assert cache.get("k", MISS) == "v"
            before = cache.get_metrics()
            assert before["l2"]["hits"] == 1
            assert before["health"]["breaker"]["state"] == "closed"

            durations: list[float] = []
            states: set[str] = set()
            os.kill(pid, signal.SIGSTOP)
            try:
                frozen_at = time.monotonic()
                n = 0
                while time.monotonic() - frozen_at < FREEZE:  # the loop *is* the freeze the issue describes
                    n += 1
                    started = time.perf_counter()
                    if n % 2:
                        got = cache.get("k", MISS)
                    else:
                        cache.put(f"p{n % 8}", n)
                        got = MISS
                    durations.append(time.perf_counter() - started)
                    assert got == MISS, "nothing can be read from a frozen Redis and L1 holds no copy"
                    states.add(cache._resilience.breaker.state)
                started = time.perf_counter()
                frozen = cache.get_metrics()  # a call during the freeze as well
                durations.append(time.perf_counter() - started)
            finally:
                os.kill(pid, signal.SIGCONT)
            thawed_at = time.monotonic()

            def served_from_redis() -> bool:
                hits = cache.get_metrics()["l2"]["hits"]
                got = cache.get("k", MISS)
                after = cache.get_metrics()
                closed = after["health"]["breaker"]["state"] == "closed"
                return bool(got == "v" and after["l2"]["hits"] == hits + 1 and closed)

            recovered = until(served_from_redis, 5.0, "serving from Redis after SIGCONT")
        finally:
            cache.close()
            writer.close()

    b0, b = before["health"]["breaker"], frozen["health"]["breaker"]
    rejected = b["rejected_calls"] - b0["rejected_calls"]
    slow = sum(d >= timeout for d in durations)  # the calls that paid a timeout
    contacted = len(durations) - rejected  # the calls the breaker let through to the frozen server
    errors = frozen["health"]["redis_errors"] - before["health"]["redis_errors"]
    print(f"freeze: {len(durations)} calls, max {max(durations) * 1000:.1f} ms (bound {bound * 1000:.0f} ms), "
          f"{slow} paid a timeout, {rejected} rejected, {errors} counted errors, breaker {b}, "
          f"states seen {sorted(states)}, "
          f"served from Redis {recovered:.3f} s after SIGCONT ({time.monotonic() - thawed_at:.3f} s with checks)")

    assert max(durations) <= bound, f"a call took {max(durations):.3f} s during the freeze, over {bound} s"
    assert "open" in states, f"the circuit never opened: {sorted(states)}"
    assert b["opens"] >= 1, f"the circuit never opened: {b}"
    # Only the calls that opened the circuit and one probe per cool-down may touch the frozen server.
    assert b["opens"] <= 1 + FREEZE / cooldown + 1, f"the circuit reopened more often than its cool-down allows: {b}"
    # The threshold calls, then one probe per cool-down (each failed probe reopens the circuit).
    assert contacted <= threshold + b["opens"] - 1, f"{contacted} calls reached Redis; {b}"
    assert slow <= threshold + b["opens"], f"{slow} calls paid a timeout; threshold {threshold}, opens {b['opens']}"
    assert errors == len(durations), f"{errors} counted failures for {len(durations)} failed calls"


# ================================================================================== 3. retries


def test_a_connection_killed_in_flight_is_retried_and_the_call_succeeds(namespace: str) -> None:
    with private_server() as server, redis.Redis.from_url(server.url) as raw:
        # promote_after is never reached and another cache writes: "k" is never in this cache's L1.
        cache = MultiLevelCache(server.url, namespace=namespace, fail_open=False, promote_after=1_000_000)
        try:
            with MultiLevelCache(server.url, namespace=namespace, fail_open=False) as writer:
                writer.put("k", "v")
            assert cache.get("k") == "v"
            cache.flush_bookkeeping()  # nothing of the cache's waits to be sent: the put below is its only call
            before = health(cache)
            assert isinstance(cache.client, redis.Redis)
            pool = cache.client.connection_pool
            [pooled] = [c for c in pool._available_connections if c._sock is not None]
            addr = f"127.0.0.1:{pooled._sock.getsockname()[1]}"

            # CLIENT PAUSE WRITE holds the cache's next script call (a put: a plain read would not be held)
            # in the server; CLIENT KILL then cuts that very connection mid-call (an idle one would be
            # replaced by redis-py's pool unnoticed).
            raw.client_pause(2000, all=False)
            out: dict[str, Any] = {}

            def call() -> None:
                try:
                    cache.put("k", "w")
                    out["value"] = cache.get("k")
                except Exception as exc:
                    out["error"] = exc

            thread = threading.Thread(target=call)
            try:
                thread.start()

                def held() -> bool:
                    return any(c["addr"] == addr and "b" in c["flags"] and c["sub"] == "0"
                               for c in raw.client_list())

                until(held, 5.0, "the cache's call being held by CLIENT PAUSE WRITE")
                assert raw.client_kill(addr)
            finally:
                raw.client_unpause()
                thread.join(5)
            assert not thread.is_alive()
            after = health(cache)
        finally:
            cache.close()
    assert "error" not in out, f"the retried call raised {out.get('error')!r}"
    assert out["value"] == "w"
    assert after["redis_errors"] == before["redis_errors"], "a retried success must not count an error"
    assert after["breaker"]["retries"] >= before["breaker"]["retries"] + 1, after["breaker"]
    assert after["breaker"]["consecutive_failures"] == 0


@pytest.mark.parametrize("fail_open", [True, False])
def test_wrongtype_is_not_retried_a_counted_failure_or_cache_unavailable(namespace: str, fail_open: bool) -> None:
    with private_server() as server, redis.Redis.from_url(server.url) as raw:
        cache = MultiLevelCache(server.url, namespace=namespace, fail_open=fail_open, breaker_threshold=2,
                                promote_after=1_000_000)
        try:
            space = KeySpace(namespace, cache.config.shards)
            shard = space.ref("k").shard
            ok_key = next(f"o{i}" for i in range(1000) if space.ref(f"o{i}").shard != shard)
            with MultiLevelCache(server.url, namespace=namespace, fail_open=False) as writer:
                writer.put_many({"k": "v", ok_key: "fine"})  # the shards' keys exist, scripts are loaded
            assert cache.get(ok_key) == "fine"
            others = ["k", *[f"x{i}" for i in range(1000) if space.ref(f"x{i}").shard == shard][:2]]
            before = cache.get_metrics()
            l2 = space.shard_keys[shard].l2
            raw.set(l2, "not a sorted set")  # by hand: the wrong Redis type
            for key in others:  # more failures than breaker_threshold, none of them Redis being down
                if fail_open:
                    cache.put(key, "unconfirmed")  # the shard's script refuses it: the write fails open
                else:
                    with pytest.raises(CacheUnavailableError, match="WRONGTYPE"):
                        cache.put(key, "unconfirmed")
            # Plain reads do not touch the shard's index: Redis answers, so no unconfirmed copy is served.
            assert [cache.get(key, MISS) for key in others] == ["v", MISS, MISS]
            assert cache.get(ok_key) == "fine", "another shard is still served from Redis"
            cache.put(ok_key, "still fine")  # and written
            cache.flush_bookkeeping()  # the reads' bookkeeping of the broken shard is refused, and dropped
            raw.delete(l2)  # get_metrics reads every shard's index: give it back a readable one
            after = cache.get_metrics()
        finally:
            cache.close()
    b0, b1 = before["health"]["breaker"], after["health"]["breaker"]
    assert b1["retries"] == b0["retries"], "WRONGTYPE cannot succeed on a retry"
    assert after["health"]["redis_errors"] - before["health"]["redis_errors"] == len(others)
    assert after["combined"]["puts"] - before["combined"]["puts"] == 1
    assert after["health"]["bookkeeping"]["dropped_batches"] >= 1, "bookkeeping only: dropped, not an error"
    # A wrong key type is not an outage: the circuit stays closed for every other key.
    assert b1["state"] == "closed", b1
    assert b1["opens"] == 0, b1


# A script that answers READONLY (transient: a server does so during a failover) on its first call, or on every
# call with ARGV[1] = 'always'; KEYS[1] counts the calls that reached Redis.
FLAKY = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or ARGV[1] == 'always' then return redis.error_reply('READONLY answered by a test script') end
return n
"""


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_tenacity_is_engaged_only_once_a_first_attempt_has_failed(namespace: str, asynchronous: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    class CountedRetrying(Retrying):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append("Retrying")
            super().__init__(*args, **kwargs)

    class CountedAsyncRetrying(AsyncRetrying):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append("AsyncRetrying")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(resilience, "Retrying", CountedRetrying)
    monkeypatch.setattr(resilience, "AsyncRetrying", CountedAsyncRetrying)
    monkeypatch.setattr(resilience, "RETRY_WINDOW", 10.0)  # the window is socket_timeout then: a slow machine retries
    flaky = ("EVAL", FLAKY, 1, f"{namespace}:attempts", "once")
    settings: dict[str, Any] = {"namespace": namespace, "fail_open": False, "promote_after": 10**9}

    def sync_calls(url: str) -> dict[str, Any]:
        with MultiLevelCache(url, **settings) as writer, MultiLevelCache(url, **settings) as cache:
            writer.put_many({"a": 1, "b": 2})
            cache.put("c", 3)
            out: dict[str, Any] = {"happy": [cache.get("a"), cache.get_many(["a", "b"]), cache.delete("a"),
                                             cache.get("a", MISS)]}
            out["built before"] = list(built)
            out["flaky"] = cache._send([flaky])
            out["breaker"] = cache._resilience.snapshot()
        return out

    async def async_calls(url: str) -> dict[str, Any]:
        async with AsyncMultiLevelCache(url, **settings) as writer, AsyncMultiLevelCache(url, **settings) as cache:
            await writer.put_many({"a": 1, "b": 2})
            await cache.put("c", 3)
            out: dict[str, Any] = {"happy": [await cache.get("a"), await cache.get_many(["a", "b"]),
                                             await cache.delete("a"), await cache.get("a", MISS)]}
            out["built before"] = list(built)
            out["flaky"] = await cache._send([flaky])
            out["breaker"] = cache._resilience.snapshot()
        return out

    with private_server() as server:
        out = asyncio.run(async_calls(server.url)) if asynchronous else sync_calls(server.url)
    assert out["happy"] == [1, {"a": 1, "b": 2}, True, MISS]
    assert out["built before"] == [], "batches that succeed at once must not build a tenacity object"
    assert out["flaky"] == [2], "the READONLY of the first attempt is retried, and the retry succeeds"
    assert built == ["AsyncRetrying" if asynchronous else "Retrying"]
    assert out["breaker"]["retries"] == 1
    assert out["breaker"]["consecutive_failures"] == 0


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_batch_gives_one_verdict_whatever_its_retries_and_an_interrupted_one_none(
        namespace: str, asynchronous: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resilience, "RETRY_WINDOW", 10.0)  # as above: the attempts, not the window, end the batch
    counter = f"{namespace}:attempts"
    always = [("EVAL", FLAKY, 1, counter, "always")]
    clock = FakeClock()
    settings: dict[str, Any] = {"namespace": namespace, "fail_open": False, "breaker_threshold": 1,
                                "breaker_cooldown": 1.0}

    def interrupted_sync(cache: MultiLevelCache) -> BaseException:
        def interrupt(_seconds: float) -> None:
            raise KeyboardInterrupt  # as a ^C would, during the pause before a retry

        cache._resilience.sleep = interrupt
        try:
            with pytest.raises(KeyboardInterrupt) as caught:
                cache._send(always)
        finally:
            cache._resilience.sleep = time.sleep
        return caught.value

    def sync_calls(url: str) -> dict[str, Any]:
        with MultiLevelCache(url, **settings) as cache:
            cache._resilience.breaker.clock = clock  # the cool-down passes when the test says
            out: dict[str, Any] = {"failed": cache._send(always), "after failure": cache._resilience.snapshot()}
            clock.advance(1.0)  # the next batch is the half-open probe
            out["interrupted"] = interrupted_sync(cache)
            out["after interruption"] = cache._resilience.snapshot()
            out["probe"] = cache._send([("PING",)])
            out["after probe"] = cache._resilience.snapshot()
        return out

    async def async_calls(url: str) -> dict[str, Any]:
        async with AsyncMultiLevelCache(url, **settings) as cache:
            cache._resilience.breaker.clock = clock
            out: dict[str, Any] = {"failed": await cache._send(always), "after failure": cache._resilience.snapshot()}
            clock.advance(1.0)
            paused = asyncio.Event()

            async def park(_seconds: float) -> None:  # the pause before a retry, until the task is cancelled
                paused.set()
                await asyncio.Event().wait()

            cache._resilience.async_sleep = park
            probe = asyncio.get_running_loop().create_task(cache._send(always))
            await asyncio.wait_for(paused.wait(), 10.0)
            probe.cancel()
            with pytest.raises(asyncio.CancelledError) as caught:
                await probe
            cache._resilience.async_sleep = asyncio.sleep
            out["interrupted"] = caught.value
            out["after interruption"] = cache._resilience.snapshot()
            out["probe"] = await cache._send([("PING",)])
            out["after probe"] = cache._resilience.snapshot()
        return out

    with private_server() as server, redis.Redis.from_url(server.url) as raw:
        out = asyncio.run(async_calls(server.url)) if asynchronous else sync_calls(server.url)
        attempts = int(raw.get(counter) or 0)
    failed, interrupted, probed = out["after failure"], out["after interruption"], out["after probe"]
    assert isinstance(out["failed"], ReadOnlyError), out["failed"]
    assert attempts == resilience.RETRY_ATTEMPTS + 1, "every attempt of the failed batch, then the probe's first"
    # RETRY_ATTEMPTS attempts, one failure: the breaker (threshold 1) opened once.
    assert (failed["retries"], failed["consecutive_failures"], failed["state"], failed["opens"]) == (
        resilience.RETRY_ATTEMPTS - 1, 1, "open", 1)
    # The interrupted probe gave no verdict, and let the next call probe.
    assert (interrupted["consecutive_failures"], interrupted["state"], interrupted["opens"]) == (1, "half_open", 1)
    assert interrupted["retries"] == failed["retries"] + 1, "the retry it was pausing for is counted"
    assert not isinstance(out["probe"], RedisError), out["probe"]
    assert (probed["state"], probed["consecutive_failures"]) == ("closed", 0)


# ====================================================================== 4. the breaker isolates Redis


def test_an_open_breaker_makes_no_connection_attempt(namespace: str) -> None:
    threshold = 3
    port = quiet_port()  # nothing listens here
    cache = MultiLevelCache(f"redis://127.0.0.1:{port}/0", namespace=namespace, fail_open=True, coherence=False,
                            breaker_threshold=threshold, breaker_cooldown=600)
    try:
        for n in range(threshold):
            assert cache._resilience.breaker.state == "closed", f"open after only {n} failures"
            assert cache.get("k", MISS) == MISS
        m = cache.get_metrics()  # refused too: the breaker is open
        assert m["health"]["breaker"]["state"] == "open"
        assert m["health"]["breaker"]["opens"] == 1
        assert m["health"]["redis_errors"] == threshold + 1

        # From now on a connection attempt would succeed, and this socket would see it.
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(16)
            calls: list[Callable[[], Any]] = [
                lambda: cache.get("k"), lambda: cache.put("k", 1), lambda: cache.get_many(["a", "b", "c"]),
                lambda: cache.delete("a"), lambda: cache.get_or_set("z", lambda: 2), cache.invalidate,
            ]
            rejected = m["health"]["breaker"]["rejected_calls"]
            for call in calls * 3:
                call()
                m = cache.get_metrics()
                # One rejection for the call, one for get_metrics itself: neither contacted Redis.
                assert m["health"]["breaker"]["rejected_calls"] == rejected + 2, m["health"]["breaker"]
                assert m["health"]["breaker"]["state"] == "open"
                rejected += 2
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):
                listener.accept()  # nobody connected
    finally:
        cache.close()


# ============================================================================== 5. recovery


def test_after_an_empty_restart_the_channel_resubscribes_and_no_stale_l1_copy_is_served(namespace: str) -> None:
    with private_server() as server:
        first = MultiLevelCache(server.url, namespace=namespace, fail_open=True, promote_after=1)
        other = MultiLevelCache(server.url, namespace=namespace, fail_open=False)
        try:
            other.put("k", "v1")
            assert first.get("k") == "v1"  # an L2 hit, copied into first's L1 (promote_after=1)
            assert first.get("k") == "v1"
            before = first.get_metrics()
            assert before["l1"]["hits"] == 1, "the second read must come from L1"
            assert before["coherence"]["channel"] == "up"

            server.kill()
            # first's listener notices the lost channel by itself (readers do no I/O) and stops trusting
            # L1; from then on every get asks Redis.
            until(lambda: first._core.coherence_state()["channel"] == "down", 5.0, "first noticing the outage")
            # Calls during the outage fail open (and open first's breaker): a miss or L1, never an error.
            for _ in range(first.config.breaker_threshold + 2):
                assert first.get("k", MISS) in ("v1", MISS)
            assert breaker(first)["state"] == "open"

            restart(server)
            other.put("k", "v2")  # in the new, empty server; first may be resubscribed or not yet
            seen: list[Any] = []

            def reads_v2() -> bool:
                seen.append(first.get("k", MISS))
                assert seen[-1] != "v1", f"a stale L1 copy from before the outage was served: {seen}"
                return bool(seen[-1] == "v2")

            took = until(reads_v2, 5.0, "the first cache reading v2")

            def resubscribed() -> bool:
                return bool(first.get_metrics()["coherence"]["channel"] == "up")

            until(resubscribed, RECONNECT_MAX + 3.0, "the invalidation channel coming back")
            with redis.Redis.from_url(server.url) as raw:  # first and other (one process: one subscription)
                until(lambda: raw.pubsub_shardnumsub(first._core.space.channels[0])[0][1] == 1, RECONNECT_MAX + 3.0,
                      "the caches subscribing on the new server")
            first.flush_bookkeeping()  # its reads' bookkeeping: the first script it runs on the new server
            after = first.get_metrics()
            assert first.get("k") == "v2"
        finally:
            first.close()
            other.close()
    print(f"recovery: v2 read {took:.3f} s after the restart; reads {seen[:3]}...{seen[-1:]} ({len(seen)}); "
          f"coherence {after['coherence']}; health {after['health']}")
    assert after["coherence"]["l1_flushes"] > before["coherence"]["l1_flushes"]
    assert after["health"]["script_reloads"] > before["health"]["script_reloads"]
    assert after["health"]["breaker"]["state"] == "closed"


# ============================================================ regressions of bugs found by these tests


def test_a_cancelled_probe_does_not_wedge_the_breaker(namespace: str) -> None:
    async def scenario(server: LocalRedisServer) -> dict[str, Any]:
        assert server.process is not None
        pid = server.process.pid
        cache = AsyncMultiLevelCache(server.url, namespace=namespace, breaker_threshold=1, breaker_cooldown=0.2,
                                     socket_timeout=0.3, connect_timeout=0.3)
        try:
            assert await cache.get("x", MISS) == MISS
            os.kill(pid, signal.SIGSTOP)
            try:
                await cache.get("x")  # times out: the circuit opens
                await asyncio.sleep(0.2 + 0.05)  # the cool-down passes: the next call is the half-open probe
                with pytest.raises(asyncio.TimeoutError):  # it waits on the frozen server: the caller gives up
                    await asyncio.wait_for(cache.get("x"), 0.05)
            finally:
                os.kill(pid, signal.SIGCONT)

            async def closed() -> bool:
                await cache.get("x")
                return bool((await cache.get_metrics())["health"]["breaker"]["state"] == "closed")

            started = time.monotonic()
            while not await closed():
                if time.monotonic() - started > 3.0:
                    break
                await asyncio.sleep(0.02)
            return dict((await cache.get_metrics())["health"]["breaker"])
        finally:
            await cache.close()

    with private_server() as server:
        state = asyncio.run(scenario(server))
    assert state["state"] == "closed", f"3 s after SIGCONT the breaker is still {state}"


def test_get_or_set_pays_one_timeout_at_most_when_redis_freezes_during_a_lease_wait(namespace: str) -> None:
    timeout = 0.2
    with private_server() as server, redis.Redis.from_url(server.url) as raw:
        assert server.process is not None
        pid = server.process.pid
        cache = MultiLevelCache(server.url, namespace=namespace, socket_timeout=timeout, connect_timeout=timeout)
        try:
            cache.put("warm", 1)  # config checked, scripts loaded
            space = KeySpace(namespace, cache.config.shards)
            raw.set(space.lease_key(space.ref("k")), "another worker", px=10_000)  # another worker fills "k"
            raw.config_resetstat()
            frozen: dict[str, float] = {}

            def freeze_once_the_cache_polls() -> None:
                until(lambda: int(raw.info("commandstats").get("cmdstat_pttl", {}).get("calls", 0)) >= 1, 5.0,
                      "the cache polling the lease")
                os.kill(pid, signal.SIGSTOP)
                frozen["at"] = time.monotonic()

            thread = threading.Thread(target=freeze_once_the_cache_polls)
            thread.start()
            try:
                value = cache.get_or_set("k", lambda: "computed")
                returned_at = time.monotonic()
            finally:
                thread.join(10)
                os.kill(pid, signal.SIGCONT)
        finally:
            cache.close()
    assert value == "computed"
    took = returned_at - frozen["at"]
    assert took <= timeout + 0.05, f"get_or_set returned {took:.3f} s after Redis froze (socket_timeout {timeout})"


def test_a_caller_never_waits_for_the_listener_resubscribing(namespace: str) -> None:
    timeout = 0.3
    with private_server() as server:
        assert server.process is not None
        pid = server.process.pid
        cache = MultiLevelCache(server.url, namespace=namespace, socket_timeout=timeout, connect_timeout=timeout,
                                breaker_threshold=1, breaker_cooldown=60)
        try:
            cache.put("k", 1)  # this process's own L1 copy: served without Redis while the channel is trusted
            durations: list[float] = []
            os.kill(pid, signal.SIGSTOP)
            try:
                frozen_at = time.monotonic()
                # The listener gives the silent server up after SILENCE, flushes L1 and re-subscribes.
                while time.monotonic() - frozen_at < SILENCE + 2 * timeout + 0.5:
                    started = time.perf_counter()
                    cache.get("k")
                    durations.append(time.perf_counter() - started)
                flushes = cache.get_metrics()["coherence"]["l1_flushes"]
            finally:
                os.kill(pid, signal.SIGCONT)
        finally:
            cache.close()
    assert flushes >= 2, "the listener never gave up on the frozen server (the scenario did not happen)"
    assert max(durations) <= timeout + 0.05, f"a get took {max(durations):.3f} s (socket_timeout {timeout})"
