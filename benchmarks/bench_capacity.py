"""Capacity: what one Redis master spends per operation, a model built on it, and the model checked on a fleet.

    python -m benchmarks run --group capacity [--quick|--tiny]
    .venv/bin/python benchmarks/bench_capacity.py [--quick|--tiny] [--url redis://host:port/0] [--json]

Every cost is **Redis CPU**: the redis-server process's own CPU time (``INFO cpu``: ``used_cpu_user +
used_cpu_sys``) over many operations by one process, less the idle server's CPU over as long (its rate
measured first), per operation. It includes what ``INFO commandstats`` leaves out (reading the request,
writing the reply, the event loop's wake-up), so it is what fills a core; the commands' own time
(``commandstats`` usec, :func:`command_usec`) is kept alongside as a cross-check. The operations of a case
are paced ``Sizes.gap`` (1 ms) apart, as a fleet's requests reach Redis: a request that finds the server
idle costs more than one of a back-to-back stream, and costs taken back to back predicted only 0.66-0.85
of the check's fleet. Measured:

* a Redis hit from L2 and from L3, cold L1 (``MultiLevelCache.get`` of keys another instance wrote, each read
  once), a miss (``get_or_set`` of an absent key: the ``HMGET`` that misses, ``lease.lua``, the fill), a
  ``get`` that misses alone, a put rewriting an entry and a put of a new key, and a plain ``GET`` of the same
  payload (each figure's floor). A hit's or a miss's bookkeeping is one event in a ``touch.lua`` call that
  carries its shard's events of one window (``bookkeeping.WINDOW``), so its cost depends on how many events
  a call carries: hits are read back to back (many per call) and again with ``flush_bookkeeping()`` after
  each (one per call); the difference is the fixed cost of a ``touch.lua`` call (``touch_call``), and each
  operation's cost is given without it (the model adds the calls a given rate makes);
* the invalidation fan-out: the same puts with 0, 1, 4 and 16 subscribed processes (each a process with a
  ``MultiLevelCache`` of the namespace, coherence on: its listener is the subscriber), the per-subscriber
  slope by least squares; and what an idle connected process costs: the commands it sends (its listener's
  health-check PING, once a second), counted, at a PING's cost (their CPU is lost in the idle server's);
* the prediction model's background rounds: ``record_query`` with a round (``flush()``) after each record and
  after every 64, so a round's fixed cost and a record's cost; ``predict_next_queries`` (answered from the
  process's view: its Redis cost is the view's reads, in rounds);
* memory: ``used_memory`` delta per entry (bench_tiers' ``VALUE``: a tool-selection dict, 111 bytes of
  msgpack) and per model pattern set (``get_statistics()["patterns"]["total"]``);
* connections per process: ``CLIENT LIST`` entries of one process with one cache, after its first calls,
  with a warmer, and with a second cache.

From those, :func:`predict` gives the Redis CPU share of a fleet (workers x requests/s x the mix-weighted cost
of a request); :func:`capacity_table` tabulates it. The validation runs bench_fleet's workload (its ``Pool``,
``fleet`` configuration: ``AsyncMultiLevelCache.get_or_set``) with ``VALIDATION_WORKERS`` processes that
mostly think (``think_ms`` after each read, so about 50 requests/s each), measures the server's CPU over the
run as bench_prewarm does, and compares it with the model fed the same run's per-op costs and the run's
own mix (the workers' tier counters, writes, rates): the verdict is measured / predicted within 0.75-1.25.
The results and the table are in docs/capacity.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import math
import multiprocessing
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import msgpack
import redis

from benchmarks import facts
from benchmarks.bench_fleet import SHARDS, FleetSettings, Pool, calibrate, run_and_print, say
from benchmarks.bench_prewarm import RedisCPU, measured_run
from benchmarks.bench_tiers import VALUE, push_to_l3
from benchmarks.figures import Progress, figure, noop
from benchmarks.workloads import query_name
from victor_rcache import MultiLevelCache, PredictiveCacheWarmer
from victor_rcache.bookkeeping import COUNTS_INTERVAL, WINDOW
from victor_rcache.config import CacheConfig
from victor_rcache.demo import clear_namespaces
from victor_rcache.keys import KeySpace

T = TypeVar("T")
SUBSCRIBERS = (0, 1, 4, 16)  # subscribed processes for the fan-out slope
VALIDATION_WORKERS = 24
VALIDATION_THINK_MS = 18.0  # after each read: about 50 requests/s per worker (1 in 10 a write, no think)
TOLERANCE = 0.25  # the model's verdict: measured / predicted within 1 +- this
MAXCLIENTS = 10_000  # Redis's default maxclients
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro")
HARNESS_COMMANDS = ("info", "config", "client", "pubsub")  # what the counting itself sends
RECORDS_PER_ROUND = 64  # the batched record variant: the model thread's RECORDS_WAKE
IDLE_COUNT_SECONDS = 2.0  # how long the idle processes' own commands are counted
MISS_SCRIPTS = 3  # script calls of a get_or_set miss: lease.lua, put.lua (the fill), release.lua


@dataclass(frozen=True)
class Sizes:
    ops: int  # operations per per-op case
    idle_seconds: float  # how long an idle rate is measured
    entries: int  # entries of the memory figure
    records: int  # record_query calls per variant
    patterns: int  # queries walked for the memory per pattern
    validation_workers: int
    validation_requests: int  # per worker
    gap: float = 0.001  # seconds between two operations of a per-op case (Meter.paced)
    subscribers: tuple[int, ...] = SUBSCRIBERS


SIZES = {
    "full": Sizes(2000, 1.0, 20_000, 1000, 3000, VALIDATION_WORKERS, 800),
    "quick": Sizes(1000, 0.5, 5000, 500, 1000, VALIDATION_WORKERS, 400),
    # the smoke test: every figure, no meaning
    "tiny": Sizes(60, 0.1, 200, 40, 60, 2, 20, gap=0.0, subscribers=(0, 1, 2)),
}


# --------------------------------------------------------------------------- the model (pure, no Redis)

@dataclass(frozen=True)
class Costs:
    """Redis CPU in µs per operation (bookkeeping calls apart), measured by :func:`measure_costs`."""

    l2_hit: float  # HMGET + the hit's event in a touch.lua call (not the call itself)
    l3_hit: float  # the same for an L3 hit (its event promotes it)
    miss: float  # get_or_set of an absent key: HMGET, lease.lua, the fill (no subscriber), the miss event
    put: float  # a put rewriting an entry, no subscriber
    touch_call: float  # the fixed cost of one touch.lua call (its round trip included)
    per_subscriber: float  # what each subscriber adds to a write (a put, a fill)
    idle_per_process: float = 0.0  # µs per second a connected, idle process costs (its health-check PINGs)
    record: float = 0.0  # a record_query's share of a model round, beyond the round's fixed cost
    model_round: float = 0.0  # the fixed cost of one model round


@dataclass(frozen=True)
class Mix:
    """What a fleet's requests are: reads by where they are answered, and the share of writes."""

    # The defaults: about the fleet workload's tiers at 2-4 processes (benchmarks/README.md: 70-74% L1, 9-18%
    # L2, 83-89% hits), with a little L3.
    l1: float = 0.70
    l2: float = 0.17
    l3: float = 0.03
    miss: float = 0.10
    write_share: float = 0.10  # of requests (a request is a read or a write)
    records_per_read: float = 0.0  # record_query calls per read (1 with the prediction model on every read)

    def __post_init__(self) -> None:
        total = self.l1 + self.l2 + self.l3 + self.miss
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"read shares must add up to 1, not {total}")
        if not 0.0 <= self.write_share <= 1.0:
            raise ValueError(f"write_share must be within 0..1, not {self.write_share}")


