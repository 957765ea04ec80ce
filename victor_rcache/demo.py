"""``make demo``: several worker processes share one warm cache.

Run ``python -m victor_rcache.demo [--url redis://...] [--workers 4] [--requests 400]``.

Each worker process stands for an AI agent that picks tools for incoming queries. Queries come
from a vocabulary of 150 strings with a Zipf-like popularity; for each request a worker asks the
cache, and on a miss it runs the "expensive selection" (a deterministic function of the query plus
a short sleep standing for the model call) and puts the result. The demo runs twice over the same
request streams:

1. baseline: every worker has a namespace of its own, so each one only reuses its own work;
2. fleet: every worker uses one namespace, so one worker's work serves all the others.

Without ``--url`` (or ``VICTOR_RCACHE_URL``/``REDIS_URL``) it starts a private ``redis-server``
on a free port, or, when no ``redis-server`` is installed, an embedded fakeredis server (then the
numbers are illustrative only). The namespaces the demo uses are emptied when it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import multiprocessing
import os
import queue
import random
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import SpawnContext
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster

from . import MultiLevelCache
from .config import CacheConfig, redact
from .errors import CacheError
from .keys import KeySpace
from .local_redis import LocalRedisServer
from .tiers import default_scripts

SHARDS = 16  # the library's default; the printed redis-cli key names depend on it
START_TIMEOUT = 120.0  # seconds for every worker to start (spawn + imports + connect)

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
MISSING: Any = object()


# --------------------------------------------------------------------------- the workload

def vocabulary(seed: int) -> list[str]:
    """The 150 queries, most popular first (the order depends on ``seed``)."""
    queries = [f"{action} {subject}" for action in ACTIONS for subject in SUBJECTS]
    random.Random(f"vocabulary:{seed}").shuffle(queries)
    return queries


def zipf_cum_weights(n: int, s: float) -> list[float]:
    """Cumulative weights of ranks 1..n with popularity 1 / rank**s."""
    total, out = 0.0, []
    for rank in range(1, n + 1):
        total += 1.0 / rank**s
        out.append(total)
    return out


def select_tools(query: str) -> dict[str, Any]:
    """The "expensive selection" without its cost: three tools and their scores, fixed by the query."""
    digest = hashlib.sha256(query.encode()).digest()
    ranked = sorted(range(len(TOOLS)), key=lambda i: digest[i])
    picks = ranked[:3]
    return {"query": query, "tools": [TOOLS[i] for i in picks],
            "scores": [round(1.0 - digest[i] / 512, 3) for i in picks]}


# --------------------------------------------------------------------------- the workers

@dataclass(frozen=True)
class WorkerJob:
    index: int
    url: str
    namespace: str
    requests: int
    seed: int
    zipf_s: float
    cost_ms: float
    l1_size: int
    l2_size: int
    l3_size: int
    cluster: bool = False
    shebang: bool = True  # fakeredis does not understand the scripts' Redis 7 shebang line


@dataclass(frozen=True)
class WorkerResult:
    index: int
    pid: int
    namespace: str
    requests: int
    computed: int
    wrong: int
    seconds: float
    metrics: dict[str, Any]


def make_cache(job: WorkerJob) -> MultiLevelCache:
    # fail_open=False: a demo should stop with Redis's error, not quietly count misses.
    return MultiLevelCache(job.url, namespace=job.namespace, l1_size=job.l1_size, l2_size=job.l2_size,
                           l3_size=job.l3_size, shards=SHARDS, fail_open=False, cluster=job.cluster,
                           lua_shebang=job.shebang)


def plain_client(url: str, cluster: bool) -> Any:
    """A plain redis-py client (cluster-aware) for the demo's own housekeeping."""
    if cluster:
        return RedisCluster.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def request_stream(job: WorkerJob) -> list[str]:
    """The queries worker ``job.index`` asks, in order (the same in both phases)."""
    vocab = vocabulary(job.seed)
    rng = random.Random(f"requests:{job.seed}:{job.index}")
    return rng.choices(vocab, cum_weights=zipf_cum_weights(len(vocab), job.zipf_s), k=job.requests)


