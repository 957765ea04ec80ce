"""Four processes of Redis hits against four processes of GET + unpack: aggregate reads per second.

Part of the micro group (``python -m benchmarks run --group micro --config parallel``). Four worker
processes (``spawn``: fresh interpreters, as a fleet's workers are) each open their own cache and their
own redis-py client on the cache's connection settings, warm up, then take turns:

* **hits**: ``MultiLevelCache.get`` of entries in L2 that this process's L1 does not hold (cache defaults,
  L2 sized to hold the entries): each worker reads its own keys, each key once, so every read is an L2
  hit with a cold L1 (a key's first Redis hit is below ``promote_after - 1``, so nothing is copied into
  L1). The cache's bookkeeping thread runs as it does in production, and each worker sends what is left
  of its bookkeeping before it stops its clock: the batches are inside the measured window.
* **floor**: redis-py ``GET`` + ``msgpack.unpackb`` of the same payload, each worker its own keys, each
  once, on a client made from the cache's connection settings.

Each turn starts at a barrier (the parent is a party too, so the four are released together) and lasts
until the last of the four has done its reads; the aggregate is all reads of a kind over the sum of its
turns' windows (first start to last end). Turns alternate kinds, in rounds, so a burst of load on the
machine falls on both. Garbage collection is off inside a turn, as in the other micro figures.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

import msgpack
import redis

from benchmarks.bench_tiers import VALUE
from benchmarks.figures import Progress, figure, noop
from victor_rcache import CacheConfig, MultiLevelCache
from victor_rcache.connection import sync_client
from victor_rcache.demo import clear_namespaces

PROCESSES = 4
TARGET = 0.6  # hits' aggregate ops/s >= 0.6x the floor's
TIMEOUT = 120.0  # seconds a worker may take to start, or a turn to finish, before the run is abandoned
WARMUP = 50  # reads of each kind per worker before the first turn: connections open, settings agreed


@dataclass(frozen=True)
class Plan:
    url: str
    namespace: str
    raw_prefix: str  # the floor's plain string keys: <raw_prefix><worker>-<i>
    l2_size: int
    per_turn: int  # reads per worker per turn
    rounds: int  # turns of each kind

    def cache_key(self, worker: int, i: int) -> str:
        return f"p{worker}-{i}"

    def raw_key(self, worker: int, i: int) -> str:
        return f"{self.raw_prefix}{worker}-{i}"

    @property
    def keys_per_worker(self) -> int:
        return WARMUP + self.rounds * self.per_turn


def worker_main(index: int, plan: Plan, commands: Queue[Any], barrier: Barrier, results: Queue[Any]) -> None:
    """One worker process: open a cache and a client, warm up, then run each turn it is sent."""
    try:
        cache = MultiLevelCache(plan.url, namespace=plan.namespace, l2_size=plan.l2_size, fail_open=False)
        raw = sync_client(cache.config)  # the cache's own connection settings, its own connection
        for i in range(WARMUP):
            cache.get(plan.cache_key(index, i))
            msgpack.unpackb(raw.get(plan.raw_key(index, i)), raw=False)
        cache.flush_bookkeeping()
        gc.collect()
        gc.freeze()  # what setup allocated is never scanned again
        results.put(("ready", index))
        while (command := commands.get()) is not None:
            kind, start = command
            stop = start + plan.per_turn
            if kind == "hits":
                keys = [plan.cache_key(index, i) for i in range(start, stop)]
                get: Callable[[Any], Any] = cache.get
                barrier.wait(TIMEOUT)
                gc.disable()
                t0 = time.perf_counter()
                for key in keys:
                    get(key)
                cache.flush_bookkeeping()  # the rest of this turn's bookkeeping, inside the window
            else:
                keys = [plan.raw_key(index, i) for i in range(start, stop)]
                read, unpack = raw.get, msgpack.unpackb
                barrier.wait(TIMEOUT)
                gc.disable()
                t0 = time.perf_counter()
                for key in keys:
                    unpack(read(key), raw=False)
            t1 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across the processes of one machine
            gc.enable()
            results.put(("turn", index, kind, len(keys), t0, t1))
        metrics = cache.get_metrics("process")
        results.put(("metrics", index, {"gets": metrics["combined"]["gets"], "l2_hits": metrics["l2"]["hits"],
                                        "l3_hits": metrics["l3"]["hits"], "l1_hits": metrics["l1"]["hits"],
                                        "l1_fills": metrics["l1"]["promotions"],
                                        "misses": metrics["combined"]["total_misses"]}))
        cache.close()
        raw.close()
    except Exception as exc:  # reported to the parent, which stops the run with it
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))


class Workers:
    """PROCESSES spawned workers and the parent, meeting at one barrier before every turn."""

    def __init__(self, plan: Plan) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.results: Queue[Any] = ctx.Queue()
        self.barrier = ctx.Barrier(PROCESSES + 1)
        self.commands: list[Queue[Any]] = [ctx.Queue() for _ in range(PROCESSES)]
        self.procs: list[SpawnProcess] = [
            ctx.Process(target=worker_main, args=(i, plan, self.commands[i], self.barrier, self.results),
                        name=f"vrc-parallel-w{i}", daemon=True) for i in range(PROCESSES)]
        for p in self.procs:
            p.start()

    def collect(self, tag: str) -> list[tuple[Any, ...]]:
        """One message tagged ``tag`` from every worker (an error or a dead worker stops the run)."""
        out: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + TIMEOUT
        while len(out) < PROCESSES:
            try:
                item = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = next((p for p in self.procs if p.exitcode is not None), None)
                if dead is not None or time.monotonic() > deadline:
                    why = f"worker {dead.name} died (exit code {dead.exitcode})" if dead else "workers timed out"
                    raise RuntimeError(why) from None
                continue
            if item[0] == "error":
                raise RuntimeError(f"parallel worker {item[1]}: {item[2]}")
            if item[0] == tag:
                out.append(item)
        return out

    def turn(self, kind: str, start: int) -> tuple[int, float]:
        """Every worker reads ``per_turn`` keys of ``kind`` from ``start``: (reads, window seconds)."""
        for c in self.commands:
            c.put((kind, start))
        self.barrier.wait(TIMEOUT)  # the parent is the last party: the four start together
        done = self.collect("turn")
        return sum(d[3] for d in done), max(d[5] for d in done) - min(d[4] for d in done)

    def stop(self) -> list[dict[str, int]]:
        for c in self.commands:
            c.put(None)
        metrics = [m[2] for m in sorted(self.collect("metrics"), key=lambda m: m[1])]
        for p in self.procs:
            p.join(timeout=10)
        return metrics

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


def parallel_hits(url: str, per_turn: int, rounds: int, prefix: str, progress: Progress = noop) -> list[dict[str, Any]]:
    """The 4-process figure: aggregate ops/s of Redis hits against that of GET + unpack, same run."""
    ns = f"{prefix}-par"
    plan = Plan(url, ns, f"{prefix}-par-raw-", 0, per_turn, rounds)
    total = PROCESSES * plan.keys_per_worker
    # L2 holds every entry (with room: shards fill unevenly), else the defaults.
    plan = Plan(url, ns, plan.raw_prefix, max(CacheConfig().l2_size, 2 * total + 1000), per_turn, rounds)
    payload = msgpack.packb(VALUE, use_bin_type=True)
    admin = redis.Redis.from_url(url)
    with MultiLevelCache(url, namespace=ns, l2_size=plan.l2_size, coherence=False) as writer:
        keys = [plan.cache_key(w, i) for w in range(PROCESSES) for i in range(plan.keys_per_worker)]
        for lo in range(0, len(keys), 5000):
            writer.put_many(dict.fromkeys(keys[lo:lo + 5000], VALUE))
    raw_keys = [plan.raw_key(w, i) for w in range(PROCESSES) for i in range(plan.keys_per_worker)]
    for lo in range(0, len(raw_keys), 5000):
        admin.mset(dict.fromkeys(raw_keys[lo:lo + 5000], payload))
    progress(f"micro: {PROCESSES} processes, {rounds} rounds of {per_turn} reads each per kind")
    workers = Workers(plan)
    totals = {"hits": [0, 0.0], "floor": [0, 0.0]}
    try:
        workers.collect("ready")
        for r in range(rounds):
            start = WARMUP + r * per_turn
            for kind in (("floor", "hits") if r % 2 == 0 else ("hits", "floor")):  # alternate who goes first
                reads, window = workers.turn(kind, start)
                totals[kind][0] += reads
                totals[kind][1] += window
        metrics = workers.stop()
    finally:
        workers.kill()
        clear_namespaces(url, [ns])
        for lo in range(0, len(raw_keys), 5000):
            admin.delete(*raw_keys[lo:lo + 5000])
        admin.close()
    expected = WARMUP + rounds * per_turn
    for m in metrics:  # every timed read took the path the figure names
        if m["l2_hits"] != expected or m["l1_fills"] or m["l1_hits"] or m["misses"]:
            raise RuntimeError(f"parallel: expected {expected} L2 hits and no L1 fill, hit or miss per worker: {m}")
    hits = totals["hits"][0] / totals["hits"][1]
    floor = totals["floor"][0] / totals["floor"][1]
    return [figure(
        "parallel:4p", f"{PROCESSES} processes of L2 hits (cold L1), aggregate reads/s / {PROCESSES} processes of "
        "GET + unpack", value=hits, unit="ops/s", floor=f"{PROCESSES} processes of redis-py GET + msgpack.unpackb",
        floor_value=floor, bound=("ratio", ">=", TARGET),
        workload=f"{PROCESSES} spawned processes released by a barrier, each on its own connection, each reading "
                 f"its own keys once ({rounds} rounds x {per_turn} reads per process per kind, kinds alternating); "
                 "the cache's defaults but l2_size (every entry in L2)",
        reads={k: v[0] for k, v in totals.items()}, seconds={k: round(v[1], 3) for k, v in totals.items()},
        per_worker=metrics)]
