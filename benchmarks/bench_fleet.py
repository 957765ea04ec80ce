"""Fleet workload: N worker processes of agent sessions against one Redis, several caches, one table.

    .venv/bin/python benchmarks/bench_fleet.py [--quick] [--url redis://host:port/0] [--processes 1 2 4]
        [--configs none cachetools fleet ...] [--costs 5 0.17] [--requests 1500] [--json]

Every worker process runs the same seeded request stream in every
configuration: agent sessions (4 open at a time, interleaved) walk a Markov chain over ``--universe``
queries (default 1,000) whose popularity is Zipf; 1 request in 10 is a write (a put of a fresh value
for the query), the rest are reads answered by a selection function of real CPU cost (SHA-256 over a
buffer, in a loop calibrated once: ``--costs`` ms, default 5). Between two requests the agent "runs
the tool" for ``--think-ms``. Every cache is handed the selection as a coroutine function that runs it
inline, on the worker's event loop (a thread per selection would be the cost of one library alone); the
table splits each mean into reads the cache answered (``hit ms``) and reads that ran the selection
(``miss ms``). Configurations:

* ``none``: every read calls the selection.
* ``cachetools``: a per-process ``cachetools.LRUCache`` of ``l1_size + (l2_size + l3_size) / N``
  entries: the fleet cache's L1 plus this process's share of L2 + L3 (values are the same size, so
  entries stand for memory).
* ``fleet``: ``AsyncMultiLevelCache.get_or_set`` (L1 per process, L2/L3 in Redis).
* ``fleet+prewarm``: as ``fleet``, plus ``AsyncPredictiveCacheWarmer(prewarm=...)``: every read is
  recorded (``prewarm_step``, the one place that calls the warmer on a request); the warmer's model
  thread predicts each session after the round that sent its record and prewarms what is predicted
  and missing, in the background, within its budget. A read's latency includes the record.
* ``fleet+adaptive``: as ``fleet`` with ``adaptive_l1=True`` and a 1 s ``l1_adjustment_interval``.
* ``cashews``: cashews' Redis backend with its client-side cache (``client_side=True``, as its docs
  recommend) of ``l1_size`` entries (the fleet's L1: the same local memory), over RESP2 (under
  redis-py 8's default RESP3 its client-side copies are never invalidated), ``Cache.get_or_set``.
* ``aiocache``: aiocache's ``RedisCache``, get then compute and set on a miss (what its ``cached``
  decorator does).

After each configuration's fleet has run (the cache is warm), one more worker process, idle until
then, makes a fresh cache object and serves its own first 100 reads: the joining worker's hit rate.
Without ``--url`` a private redis-server is started (LocalRedisServer). ``run_fleet`` is the entry
point of ``python -m benchmarks run --group fleet``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import multiprocessing
import os
import queue
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any
from urllib.parse import urlsplit

from benchmarks import facts
from benchmarks.workloads import MarkovChain, query_name
from victor_rcache import AsyncMultiLevelCache
from victor_rcache.demo import TOOLS, clear_namespaces, counts, percentile, zipf_cum_weights
from victor_rcache.local_redis import LocalRedisServer
from victor_rcache.prediction.warmer import AsyncPredictiveCacheWarmer

CONFIGS = ("none", "cachetools", "fleet", "fleet+prewarm", "fleet+adaptive", "cashews", "aiocache")
# The earlier design's names for the same configurations (``run --config baseline --config predictive``).
ALIASES = {"baseline": "none", "per-process": "cachetools", "predictive": "fleet+prewarm", "adaptive": "fleet+adaptive"}
PEERS = ("cashews", "aiocache")
FLEET_CONFIGS = ("fleet", "fleet+prewarm", "fleet+adaptive")
SHARDS = 16
START_TIMEOUT = 120.0
BLOCK = b"\x5a" * 8192  # hashed per busy round; > 2 KiB, so hashlib releases the GIL while hashing

# The fleet targets (4 processes, 5 ms selection).
TARGET_HIT_RATE = 0.82
TARGET_LATENCY_RATIO = 0.5  # mean latency vs the cachetools configuration
TARGET_JOIN_HIT_RATE = 0.70


# --------------------------------------------------------------------------- the workload

@dataclass(frozen=True)
class FleetSettings:
    url: str
    namespace: str  # prefix of every key; each configuration adds its own suffix
    requests: int  # per worker (reads + writes)
    universe: int = 1000
    zipf_s: float = 1.0
    write_every: int = 10
    cost_ms: float = 5.0
    rounds_per_ms: float = 100.0  # busy rounds per ms of CPU, calibrated once by the parent
    think_ms: float = 2.0
    sessions: int = 4  # open at a time per worker, interleaved
    session_length: tuple[int, int] = (4, 40)
    l1_size: int = 100
    l2_size: int = 300
    l3_size: int = 600
    # An L1 copy at the first Redis hit (the library's default is 3 fleet-wide hits): what cashews'
    # client-side cache does with every key it reads, so L1 is compared with it like for like.
    promote_after: int = 1
    processes: int = 1
    seed: int = 10
    join_reads: int = 100
    adaptive_interval: float = 1.0
    top_k: int = 2
    ttl: float | None = None  # every value's own ttl in seconds (get_or_set, put, prewarm); None: none
    # A query's successors are weighted 1/rank**workflow_skew: 1 here (a step's likeliest successor is right
    # ~43% of the time); the prewarm group's agent workflows, whose next step is far more predictable, use more.
    workflow_skew: float = 1.0
    prewarm_budget: float | None = None  # fleet+prewarm's warmer: its prewarm_budget (None: the library's default)


def successor_probabilities(k: int, skew: float = 1.0) -> tuple[float, ...]:
    """The transition probabilities of a query's ``k`` successors, likeliest first: 1/rank**skew, normalized."""
    weights = [1.0 / rank**skew for rank in range(1, k + 1)]
    total = sum(weights)
    return tuple(w / total for w in weights)


