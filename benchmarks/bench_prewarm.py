"""Where prewarming pays and where it does not: the fleet workload in three variants, with and without it.

    python -m benchmarks run --group prewarm [--quick|--tiny] [--config steady --config ttl --config evicting]
    .venv/bin/python benchmarks/bench_prewarm.py [--quick|--tiny] [--workloads steady ttl evicting]
        [--costs 5 50] [--requests N] [--think-ms MS] [--url redis://host:port/0] [--json]
        [--workflow-skew S] [--prewarm-budget B]   (for exploring; the verdicts are taken with the defaults)

The fleet workload of benchmarks/bench_fleet.py (its request streams, workers, selection and ``Runner``):
4 worker processes, each serving its seeded stream of agent sessions (4 open at a time, interleaved)
walking a Markov chain over 1,000 Zipf-popular queries, 1 request in 10 a write; after each read the
agent runs its tool (the think time). The sessions model agent workflows, whose next step is far more
predictable than the fleet benchmark's: the chain has the fleet's successors (3-8 per query) weighted
1/rank**``WORKFLOW_SKEW`` (3) instead of 1/rank, so a step's likeliest successor is the next step about
84% of the time (the oracle's top-1, 43% at 1/rank). A prewarm saves a miss only when it is right, so
1 / that accuracy is the least background selections per saved miss any predictor can spend; every run
reports it (``chain_oracle``), with the share of reads whose session's next request is a read of that
successor (writes and session ends count against it too). Each workload runs ``fleet``
(``AsyncMultiLevelCache.get_or_set``) and ``fleet+prewarm`` (the same plus bench_fleet's ``prewarm_step``:
``record_query`` on a warmer built with ``prewarm=``, whose model thread predicts and prewarms in the
background) over the same requests, at a 5 ms and a 50 ms selection:

* ``steady``: today's fleet workload, where everything stays cached: no ttl, L2 + L3 (300 + 600) larger
  than the queries the streams touch. Prewarming finds nothing to do; what it costs shows.
* ``ttl``: every value (a fill, a write, a prewarm) is stored with a ttl shorter than the typical revisit
  time but not shorter than a session's own step gap: halfway (``TTL_SHARE``) between the two medians
  measured in the steady ``fleet`` run at the same cost, from the workers' clocks (one monotonic clock on
  one machine): the step gap, between a session's consecutive requests, and the revisit time, between a
  read and the last request (read or write) of its query anywhere in the fleet. Values expire before
  the fleet asks for them again, while a value prewarmed after a session's step is still there when
  the session asks. If the step gap is not below the revisit time the run says so (a warning, and
  ``ttl_ordered`` false in the row); each row reports its own step gap and revisit time (longer in the
  ttl runs: misses slow every worker), and the ttl row the share of the steady run's step gaps longer
  than the ttl (the interleaving of a worker's sessions is random, so step gaps have a long tail).
* ``evicting``: L2 + L3 hold ``EVICT_SHARE`` (1/4) of the distinct queries the fleet's streams touch
  (computed from the seeded streams: L2 a third of it, L3 the rest, each at least one entry per shard),
  L1 an eighth of that per process: entries are evicted before they are asked for again.

The think time is ``max(20 ms, 2 x the selection cost)`` (20 ms and 100 ms): a prewarm (one selection,
in a thread) started after a read fits in one think time, so it is done before the session's next
request even when that comes right after (on average 4 requests of the worker pass first), and the 4
processes' selections, foreground and background, leave room on 2 vCPUs (a selection is real CPU work:
with a shorter think time at 50 ms the machine is saturated and every extra selection is waited for).
Requests per worker: 400 at 5 ms, 160 at 50 ms (quick: 120, 40), so a configuration run takes 10-25 s.
Every configuration run starts cold (its namespace, model included, cleared). Per configuration: hit
rate (reads answered without a selection of their own, a read that waited for a prewarm's fill
included), mean and p99 latency per read (the prewarm path's awaited part included; ``learn ms`` is that
part), foreground and background selections per request (a request is a read or a write), for
``fleet+prewarm`` where its predictions went (the fleet's prewarms computed and read at least once, which
is what ``prewarm_budget`` counts; predictions not computed because over the budget or already cached),
and Redis CPU
per request: the redis-server process's CPU time (``INFO cpu``: ``used_cpu_user + used_cpu_sys``) from
the workers' release (caches open) until they have closed their caches (bookkeeping sent), less the idle
server's CPU over as long (its rate measured for 1 s before and after the group), over the requests; the
gross figure is kept alongside. The verdicts (``figures``) compare the two configurations of one
workload and cost in the same run:

* steady: mean latency with prewarming <= 1.05x without; Redis CPU per request <= 1.3x without;
* ttl, evicting: hit rate at least 10 points higher; mean latency <= 0.8x; background selections
  <= 1.5x the misses saved (misses without - misses with, over the same requests).

``run_prewarm`` is the entry point of ``python -m benchmarks run --group prewarm``. With ``--url`` the
Redis CPU is that server's, whatever else it serves: point it at a server nobody else is using.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import itertools
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis

from benchmarks import facts
from benchmarks.bench_fleet import (
    SHARDS,
    FleetSettings,
    Pool,
    Report,
    answer,
    calibrate,
    request_stream,
    run_and_print,
    say,
    zipf_chain,
)
from benchmarks.figures import Progress, figure, noop
from benchmarks.workloads import query_name
from victor_rcache import MultiLevelCache, PredictiveCacheWarmer
from victor_rcache.demo import clear_namespaces, percentile

WORKLOADS = ("steady", "ttl", "evicting")
CONFIGS = ("fleet", "fleet+prewarm")
WORKFLOW_SKEW = 3.0  # the chain's successor weights, 1/rank**this: a step's likeliest successor dominates
TTL_SHARE = 0.5  # ttl = the step gap + this share of (the revisit time - the step gap): halfway between them
EVICT_SHARE = 0.25  # L2 + L3 = this share of the distinct queries the streams touch
MIN_THINK_MS = 20.0

# The targets: with prewarming / without, same workload, cost and run.
STEADY_MEAN = 1.05
STEADY_CPU = 1.3
HIT_POINTS = 10.0
MEAN = 0.8
BACKGROUND = 1.5


@dataclass(frozen=True)
class Mode:
    processes: int
    requests: dict[float, int]  # selection cost (ms) -> requests per worker; the costs run, in order
    idle_seconds: float = 1.0  # how long the idle server's CPU rate is measured, before and after the group
    train_requests: int = 8000  # earlier requests the prewarming fleet's model learned from (train_model)

    def requests_at(self, cost: float) -> int:
        """Requests per worker at ``cost`` (a cost the mode does not list: its smallest count)."""
        return self.requests.get(cost, min(self.requests.values()))


# Requests per worker so that a configuration run takes 10-25 s on 2 vCPUs (a full run: about 4 minutes,
# see benchmarks/README.md); tiny is the smoke run of tests/test_benchmarks_harness.py, meaningless.
MODES = {"full": Mode(4, {5.0: 400, 50.0: 160}), "quick": Mode(4, {5.0: 120, 50.0: 40}),
         "tiny": Mode(2, {5.0: 16}, idle_seconds=0.2, train_requests=200)}


def think_ms(cost_ms: float) -> float:
    """The agent's tool run after each read: twice the selection, 20 ms at least. A prewarm (one selection)
    started after a read fits in one think time, and the 4 processes' selections, foreground and background,
    leave room on 2 vCPUs (the selection is real CPU work)."""
    return max(MIN_THINK_MS, 2 * cost_ms)


def resolve_workloads(workloads: Sequence[str] | None) -> list[str]:
    """The workloads to run, in order (None: all); ValueError for an unknown name."""
    wanted = list(dict.fromkeys(workloads or WORKLOADS))
    unknown = [w for w in wanted if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown prewarm workloads {unknown}; choose from {list(WORKLOADS)}")
    return [w for w in WORKLOADS if w in wanted]


# --------------------------------------------------------------------------- the workloads' settings

def distinct_queries(settings: FleetSettings) -> int:
    """How many distinct queries the fleet's streams touch (``settings.requests`` per worker, reads and writes)."""
    seen: set[str] = set()
    for worker in range(settings.processes):
        seen.update(q for _, q, _ in itertools.islice(request_stream(settings, worker), settings.requests))
    return len(seen)