def touch_calls_per_second(events_per_second: float, shards: int = SHARDS, window: float = WINDOW) -> float:
    """touch.lua calls a process makes per second for ``events_per_second`` Redis hits and misses spread over
    ``shards``: a shard's batch starts at its first event and goes ``window`` later, so each call carries
    1 + (the shard's event rate x window) events on average."""
    per_shard = events_per_second / shards
    return shards * per_shard / (1.0 + per_shard * window) if per_shard > 0 else 0.0


def rounds_per_second(records_per_second: float, interval: float = 0.05, wake: int = RECORDS_PER_ROUND) -> float:
    """Model rounds a process's records cause per second: a round every ``interval`` while records wait
    (or at once when ``wake`` wait), so 1 + rate x interval records per round, ``wake`` at most."""
    if records_per_second <= 0:
        return 0.0
    return records_per_second / min(float(wake), 1.0 + records_per_second * interval)


def predict(costs: Costs, workers: float, rps: float, mix: Mix, subscribers: float | None = None,
            shards: int = SHARDS) -> dict[str, float]:
    """Redis CPU of a fleet: ``workers`` processes (one cache each) of ``rps`` requests per second with ``mix``;
    every write (a put, a miss's fill) is copied to ``subscribers`` processes (default: every worker).
    Returns µs of Redis CPU per request and per second, the share of one core (``cpu_share``), and the parts."""
    subs = workers if subscribers is None else subscribers
    reads, writes = rps * (1.0 - mix.write_share), rps * mix.write_share
    events = reads * (mix.l2 + mix.l3 + mix.miss)  # per worker per second: each a touch.lua event
    calls = touch_calls_per_second(events, shards)
    if reads > 0:  # a process with L1 hits only still sends its counters every COUNTS_INTERVAL
        calls = max(calls, 1.0 / COUNTS_INTERVAL)
    fanout = subs * costs.per_subscriber
    records = reads * mix.records_per_read
    parts = {  # µs per second per worker
        "reads": reads * (mix.l2 * costs.l2_hit + mix.l3 * costs.l3_hit + mix.miss * (costs.miss + fanout)),
        "writes": writes * (costs.put + fanout),
        "bookkeeping": calls * costs.touch_call,
        "model": records * costs.record + rounds_per_second(records) * costs.model_round,
        "idle": costs.idle_per_process,
    }
    per_worker = sum(parts.values())
    total = workers * per_worker
    return {"us_per_request": per_worker / rps if rps else 0.0, "us_per_second": total, "cpu_share": total / 1e6,
            "touch_calls_per_second": workers * calls, **{f"{k}_us_per_second": workers * v for k, v in parts.items()}}