def zipf_chain(seed: int, universe: int, zipf_s: float, skew: float = 1.0) -> MarkovChain:
    """A ``workloads.MarkovChain`` whose successors are drawn by Zipf popularity (query-000 first), so
    the walk stays among popular queries; each query has 3..8 successors, weighted 1/rank**skew
    (``successor_probabilities``); the draws do not depend on ``skew``, only the weights do."""
    rng = random.Random(f"fleet-chain:{seed}")
    cw = zipf_cum_weights(universe, zipf_s)
    population = range(universe)
    successors, probabilities = [], []
    for q in population:
        k = rng.randint(3, 8)
        picked: list[int] = []
        while len(picked) < k:
            s = rng.choices(population, cum_weights=cw)[0]
            if s != q and s not in picked:
                picked.append(s)
        successors.append(tuple(picked))
        probabilities.append(successor_probabilities(k, skew))
    return MarkovChain(tuple(successors), tuple(probabilities), seed)


def request_stream(settings: FleetSettings, worker: int) -> Iterator[tuple[str, str, bool]]:
    """Worker ``worker``'s requests (session, query, is_write), forever; fixed by the seed and the index.

    ``settings.sessions`` sessions are open at once; each starts at a Zipf-popular query and walks the
    chain for a random length; a request is a write with probability ``1 / write_every``."""
    chain = zipf_chain(settings.seed, settings.universe, settings.zipf_s, settings.workflow_skew)
    cw = zipf_cum_weights(settings.universe, settings.zipf_s)
    rng = random.Random(f"fleet-stream:{settings.seed}:{worker}")
    slots: list[tuple[str, int, int] | None] = [None] * settings.sessions
    number = 0
    while True:
        slot = rng.randrange(len(slots))
        current = slots[slot]
        if current is None or current[2] == 0:
            number += 1
            session = f"w{worker}-s{number}"
            query = rng.choices(range(settings.universe), cum_weights=cw)[0]
            left = rng.randint(*settings.session_length) - 1
        else:
            session, previous, left = current
            query, left = chain.step(previous, rng), left - 1
        slots[slot] = (session, query, left)
        yield session, query_name(query), rng.random() < 1.0 / settings.write_every


def busy(rounds: int) -> None:
    for _ in range(rounds):
        hashlib.sha256(BLOCK).digest()


def calibrate() -> float:
    """Busy rounds per millisecond of CPU on this machine (best of 5, so a busy moment does not count)."""
    busy(200)
    best = min(_timed(2000) for _ in range(5))
    return 2000 / (best * 1000)


def _timed(rounds: int) -> float:
    started = time.perf_counter()
    busy(rounds)
    return time.perf_counter() - started