def evicting_sizes(settings: FleetSettings) -> tuple[int, int, int, int]:
    """(L1, L2, L3, distinct queries): L2 + L3 = EVICT_SHARE of the distinct queries, L2 a third of it."""
    distinct = distinct_queries(settings)
    redis_total = max(2 * SHARDS, round(EVICT_SHARE * distinct))
    l2 = max(SHARDS, redis_total // 3)
    l3 = max(SHARDS, redis_total - l2)
    return max(4, (l2 + l3) // 8), l2, l3, distinct


def revisit_gaps(reports: list[Report]) -> list[float]:
    """Seconds between each read and the last earlier request (read or write) of its query anywhere in the
    fleet (reads of a query nobody asked before have none)."""
    last: dict[str, float] = {}
    gaps: list[float] = []
    for t, query, is_write, _ in sorted(s for r in reports for s in r.stamps):
        if not is_write and query in last:
            gaps.append(t - last[query])
        last[query] = t
    return gaps


def step_gaps(reports: list[Report]) -> list[float]:
    """Seconds between a session's consecutive requests (read or write): how long a value prewarmed after a
    session's step has to stay until the session's next request may ask for it."""
    last: dict[str, float] = {}
    gaps: list[float] = []
    for t, _, _, session in sorted(s for r in reports for s in r.stamps):
        if session in last:
            gaps.append(t - last[session])
        last[session] = t
    return gaps


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ttl_between(step: float, revisit: float) -> float:
    """The ttl workload's ttl (seconds) from the steady fleet run's median step gap and revisit time: ``TTL_SHARE``
    of the way from the step gap to the revisit time. Below the revisit time (most values expire before the
    fleet asks for them again) and above the step gap (a value prewarmed after a session's step is there when
    the session asks) only while the step gap is below the revisit time: ``ttl_ordered`` says whether it is."""
    return step + TTL_SHARE * (revisit - step)


def ttl_ordered(step: float, revisit: float) -> bool:
    """Whether the ttl workload is what it says: a session's step gap below the fleet's revisit time."""
    return step < revisit


def chain_oracle(settings: FleetSettings) -> dict[str, float | None]:
    """The chain's oracle (its likeliest successor, the true transition matrix's best guess) and what it
    implies for prewarming, whatever the predictor: ``oracle_top1`` is its accuracy stationary-weighted over
    the chain (``MarkovChain.expected_oracle_accuracy(1)``), ``oracle_top1_walked`` its expected accuracy over
    the transitions the streams walk (``settings.requests`` per worker; sessions start at Zipf-popular
    queries), and ``least_bg_per_saved = 1 / oracle_top1_walked``: a prewarm saves a miss only if it is right,
    so no predictor spends fewer background selections per miss saved. ``next_read_top1`` is the share of
    reads whose session's next request is a read of that likeliest successor (not a write, not the session's
    end): a prewarm made after any other read saves nothing, so ``1 / next_read_top1`` is the same floor with
    the workload's writes and session ends counted."""
    chain = zipf_chain(settings.seed, settings.universe, settings.zipf_s, settings.workflow_skew)
    index = {query_name(i): i for i in range(settings.universe)}
    walked: list[float] = []
    reads = next_right = 0
    for worker in range(settings.processes):
        previous: dict[str, tuple[int, bool]] = {}  # session -> (its last query, was it a read)
        for session, name, is_write in itertools.islice(request_stream(settings, worker), settings.requests):
            query = index[name]
            before = previous.get(session)
            if before is not None:
                walked.append(chain.probabilities[before[0]][0])
                next_right += before[1] and not is_write and chain.successors[before[0]][0] == query
            reads += not is_write
            previous[session] = (query, not is_write)
    top1 = statistics.fmean(walked) if walked else 0.0
    share = next_right / reads if reads else 0.0
    return {"oracle_top1": chain.expected_oracle_accuracy(1), "oracle_top1_walked": top1,
            "least_bg_per_saved": 1 / top1 if top1 else None, "next_read_top1": share,
            "least_bg_per_saved_reads": 1 / share if share else None}


# --------------------------------------------------------------------------- a fleet that has been running

TRAIN_WORKERS = range(100, 104)  # stream indexes of the earlier traffic: other sessions than the measured ones


def train_model(settings: FleetSettings, namespace: str, requests: int) -> None:
    """Record ``requests`` earlier requests of the same workload (same chain, other sessions) into the model of
    ``namespace``, and nothing into its cache: prewarming is measured in a fleet that has been running, whose
    model knows the workload, while every cache starts cold (``fleet`` has nothing a model could give it)."""
    per_stream = requests // len(TRAIN_WORKERS)
    with MultiLevelCache(settings.url, namespace=namespace, coherence=False, fail_open=False) as cache:
        warmer = PredictiveCacheWarmer(cache)
        for worker in TRAIN_WORKERS:
            for session, query, is_write in itertools.islice(request_stream(settings, worker), per_stream):
                if not is_write:
                    warmer.record_query(query, answer(query)["tools"], session=session)
        warmer.flush()


def fleet_prewarming(settings: FleetSettings, namespace: str) -> dict[str, int]:
    """The fleet's prewarm counts of ``namespace`` once its workers have closed their caches (bookkeeping
    sent): prewarms computed, and of them those read at least once (what ``prewarm_budget`` counts as useful)."""
    with MultiLevelCache(settings.url, namespace=namespace, coherence=False, fail_open=False) as cache:
        stats = PredictiveCacheWarmer(cache).get_statistics()["prewarming"]
    return {"completed": int(stats["completed"]), "useful": int(stats["useful"])}


# --------------------------------------------------------------------------- Redis CPU

class RedisCPU:
    """The redis-server process's CPU seconds (user + system), from ``INFO cpu``."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def seconds(self) -> float:
        info: dict[str, Any] = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def idle_rate(self, seconds: float) -> float:
        """CPU seconds per second of the server while this benchmark sends nothing."""
        c0, t0 = self.seconds(), time.perf_counter()
        time.sleep(seconds)
        return (self.seconds() - c0) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------- one configuration run

def measured_run(pool: Pool, cpu: RedisCPU, settings: FleetSettings, config: str) -> tuple[list[Report], float, float]:
    """One configuration run: the workers' reports, Redis CPU seconds and wall seconds from the moment the
    workers (caches open) are released until the last has closed its cache (its bookkeeping sent)."""
    start: list[float] = []
    reports = pool.run_fleet(settings, config, lambda: start.extend((cpu.seconds(), time.perf_counter())))
    return reports, cpu.seconds() - start[0], time.perf_counter() - start[1]


def summarize(workload: str, config: str, settings: FleetSettings, reports: list[Report], cpu_seconds: float,
              wall_seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    lat = [x for r in reports for x in r.latencies]
    reads = sum(r.reads for r in reports)
    writes = sum(r.writes for r in reports)
    requests = reads + writes
    fg = sum(r.calls for r in reports)
    bg = sum(r.background_calls for r in reports)
    gaps = revisit_gaps(reports)
    steps = step_gaps(reports)
    return {
        "workload": workload, "config": config, "processes": settings.processes, "cost_ms": settings.cost_ms,
        "workflow_skew": settings.workflow_skew,
        "think_ms": settings.think_ms, "ttl_ms": None if settings.ttl is None else round(1000 * settings.ttl, 1),
        "sizes": [settings.l1_size, settings.l2_size, settings.l3_size], "reads": reads, "writes": writes,
        "hit_rate": sum(r.hits for r in reports) / reads if reads else 0.0,
        "mean_ms": 1000 * statistics.fmean(lat) if lat else 0.0,
        "p50_ms": 1000 * percentile(lat, 0.50), "p99_ms": 1000 * percentile(lat, 0.99),
        "learn_ms": 1000 * sum(r.learn_seconds for r in reports) / reads if reads else 0.0,
        "selections": fg, "background_selections": bg,
        "selections_per_request": fg / requests if requests else 0.0,
        "background_per_request": bg / requests if requests else 0.0,
        "redis_cpu_seconds": cpu_seconds, "wall_seconds": wall_seconds,  # net per request: finish()
        "revisit_ms": 1000 * statistics.median(gaps) if gaps else None,
        "step_gap_ms": 1000 * statistics.median(steps) if steps else None,
        "wrong": sum(r.wrong for r in reports),
        "prewarming": {k: sum(r.prewarming.get(k, 0) for r in reports)
                       for k in dict.fromkeys(k for r in reports for k in r.prewarming)},
        "seconds": max(r.seconds for r in reports),
        **extra,
    }


def finish(rows: list[dict[str, Any]], idle_rate: float) -> None:
    """Redis CPU per request, gross and less the idle server's CPU over the run's wall time (µs)."""
    for row in rows:
        requests = row["reads"] + row["writes"]
        gross = row.pop("redis_cpu_seconds")
        net = gross - idle_rate * row["wall_seconds"]
        row["redis_cpu_us_per_request"] = 1e6 * net / requests if requests else 0.0
        row["redis_cpu_gross_us_per_request"] = 1e6 * gross / requests if requests else 0.0


def workload_text(row: dict[str, Any]) -> str:
    """What a workload at a cost is, for the report."""
    l1, l2, l3 = row["sizes"]
    per_worker = (row["reads"] + row["writes"]) // row["processes"]
    chain = "" if "oracle_top1_walked" not in row else (
        f"; successors weighted 1/rank^{row['workflow_skew']:g}, oracle top-1 {row['oracle_top1_walked']:.2f}")
    head = (f"{row['processes']} processes x {per_worker} requests of the fleet workload (agent sessions over "
            f"Zipf-popular queries, 1 in 10 a write{chain}), {row['cost_ms']:g} ms selection, "
            f"think {row['think_ms']:g} ms after each read; fleet = AsyncMultiLevelCache.get_or_set, fleet+prewarm "
            f"adds record_query on a warmer with prewarm= (its model thread predicts the top 2 and prewarms "
            f"what is missing, in the background)")
    if row["workload"] == "steady":
        return f"steady: {head}; L1 {l1} per process, L2 {l2}, L3 {l3}, no ttl: everything stays cached"
    if row["workload"] == "ttl":
        if "ttl_from_step_ms" not in row:  # a result from before the step gap was measured
            return (f"ttl: {head}; every value stored with ttl {row['ttl_ms']:g} ms, from the typical revisit time "
                    f"{row['ttl_from_revisit_ms']:.0f} ms; L1 {l1}, L2 {l2}, L3 {l3}")
        order = "" if row["ttl_ordered"] else " (NOT below the revisit time: the step gap is not shorter than it)"
        return (f"ttl: {head}; every value stored with ttl {row['ttl_ms']:g} ms{order}, halfway between a session's "
                f"step gap {row['ttl_from_step_ms']:.0f} ms (median time between a session's consecutive requests) "
                f"and the typical revisit time {row['ttl_from_revisit_ms']:.0f} ms (median time between a read and "
                f"the last request of its query in the fleet), both from the steady fleet run at this cost; "
                f"L1 {l1}, L2 {l2}, L3 {l3}")
    return (f"evicting: {head}; L2 {l2} + L3 {l3} = {EVICT_SHARE:g} of the {row['distinct_queries']} distinct queries "
            f"the streams touch, L1 {l1} per process; no ttl")


# --------------------------------------------------------------------------- verdicts

def figures_of(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The acceptance verdicts, per workload and cost run with and without prewarming (the largest N)."""
    if not rows:
        return []
    n = max(r["processes"] for r in rows)
    at = {(r["workload"], r["cost_ms"], r["config"]): r for r in rows if r["processes"] == n}
    out: list[dict[str, Any]] = []
    for workload in WORKLOADS:
        for cost in sorted({r["cost_ms"] for r in rows}):
            base, pre = at.get((workload, cost, "fleet")), at.get((workload, cost, "fleet+prewarm"))
            if base is None or pre is None:
                continue
            at_ = f"{workload}@{cost:g}ms"
            where = f"{workload} workload, N={n}, {cost:g} ms selection"
            without = "without prewarming (fleet), same requests"
            common = {"workload": workload_text(pre), "processes": n, "cost_ms": cost,
                      "hit_rate": pre["hit_rate"], "floor_hit_rate": base["hit_rate"],
                      "p99_ms": pre["p99_ms"], "floor_p99_ms": base["p99_ms"]}
            mean_bound = STEADY_MEAN if workload == "steady" else MEAN
            out.append(figure(f"prewarm:{at_}:mean", f"{where}: mean latency with prewarming / without",
                              value=pre["mean_ms"], unit="ms", floor=without, floor_value=base["mean_ms"] or None,
                              bound=("ratio", "<=", mean_bound), **common))
            if workload == "steady":
                out.append(figure(f"prewarm:{at_}:redis_cpu", f"{where}: Redis CPU per request with prewarming / "
                                  "without", value=pre["redis_cpu_us_per_request"], unit="us", floor=without,
                                  floor_value=base["redis_cpu_us_per_request"] or None,
                                  bound=("ratio", "<=", STEADY_CPU), **common))
                continue
            out.append(figure(f"prewarm:{at_}:hit_rate", f"{where}: hit rate with prewarming - without",
                              value=100 * (pre["hit_rate"] - base["hit_rate"]), unit="points",
                              floor=f"{without}: {100 * base['hit_rate']:.1f}%", floor_value=None,
                              bound=("value", ">=", HIT_POINTS), target=f">= +{HIT_POINTS:g} points", **common))
            saved = base["selections"] - pre["selections"]
            out.append(figure(f"prewarm:{at_}:background", f"{where}: background selections / misses saved",
                              value=float(pre["background_selections"]), unit="selections",
                              floor="misses saved (misses without - misses with, same requests)"
                              + ("" if saved > 0 else f": {saved}, none saved"),
                              floor_value=float(saved) if saved > 0 else None,
                              bound=("ratio", "<=", BACKGROUND), target=f"<= {BACKGROUND:g}x the misses saved",
                              misses_without=base["selections"], misses_with=pre["selections"],
                              oracle_top1=pre.get("oracle_top1_walked"),
                              least_bg_per_saved=pre.get("least_bg_per_saved"), **common))
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"{'workload':<9} {'cost':>5} {'configuration':<14} {'hit rate':>8} {'mean ms':>8} {'p99 ms':>7} "
             f"{'learn ms':>8} {'sel/req':>7} {'bg/req':>7} {'Redis us/req':>12} {'step ms':>7} {'revisit ms':>10}  "
             "ttl / sizes"]
    chains: dict[float, dict[str, Any]] = {}
    for r in result["results"]:
        shape = (f"ttl {r['ttl_ms']:g} ms" if r["ttl_ms"] is not None else "") + (
            f"{', ' if r['ttl_ms'] is not None else ''}L1/L2/L3 {'/'.join(map(str, r['sizes']))}")
        revisit = "-" if r["revisit_ms"] is None else f"{r['revisit_ms']:.0f}"
        step = "-" if r.get("step_gap_ms") is None else f"{r['step_gap_ms']:.0f}"
        lines.append(f"{r['workload']:<9} {r['cost_ms']:>3g}ms {r['config']:<14} {100 * r['hit_rate']:7.1f}% "
                     f"{r['mean_ms']:8.2f} {r['p99_ms']:7.2f} {r['learn_ms']:8.2f} {r['selections_per_request']:7.3f} "
                     f"{r['background_per_request']:7.3f} {r['redis_cpu_us_per_request']:12.1f} {step:>7} "
                     f"{revisit:>10}  {shape}")
        if "oracle_top1_walked" in r:
            chains.setdefault(r["cost_ms"], r)
    for cost, r in chains.items():
        lines.append(f"chain at {cost:g} ms: successors 1/rank^{r['workflow_skew']:g}; oracle top-1 "
                     f"{r['oracle_top1_walked']:.3f} over the walked transitions (stationary {r['oracle_top1']:.3f}): "
                     f">= {_or_dash(r['least_bg_per_saved'])} background selections per saved miss for any "
                     f"predictor; reads followed by a read of that successor {r['next_read_top1']:.3f}: "
                     f">= {_or_dash(r['least_bg_per_saved_reads'])}")
    for r in result["results"]:
        p = r.get("prewarming") or {}
        if p:
            lines.append(f"prewarming, {r['workload']} at {r['cost_ms']:g} ms: predictions {p.get('predictions', 0)} "
                         f"(checked {p.get('checked', 0)}, right {p.get('correct', 0)}); prewarms computed "
                         f"{p.get('fleet_completed', 0)}, read at least once {p.get('fleet_useful', 0)}; not computed: "
                         f"over budget {p.get('over_budget', 0)}, cached {p.get('cached', 0)}, busy {p.get('busy', 0)}")
    for r in result["results"]:
        if r["workload"] == "ttl" and r["config"] == "fleet" and "ttl_from_step_ms" in r:
            verdict = "" if r["ttl_ordered"] else (" WARNING: the step gap is not below the revisit time, the ttl "
                                                  "workload is not what it says")
            over = r.get("step_gaps_over_ttl")
            longer = "" if over is None else f"; {100 * over:.0f}% of its step gaps are longer than the ttl"
            lines.append(f"ttl at {r['cost_ms']:g} ms: {r['ttl_ms']:g} ms, halfway between the steady fleet run's "
                         f"step gap {r['ttl_from_step_ms']:.0f} ms and revisit time {r['ttl_from_revisit_ms']:.0f} ms"
                         + longer + verdict)
    if result.get("figures"):
        n = result["figures"][0]["detail"]["processes"]
        lines += ["", f"verdicts (fleet+prewarm against fleet, same run; N = {n}):"]
        for f in result["figures"]:
            if f["bound"][0] == "ratio":
                value = "no miss saved" if f["ratio"] is None else f"{f['ratio']:.2f}x"
            else:
                value = f"{f['value']:+.1f} {f['unit']}"
            verdict = "PASS" if f["pass"] else "FAIL"
            lines.append(f"  {f['id']:<34} {value:>14}  {f['target']:<28} {verdict}")
    return "\n".join(lines)


def _or_dash(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


# --------------------------------------------------------------------------- the group

def run_prewarm(url: str, mode: str = "full", workloads: Sequence[str] | None = None, progress: Progress = noop,
                costs: Sequence[float] | None = None, requests: int | None = None,
                think: float | None = None, skew: float = WORKFLOW_SKEW,
                budget: float | None = None) -> dict[str, Any]:
    """Every selected workload at every cost, fleet and fleet+prewarm: {"results", "figures", "settings", ...}.
    ``skew`` and ``budget`` (the warmer's ``prewarm_budget``; None: the library's) are for exploring: the
    group's verdicts are taken with the defaults."""
    m = MODES[mode]
    wanted = resolve_workloads(workloads)
    n, costs = m.processes, tuple(costs or m.requests)
    ns = f"vrcprewarm{os.getpid()}"
    started = time.perf_counter()
    progress("prewarm: calibrating the selection's CPU cost")
    rounds = calibrate()
    cpu = RedisCPU(url)
    idle = [cpu.idle_rate(m.idle_seconds)]
    rows: list[dict[str, Any]] = []
    namespaces: list[str] = []
    progress(f"prewarm: starting {n} worker processes; workloads {', '.join(wanted)}; costs "
             f"{', '.join(f'{c:g} ms' for c in costs)}; {', '.join(str(requests or m.requests_at(c)) for c in costs)} "
             "requests per worker")
    pool = Pool(n, joiner=False)
    try:
        for cost in costs:
            base = FleetSettings(url=url, namespace=ns, requests=requests or m.requests_at(cost), cost_ms=cost,
                                 rounds_per_ms=rounds, think_ms=think if think is not None else think_ms(cost),
                                 processes=n, workflow_skew=skew, prewarm_budget=budget)
            oracle = chain_oracle(base)
            # seconds, measured in the steady fleet run at this cost: median revisit time and session step gap
            revisit: float | None = None
            step: float | None = None
            steps: list[float] = []  # the steady fleet run's step gaps
            for workload in WORKLOADS:
                # ttl needs the steady fleet run's revisit time: it runs (fleet only) even if steady was not asked for
                if workload not in wanted and not (workload == "steady" and "ttl" in wanted):
                    continue
                extra: dict[str, Any] = dict(oracle)
                settings = replace(base, namespace=f"{ns}-{workload}")
                if workload == "ttl":
                    assert revisit is not None
                    assert step is not None
                    ttl = round(ttl_between(step, revisit), 3)
                    settings = replace(settings, ttl=ttl)
                    extra.update(ttl_from_revisit_ms=1000 * revisit, ttl_from_step_ms=1000 * step,
                                 ttl_ordered=ttl_ordered(step, revisit),
                                 step_gaps_over_ttl=sum(g > ttl for g in steps) / len(steps) if steps else None)
                    if not extra["ttl_ordered"]:
                        progress(f"prewarm: WARNING at {cost:g} ms the steady run's step gap ({1000 * step:.0f} ms) is "
                                 f"not below its revisit time ({1000 * revisit:.0f} ms): the ttl workload's ttl "
                                 "is not below the revisit time")
                elif workload == "evicting":
                    l1, l2, l3, distinct = evicting_sizes(settings)
                    settings = replace(settings, l1_size=l1, l2_size=l2, l3_size=l3)
                    extra["distinct_queries"] = distinct
                for config in CONFIGS if workload in wanted else ("fleet",):
                    name = f"{settings.namespace}-{config.replace('+', '-')}"
                    namespaces.append(name)
                    clear_namespaces(url, [name])  # cold, model included
                    if config == "fleet+prewarm":
                        train_model(settings, name, m.train_requests)
                    reports, used, wall = measured_run(pool, cpu, settings, config)
                    row = summarize(workload, config, settings, reports, used, wall, extra)
                    if config == "fleet+prewarm":
                        row["prewarming"].update({f"fleet_{k}": v for k, v in fleet_prewarming(settings, name).items()})
                    rows.append(row)
                    if workload == "steady" and config == "fleet":
                        revisit = median_or_none(revisit_gaps(reports)) or 1.0
                        steps = step_gaps(reports)
                        step = median_or_none(steps) or 0.0
                    progress(f"prewarm: {workload:<8} {cost:g} ms {config:<13} hit {100 * row['hit_rate']:5.1f}%  "
                             f"mean {row['mean_ms']:6.2f} ms  sel/req {row['selections_per_request']:.3f}  "
                             f"bg/req {row['background_per_request']:.3f}  ({wall:.1f} s)")
    finally:
        pool.stop()
        with contextlib.suppress(Exception):
            clear_namespaces(url, namespaces)
        with contextlib.suppress(Exception):
            idle.append(cpu.idle_rate(m.idle_seconds))
        cpu.close()
    finish(rows, statistics.fmean(idle))
    figures = figures_of(rows)
    settings_out = {k: v for k, v in asdict(FleetSettings(url=url, namespace=ns, requests=0)).items()
                    if k not in ("url", "namespace", "requests", "cost_ms", "rounds_per_ms", "think_ms", "ttl",
                                 "processes", "join_reads", "adaptive_interval")}
    settings_out.update(processes=n, costs_ms=list(costs),
                        requests={f"{c:g}": requests or m.requests_at(c) for c in costs},
                        think_ms={f"{c:g}": think if think is not None else think_ms(c) for c in costs},
                        workflow_skew=skew, prewarm_budget=budget, ttl_share=TTL_SHARE, evict_share=EVICT_SHARE,
                        idle_redis_cpu_ms_per_s=[round(1000 * x, 3) for x in idle])
    return {"group": "prewarm", "mode": mode, "facts": facts.machine_facts(url), "settings": settings_out,
            "results": rows, "figures": figures, "skipped": {}, "seconds": round(time.perf_counter() - started, 1)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Where prewarming pays: the fleet workload with and without it.")
    p.add_argument("--url", help="an existing Redis (default: a private redis-server)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer requests per worker (120 at 5 ms, 40 at 50 ms)")
    size.add_argument("--tiny", action="store_true", help="a smoke run: 2 processes, 5 ms only, meaningless")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, help="workloads (default: all)")
    p.add_argument("--costs", type=float, nargs="+", help="selection CPU cost in ms (default 5 50)")
    p.add_argument("--requests", type=int, help="requests per worker at every cost (default 400 at 5 ms, 160 at 50 ms)")
    p.add_argument("--think-ms", type=float,
                   help=f"think time after each read (default max({MIN_THINK_MS:g}, 2 x the selection cost))")
    p.add_argument("--workflow-skew", type=float, default=WORKFLOW_SKEW,
                   help=f"successor weights 1/rank**SKEW (default {WORKFLOW_SKEW:g}; the fleet benchmark's is 1)")
    p.add_argument("--prewarm-budget", type=float,
                   help="the prewarming warmer's prewarm_budget (default: the library's, 1.5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    return run_and_print(args.url, args.json, table, lambda url: run_prewarm(
        url, mode, args.workloads, say, args.costs, args.requests, args.think_ms, args.workflow_skew,
        args.prewarm_budget))


if __name__ == "__main__":
    sys.exit(main())
