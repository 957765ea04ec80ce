"""``make demo`` / ``victor-rcache demo``: a fleet of agent workers, four ways of caching, one table.

Run ``python -m victor_rcache.demo [--url redis://...] [--workers 4] [--requests 300]`` (``--help``
lists the rest: agents per worker, session length, selection cost, think time, tier sizes, seed).

Each worker process stands for an agent server: it runs ``--agents`` agent sessions at a time
(asyncio tasks), and each session asks for a tool selection per step. A session walks a Markov chain
over 150 queries ("read the file of the CLI" is usually followed by "search the code of the CLI"),
so the fleet's traffic has patterns the prediction model can learn. A selection calls a stand-in
for a model: ``--cost-ms`` of sleep; between two requests an agent "runs the tool" for
``--think-ms``. Every request stream is fixed by ``--seed``; the same streams run four times:

1. no cache: every request calls the selection;
2. per-process cache: each worker caches alone, in an in-process LRU of ``--l1-size`` entries (what
   L1 does without Redis; with single-flight among the worker's agents);
3. fleet cache: every worker uses one ``AsyncMultiLevelCache`` namespace and ``get_or_set``, so a
   selection computed by one worker serves all of them (L1 per process, L2/L3 in Redis);
4. fleet cache with prewarming: as 3, and each worker records every query with its session in the
   shared ``AsyncPredictiveCacheWarmer`` model, predicts the session's next query and prewarms it
   in the background (an asyncio task) while the agent runs its tool.

The worker processes are started once and run the four configurations in turn. Without ``--url``
(or ``VICTOR_RCACHE_URL``/``REDIS_URL``) the demo starts a private ``redis-server`` on a free port, or,
when none is installed, an embedded fakeredis server (then the numbers are illustrative only). The
namespace the demo uses is emptied before each fleet configuration; the last one's cache and model
stay in Redis to be looked at with ``redis-cli`` or ``victor-rcache stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import importlib.util
import math
import multiprocessing
import os
import queue
import random
import shlex
import shutil
import sys
import textwrap
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any, TextIO
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster

from . import AsyncMultiLevelCache, MultiLevelCache
from .config import CacheConfig, redact
from .errors import CacheError
from .keys import KeySpace
from .local_redis import LocalRedisServer
from .prediction.model import ModelKeys
from .prediction.warmer import AsyncPredictiveCacheWarmer, PredictiveCacheWarmer
from .tiers import default_scripts

WIDTH = 108  # of the text around the table
SHARDS = 16  # the library's default; the printed redis-cli key names depend on it
START_TIMEOUT = 120.0  # seconds for every worker to start a configuration (spawn + imports + connect)

ACTIONS = (
    "read the file", "list the folder of", "search the code of", "run the tests of", "show the git diff of",
    "summarize the README of", "open a pull request for", "find the callers in", "lint", "format",
    "explain the errors in", "benchmark", "grep the logs of", "deploy", "roll back",
)
SUBJECTS = (
    "the auth service", "the billing module", "the search index", "the mobile app", "the data pipeline",
    "the web frontend", "the payments API", "the scheduler", "the metrics exporter", "the CLI",
)
TOOLS = (
    "read_file", "write_file", "list_dir", "grep", "run_tests", "git_diff", "git_log", "open_pr",
    "web_search", "http_get", "sql_query", "lint", "format_code", "python_exec", "shell", "summarize",
    "translate", "calendar", "send_email", "create_ticket", "deploy", "rollback", "metrics_query",
    "log_search",
)
NEXT_WEIGHTS = (0.6, 0.25, 0.1)  # an action's three usual next actions (same subject)
JUMP = 0.05  # otherwise the agent jumps to another subject and a random action

NONE, LOCAL, FLEET, PREWARM = "none", "local", "fleet", "prewarm"
CONFIGS = (NONE, LOCAL, FLEET, PREWARM)
LABELS = {NONE: "no cache", LOCAL: "per-process LRU", FLEET: "fleet cache", PREWARM: "fleet + prewarming"}


# --------------------------------------------------------------------------- the workload

def zipf_cum_weights(n: int, s: float) -> list[float]:
    """Cumulative weights of ranks 1..n with popularity 1 / rank**s."""
    total, out = 0.0, []
    for rank in range(1, n + 1):
        total += 1.0 / rank**s
        out.append(total)
    return out


class Workload:
    """The Markov chain the agent sessions walk, fixed by ``seed``.

    A query is "<action> <subject>". A session starts at a popular subject (Zipf ``s``) and a popular
    action; each next query keeps the subject and moves to one of the action's three usual next
    actions (probabilities 0.6, 0.25, 0.1), or, with probability 0.05, jumps to another subject.
    """

    def __init__(self, seed: int, zipf_s: float) -> None:
        rng = random.Random(f"workload:{seed}")
        self.subjects = list(SUBJECTS)
        self.actions = list(ACTIONS)
        rng.shuffle(self.subjects)  # most popular first
        rng.shuffle(self.actions)
        self.subject_cw = zipf_cum_weights(len(self.subjects), zipf_s)
        self.action_cw = zipf_cum_weights(len(self.actions), zipf_s)
        self.next_actions = {a: tuple(rng.sample([b for b in ACTIONS if b != a], len(NEXT_WEIGHTS)))
                             for a in ACTIONS}

    @property
    def vocabulary(self) -> list[str]:
        return [f"{a} {s}" for a in ACTIONS for s in SUBJECTS]

    def session(self, rng: random.Random, length: int) -> list[str]:
        subject = rng.choices(self.subjects, cum_weights=self.subject_cw)[0]
        action = rng.choices(self.actions, cum_weights=self.action_cw)[0]
        out = [f"{action} {subject}"]
        while len(out) < length:
            if rng.random() < JUMP:
                subject = rng.choices(self.subjects, cum_weights=self.subject_cw)[0]
                action = rng.choice(ACTIONS)
            else:
                action = rng.choices(self.next_actions[action], weights=NEXT_WEIGHTS)[0]
            out.append(f"{action} {subject}")
        return out


def select_tools(query: str) -> dict[str, Any]:
    """The selection without its cost: three tools and their scores, fixed by the query."""
    digest = hashlib.sha256(query.encode()).digest()
    ranked = sorted(range(len(TOOLS)), key=lambda i: digest[i])
    picks = ranked[:3]
    return {"query": query, "tools": [TOOLS[i] for i in picks],
            "scores": [round(1.0 - digest[i] / 512, 3) for i in picks]}


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs; the same for every configuration."""

    url: str
    namespace: str
    requests: int  # per worker
    agents: int  # sessions a worker runs at a time
    session_length: int
    seed: int
    zipf_s: float
    cost_ms: float
    think_ms: float
    l1_size: int
    l2_size: int
    l3_size: int
    top_k: int = 2
    cluster: bool = False
    shebang: bool = True  # fakeredis does not understand the scripts' Redis 7 shebang line
    timeout: float = 0.5  # seconds per Redis call; fakeredis (pure Python, one thread) needs far more