def answer(query: str, version: int = 0) -> dict[str, Any]:
    digest = hashlib.sha256(query.encode()).digest()
    ranked = sorted(range(len(TOOLS)), key=lambda i: digest[i])[:3]
    return {"query": query, "tools": [TOOLS[i] for i in ranked], "v": version}


# --------------------------------------------------------------------------- the prewarm path, in one place

async def prewarm_step(warmer: AsyncPredictiveCacheWarmer, session: str, query: str, value: Any) -> None:
    """What ``fleet+prewarm`` does for every read, after the read answered it, in the request (awaited by
    its caller): learn that ``session`` asked ``query`` (whose answer used ``value["tools"]``). The warmer
    was built with ``prewarm=`` (see ``Runner.open``): its model thread sends the record, predicts the
    session's likeliest next queries after the round and prewarms what is missing, in the background,
    within its budget. The only code that calls the warmer on a request: the fleet and prewarm benchmarks
    follow the library's prewarm API by changing this function (and the warmer's construction) alone."""
    await warmer.record_query(query, value["tools"], session=session)


# --------------------------------------------------------------------------- one worker, one configuration

@dataclass
class Report:
    config: str
    index: int
    latencies: list[float] = field(default_factory=list)  # seconds per read (with the prewarm path's foreground)
    learn_seconds: float = 0.0  # of them, the time spent in prewarm_step (awaited by the request)
    computed: list[bool] = field(default_factory=list)  # per read, parallel to latencies: a selection of its own
    # (time.monotonic(), query, is_write, session) per request
    stamps: list[tuple[float, str, bool, str]] = field(default_factory=list)
    reads: int = 0
    writes: int = 0
    hits: int = 0  # reads answered without a selection call of their own
    calls: int = 0  # selection calls on the request path
    background_calls: int = 0  # selection calls made by prewarming
    wrong: int = 0  # answers for another query
    counts: dict[str, int] = field(default_factory=dict)  # victor_rcache's per-tier counters
    l1_size_end: int | None = None  # adaptive L1's size at the end
    # fleet+prewarm: this process's prewarm outcomes (completed, cached, over_budget, ...) and predictions
    # checked / correct, from the warmer's statistics at the end
    prewarming: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class Runner:
    """Serves one worker's stream with one kind of cache: ``read(query, select)``, ``write(query, value)``."""

    def __init__(self, settings: FleetSettings, config: str, index: int) -> None:
        self.settings, self.config = settings, config
        self.report = Report(config, index)
        self.rounds = max(1, round(settings.cost_ms * settings.rounds_per_ms))
        self.ns = f"{settings.namespace}-{config.replace('+', '-')}"
        self.cache: Any = None
        self.warmer: AsyncPredictiveCacheWarmer | None = None
        self.counting = threading.Lock()  # background selections run in threads of their own

    def select(self, query: str) -> dict[str, Any]:
        busy(self.rounds)
        return answer(query)

    def background_select(self, query: str) -> dict[str, Any]:  # runs in the warmer's thread
        with self.counting:
            self.report.background_calls += 1
        return self.select(query)


    async def open(self) -> None:
        s, c = self.settings, self.config
        if c == "cachetools":
            import cachetools  # noqa: PLC0415  (only this configuration needs it)

            self.cache = cachetools.LRUCache(maxsize=s.l1_size + (s.l2_size + s.l3_size) // s.processes)
        elif c in FLEET_CONFIGS:
            extra: dict[str, Any] = {}
            if c == "fleet+adaptive":
                extra = {"adaptive_l1": True, "l1_adjustment_interval": s.adaptive_interval}
            self.cache = AsyncMultiLevelCache(s.url, namespace=self.ns, l1_size=s.l1_size, l2_size=s.l2_size,
                                              l3_size=s.l3_size, shards=SHARDS, promote_after=s.promote_after,
                                              fail_open=False, **extra)
            await self.cache.client.ping()
            if c == "fleet+prewarm":
                budget = {} if s.prewarm_budget is None else {"prewarm_budget": s.prewarm_budget}
                self.warmer = AsyncPredictiveCacheWarmer(self.cache, prewarm=self.background_select,
                                                         prewarm_top_k=s.top_k, prewarm_ttl=s.ttl, **budget)
        elif c == "cashews":
            from cashews import Cache  # noqa: PLC0415
            from cashews.backends.memory import Memory  # noqa: PLC0415

            self.cache = Cache()
            # The docs' recommended Redis setup, with its client-side copies held in as many entries as
            # the fleet's L1 (its default, 10,000, would hold the whole universe in every process): the
            # caches are compared at the same local memory, as the per-process one is. RESP2: with
            # redis-py 8's default RESP3 its invalidation listener hears nothing, and its copies would
            # stay stale after another worker's write (seen with cashews 7.6): compared coherent.
            self.cache.setup(s.url, client_side=True, local_cache=Memory(size=s.l1_size), protocol=2)
            await self.cache.init()
            await self.cache.ping()
        elif c == "aiocache":
            from aiocache import RedisCache  # noqa: PLC0415

            u = urlsplit(s.url)
            db = int(u.path.strip("/") or 0)
            self.cache = RedisCache(endpoint=u.hostname or "127.0.0.1", port=u.port or 6379, db=db,
                                    namespace=self.ns + ":")
            await self.cache.exists("ping")

    async def close(self) -> None:
        if self.warmer is not None:
            await self.warmer.wait_for_prewarms(30.0)
            stats = await self.warmer.get_statistics()
            made = stats["predictions"]["process"]
            self.report.prewarming = {**stats["prewarming"]["process"], "predictions": made["made"],
                                      "checked": made["checked"], "correct": made["correct"]}
        if self.config in FLEET_CONFIGS:
            metrics = await self.cache.get_metrics()
            self.report.counts = counts(metrics)
            adaptive = metrics["l1"].get("adaptive")
            if isinstance(adaptive, dict) and adaptive.get("enabled"):
                last = adaptive.get("last_adjustment") or {}
                self.report.l1_size_end = int(last.get("new_size", self.settings.l1_size))
            await self.cache.close()
        elif self.config in PEERS:
            await self.cache.close()

    async def read(self, session: str, query: str) -> tuple[Any, bool]:
        c = self.config
        computed = False

        def loader() -> Any:
            nonlocal computed
            computed = True
            self.report.calls += 1
            return self.select(query)

        async def aloader() -> Any:  # every cache runs the selection inline, on the event loop, as a peer must
            return loader()

        if c == "none":
            value = loader()
        elif c == "cachetools":
            value = self.cache.get(query)
            if value is None:
                value = self.cache[query] = loader()
        elif c in FLEET_CONFIGS:
            value = await self.cache.get_or_set(query, aloader, self.settings.ttl)
        elif c == "cashews":
            value = await self.cache.get_or_set(f"{self.ns}:{query}", aloader)
        else:  # aiocache: what its @cached decorator does
            value = await self.cache.get(query)
            if value is None:
                value = loader()
                await self.cache.set(query, value)
        return value, computed

    async def write(self, query: str, value: Any) -> None:
        c = self.config
        if c == "cachetools":
            self.cache[query] = value
        elif c in FLEET_CONFIGS:
            await self.cache.put(query, value, self.settings.ttl)
        elif c == "cashews":
            await self.cache.set(f"{self.ns}:{query}", value)
        elif c == "aiocache":
            await self.cache.set(query, value)

    async def learn(self, session: str, query: str, value: Any) -> None:
        if self.warmer is not None:
            await prewarm_step(self.warmer, session, query, value)

    async def run(self, stream: Iterator[tuple[str, str, bool]], reads: int | None,
                  progress: Callable[[int], None] | None = None) -> Report:
        """``settings.requests`` requests, or (``reads`` given) until that many reads were served."""
        think = self.settings.think_ms / 1000
        r = self.report
        started = time.perf_counter()
        done = 0
        while (r.reads < reads) if reads is not None else (done < self.settings.requests):
            session, query, is_write = next(stream)
            r.stamps.append((time.monotonic(), query, is_write, session))
            if is_write:
                r.writes += 1
                await self.write(query, answer(query, version=done + 1))
            else:
                t0 = time.perf_counter()
                value, computed = await self.read(session, query)
                t1 = time.perf_counter()
                await self.learn(session, query, value)  # the request's caller awaits this part too
                t2 = time.perf_counter()
                r.latencies.append(t2 - t0)
                r.computed.append(computed)
                r.learn_seconds += t2 - t1
                r.reads += 1
                r.hits += not computed
                r.wrong += not (isinstance(value, dict) and value.get("query") == query)
                await asyncio.sleep(think)  # the agent runs its tool
            done += 1
            if progress is not None and done % 50 == 0:
                progress(done)
        r.seconds = time.perf_counter() - started
        return r


async def run_one(settings: FleetSettings, config: str, index: int, join: bool, barrier: Barrier | None,
                  results: Queue[Any]) -> Report:
    runner = Runner(settings, config, index)
    await runner.open()
    try:
        stream = request_stream(settings, index)
        gc.collect()
        gc.freeze()
        if barrier is not None:
            await asyncio.to_thread(barrier.wait, START_TIMEOUT)
        return await runner.run(stream, settings.join_reads if join else None,
                                lambda done: results.put(("progress", index, done)))
    finally:
        await runner.close()


def worker_main(index: int, commands: Queue[Any], barrier: Barrier, results: Queue[Any]) -> None:
    """A worker process: runs (settings, config, join) commands until it gets None."""
    while True:
        command = commands.get()
        if command is None:
            return
        settings, config, join = command
        try:
            report = asyncio.run(run_one(settings, config, index, join, None if join else barrier, results))
            results.put(report)
        except Exception as exc:
            if not join:
                barrier.abort()
            results.put(f"worker {index} ({config}): {type(exc).__name__}: {exc}")
            return


class Pool:
    """``n`` fleet workers plus one joining worker (unless ``joiner=False``), started once, reused for every
    configuration."""

    def __init__(self, n: int, joiner: bool = True) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.n = n
        self.results: Queue[Any] = ctx.Queue()
        self.barrier = ctx.Barrier(n + 1)
        self.commands: list[Queue[Any]] = [ctx.Queue() for _ in range(n + joiner)]
        self.procs: list[SpawnProcess] = [
            ctx.Process(target=worker_main, args=(i, self.commands[i], self.barrier, self.results),
                        name=f"vrc-fleet-w{i}", daemon=True)
            for i in range(n + joiner)]
        for p in self.procs:
            p.start()

    def _collect(self, want: int) -> list[Report]:
        out: list[Report] = []
        while len(out) < want:
            try:
                item = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = next((p for p in self.procs if p.exitcode is not None), None)
                if dead is not None:
                    raise RuntimeError(f"worker {dead.name} died (exit code {dead.exitcode})") from None
                continue
            if isinstance(item, str):
                raise RuntimeError(item)
            if isinstance(item, Report):
                out.append(item)
        return sorted(out, key=lambda r: r.index)

    def run(self, settings: FleetSettings, config: str) -> tuple[list[Report], Report]:
        fleet = self.run_fleet(settings, config)
        self.commands[self.n].put((settings, config, True))  # the fleet is warm: a new worker joins
        joined = self._collect(1)[0]
        return fleet, joined

    def run_fleet(self, settings: FleetSettings, config: str,
                  released: Callable[[], None] | None = None) -> list[Report]:
        """The ``n`` workers' reports, each worker's cache closed (its bookkeeping sent) before it reports;
        ``released`` is called when the workers, their caches open, are released to serve their streams."""
        for i in range(self.n):
            self.commands[i].put((settings, config, False))
        with contextlib.suppress(threading.BrokenBarrierError):
            self.barrier.wait(START_TIMEOUT)
        if released is not None:
            released()
        return self._collect(self.n)

    def stop(self) -> None:
        for c in self.commands:
            with contextlib.suppress(Exception):
                c.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


# --------------------------------------------------------------------------- summary, targets, table

def summarize(config: str, n: int, cost_ms: float, fleet: list[Report], joined: Report) -> dict[str, Any]:
    lat = [x for r in fleet for x in r.latencies]
    reads = sum(r.reads for r in fleet)
    row: dict[str, Any] = {
        "config": config, "processes": n, "cost_ms": cost_ms, "reads": reads,
        "writes": sum(r.writes for r in fleet),
        "hit_rate": sum(r.hits for r in fleet) / reads if reads else 0.0,
        "mean_ms": 1000 * statistics.fmean(lat) if lat else 0.0,
        "p50_ms": 1000 * percentile(lat, 0.50), "p99_ms": 1000 * percentile(lat, 0.99),
        # where the mean goes: a read answered by the cache, a read that ran its selection
        "hit_mean_ms": _mean_ms(fleet, computed=False), "miss_mean_ms": _mean_ms(fleet, computed=True),
        "calls_per_request": sum(r.calls for r in fleet) / reads if reads else 0.0,
        "background_calls": sum(r.background_calls for r in fleet),
        "join_hit_rate": joined.hits / joined.reads if joined.reads else 0.0,
        "wrong": sum(r.wrong for r in fleet) + joined.wrong,
        "seconds": max(r.seconds for r in fleet),
    }
    if config in FLEET_CONFIGS:
        gets = sum(r.counts.get("gets", 0) for r in fleet)
        row["tiers"] = {t: sum(r.counts.get(t, 0) for r in fleet) / gets if gets else 0.0 for t in ("l1", "l2", "l3")}
        if config == "fleet+adaptive":
            row["l1_size_end"] = [r.l1_size_end for r in fleet]
    return row


def _mean_ms(fleet: list[Report], computed: bool) -> float:
    picked = [x for r in fleet for x, c in zip(r.latencies, r.computed, strict=True) if c is computed]
    return 1000 * statistics.fmean(picked) if picked else 0.0


def evaluate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fleet targets, for each victor_rcache configuration at the largest N and 5 ms."""
    if not rows:
        return []
    n = max(r["processes"] for r in rows)
    cost = 5.0 if any(r["cost_ms"] == 5.0 for r in rows) else rows[0]["cost_ms"]
    at = {r["config"]: r for r in rows if r["processes"] == n and r["cost_ms"] == cost}
    out = []
    for config in FLEET_CONFIGS:
        r = at.get(config)
        if r is None:
            continue
        checks: list[tuple[str, float, str, bool | None]] = [
            ("combined hit rate >= 82%", r["hit_rate"], "", r["hit_rate"] >= TARGET_HIT_RATE),
            ("joining worker's first-100 hit rate >= 70%", r["join_hit_rate"], "",
             r["join_hit_rate"] >= TARGET_JOIN_HIT_RATE)]
        base = at.get("cachetools")
        if base is not None and base["mean_ms"] > 0:
            ratio = r["mean_ms"] / base["mean_ms"]
            checks.append(("mean latency <= 0.5x cachetools", ratio, "x", ratio <= TARGET_LATENCY_RATIO))
        for peer in PEERS:
            p = at.get(peer)
            if p is None:
                checks.append((f"ahead of {peer} (lower mean latency)", 0.0, "", None))
                continue
            # Ahead: a lower mean latency in the same workload (every shared cache's hit rate is about the same,
            # so requiring a strictly higher one would fail on ties).
            ok = r["mean_ms"] < p["mean_ms"]
            checks.append((f"ahead of {peer} (lower mean latency)",
                           r["mean_ms"] / p["mean_ms"] if p["mean_ms"] else 0.0, "x mean", ok))
        for name, value, unit, ok in checks:
            out.append({"config": config, "processes": n, "cost_ms": cost, "target": name,
                        "value": round(value, 4), "unit": unit,
                        "result": "n/a (peer skipped)" if ok is None else ("PASS" if ok else "FAIL")})
    return out


def fleet_figures(rows: list[dict[str, Any]], settings: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The fleet's figures for the harness (benchmarks/figures.py), for the ``fleet`` configuration at N = 4
    (else the largest N run): mean latency against the per-process cachetools configuration and against each
    peer at a 5 ms selection, against no cache at 0.17 ms, and the hit rates. "Ahead of" a peer is a lower
    mean latency in the same workload (the hit rates, nearly equal for every shared cache, are in the detail).
    Also what could not be measured, and why."""
    from benchmarks.figures import figure  # noqa: PLC0415 - only the harness needs it

    n = 4 if any(r["processes"] == 4 for r in rows) else max((r["processes"] for r in rows), default=0)
    at = {(r["config"], r["cost_ms"]): r for r in rows if r["processes"] == n}
    workload = (f"{n} worker processes of agent sessions over {settings.get('universe')} Zipf-popular queries "
                f"(s={settings.get('zipf_s')}), 1 request in {settings.get('write_every')} a write, "
                f"{settings.get('requests')} requests per worker; L1 {settings.get('l1_size')} per process, L2 "
                f"{settings.get('l2_size')}, L3 {settings.get('l3_size')}, promote_after "
                f"{settings.get('promote_after')}; AsyncMultiLevelCache.get_or_set")
    out: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}

    def pair(fid: str, name: str, cost: float, base: str, field: str, unit: str,
             bound: tuple[str, str, float], target: str | None = None) -> None:
        ours, theirs = at.get(("fleet", cost)), at.get((base, cost))
        if ours is None or theirs is None:
            missing = "fleet" if ours is None else base
            skipped[fid] = f"configuration {missing} at N={n}, {cost:g} ms was not run"
            return
        scale = 100.0 if field.endswith("hit_rate") else 1.0
        out.append(figure(fid, name, value=scale * ours[field], unit=unit, floor=f"{base} ({cost:g} ms selection)",
                          floor_value=scale * theirs[field] or None, bound=bound, target=target, processes=n,
                          cost_ms=cost, hit_rate=ours["hit_rate"], floor_hit_rate=theirs["hit_rate"],
                          p99_ms=ours["p99_ms"], floor_p99_ms=theirs["p99_ms"], workload=workload))

    pair("fleet:mean_vs_cachetools", f"fleet mean latency / per-process cachetools, N={n}, 5 ms selection", 5.0,
         "cachetools", "mean_ms", "ms", ("ratio", "<=", TARGET_LATENCY_RATIO))
    for peer in PEERS:
        pair(f"fleet:mean_vs_{peer}", f"fleet mean latency / {peer}, N={n}, 5 ms selection", 5.0, peer,
             "mean_ms", "ms", ("ratio", "<", 1.0), target=f"< 1x (ahead of {peer})")
    pair("fleet:mean_vs_none@0.17ms", f"fleet mean latency / no cache, N={n}, 0.17 ms selection", 0.17, "none",
         "mean_ms", "ms", ("ratio", "<", 1.0), target="< 1x (faster than no cache)")
    pair("fleet:hit_rate", f"fleet combined hit rate, N={n}, 5 ms selection", 5.0, "cachetools", "hit_rate", "%",
         ("value", ">=", 100 * TARGET_HIT_RATE))
    pair("fleet:join_hit_rate", f"fleet: a joining worker's first {settings.get('join_reads')} reads, hit rate, "
         f"N={n}, 5 ms selection", 5.0, "cachetools", "join_hit_rate", "%", ("value", ">=", 100 * TARGET_JOIN_HIT_RATE))
    return out, skipped