def masters_needed(cpu_share: float, ceiling: float = 0.6) -> int:
    """Masters of a cluster that keep each below ``ceiling`` of a core (keys spread evenly over the slots)."""
    return max(1, math.ceil(cpu_share / ceiling))


TABLE_WORKERS = (10, 100, 1000)
TABLE_RPS = (1.0, 10.0, 50.0)
TABLE_WRITES = (0.01, 0.10)


def capacity_table(costs: Costs, mix: Mix = Mix(), ceiling: float = 0.6) -> list[dict[str, Any]]:
    """CPU share of one master for every workers x requests/s per worker x write share of the table (``mix``'s
    read shares, subscribers = workers), and the masters that keep each under ``ceiling`` of a core."""
    rows = []
    for workers in TABLE_WORKERS:
        for rps in TABLE_RPS:
            for w in TABLE_WRITES:
                got = predict(costs, workers, rps, Mix(mix.l1, mix.l2, mix.l3, mix.miss, w, mix.records_per_read))
                rows.append({"workers": workers, "rps_per_worker": rps, "write_share": w,
                             "requests_per_second": workers * rps, "us_per_request": got["us_per_request"],
                             "cpu_share": got["cpu_share"], "masters": masters_needed(got["cpu_share"], ceiling)})
    return rows


# --------------------------------------------------------------------------- measuring one kind of operation