def agent_streams(settings: Settings, worker: int) -> list[list[tuple[str, str]]]:
    """Worker ``worker``'s requests as (session, query), one list per agent, in order.

    The worker's sessions are numbered; agent ``a`` runs sessions a, a + agents, ... one after the
    other. Each session's queries depend only on the seed, the worker and the session number."""
    workload = Workload(settings.seed, settings.zipf_s)
    streams: list[list[tuple[str, str]]] = [[] for _ in range(settings.agents)]
    left, number = settings.requests, 0
    while left > 0:
        length = min(settings.session_length, left)
        rng = random.Random(f"session:{settings.seed}:{worker}:{number}")
        session = f"w{worker}-s{number}"
        streams[number % settings.agents] += [(session, q) for q in workload.session(rng, length)]
        left -= length
        number += 1
    return streams


# --------------------------------------------------------------------------- the workers

Computation = tuple[str, float, float]  # query, start, end (time.monotonic: one clock for the host)


@dataclass
class WorkerReport:
    """What one worker saw in one configuration."""

    config: str
    index: int
    pid: int
    latencies: list[float] = field(default_factory=list)  # seconds, per request
    hits: int = 0  # requests answered without a selection call of their own
    calls: int = 0  # selection calls on the request path
    background_calls: int = 0  # selection calls made by prewarming
    wrong: int = 0  # answers that differ from a fresh selection
    computations: list[Computation] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # the cache's own process counters
    fills_refused: int = 0  # get_or_set fills Redis refused (the key changed meanwhile)
    prewarm: dict[str, int] = field(default_factory=dict)  # this worker's prewarm outcomes
    seconds: float = 0.0


Progress = tuple[str, int, int]  # ("progress", worker, requests done)
Message = WorkerReport | Progress | str  # a str is an error