def table(result: dict[str, Any]) -> str:
    lines = []
    head = (f"{'N':>2} {'cost':>6}  {'configuration':<15} {'hit rate':>8}  {'L1 / L2 / L3':<17} {'mean ms':>8} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'hit ms':>7} {'miss ms':>7} {'calls/req':>9} {'join 100':>8}")
    lines.append(head)
    for r in result["results"]:
        tiers = "/".join(f"{100 * r['tiers'][t]:.0f}%" for t in ("l1", "l2", "l3")) if "tiers" in r else "-"
        lines.append(f"{r['processes']:>2} {r['cost_ms']:>4g}ms  {r['config']:<15} {100 * r['hit_rate']:7.1f}%  "
                     f"{tiers:<17} {r['mean_ms']:8.2f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
                     f"{r['hit_mean_ms']:7.2f} {r['miss_mean_ms']:7.2f} "
                     f"{r['calls_per_request']:9.3f} {100 * r['join_hit_rate']:7.0f}%")
    for name, why in result["skipped"].items():
        lines.append(f"   skipped {name}: {why}")
    if result["targets"]:
        lines.append("")
        lines.append("targets (N = largest process count, 5 ms selection):")
        for t in result["targets"]:
            value = f"{100 * t['value']:.1f}%" if t["unit"] == "" else f"{t['value']:.2f}{t['unit']}"
            lines.append(f"  {t['config']:<15} {t['target']:<46} {value:>10}  {t['result']}")
    return "\n".join(lines)