def run_requests(job: WorkerJob, cache: MultiLevelCache) -> WorkerResult:
    """One worker's request stream against ``cache`` (the same stream in both phases)."""
    computed = wrong = 0
    started = time.perf_counter()
    for query in request_stream(job):

        def select(query: str = query) -> dict[str, Any]:
            nonlocal computed
            computed += 1
            time.sleep(job.cost_ms / 1000)  # stands for the model call
            return select_tools(query)

        # Computed once per fleet: a worker missing a query another one is computing waits for it.
        selection = cache.get_or_set(query, select)
        if selection != select_tools(query):  # a cache must never answer for another query
            wrong += 1
    seconds = time.perf_counter() - started
    return WorkerResult(job.index, os.getpid(), job.namespace, job.requests, computed, wrong, seconds,
                        cache.get_metrics("process"))


def worker_main(job: WorkerJob, barrier: Barrier, results: Queue[WorkerResult | str]) -> None:
    """A worker process: connect, wait until every worker is ready, serve its requests, report."""
    try:
        with make_cache(job) as cache:
            cache.client.ping()  # connect before the start line (a get would count as a request)
            barrier.wait(START_TIMEOUT)
            result = run_requests(job, cache)
        results.put(result)
    except threading.BrokenBarrierError:
        results.put(f"worker {job.index}: another worker failed to start")
    except Exception as exc:  # report any failure to the parent, which prints it
        barrier.abort()
        results.put(f"worker {job.index}: {type(exc).__name__}: {exc}")


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


def run_phase(ctx: SpawnContext, label: str, jobs: list[WorkerJob]) -> list[WorkerResult]:
    """Start one process per job, release them together, collect their results."""
    results: Queue[WorkerResult | str] = ctx.Queue()
    barrier = ctx.Barrier(len(jobs) + 1)
    procs = [ctx.Process(target=worker_main, args=(job, barrier, results), name=f"vrc-demo-w{job.index}")
             for job in jobs]
    for proc in procs:
        proc.start()
    out: list[WorkerResult] = []
    errors: list[str] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while barrier.n_waiting < len(jobs) and not barrier.broken:  # all workers connected, or one failed
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                barrier.abort()
                break
            time.sleep(0.01)
        with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: its message is queued
            barrier.wait(START_TIMEOUT)
        while len(out) + len(errors) < len(jobs):
            try:
                item = results.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DemoError(f"worker process {dead[0].name} died (exit code {dead[0].exitcode})") from None
                continue
            if isinstance(item, str):
                errors.append(item)
                continue
            out.append(item)
            print(f"  {label}: worker {item.index} done ({item.requests} requests, {item.computed} computed, "
                  f"{item.seconds:.1f} s)", file=sys.stderr, flush=True)
        if errors:
            raise DemoError("; ".join(errors))
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return sorted(out, key=lambda r: r.index)


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
    """Remove every key of these namespaces (data, indexes, counters), so each run starts cold."""
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


# --------------------------------------------------------------------------- reporting

TIERS = ("l1", "l2", "l3")


def counts(metrics: dict[str, Any]) -> dict[str, int]:
    """The raw counters behind a metrics dict."""
    return {"gets": metrics["combined"]["gets"], "l1": metrics["l1"]["hits"], "l2": metrics["l2"]["hits"],
            "l3": metrics["l3"]["hits"], "misses": metrics["combined"]["total_misses"],
            "puts": metrics["combined"]["puts"]}