class Agents:
    """Runs one worker's agent sessions against one kind of cache and keeps the report."""

    def __init__(self, settings: Settings, config: str, index: int, results: Queue[Message]) -> None:
        self.settings = settings
        self.report = WorkerReport(config, index, os.getpid())
        self.results = results
        self.done = 0
        self.every = max(1, settings.requests // 50)

    async def select(self, query: str, background: bool = False) -> dict[str, Any]:
        """The selection: a model call's cost, then the answer."""
        started = time.monotonic()
        if background:
            self.report.background_calls += 1
        else:
            self.report.calls += 1
        await asyncio.sleep(self.settings.cost_ms / 1000)
        self.report.computations.append((query, started, time.monotonic()))
        return select_tools(query)

    async def run(self, answer: Callable[[str, str], Awaitable[tuple[Any, bool]]],
                  after: Callable[[str, str, Any], Awaitable[None]] | None = None) -> None:
        """Every agent's stream; ``answer(session, query)`` returns (selection, computed here)."""
        think = self.settings.think_ms / 1000

        async def agent(number: int, stream: list[tuple[str, str]]) -> None:
            # Agents start at seeded moments within one think time: a fleet's agents do not march in step.
            offset = random.Random(f"start:{self.settings.seed}:{self.report.index}:{number}").random()
            await asyncio.sleep(think * offset)
            for i, (session, query) in enumerate(stream):
                started = time.perf_counter()
                value, computed = await answer(session, query)
                self.report.latencies.append(time.perf_counter() - started)
                self.report.hits += not computed
                if value != select_tools(query):  # a cache must never answer for another query
                    self.report.wrong += 1
                self.done += 1
                if self.done % self.every == 0 or self.done == self.settings.requests:
                    self.results.put(("progress", self.report.index, self.done))
                # The agent runs the tool it selected for ``think`` seconds; learning happens meanwhile.
                resume = time.perf_counter() + think
                if after is not None:
                    await after(session, query, value)
                if i + 1 < len(stream):
                    await asyncio.sleep(max(0.0, resume - time.perf_counter()))

        started = time.perf_counter()
        await asyncio.gather(*(agent(n, s) for n, s in enumerate(agent_streams(self.settings, self.report.index))))
        self.report.seconds = time.perf_counter() - started


def make_cache(settings: Settings) -> AsyncMultiLevelCache:
    # fail_open=False: a demo should stop with Redis's error, not quietly count misses.
    return AsyncMultiLevelCache(settings.url, namespace=settings.namespace, l1_size=settings.l1_size,
                                l2_size=settings.l2_size, l3_size=settings.l3_size, shards=SHARDS,
                                fail_open=False, cluster=settings.cluster, lua_shebang=settings.shebang,
                                socket_timeout=settings.timeout, connect_timeout=settings.timeout)


async def run_config(config: str, settings: Settings, index: int, barrier: Barrier,
                     results: Queue[Message]) -> WorkerReport:
    """One configuration in one worker: get ready, wait for the others, serve every agent, report."""
    agents = Agents(settings, config, index, results)

    async def start_line() -> None:
        # What exists now (modules, clients) lives until the end: keep it out of the collector's full
        # passes, which would otherwise stall this worker's event loop for tens of ms mid-run.
        gc.collect()
        gc.freeze()
        await asyncio.to_thread(barrier.wait, START_TIMEOUT)

    if config == NONE:
        async def uncached(session: str, query: str) -> tuple[Any, bool]:
            return await agents.select(query), True

        await start_line()
        await agents.run(uncached)
        return agents.report

    if config == LOCAL:
        lru: OrderedDict[str, Any] = OrderedDict()  # L1 alone: an LRU of l1_size entries in this process
        computing: dict[str, asyncio.Future[Any]] = {}

        async def local(session: str, query: str) -> tuple[Any, bool]:
            if query in lru:
                lru.move_to_end(query)
                return lru[query], False
            if query in computing:  # another agent of this worker is computing it: wait for it
                return await asyncio.shield(computing[query]), False
            computing[query] = future = asyncio.get_running_loop().create_future()
            try:
                lru[query] = value = await agents.select(query)
                while len(lru) > settings.l1_size:
                    lru.popitem(last=False)
                future.set_result(value)
            except Exception as exc:  # the waiting agents get it too
                future.set_exception(exc)
                raise
            finally:
                del computing[query]
                if not future.done():  # cancelled: so are the waiting agents
                    future.cancel()
            return value, True

        await start_line()
        await agents.run(local)
        return agents.report

    cache = make_cache(settings)
    try:
        # Connect before the start line, one connection per agent (a get would count as a request).
        await asyncio.gather(*(cache.client.ping() for _ in range(settings.agents)))
        warmer = AsyncPredictiveCacheWarmer(cache) if config == PREWARM else None
        prewarms: set[asyncio.Task[Any]] = set()
        outcomes: Counter[str] = Counter()

        async def fleet(session: str, query: str) -> tuple[Any, bool]:
            computed = False

            async def loader() -> Any:
                nonlocal computed
                computed = True
                return await agents.select(query)

            # Computed once per fleet: a worker missing a query another one is computing waits for it.
            return await cache.get_or_set(query, loader), computed

        async def prewarm_select(query: str) -> dict[str, Any]:  # a coroutine function: runs on this loop
            return await agents.select(query, background=True)

        async def prewarm_background(prediction: Any) -> None:
            assert warmer is not None
            report = await warmer.prewarm_predictions(prediction, prewarm_select)
            outcomes.update(completed=report.completed, cached=report.cached, busy=report.busy,
                            refused=report.refused, failed=report.failed)

        async def learn(session: str, query: str, value: Any) -> None:
            assert warmer is not None
            await warmer.record_query(query, value["tools"], session=session)
            prediction = await warmer.predict_next_queries(query, top_k=settings.top_k, session=session)
            if prediction.queries:
                task = asyncio.get_running_loop().create_task(prewarm_background(prediction))
                prewarms.add(task)
                task.add_done_callback(prewarms.discard)

        await start_line()
        await agents.run(fleet, learn if warmer is not None else None)
        await asyncio.gather(*prewarms)
        agents.report.prewarm = dict(outcomes)
        metrics = await cache.get_metrics()
        agents.report.counts = counts(metrics)
        agents.report.fills_refused = metrics["stampede"]["fills_refused"]
    finally:
        await cache.close()
    return agents.report


def worker_main(index: int, settings: Settings, commands: Queue[str | None], barrier: Barrier,
                results: Queue[Message]) -> None:
    """A worker process: run each configuration the parent sends, until it sends None."""
    while True:
        config = commands.get()
        if config is None:
            return
        try:
            results.put(asyncio.run(run_config(config, settings, index, barrier, results)))
        except threading.BrokenBarrierError:
            results.put(f"worker {index}: another worker failed to start")
            return
        except Exception as exc:  # report any failure to the parent, which prints it
            barrier.abort()
            results.put(f"worker {index}: {type(exc).__name__}: {exc}")
            return


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


class ProgressBar:
    """A text bar on stderr: redrawn in place on a terminal, one line when a configuration ends otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.label, self.total, self.width = label, total, width
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.started = time.perf_counter()

    def line(self, done: int) -> str:
        filled = self.width * done // self.total
        return (f"  {self.label:<20} [{'#' * filled}{'.' * (self.width - filled)}] {100 * done // self.total:3d}%"
                f"  {done}/{self.total} requests")

    def update(self, done: int) -> None:
        if self.live:
            self.stream.write("\r" + self.line(done))
            self.stream.flush()

    def finish(self) -> None:
        seconds = time.perf_counter() - self.started
        self.stream.write(("\r" if self.live else "") + self.line(self.total) + f" in {seconds:.1f} s\n")
        self.stream.flush()


class WorkerPool:
    """The worker processes, started once; each configuration releases them together at a barrier."""

    def __init__(self, ctx: SpawnContext, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.results: Queue[Message] = ctx.Queue()
        self.barrier = ctx.Barrier(workers + 1)
        self.commands: list[Queue[str | None]] = [ctx.Queue() for _ in range(workers)]
        self.procs: list[SpawnProcess] = [
            ctx.Process(target=worker_main, args=(i, settings, self.commands[i], self.barrier, self.results),
                        name=f"vrc-demo-w{i}")
            for i in range(workers)]
        for proc in self.procs:
            proc.start()

    def _dead(self) -> SpawnProcess | None:
        return next((p for p in self.procs if p.exitcode is not None), None)

    def run(self, config: str) -> list[WorkerReport]:
        for command in self.commands:
            command.put(config)
        workers = len(self.procs)
        deadline = time.monotonic() + START_TIMEOUT
        while self.barrier.n_waiting < workers and not self.barrier.broken:  # all ready, or one failed
            if time.monotonic() > deadline or self._dead() is not None:
                self.barrier.abort()
                break
            time.sleep(0.01)
        with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: its message is queued
            self.barrier.wait(START_TIMEOUT)
        bar = ProgressBar(LABELS[config], workers * self.settings.requests)
        progress = [0] * workers
        out: list[WorkerReport] = []
        errors: list[str] = []
        while len(out) + len(errors) < workers:
            try:
                item = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = self._dead()
                if dead is not None and not errors:
                    raise DemoError(f"worker process {dead.name} died (exit code {dead.exitcode})") from None
                if dead is not None:
                    break
                continue
            if isinstance(item, str):
                errors.append(item)
            elif isinstance(item, tuple):
                progress[item[1]] = item[2]
                bar.update(sum(progress))
            else:
                out.append(item)
        if errors:
            if bar.live:
                bar.stream.write("\n")
            raise DemoError("; ".join(errors))
        bar.finish()
        return sorted(out, key=lambda r: r.index)

    def stop(self) -> None:
        for command in self.commands:
            with contextlib.suppress(Exception):
                command.put(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()


# --------------------------------------------------------------------------- the Redis server

@dataclass
class Server:
    url: str
    kind: str  # "given", "redis-server" or "fakeredis"
    description: str
    keep: bool = False


def _fakeredis_lua_ok() -> bool:
    """fakeredis runs Lua scripts only when lupa is installed (the ``fakeredis[lua]`` extra)."""
    return importlib.util.find_spec("lupa") is not None


@contextlib.contextmanager
def redis_server(url: str | None, keep: bool) -> Iterator[Server]:
    """The Redis the demo uses: the given URL, else a private redis-server, else embedded fakeredis."""
    if url:
        yield Server(url, "given", f"Redis at {redact(url)}")
        return
    if shutil.which("redis-server"):
        local = LocalRedisServer().start()
        try:
            yield Server(local.url, "redis-server", f"a private redis-server on port {local.port}", keep)
        finally:
            if not keep:
                local.stop()
        return
    try:
        from fakeredis import TcpFakeServer  # noqa: PLC0415  (an optional dependency)
    except ImportError:
        raise DemoError(
            "no redis-server found on PATH and fakeredis is not installed. Install redis-server "
            "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis), or "
            "pip install 'victor-rcache[demo]', or pass --url redis://host:port/0"
        ) from None
    if not _fakeredis_lua_ok():
        raise DemoError("fakeredis runs the cache's Lua scripts only with lupa: pip install 'fakeredis[lua]'")
    fake = TcpFakeServer(("127.0.0.1", 0), server_type="redis", server_version=(7, 0))
    port = int(fake.server_address[1])
    thread = threading.Thread(target=fake.serve_forever, name="fakeredis", daemon=True)
    thread.start()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        preload_scripts(url)
        yield Server(url, "fakeredis", f"an embedded fakeredis server on port {port}",
                     keep)
    finally:
        fake.shutdown()
        fake.server_close()


def preload_scripts(url: str) -> None:
    """Load the cache's Lua scripts into fakeredis before any worker calls them.

    fakeredis's TCP server closes a connection after sending any error reply, so the NOSCRIPT reply
    a first EVALSHA gets would cut off the rest of the worker's pipeline.
    """
    with redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5) as client:
        for script in default_scripts(shebang=False).all():
            sha = client.script_load(script.source)
            if sha != script.sha:
                raise DemoError(f"fakeredis loaded {script.name}.lua under SHA1 {sha}, expected {script.sha}")


def plain_client(url: str, cluster: bool) -> Any:
    """A plain redis-py client (cluster-aware) for the demo's own housekeeping."""
    if cluster:
        return RedisCluster.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def server_version(server: Server, cluster: bool) -> str:
    if server.kind == "fakeredis":  # fakeredis has no INFO
        from fakeredis import __version__  # noqa: PLC0415

        return f"fakeredis {__version__}"
    with plain_client(server.url, cluster) as client:
        node = client.get_primaries()[0].redis_connection if cluster else client
        info: dict[str, Any] = node.info("server")
    return f"redis_version {info.get('redis_version', '?')}" + (" (cluster)" if cluster else "")


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def clear_namespaces(url: str, namespaces: Sequence[str], cluster: bool = False) -> None:
    """Remove every key of these namespaces (data, indexes, counters, model), so a run starts cold."""
    with plain_client(url, cluster) as client:
        for namespace in namespaces:
            batch: list[bytes] = []
            for key in client.scan_iter(match=_glob_escape(namespace) + ":*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    client.delete(*batch)
                    batch.clear()
            if batch:
                client.delete(*batch)


def fleet_view(settings: Settings, prewarm: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The namespace's fleet-wide metrics and, after prewarming, the model's statistics."""
    with MultiLevelCache(settings.url, namespace=settings.namespace, l1_size=settings.l1_size,
                         l2_size=settings.l2_size, l3_size=settings.l3_size, shards=SHARDS, fail_open=False,
                         cluster=settings.cluster, lua_shebang=settings.shebang, coherence=False,
                         socket_timeout=settings.timeout, connect_timeout=settings.timeout) as cache:
        metrics = cache.get_metrics(scope="fleet")
        stats = PredictiveCacheWarmer(cache).get_statistics() if prewarm else None
    return metrics, stats


# --------------------------------------------------------------------------- reporting

def counts(metrics: dict[str, Any]) -> dict[str, int]:
    """The raw counters behind a metrics dict."""
    return {"gets": metrics["combined"]["gets"], "l1": metrics["l1"]["hits"], "l2": metrics["l2"]["hits"],
            "l3": metrics["l3"]["hits"], "misses": metrics["combined"]["total_misses"]}


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)] if ordered else 0.0


@dataclass
class Row:
    """One configuration's line of the table, and what its checks need."""

    config: str
    requests: int
    hits: int
    mean_ms: float
    p99_ms: float
    calls: int
    background_calls: int
    wrong: int
    seconds: float
    computations: list[Computation]
    counts: dict[str, int]
    prewarm: dict[str, int]
    fills_refused: int
    fleet: dict[str, Any] | None = None  # get_metrics(scope="fleet")
    model: dict[str, Any] | None = None  # the warmer's get_statistics()

    @classmethod
    def of(cls, config: str, reports: list[WorkerReport]) -> Row:
        latencies = [x for r in reports for x in r.latencies]
        total: Counter[str] = Counter()
        prewarm: Counter[str] = Counter()
        for r in reports:
            total.update(r.counts)
            prewarm.update(r.prewarm)
        return cls(config, len(latencies), sum(r.hits for r in reports),
                   1000 * sum(latencies) / max(1, len(latencies)), 1000 * percentile(latencies, 0.99),
                   sum(r.calls for r in reports), sum(r.background_calls for r in reports),
                   sum(r.wrong for r in reports), max(r.seconds for r in reports),
                   [c for r in reports for c in r.computations], dict(total), dict(prewarm),
                   sum(r.fills_refused for r in reports))

    @property
    def total_calls(self) -> int:
        return self.calls + self.background_calls

    @property
    def fleet_counts(self) -> dict[str, int]:
        assert self.fleet is not None
        return counts(self.fleet)


def table(rows: list[Row]) -> list[str]:
    baseline = next(r.total_calls for r in rows if r.config == NONE)
    head = (f"  {'':<20}{'hit rate':>9}{'mean':>10}{'p99':>10}{'selection calls':>17}{'saved':>8}"
            f"{'prewarmed: completed / useful':>32}")
    lines = [head]
    for r in rows:
        calls = f"{r.calls} + {r.background_calls}" if r.config == PREWARM else str(r.calls)
        prewarmed = "-"
        if r.model is not None:
            p = r.model["prewarming"]
            prewarmed = f"{p['completed']} / {p['useful']}"
        saved = "-" if r.config == NONE else str(baseline - r.total_calls)
        lines.append(f"  {LABELS[r.config]:<20}{100 * r.hits / max(1, r.requests):>8.1f}%{r.mean_ms:>7.2f} ms"
                     f"{r.p99_ms:>7.2f} ms{calls:>17}{saved:>8}{prewarmed:>32}")
    return lines


def overlaps(computations: list[Computation]) -> int:
    """Selections computed while the same one was being computed elsewhere in the fleet."""
    by_query: dict[str, list[tuple[float, float]]] = {}
    for query, start, end in computations:
        by_query.setdefault(query, []).append((start, end))
    found = 0
    for spans in by_query.values():
        spans.sort()
        busy_until = -math.inf
        for start, end in spans:
            if start < busy_until:
                found += 1
            busy_until = max(busy_until, end)
    return found


def fleet_checks(row: Row) -> tuple[list[str], bool]:
    """Once per fleet: never two computations of a selection at once, and a recomputation only for an
    entry Redis removed (evicted or expired) or a fill that was refused."""
    assert row.fleet is not None
    ok = True
    lines = []
    twice = overlaps(row.computations)
    if twice:
        ok = False
        lines.append(f"ERROR: {twice} selections were computed while another worker computed the same one.")
    distinct = len({q for q, _, _ in row.computations})
    again = row.total_calls - distinct
    removed = row.fleet["l3"]["evictions"] + row.fleet["combined"]["total_expirations"]
    refused = row.fills_refused + row.prewarm.get("refused", 0) + row.prewarm.get("failed", 0)
    if again > removed + refused:
        ok = False
        lines.append(f"ERROR: {again} selections were computed again, but Redis removed only {removed} entries.")
    if ok and again:
        lines.append(f"Check passed: never two computations of one selection at once; {distinct} distinct "
                     f"selections, and {again} recomputations of entries Redis had evicted ({removed} evictions).")
    elif ok:
        lines.append(f"Check passed: each of the {distinct} distinct selections was computed once for the whole "
                     "fleet.")
    mismatch = {k: (row.fleet_counts[k], row.counts.get(k)) for k in row.fleet_counts
                if row.fleet_counts[k] != row.counts.get(k)}
    if mismatch:
        lines.append("WARNING: the fleet counters differ from the sum of the workers' own counters: "
                     + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(mismatch.items())))
    return lines, ok


def cli_prefix(server: Server, cluster: bool) -> list[str]:
    if server.kind == "given":
        cli = ["redis-cli", "-u", redact(server.url)]
    else:
        cli = ["redis-cli", "-p", str(urlsplit(server.url).port)]
    if cluster:
        cli.insert(1, "-c")  # follow MOVED to the node that holds each key
    return cli


def inspect_commands(server: Server, namespace: str, query: str, cluster: bool = False) -> list[str]:
    """The documented redis-cli recipes for this server and namespace (docs/key-layout.md#inspecting-with-redis-cli)."""
    cli = shlex.join(cli_prefix(server, cluster))
    space = KeySpace(namespace, SHARDS)
    ref = space.ref(query)
    shard = space.shard_keys[ref.shard]
    model = ModelKeys(namespace)
    ns = _glob_escape(namespace)
    q = shlex.quote

    def line(comment: str, command: str) -> str:
        return f"  # {comment}\n  {command}"

    return [
        line("some keys of the namespace", f"{cli} --scan --pattern {q(ns + ':*')} | head"),
        line("entries in L2 and L3 (the whole namespace)",
             f"{cli} --scan --pattern {q(ns + ':{s[0-9]*}:l[23]')} | xargs -I {{}} {cli} ZCARD {{}}"
             " | awk '{n += $1} END {print n}'"),
        line(f"what is in L2 of shard {ref.shard}, most recently used first",
             f"{cli} ZREVRANGE {q(shard.l2.decode())} 0 9 WITHSCORES"),
        line(f"{query!r}: Redis hits since it was written or last demoted, version, tier (2 or 3)",
             f"{cli} HMGET {q(space.entry_key(ref).decode())} n ver t"),
        line(f"what the model saw follow {query!r}",
             f"{cli} ZREVRANGE {q(model.next(query.encode()).decode())} 0 4 WITHSCORES"),
        line("the model's counters (records, predictions_total, predictions_correct, ...)",
             f"{cli} HGETALL {q(model.stats.decode())}"),
    ]


def legend(args: argparse.Namespace) -> list[str]:
    text = (
        "hit rate: requests answered without a selection call of their own (waiting for another agent's or "
        "worker's call counts as a hit). mean, p99: latency per request, as the agent saw it (the p99 is a "
        "miss wherever more than 1% miss: with the fleet cache a miss also pays its Redis round trips, and "
        "sometimes a wait for another worker computing the same selection). selection calls: "
        "on the request path (+ in the background, for prewarming); saved: compared with no cache. "
        f"per-process LRU: each worker caches alone, in an LRU of {args.l1_size} entries (L1 without Redis). "
        "fleet cache: AsyncMultiLevelCache.get_or_set, one namespace for every worker. fleet + prewarming: the "
        "same, and after each answer AsyncPredictiveCacheWarmer.record_query and predict_next_queries, then "
        "prewarm_predictions in an asyncio task while the agent runs its tool."
    )
    return ["", *textwrap.wrap(text, WIDTH, initial_indent="  ", subsequent_indent="  ")]


# --------------------------------------------------------------------------- main

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m victor_rcache.demo",
        description="Worker processes run agent sessions that select tools for their queries, four times over "
                    "the same request streams: without a cache, with a cache per process, with the fleet cache, "
                    "and with the fleet cache and prewarming; then a table compares them.",
    )
    parser.add_argument("--cluster", action="store_true",
                        default=os.environ.get("VICTOR_RCACHE_CLUSTER", "").lower() in ("1", "true", "yes", "on"),
                        help="--url points at a Redis Cluster node (default: VICTOR_RCACHE_CLUSTER)")
    parser.add_argument("--url", default=os.environ.get("VICTOR_RCACHE_URL") or os.environ.get("REDIS_URL"),
                        help="Redis URL (default: VICTOR_RCACHE_URL, then REDIS_URL; without any, a private "
                             "redis-server is started, or an embedded fakeredis server if none is installed)")
    parser.add_argument("--workers", type=positive_int, default=4, help="worker processes (default 4)")
    parser.add_argument("--requests", type=positive_int, default=300, help="requests per worker (default 300)")
    parser.add_argument("--agents", type=positive_int, default=4,
                        help="agent sessions each worker runs at a time (default 4)")
    parser.add_argument("--session-length", type=positive_int, default=8, help="queries per session (default 8)")
    parser.add_argument("--namespace", default="demo",
                        help="namespace of the fleet cache; emptied before each fleet configuration (default 'demo')")
    parser.add_argument("--seed", type=int, default=1, help="seed of the workload and request streams (default 1)")
    parser.add_argument("--zipf", type=float, default=1.0,
                        help="popularity skew s of subjects and first actions: rank r has weight 1/r**s (default 1)")
    parser.add_argument("--cost-ms", type=float, default=20.0,
                        help="the model call's cost per selection, ms (default 20)")
    parser.add_argument("--think-ms", type=float, default=50.0,
                        help="an agent's time between two requests (running the tool), ms (default 50)")
    parser.add_argument("--top-k", type=positive_int, default=2,
                        help="predicted next queries considered for prewarming per request (default 2)")
    parser.add_argument("--l1-size", type=positive_int, default=24,
                        help="L1 entries per process (default 24)")
    parser.add_argument("--l2-size", type=positive_int, default=32,
                        help="L2 entries, whole namespace (default 32)")
    parser.add_argument("--l3-size", type=positive_int, default=64,
                        help="L3 entries, whole namespace (default 64: together with L2 less than the 150 "
                             "queries, so the cache must choose what to keep, as a real one does)")
    parser.add_argument("--keep-server", action="store_true",
                        help="leave the private server running after the demo, to look inside with redis-cli")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        CacheConfig(namespace=args.namespace, l1_size=args.l1_size, l2_size=args.l2_size, l3_size=args.l3_size,
                    shards=SHARDS)
        KeySpace(args.namespace, SHARDS)
    except CacheError as exc:
        parser.error(str(exc))
    if args.cost_ms < 0 or args.think_ms < 0 or args.zipf < 0:
        parser.error("--cost-ms, --think-ms and --zipf must be >= 0")
    return args


def settings_for(args: argparse.Namespace, server: Server) -> Settings:
    return Settings(server.url, args.namespace, args.requests, args.agents, args.session_length, args.seed, args.zipf,
                    args.cost_ms, args.think_ms, args.l1_size, args.l2_size, args.l3_size, args.top_k, args.cluster,
                    shebang=server.kind != "fakeredis", timeout=10.0 if server.kind == "fakeredis" else 0.5)


def run_demo(args: argparse.Namespace, server: Server) -> int:
    ns = args.namespace
    settings = settings_for(args, server)
    if server.kind == "fakeredis":
        print("NOTE: no redis-server found: running on an embedded fakeredis server; results are illustrative.")
        print("      Install redis-server or pass --url for real numbers.\n")
    version = server_version(server, args.cluster)
    started = time.perf_counter()
    total = args.workers * args.requests
    print(f"victor_rcache demo: {args.workers} worker processes x {args.agents} agent sessions at a time, "
          f"{args.requests} requests per worker ({total} in all)")
    print(f"Workload: sessions of {args.session_length} queries walking a Markov chain over 150 queries (seed "
          f"{args.seed}); a selection costs {args.cost_ms:g} ms of 'model time', an agent runs its tool for "
          f"{args.think_ms:g} ms between requests")
    print(f"Redis: {server.description} ({version})")
    print(f"Fleet cache: namespace '{ns}', L1 {args.l1_size} entries per process, L2 {args.l2_size} and "
          f"L3 {args.l3_size} entries for the whole fleet\n", flush=True)

    rows: list[Row] = []
    pool = WorkerPool(multiprocessing.get_context("spawn"), settings, args.workers)
    try:
        for config in CONFIGS:
            if config in (FLEET, PREWARM):
                clear_namespaces(server.url, [ns], args.cluster)  # each fleet configuration starts cold
            row = Row.of(config, pool.run(config))
            if config in (FLEET, PREWARM):
                row.fleet, row.model = fleet_view(settings, prewarm=config == PREWARM)
            rows.append(row)
    finally:
        pool.stop()

    print("\n" + "\n".join(table(rows)))
    print("\n".join(legend(args)))

    ok = True
    for row in rows:
        if row.wrong:
            ok = False
            print(f"ERROR: {LABELS[row.config]}: {row.wrong} answers did not match a fresh selection.")
    for row in rows:
        if row.fleet is None:
            continue
        c = row.fleet_counts
        tiers = ", ".join(f"{t.upper()} {100 * c[t] / max(1, c['gets']):.1f}%" for t in ("l1", "l2", "l3"))
        checks, passed = fleet_checks(row)
        ok = ok and passed
        notes = [f"{LABELS[row.config]}: of {c['gets']} lookups, {tiers} hits, {c['misses']} misses "
                 f"(get_metrics(scope=\"fleet\"))."]
        if row.model is not None:
            p, m = row.model["prewarming"], row.model["predictions"]
            notes.append(f"Prewarming: {p['completed']} selections prewarmed, {p['useful']} of them hit; "
                         f"{p['skipped']} predictions were already cached or being computed. The model's top "
                         f"{args.top_k} held the session's next query {m['correct']} times out of {m['total']} "
                         f"({100 * m['accuracy']:.1f}%).")
        print()
        for i, note in enumerate(notes + checks):
            print("\n".join(textwrap.wrap(note, WIDTH, initial_indent="" if i == 0 else "  ",
                                           subsequent_indent="    ")))

    url = redact(server.url) if server.kind == "given" else server.url
    print(f"\nLook inside namespace '{ns}' (the last configuration's cache and model):")
    print(f"  victor-rcache stats --url {shlex.quote(url)} --namespace {shlex.quote(ns)}"
          + (" --cluster" if args.cluster else ""))
    top = Workload(args.seed, args.zipf)
    print("\n".join(inspect_commands(server, ns, f"{top.actions[0]} {top.subjects[0]}", args.cluster)))
    print("  (more in the README, section \"Inspecting with redis-cli\")")
    if server.kind == "given":
        print(f"(the data stays in Redis; the next run with --namespace {ns} clears it)")
    elif server.keep:
        print(f"The server keeps running at {server.url}", end="")
        if server.kind == "redis-server":
            print(f"; stop it with: redis-cli -p {urlsplit(server.url).port} shutdown nosave")
        else:
            print(" inside this process; press Ctrl-C to stop it.")
    else:
        print("(the private server stops when the demo exits: run with --keep-server to keep it running)")
    print(f"\nDone in {time.perf_counter() - started:.1f} s.", flush=True)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with redis_server(args.url, args.keep_server) as server:
            code = run_demo(args, server)
            if server.kind == "fakeredis" and server.keep:
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
            return code
    except (DemoError, CacheError, redis.RedisError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