def available(config: str) -> str | None:
    """Why ``config`` cannot run here, or None."""
    module = {"cachetools": "cachetools", "cashews": "cashews", "aiocache": "aiocache"}.get(config)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError as exc:
        return f"{module} is not installed ({exc}); pip install 'victor-rcache[bench]'"
    return None


def resolve_configs(configs: Sequence[str] | None) -> list[str]:
    """The configurations to run, in order, aliases resolved (None: all); ValueError for an unknown name."""
    wanted = list(dict.fromkeys(ALIASES.get(c, c) for c in configs or CONFIGS))
    unknown = [c for c in wanted if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown fleet configurations {unknown}; choose from {list(CONFIGS)} "
                         f"(or the aliases {', '.join(ALIASES)})")
    return wanted


def run_fleet(url: str, quick: bool, configs: list[str] | None, progress: Callable[[str], None],
              processes: Sequence[int] | None = None, costs: Sequence[float] | None = None,
              requests: int | None = None, sizes: Sequence[int] | None = None,
              promote_after: int | None = None) -> dict[str, Any]:
    """Run the fleet workload against ``url`` and return {"facts", "settings", "results", "targets", ...}."""
    wanted = resolve_configs(configs)
    skipped = {c: why for c in wanted if (why := available(c)) is not None}
    wanted = [c for c in wanted if c not in skipped]
    ns = f"vrcfleet{os.getpid()}"
    progress("calibrating the selection's CPU cost")
    base = FleetSettings(url=url, namespace=ns, requests=requests or (400 if quick else 1500),
                         rounds_per_ms=calibrate())
    if sizes:
        base = replace(base, l1_size=sizes[0], l2_size=sizes[1], l3_size=sizes[2])
    if promote_after:
        base = replace(base, promote_after=promote_after)
    ns_list = [f"{ns}-{c.replace('+', '-')}" for c in wanted]
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for n in processes or ((1, 4) if quick else (1, 2, 4)):
            progress(f"starting {n} + 1 worker processes")
            pool = Pool(n)
            try:
                for cost in costs or ((5.0,) if quick else (5.0, 0.17)):
                    settings = replace(base, processes=n, cost_ms=cost)
                    for config in wanted:
                        name = f"{ns}-{config.replace('+', '-')}"
                        clear_namespaces(url, [name, "cashews:" + name])  # cold (cashews prefixes its keys)
                        t0 = time.perf_counter()
                        fleet, joined = pool.run(settings, config)
                        row = summarize(config, n, cost, fleet, joined)
                        results.append(row)
                        progress(f"N={n} cost={cost:g}ms {config:<15} hit {100 * row['hit_rate']:5.1f}%  "
                                 f"mean {row['mean_ms']:6.2f} ms  join {100 * row['join_hit_rate']:3.0f}%  "
                                 f"({time.perf_counter() - t0:.1f} s)")
            finally:
                pool.stop()
    finally:
        with contextlib.suppress(Exception):
            clear_namespaces(url, ns_list + ["cashews:" + x for x in ns_list])
    info = facts.machine_facts(url)
    settings_out = asdict(base)
    settings_out.pop("url")
    return {"group": "fleet", "facts": info, "settings": settings_out, "results": results,
            "targets": evaluate(results), "skipped": skipped, "seconds": round(time.perf_counter() - started, 1)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fleet workload: N processes, several caches, one table.")
    p.add_argument("--url", help="an existing Redis (default: a private redis-server)")
    p.add_argument("--quick", action="store_true", help="1 and 4 processes, 400 requests each, 5 ms only")
    p.add_argument("--processes", type=int, nargs="+", help="process counts (default 1 2 4; quick: 1 4)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, help="configurations (default: all)")
    p.add_argument("--costs", type=float, nargs="+", help="selection CPU cost in ms (default 5 0.17; quick: 5)")
    p.add_argument("--requests", type=int, help="requests per worker (default 1500; quick: 400)")
    p.add_argument("--sizes", type=int, nargs=3, metavar=("L1", "L2", "L3"),
                   help="tier sizes in entries (default: 100 300 600, smaller than the universe)")
    p.add_argument("--promote-after", type=int, help="victor_rcache's promote_after (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_print(args.url, args.json, table, lambda url: run_fleet(
        url, args.quick, args.configs, say, args.processes, args.costs, args.requests, args.sizes, args.promote_after))


def say(msg: str) -> None:
    """Progress, to stderr (stdout holds the result)."""
    print(msg, file=sys.stderr, flush=True)


def run_and_print(url: str | None, as_json: bool, table: Callable[[dict[str, Any]], str],
                  run: Callable[[str], dict[str, Any]]) -> int:
    """A benchmark run as a script: on ``url``, else a private redis-server; its result as JSON or a table."""
    server = None if url else LocalRedisServer().start()
    try:
        result = run(url or server.url)  # type: ignore[union-attr]
    finally:
        if server is not None:
            server.stop()
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        f = result["facts"]
        print(f"{f['date']}; nproc {f['nproc']}, load {f['load_average']}; Python {f['python']}, "
              f"redis-server {f['redis_server']}; {result['seconds']} s")
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