def add_counts(rows: Sequence[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in rows:
        for name, value in row.items():
            total[name] = total.get(name, 0) + value
    return total


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "    - "


def tier_rates(c: dict[str, int]) -> list[str]:
    """Each tier's hit rate over the requests that reached it, then the combined hit rate."""
    reach = c["gets"]
    rates = []
    for tier in TIERS:
        rates.append(pct(c[tier], reach))
        reach -= c[tier]
    rates.append(pct(c["l1"] + c["l2"] + c["l3"], c["gets"]))
    return rates


HEADER = f"  {'':<8}{'pid':>8}{'lookups':>10}{'L1 hit':>9}{'L2 hit':>9}{'L3 hit':>9}{'combined':>10}{'computed':>10}"


def row(name: str, pid: str, c: dict[str, int], computed: int) -> str:
    l1, l2, l3, combined = tier_rates(c)
    return f"  {name:<8}{pid:>8}{c['gets']:>10}{l1:>9}{l2:>9}{l3:>9}{combined:>10}{computed:>10}"


def phase_table(results: list[WorkerResult], total_name: str) -> tuple[list[str], dict[str, int], int]:
    lines = [HEADER]
    per_worker = [counts(r.metrics) for r in results]
    for r, c in zip(results, per_worker, strict=True):
        lines.append(row(f"worker {r.index}", str(r.pid), c, r.computed))
    total = add_counts(per_worker)
    computed = sum(r.computed for r in results)
    lines.append(row(total_name, "", total, computed))
    return lines, total, computed


def inspect_commands(server: Server, namespace: str, top_query: str, cluster: bool = False) -> list[str]:
    port = str(urlsplit(server.url).port)
    cli = ["redis-cli", "-u", redact(server.url)] if server.kind == "given" else ["redis-cli", "-p", port]
    if cluster:
        cli.insert(1, "-c")  # follow MOVED to the node that holds each key
    space = KeySpace(namespace, SHARDS)
    shard = space.shard_keys[0]
    entry = space.entry_key(space.ref(top_query)).decode()

    def cmd(comment: str, *args: str) -> str:
        return f"  # {comment}\n  {shlex.join([*cli, *args])}"

    return [
        cmd("some keys of the namespace", "--scan", "--pattern", _glob_escape(namespace) + ":*") + " | head",
        cmd("shard 0's L2 index: entry -> last touch (ms), most recent first",
            "ZREVRANGE", shard.l2.decode(), "0", "9", "WITHSCORES"),
        cmd("shard 0's L3 index", "ZREVRANGE", shard.l3.decode(), "0", "9", "WITHSCORES"),
        cmd("shard 0's fleet counters", "HGETALL", shard.stats.decode()),
        cmd("the most popular query's entry: Redis hits since it entered its tier, version, bytes",
            "HMGET", entry, "n", "ver", "s"),
    ]


# --------------------------------------------------------------------------- main

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m victor_rcache.demo",
        description="Several worker processes select tools for agent queries through one shared cache; "
                    "the demo compares per-worker caching with the shared fleet cache.",
    )
    parser.add_argument("--cluster", action="store_true",
                        default=os.environ.get("VICTOR_RCACHE_CLUSTER", "").lower() in ("1", "true", "yes", "on"),
                        help="--url points at a Redis Cluster node (default: VICTOR_RCACHE_CLUSTER)")
    parser.add_argument("--url", default=os.environ.get("VICTOR_RCACHE_URL") or os.environ.get("REDIS_URL"),
                        help="Redis URL (default: VICTOR_RCACHE_URL, then REDIS_URL; without any, a private "
                             "redis-server is started, or an embedded fakeredis server if none is installed)")
    parser.add_argument("--workers", type=positive_int, default=4, help="worker processes (default 4)")
    parser.add_argument("--requests", type=positive_int, default=400, help="requests per worker (default 400)")
    parser.add_argument("--namespace", default="demo",
                        help="namespace of the shared cache; the baseline uses NAMESPACE-solo-<i>. These "
                             "namespaces are emptied at start (default 'demo')")
    parser.add_argument("--seed", type=int, default=1, help="seed of the query streams (default 1)")
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity skew s: rank r has weight 1/r**s")
    parser.add_argument("--cost-ms", type=float, default=2.0,
                        help="the model call's cost per computed selection, ms (default 2)")
    parser.add_argument("--l1-size", type=positive_int, default=24,
                        help="L1 entries per process (default 24, small on purpose so every tier is used)")
    parser.add_argument("--l2-size", type=positive_int, default=32,
                        help="L2 entries, whole namespace (default 32, small on purpose)")
    parser.add_argument("--l3-size", type=positive_int, default=1000, help="L3 entries, whole namespace")
    parser.add_argument("--keep-server", action="store_true",
                        help="leave the private server running after the demo, to look inside with redis-cli")
    args = parser.parse_args(argv)
    try:
        for namespace in (args.namespace, f"{args.namespace}-solo-0"):
            CacheConfig(namespace=namespace, l1_size=args.l1_size, l2_size=args.l2_size, l3_size=args.l3_size,
                        shards=SHARDS)
            KeySpace(namespace, SHARDS)
    except CacheError as exc:
        parser.error(str(exc))
    if args.cost_ms < 0 or args.zipf < 0:
        parser.error("--cost-ms and --zipf must be >= 0")
    return args


def jobs_for(args: argparse.Namespace, server: Server, shared: bool) -> list[WorkerJob]:
    return [WorkerJob(i, server.url, args.namespace if shared else f"{args.namespace}-solo-{i}", args.requests,
                      args.seed, args.zipf, args.cost_ms, args.l1_size, args.l2_size, args.l3_size, args.cluster,
                      shebang=server.kind != "fakeredis")
            for i in range(args.workers)]


def fleet_metrics(job: WorkerJob) -> dict[str, Any]:
    with make_cache(job) as cache:
        return cache.get_metrics(scope="fleet")


def run_demo(args: argparse.Namespace, server: Server) -> int:
    ns = args.namespace
    solo = [f"{ns}-solo-{i}" for i in range(args.workers)]
    if server.kind == "fakeredis":
        print("NOTE: no redis-server found: running on an embedded fakeredis server; results are illustrative.")
        print("      Install redis-server or pass --url for real numbers.\n")
    version = server_version(server, args.cluster)
    clear_namespaces(server.url, [ns, *solo], args.cluster)
    started = time.perf_counter()
    print(f"victor_rcache demo: {args.workers} worker processes x {args.requests} requests; "
          f"150 distinct queries, Zipf s={args.zipf:g}, seed {args.seed}")
    print(f"Redis: {server.description} ({version})")
    print(f"Tiers: L1 {args.l1_size} entries per process; L2 {args.l2_size} and L3 {args.l3_size} entries per "
          f"namespace; a miss costs {args.cost_ms:g} ms of 'model time'")
    print("Hit rates: L1 over all lookups, L2 over L1's misses, L3 over L2's misses; combined over all. A worker "
          "that waited for another's fill looks the value up twice.\n", flush=True)

    ctx = multiprocessing.get_context("spawn")
    base = run_phase(ctx, "baseline", jobs_for(args, server, shared=False))
    fleet_jobs = jobs_for(args, server, shared=True)
    shared = run_phase(ctx, "fleet", fleet_jobs)

    print(f"1. Baseline: each worker caches alone (namespaces {ns}-solo-0..{args.workers - 1})")
    lines, base_total, base_computed = phase_table(base, "all")
    print("\n".join(lines))
    print(f"\n2. Fleet: every worker shares namespace '{ns}'")
    lines, fleet_total, fleet_computed = phase_table(shared, "all")
    print("\n".join(lines))

    fleet_raw = fleet_metrics(fleet_jobs[0])
    fleet = counts(fleet_raw)
    l1, l2, l3, combined = (s.strip() for s in tier_rates(fleet))
    print(f'\n   get_metrics(scope="fleet"): gets {fleet["gets"]}, hit rates L1 {l1}, L2 {l2}, L3 {l3}, '
          f"combined {combined}; misses {fleet['misses']}, puts {fleet['puts']}")
    mismatch = {k: (fleet[k], fleet_total[k]) for k in fleet if fleet[k] != fleet_total.get(k)}
    if mismatch:
        print("   WARNING: fleet counters differ from the sum of the workers' own counters: "
              + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(mismatch.items())))
    else:
        print("   (equal to the sum of the workers' own counters)")

    wrong = sum(r.wrong for r in base + shared)
    saved = base_computed - fleet_computed
    print(f"\ncombined hit rate: baseline {pct(base_total['gets'] - base_total['misses'], base_total['gets']).strip()}"
          f" -> fleet {pct(fleet_total['gets'] - fleet_total['misses'], fleet_total['gets']).strip()}")
    distinct = len({q for job in fleet_jobs for q in request_stream(job)})
    print(f"The fleet computed {fleet_computed} selections instead of {base_computed} "
          f"({pct(saved, base_computed).strip()} saved, about {saved * args.cost_ms / 1000:.1f} s of model time).")
    dropped = fleet_raw["l3"]["evictions"] + fleet_raw["combined"]["total_expirations"]
    if fleet_computed <= distinct:
        print(f"(The least possible is {distinct}, one per distinct query asked: get_or_set computes each once "
              "per fleet, the others wait for it.)")
    else:
        print(f"(The least possible is {distinct}, one per distinct query asked; the excess recomputes some of "
              f"the {dropped} entries Redis evicted or expired.)")
    if wrong:
        print(f"ERROR: {wrong} cached answers did not match a fresh computation.")

    clear_namespaces(server.url, solo, args.cluster)
    print(f"\nLook inside namespace '{ns}' with redis-cli:")
    print("\n".join(inspect_commands(server, ns, vocabulary(args.seed)[0], args.cluster)))
    if server.kind == "given":
        print(f"(the data stays in Redis; the next run with --namespace {ns} clears it)")
    elif server.keep:
        print(f"The server keeps running at {server.url}", end="")
        if server.kind == "redis-server":
            port = urlsplit(server.url).port
            print(f"; stop it with: redis-cli -p {port} shutdown nosave")
        else:
            print(" inside this process; press Ctrl-C to stop it.")
    else:
        print("(the private server stops when the demo exits: run with --keep-server to keep it running)")
    print(f"\nDone in {time.perf_counter() - started:.1f} s.", flush=True)
    return 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
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