class Meter:
    """Redis CPU per operation: INFO cpu over a run, less the idle server's rate, with commandstats alongside."""

    def __init__(self, url: str, idle_seconds: float, gap: float = 0.0) -> None:
        self.gap = gap
        self.admin = redis.Redis.from_url(url)
        self.cpu = RedisCPU(url)
        self.idle_seconds = idle_seconds
        self.idle = self.cpu.idle_rate(idle_seconds)

    def per_op(self, run: Callable[[], int]) -> dict[str, Any]:
        """``run()`` does the operations and returns how many; µs of Redis CPU per operation."""
        self.admin.config_resetstat()
        c0, t0 = self.cpu.seconds(), time.perf_counter()
        ops = run()
        c1, t1 = self.cpu.seconds(), time.perf_counter()
        stats: dict[str, Any] = self.admin.info("commandstats")
        scripts = sum(int(stats.get(f"cmdstat_{n}", {}).get("calls", 0)) for n in SCRIPT_COMMANDS)
        gross = c1 - c0
        net = gross - self.idle * (t1 - t0)
        return {"us": 1e6 * net / ops, "gross_us": 1e6 * gross / ops, "command_us": command_usec(stats) / ops,
                "script_calls_per_op": scripts / ops, "ops": ops, "seconds": round(t1 - t0, 3),
                "commands": per_command(stats)}

    def paced(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, ``gap`` seconds apart: the operations reach Redis spaced as a fleet's do, not back to back."""
        for item in items:
            yield item
            if self.gap:
                time.sleep(self.gap)

    def close(self) -> None:
        self.admin.close()
        self.cpu.close()


def command_usec(stats: dict[str, Any]) -> float:
    """The commands' own time (``INFO commandstats`` usec) but the counting's (INFO, CONFIG, CLIENT). A script's
    inner commands are counted under their own names as well as inside its EVALSHA: counted twice, alike in the
    per-op measurements and the fleet's, so the two compare."""
    return sum(float(v.get("usec", 0)) for name, v in stats.items()
               if name.removeprefix("cmdstat_").split("|")[0] not in HARNESS_COMMANDS)


def per_command(stats: dict[str, Any]) -> dict[str, list[float]]:
    """{command: [calls, usec]} of an ``INFO commandstats`` reply, the counting's own commands left out."""
    return {name.removeprefix("cmdstat_"): [int(v["calls"]), float(v["usec"])] for name, v in stats.items()
            if name.removeprefix("cmdstat_").split("|")[0] not in HARNESS_COMMANDS}


def slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


# --------------------------------------------------------------------------- helper processes

def holder_main(url: str, namespace: str, conn: Connection) -> None:
    """A process that holds caches of ``namespace`` and answers the parent's steps (``conn``): "open" a cache
    (coherence on: its listener subscribes), "use" it (get, put, get_or_set, flush), "warmer" (a record and a
    round), "close"; it replies "ok" after each, so the parent can count its connections in between."""
    caches: list[MultiLevelCache] = []
    warmers: list[PredictiveCacheWarmer] = []
    try:
        while True:
            step = conn.recv()
            if step == "open":
                caches.append(MultiLevelCache(url, namespace=namespace, fail_open=False))
                caches[-1].get("holder-probe")  # connected, the namespace's settings agreed
                caches[-1].flush_bookkeeping()  # its miss sent now, not in the parent's idle measurement
            elif step == "use":
                cache = caches[-1]
                cache.put(f"holder-{os.getpid()}", VALUE)
                cache.get(f"holder-{os.getpid()}")
                cache.get_or_set(f"holder-fill-{os.getpid()}", lambda: VALUE)
                cache.flush_bookkeeping()
            elif step == "warmer":
                warmers.append(PredictiveCacheWarmer(caches[-1]))
                warmers[-1].record_query("holder-a", session="holder")
                warmers[-1].record_query("holder-b", session="holder")
                warmers[-1].flush()
            elif step == "close":
                return
            conn.send("ok")
    finally:
        for cache in caches:
            cache.close()
        conn.close()


class Holders:
    """Helper processes (:func:`holder_main`), each holding caches of one namespace."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url, self.namespace = url, namespace
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[tuple[Any, Connection]] = []

    def add(self, n: int) -> None:
        """Start ``n`` more, each with one open cache (so one subscriber of the namespace's channel)."""
        started = []
        for _ in range(n):
            mine, theirs = self.ctx.Pipe()
            p = self.ctx.Process(target=holder_main, args=(self.url, self.namespace, theirs), daemon=True)
            p.start()
            mine.send("open")
            started.append((p, mine))
        for p, mine in started:
            self.step(mine, p)
        self.procs += started

    @staticmethod
    def step(conn: Connection, proc: Any, timeout: float = 120.0) -> None:
        if not conn.poll(timeout) or conn.recv() != "ok":
            raise RuntimeError(f"helper process {proc.pid} did not answer (exit code {proc.exitcode})")

    def stop(self) -> None:
        for _, conn in self.procs:
            with contextlib.suppress(Exception):
                conn.send("close")
        for p, _ in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []


def wait_for_subscribers(admin: redis.Redis, channel: bytes, want: int) -> None:
    """Until Redis counts ``want`` subscribers of the shard channel ``channel`` (one per process)."""
    deadline = time.monotonic() + 30
    while int(dict(admin.pubsub_shardnumsub(channel)).get(channel, 0)) != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{channel!r}: expected {want} subscribers")
        time.sleep(0.01)


def client_count(admin: redis.Redis) -> int:
    return len(admin.client_list())


# --------------------------------------------------------------------------- the measurements

def _touch_pair(meter: Meter, reader: MultiLevelCache, keys: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Redis hits (or misses) of ``reader.get`` over ``keys``: the first half back to back (the bookkeeping
    batched, sent at the end), the second with ``flush_bookkeeping()`` after each (one event per call)."""
    half = len(keys) // 2
    reader.flush_bookkeeping()

    def batched() -> int:
        for k in meter.paced(keys[:half]):
            reader.get(k)
        reader.flush_bookkeeping()
        return half

    def one_per_call() -> int:
        for k in meter.paced(keys[half:]):
            reader.get(k)
            reader.flush_bookkeeping()
        return len(keys) - half

    return meter.per_op(batched), meter.per_op(one_per_call)


def measure_costs(url: str, sizes: Sizes, prefix: str, progress: Progress) -> dict[str, Any]:
    """Every per-op cost (µs of Redis CPU), memory per entry and per pattern, connections per process."""
    meter = Meter(url, sizes.idle_seconds, sizes.gap)
    admin = meter.admin
    n = sizes.ops
    out: dict[str, Any] = {"idle_us_per_second": 1e6 * meter.idle}
    room: dict[str, Any] = {"l2_size": 2 * n + 1000, "l3_size": 2 * n + 1000, "promote_after": 1, "fail_open": False}
    namespaces = [f"{prefix}-{x}" for x in ("get", "l2", "l3", "miss", "put", "pub", "model", "mem", "pat")]
    holders = Holders(url, f"{prefix}-pub")
    try:
        # The floor: a plain GET of the same payload, by a redis-py client.
        payload = msgpack.packb(VALUE, use_bin_type=True)
        raw_keys = [f"{prefix}-raw-{i}" for i in range(n)]
        admin.mset(dict.fromkeys(raw_keys, payload))
        out["get_floor"] = meter.per_op(lambda: sum(1 for k in meter.paced(raw_keys) if admin.get(k) is not None))
        admin.delete(*raw_keys)
        out["ping_floor"] = meter.per_op(lambda: sum(1 for _ in meter.paced(range(n // 2)) if admin.ping()))

        progress(f"capacity: L2 and L3 hits, misses, puts ({n} operations each)")
        keys = [f"k{i}" for i in range(n)]
        with MultiLevelCache(url, namespace=namespaces[1], coherence=False, **room) as writer:
            writer.put_many(dict.fromkeys(keys, VALUE))
        with MultiLevelCache(url, namespace=namespaces[1], coherence=False, **room) as reader:
            reader.get("absent")  # connected, scripts loaded
            out["l2_batched"], out["l2_one_per_call"] = _touch_pair(meter, reader, keys)
        # One L2 slot per shard: the q-keys end in L3; with promote_after 1 each first hit promotes its entry
        # (in its touch.lua event) and demotes another, as in a fleet whose L2 is full.
        l3: dict[str, Any] = {**room, "l2_size": SHARDS}
        with MultiLevelCache(url, namespace=namespaces[2], coherence=False, **l3) as writer:
            push_to_l3(writer, n)
        with MultiLevelCache(url, namespace=namespaces[2], coherence=False, **l3) as reader:
            reader.get("absent")
            out["l3_batched"], out["l3_one_per_call"] = _touch_pair(meter, reader, [f"q{i}" for i in range(n)])
        with MultiLevelCache(url, namespace=namespaces[3], coherence=False, **room) as cache:
            cache.get_or_set("warm", lambda: VALUE)  # lease.lua and put.lua loaded

            def gets() -> int:
                for i in meter.paced(range(n)):
                    cache.get(f"absent-{i}")
                cache.flush_bookkeeping()
                return n

            def fills() -> int:
                for i in meter.paced(range(n)):
                    cache.get_or_set(f"m{i}", lambda: VALUE)
                cache.flush_bookkeeping()
                return n

            out["get_miss"] = meter.per_op(gets)
            out["miss"] = meter.per_op(fills)
        with MultiLevelCache(url, namespace=namespaces[4], coherence=False, **room) as cache:
            cache.put("warm", VALUE)

            def new_puts() -> int:
                for i in meter.paced(range(n)):
                    cache.put(f"p{i}", VALUE)
                return n

            def rewrites() -> int:
                for i in meter.paced(range(n)):
                    cache.put(f"p{i}", VALUE)
                return n

            out["put_new"] = meter.per_op(new_puts)
            out["put"] = meter.per_op(rewrites)

        progress(f"capacity: fan-out of a write to {', '.join(map(str, sizes.subscribers))} subscribed processes")
        out["fanout"] = fanout(meter, holders, sizes)
        progress("capacity: connections per process")
        out["connections"] = connections(url, admin, f"{prefix}-conn")
        progress(f"capacity: the prediction model's rounds ({sizes.records} records per variant)")
        out["model"] = model_rounds(meter, url, namespaces[6], sizes)
        progress(f"capacity: memory per entry ({sizes.entries:,} entries) and per pattern set")
        out["memory"] = memory(admin, url, namespaces[7], namespaces[8], sizes)
    finally:
        holders.stop()
        meter.close()
        with contextlib.suppress(Exception):
            clear_namespaces(url, namespaces)
    return out


def fanout(meter: Meter, holders: Holders, sizes: Sizes) -> dict[str, Any]:
    """Redis CPU per put with 0, 1, 4, 16 subscribed processes, and the idle server with them connected."""
    rows: dict[int, dict[str, Any]] = {}
    with MultiLevelCache(holders.url, namespace=holders.namespace, coherence=False, fail_open=False) as cache:
        channel = cache._core.space.channels[0]  # (each subscribed process listens to every shard's)
        keys = [f"f{i}" for i in range(256)]  # rewritten again and again: the namespace keeps its size
        cache.put_many(dict.fromkeys(keys, VALUE))
        for k in sizes.subscribers:
            holders.add(k - len(holders.procs))
            wait_for_subscribers(meter.admin, channel, k)
            idle = meter.cpu.idle_rate(sizes.idle_seconds)

            def puts() -> int:
                for i in meter.paced(range(sizes.ops)):
                    cache.put(keys[i % len(keys)], VALUE)
                return sizes.ops

            rows[k] = {**meter.per_op(puts), "idle_us_per_second": 1e6 * idle}
    idle_base, idle_per = slope(list(rows), [r["idle_us_per_second"] for r in rows.values()])
    # What the connected processes send once they have heard nothing for a while (a listener pings after a
    # second of silence): counted, since their CPU is too small to tell from the idle server's by INFO cpu.
    time.sleep(1.5)
    meter.admin.config_resetstat()
    time.sleep(IDLE_COUNT_SECONDS)
    idle_commands = per_command(meter.admin.info("commandstats"))
    sent = sum(calls for calls, _ in idle_commands.values())
    return {"idle_per_process_us_per_second": idle_per, "idle_base_us_per_second": idle_base,
            "idle_commands_per_process_per_second": sent / max(1, len(holders.procs)) / IDLE_COUNT_SECONDS,
            "idle_commands": idle_commands, "by_subscribers": {str(k): v for k, v in rows.items()}}


def connections(url: str, admin: redis.Redis, namespace: str) -> dict[str, Any]:
    """Connections (CLIENT LIST entries) one process holds: one cache opened, used, with a warmer, two caches."""
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    before = client_count(admin)
    p = ctx.Process(target=holder_main, args=(url, namespace, theirs), daemon=True)
    p.start()
    out: dict[str, Any] = {}
    channel = KeySpace(namespace, CacheConfig().shards).channels[0]  # (the holder's caches have the default shards)
    try:
        for step, name in (("open", "one cache, opened"), ("use", "one cache, after get/put/get_or_set/flush"),
                           ("warmer", "one cache + a warmer, after a model round"), ("open", "two caches")):
            mine.send(step)
            Holders.step(mine, p)
            wait_for_subscribers(admin, channel, 1)  # the listener's subscription is made by its thread
            out[name] = client_count(admin) - before
        mine.send("close")
        p.join(timeout=10)
    finally:
        if p.is_alive():
            p.kill()
            p.join()
        clear_namespaces(url, [namespace])
    return out


def model_rounds(meter: Meter, url: str, namespace: str, sizes: Sizes) -> dict[str, Any]:
    """The model thread's rounds: records with a round after each and after every 64; predictions."""
    rng = random.Random(7)
    queries = [query_name(rng.randrange(200)) for _ in range(2 * sizes.records)]
    with MultiLevelCache(url, namespace=namespace, coherence=False, fail_open=False) as cache:
        warmer = PredictiveCacheWarmer(cache)
        warmer.record_query(queries[0], session="warm")
        warmer.flush()

        def one_per_round() -> int:
            for i, q in meter.paced(enumerate(queries[:sizes.records])):
                warmer.record_query(q, VALUE["tools"], session=f"s{i // 8}")
                warmer.flush()
            return sizes.records

        def batched() -> int:
            for i, q in enumerate(queries[sizes.records:]):  # back to back: 64 records per round exactly
                warmer.record_query(q, VALUE["tools"], session=f"t{i // 8}")
                if i % RECORDS_PER_ROUND == RECORDS_PER_ROUND - 1:
                    warmer.flush()
            warmer.flush()
            return sizes.records

        def predictions() -> int:
            for i, q in meter.paced(enumerate(queries[:sizes.records])):
                warmer.predict_next_queries(q, top_k=2, session=f"s{i // 8}")
            warmer.flush()
            return sizes.records

        single, many = meter.per_op(one_per_round), meter.per_op(batched)
        predict_ = meter.per_op(predictions)
        warmer.clear_patterns()
    return {"one_per_round": single, "batched": many, "predict": predict_}


def memory(admin: redis.Redis, url: str, namespace: str, patterns_ns: str, sizes: Sizes) -> dict[str, Any]:
    """used_memory delta per entry (VALUE) and per model pattern set."""
    before = int(admin.info("memory")["used_memory"])
    n = sizes.entries
    with MultiLevelCache(url, namespace=namespace, coherence=False, l2_size=n + 1000, l3_size=n + 1000) as cache:
        for lo in range(0, n, 5000):
            cache.put_many({f"e{i}": VALUE for i in range(lo, min(n, lo + 5000))})
    per_entry = (int(admin.info("memory")["used_memory"]) - before) / n
    clear_namespaces(url, [namespace])
    rng = random.Random(3)
    with MultiLevelCache(url, namespace=patterns_ns, coherence=False) as cache:
        warmer = PredictiveCacheWarmer(cache, max_patterns=10 * sizes.patterns)
        warmer.record_query("warm", session="warm")
        warmer.flush()
        before = int(admin.info("memory")["used_memory"])
        for i in range(sizes.patterns):  # sessions of 4 over a wide range of queries: mostly new patterns
            warmer.record_query(query_name(rng.randrange(10 * sizes.patterns)), VALUE["tools"], session=f"p{i // 4}")
        warmer.flush()
        after = int(admin.info("memory")["used_memory"])
        stats = warmer.get_statistics()
        total = int(stats["patterns"]["total"])
        warmer.clear_patterns()
    return {"bytes_per_entry": per_entry, "value_bytes": len(msgpack.packb(VALUE, use_bin_type=True)),
            "entries": n, "bytes_per_pattern": (after - before) / total if total else 0.0, "patterns": total,
            "records": sizes.patterns}


def costs_of(m: dict[str, Any], key: str = "us") -> Costs:
    """The model's inputs from :func:`measure_costs`' measurements: Redis CPU (``key="us"``), or the commands' own
    time (``"command_us"``, the cross-check). The fixed cost of a touch.lua call is the L2 pair's difference (one
    event per call against many); each operation's cost is given without its share of the calls."""
    def minus_calls(case: dict[str, Any], call: float, own: float = 0.0) -> float:
        return float(case[key] - call * max(0.0, case["script_calls_per_op"] - own))

    b, one = m["l2_batched"], m["l2_one_per_call"]
    # one = op + call x 1 (one call per hit); b = op + call x (calls per hit, batched)
    call = (one[key] - b[key]) / max(1e-9, 1.0 - b["script_calls_per_op"])
    rows = m["fanout"]["by_subscribers"]
    put, per_subscriber = slope([float(k) for k in rows], [r[key] for r in rows.values()])
    # An idle process costs its commands (health-check PINGs) at a PING's cost: the direct INFO cpu slope over
    # the connected processes (kept in the results) is within the idle server's noise.
    idle = max(0.0, m["fanout"]["idle_commands_per_process_per_second"]) * m["ping_floor"][key]
    single, batched = m["model"]["one_per_round"], m["model"]["batched"]
    # single = round + record; batched = round / 64 + record
    model_round = (single[key] - batched[key]) / (1 - 1 / RECORDS_PER_ROUND)
    # get_or_set's miss: 3 script calls of its own (lease.lua, then put.lua and release.lua in one round trip)
    # besides its share of the touch.lua calls
    return Costs(l2_hit=minus_calls(b, call), l3_hit=minus_calls(m["l3_batched"], call),
                 miss=minus_calls(m["miss"], call, MISS_SCRIPTS), put=put, touch_call=call,
                 per_subscriber=per_subscriber, idle_per_process=idle, record=single[key] - model_round,
                 model_round=model_round)


# --------------------------------------------------------------------------- the validation

def validate(url: str, costs: Costs, command_costs: Costs, sizes: Sizes, prefix: str,
             progress: Progress) -> dict[str, Any]:
    """bench_fleet's workload with many thinking processes: Redis CPU measured against the model's prediction
    from the run's own mix and rates."""
    n = sizes.validation_workers
    cpu = RedisCPU(url)
    idle = cpu.idle_rate(sizes.idle_seconds)
    settings = FleetSettings(url=url, namespace=f"{prefix}-val", requests=sizes.validation_requests,
                             cost_ms=0.01, rounds_per_ms=calibrate(), think_ms=VALIDATION_THINK_MS, processes=n)
    progress(f"capacity: validation, {n} worker processes x {sizes.validation_requests} requests, think "
             f"{VALIDATION_THINK_MS:g} ms after each read")
    pool = Pool(n, joiner=False)
    admin = redis.Redis.from_url(url)
    peak = [0]
    done = threading.Event()

    def sample_connections() -> None:  # the most connections the fleet held at once, sampled
        with redis.Redis.from_url(url) as watcher:
            while not done.wait(0.25):
                peak[0] = max(peak[0], int(watcher.info("clients")["connected_clients"]))

    watcher = threading.Thread(target=sample_connections, daemon=True)
    try:
        clear_namespaces(url, [f"{settings.namespace}-fleet"])
        admin.config_resetstat()  # the workers' caches are opened (a few commands) inside the count
        watcher.start()
        reports, used, wall = measured_run(pool, cpu, settings, "fleet")
        stats: dict[str, Any] = admin.info("commandstats")
    finally:
        done.set()
        pool.stop()
        with contextlib.suppress(Exception):
            clear_namespaces(url, [f"{settings.namespace}-fleet"])
        cpu.close()
        admin.close()
    got = {k: sum(r.counts.get(k, 0) for r in reports) for k in ("gets", "l1", "l2", "l3", "misses")}
    reads = got["gets"]
    writes = sum(r.writes for r in reports)
    requests = reads + writes
    # Each worker's own rate over the measured window (the workers start together, the slowest ends it).
    rps = requests / n / wall
    mix = Mix(l1=got["l1"] / reads, l2=got["l2"] / reads, l3=got["l3"] / reads,
              miss=1.0 - (got["l1"] + got["l2"] + got["l3"]) / reads, write_share=writes / requests)
    model = predict(costs, n, rps, mix)
    measured = (used - idle * wall) / wall * 1e6  # µs of Redis CPU per second, the idle server's less
    command_model = predict(command_costs, n, rps, mix)
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()
             if name.removeprefix("cmdstat_") in ("evalsha", "spublish")}
    misses = got["misses"]
    # What the model counts, in the commands Redis counts: a script call per write, three per miss, one per
    # touch.lua call; an SPUBLISH (run by the scripts) per write and per miss's fill.
    expected = {"spublish": writes + misses,
                "evalsha": round(writes + MISS_SCRIPTS * misses + model["touch_calls_per_second"] * wall)}
    return {"workers": n, "requests": requests, "reads": reads, "writes": writes, "wall_seconds": wall,
            "rps_per_worker": rps, "mix": asdict(mix), "counts": got, "think_ms": VALIDATION_THINK_MS,
            "measured_us_per_second": measured, "measured_gross_us_per_second": used / wall * 1e6,
            "predicted_us_per_second": model["us_per_second"], "ratio": measured / model["us_per_second"],
            "measured_us_per_request": measured / (requests / wall), "prediction": model,
            "idle_us_per_second": 1e6 * idle, "wrong": sum(r.wrong for r in reports),
            "commands": calls, "commands_expected": expected, "commandstats": per_command(stats),
            "measured_command_us_per_second": command_usec(stats) / wall,
            "predicted_command_us_per_second": command_model["us_per_second"],
            "command_prediction": command_model, "peak_connections": peak[0],
            "connections_per_process": peak[0] / n}


# --------------------------------------------------------------------------- the group

FIGURES = (("l2_hit", "L2 hit, cold L1 (HMGET + its touch.lua event)"),
           ("l3_hit", "L3 hit, cold L1 (HMGET + its touch.lua event, a promotion)"),
           ("miss", "miss: get_or_set of an absent key (HMGET, lease.lua, the fill), no subscriber"),
           ("put", "put rewriting an entry, no subscriber"),
           ("touch_call", "a touch.lua call's fixed cost (bookkeeping)"),
           ("per_subscriber", "a write's fan-out, per subscribed process"),
           ("record", "record_query, its share of a model round"),
           ("model_round", "a model round's fixed cost"))


def figures_of(costs: Costs, m: dict[str, Any], validation: dict[str, Any] | None) -> list[dict[str, Any]]:
    floor = m["get_floor"]["us"]
    out = [figure(f"capacity:{key}", f"Redis CPU per op: {name}", value=getattr(costs, key), unit="us",
                  floor="a plain GET of the same payload (redis-py), same run", floor_value=floor or None)
           for key, name in FIGURES]
    mem = m["memory"]
    out.append(figure("capacity:memory_per_entry", f"Redis memory per entry ({mem['value_bytes']} B value)",
                      value=mem["bytes_per_entry"], unit="bytes", floor="the msgpack payload",
                      floor_value=float(mem["value_bytes"])))
    if validation is not None:
        v = validation
        f = figure("capacity:model", f"fleet of {v['workers']} processes, ~{v['rps_per_worker']:.0f} req/s each: "
                   "measured Redis CPU / the model's prediction", value=v["measured_us_per_second"],
                   unit="us/s", floor="the model, from this run's per-op costs and mix",
                   floor_value=v["predicted_us_per_second"] or None,
                   target=f"within {1 - TOLERANCE:g}x to {1 + TOLERANCE:g}x", mix=v["mix"],
                   workload=f"bench_fleet's workload (fleet: AsyncMultiLevelCache.get_or_set), {v['workers']} "
                            f"processes x {v['requests'] // v['workers']} requests, think {v['think_ms']:g} ms "
                            "after each read")
        f["pass"] = f["ratio"] is not None and abs(f["ratio"] - 1.0) <= TOLERANCE
        out.append(f)
    return out


def table(result: dict[str, Any]) -> str:
    """The per-op costs, the validation, and the capacity table, as text."""
    c, m = result["costs"], result["measured"]
    lines = [f"Redis CPU per operation (µs; a plain GET: {m['get_floor']['us']:.1f})"]
    for key, name in FIGURES:
        lines.append(f"  {name:<82} {c[key]:8.1f}")
    lines.append(f"  {'an idle connected process (µs per second)':<82} {c['idle_per_process']:8.1f}")
    mem = m["memory"]
    lines += [f"memory: {mem['bytes_per_entry']:.0f} B per entry ({mem['value_bytes']} B value), "
              f"{mem['bytes_per_pattern']:.0f} B per pattern set ({mem['patterns']} sets)",
              "connections per process: " + ", ".join(f"{k}: {v}" for k, v in m["connections"].items())]
    v = result.get("validation")
    if v:
        lines += [f"validation: {v['workers']} processes x {v['rps_per_worker']:.1f} req/s, mix "
                  + ", ".join(f"{k} {x:.3f}" for k, x in v["mix"].items())
                  + f": measured {v['measured_us_per_second']:.0f} µs/s, predicted {v['predicted_us_per_second']:.0f}"
                  f" µs/s, ratio {v['ratio']:.2f}",
                  "  commands Redis counted / the model's: " + ", ".join(
                      f"{k} {v['commands'].get(k, 0):,} / {x:,}" for k, x in v["commands_expected"].items()),
                  f"  the commands' own time (commandstats): measured {v['measured_command_us_per_second']:.0f} µs/s, "
                  f"predicted {v['predicted_command_us_per_second']:.0f} µs/s",
                  f"  peak connections {v['peak_connections']} ({v['connections_per_process']:.2f} per process: "
                  f"maxclients {MAXCLIENTS:,} reached at {MAXCLIENTS / v['connections_per_process']:,.0f} "
                  "processes per master)"]
    lines += ["", f"{'workers':>7} {'req/s/w':>7} {'writes':>6} {'req/s':>8} {'µs/req':>7} {'CPU share':>9} masters"]
    for r in result["table"]:
        lines.append(f"{r['workers']:>7} {r['rps_per_worker']:>7g} {100 * r['write_share']:>5g}% "
                     f"{r['requests_per_second']:>8,.0f} {r['us_per_request']:>7.1f} {r['cpu_share']:>9.3f} "
                     f"{r['masters']:>7}")
    return "\n".join(lines)


def run_capacity(url: str, mode: str = "full", progress: Progress = noop) -> dict[str, Any]:
    """The capacity group: per-op costs, the model's table, the validation run."""
    sizes = SIZES[mode]
    prefix = f"vrccap{random.getrandbits(24):06x}"
    started = time.perf_counter()
    measured = measure_costs(url, sizes, prefix, progress)
    costs, command_costs = costs_of(measured), costs_of(measured, "command_us")
    progress("capacity: " + ", ".join(f"{k} {v:.1f}" for k, v in asdict(costs).items()))
    validation = validate(url, costs, command_costs, sizes, prefix, progress)
    progress(f"capacity: validation measured {validation['measured_us_per_second']:.0f} µs/s, predicted "
             f"{validation['predicted_us_per_second']:.0f} µs/s (ratio {validation['ratio']:.2f})")
    return {"group": "capacity", "mode": mode, "facts": facts.machine_facts(url), "sizes": asdict(sizes),
            "measured": measured, "costs": asdict(costs), "command_costs": asdict(command_costs),
            "table": capacity_table(costs),
            "validation": validation, "figures": figures_of(costs, measured, validation), "skipped": {},
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Redis CPU per operation, a capacity model and its validation.")
    p.add_argument("--url", help="an existing Redis (default: a private redis-server)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer operations and requests")
    size.add_argument("--tiny", action="store_true", help="a smoke run: meaningless")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = p.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    return run_and_print(args.url, args.json, table, lambda url: run_capacity(url, mode, say))


if __name__ == "__main__":
    sys.exit(main())
