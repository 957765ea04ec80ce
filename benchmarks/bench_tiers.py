"""Latency of each cache path, next to floors measured in the same run (``make bench``).

    .venv/bin/python benchmarks/bench_tiers.py [--url redis://host:port/0] [--samples 3000] [--json]

Without ``--url`` a private redis-server is started on a free port (LocalRedisServer) and stopped at
the end. Every Redis-backed path is reported in microseconds and as a multiple of a floor measured
against the same server in the same run (a plain GET, a PING), so results compare across machines;
L1 is compared with a plain ``OrderedDict`` lookup. Measurements are interleaved in rounds, so a
burst of load on the machine hits floors and cache paths alike. See benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable (benchmarks.facts)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import redis

from benchmarks import facts
from victor_rcache import MultiLevelCache
from victor_rcache.keys import KeySpace
from victor_rcache.local_redis import LocalRedisServer

NEVER = 10**9  # promote_after for readers that must keep hitting Redis (no L1 fill, no L3 -> L2 promotion)
BATCH = 100  # sub-microsecond operations are timed in batches of this many calls

# A value shaped like what the demo caches: a tool selection for one query.
VALUE: dict[str, Any] = {
    "query": "search the code of the billing module",
    "tools": ["grep", "read_file", "git_log"],
    "scores": [0.912, 0.774, 0.615],
}


@dataclass
class Case:
    """One measured operation: ``fn(i)`` with a fresh ``i`` per call (batched cases: i < BATCH)."""

    name: str
    fn: Callable[[int], object]
    floor: str | None = None  # name of the floor case it is compared with
    batched: bool = False
    note: str = ""
    times: list[float] = field(default_factory=list)  # microseconds per call


@dataclass
class Row:
    name: str
    samples: int
    median_us: float
    p99_us: float
    floor: str | None
    x_floor_median: float | None
    x_floor_p99: float | None
    x_ping_median: float | None
    note: str


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@contextmanager
def quiet_gc() -> Iterator[None]:
    """No garbage collection pauses inside a timed loop (collect before, re-enable after)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed(case: Case, start: int, count: int) -> list[float]:
    """``count`` samples in microseconds per call: one call each, or the mean of a batch of BATCH calls."""
    fn, clock, out = case.fn, time.perf_counter_ns, []
    with quiet_gc():
        if case.batched:
            for _ in range(count):
                t0 = clock()
                for i in range(BATCH):
                    fn(i)
                out.append((clock() - t0) / 1000 / BATCH)
        else:
            for i in range(start, start + count):
                t0 = clock()
                fn(i)
                out.append((clock() - t0) / 1000)
    return out


def measure(cases: list[Case], samples: int, warmup: int, rounds: int) -> None:
    """Warm every case up (calls with i >= samples), then time them in ``rounds`` interleaved rounds."""
    for case in cases:
        for i in range(samples, samples + warmup):
            case.fn(i % BATCH if case.batched else i)
    per_round = math.ceil(samples / rounds)
    for start in range(0, samples, per_round):
        for case in cases:
            case.times += timed(case, start, min(per_round, samples - start))


def rows_of(cases: list[Case]) -> list[Row]:
    by_name = {c.name: c for c in cases}
    med = {c.name: statistics.median(c.times) for c in cases}
    top = {c.name: p99(c.times) for c in cases}
    ping = med["floor: PING"]
    rows = []
    for c in cases:
        floor = c.floor
        redis_path = not c.batched and not c.name.startswith("floor")
        rows.append(Row(
            c.name, len(c.times), med[c.name], top[c.name], floor,
            None if floor is None else med[c.name] / med[floor],
            None if floor is None else top[c.name] / top[floor],
            med[c.name] / ping if redis_path else None,
            by_name[c.name].note,
        ))
    return rows


def check(cache: MultiLevelCache, tier: str, expected: int, what: str) -> None:
    """Make sure the timed calls took the path they are reported as (counts from the cache's own metrics)."""
    metrics = cache.get_metrics("process")
    got = metrics["combined"]["total_misses"] if tier == "miss" else metrics[tier]["hits"]
    if got != expected:
        raise RuntimeError(f"{what}: expected {expected} {tier} results, the cache counted {got}: {metrics}")


def push_to_l3(cache: MultiLevelCache, count: int) -> None:
    """Put q0..q<count-1>, then one more key into every shard: with one L2 slot per shard, all q-keys end in L3."""
    for i in range(count):
        cache.put(f"q{i}", VALUE)
    space = KeySpace(cache.namespace, cache.config.shards)
    unfilled = set(range(cache.config.shards))
    for j in itertools.count():
        if not unfilled:
            break
        # "~" sorts after "q": when a filler ties with a q-key on L2's millisecond score, the q-key is the
        # one demoted (ZPOPMIN breaks ties by member order)
        shard = space.ref(f"~filler-{j}").shard
        if shard in unfilled:
            cache.put(f"~filler-{j}", VALUE)
            unfilled.discard(shard)


def run(url: str, samples: int, warmup: int, rounds: int, prefix: str) -> list[Row]:
    n = samples + warmup  # distinct keys each Redis-backed case needs
    room = 2 * n + 1000  # tier sizes that no shard fills up, however unevenly keys hash
    client = redis.Redis.from_url(url)
    encoded = msgpack.packb(VALUE, use_bin_type=True)
    small = b"x" * len(encoded)
    od: OrderedDict[bytes, bytes] = OrderedDict((f"k{i}".encode(), encoded) for i in range(1000))
    od_keys = [f"k{i}".encode() for i in range(BATCH)]
    floor_key = f"{prefix}-floor"
    client.set(floor_key, small)
    mget_keys = [f"{prefix}-floor-{i}" for i in range(100)]
    client.mset(dict.fromkeys(mget_keys, small))

    with ExitStack() as stack:
        def cache(ns: str, **settings: Any) -> MultiLevelCache:
            return stack.enter_context(MultiLevelCache(url, namespace=f"{prefix}-{ns}", fail_open=False, **settings))

        l1 = cache("l1")
        l1.put("hot", VALUE)
        with MultiLevelCache(url, namespace=f"{prefix}-l2", l2_size=room) as writer:
            writer.put_many({f"q{i}": VALUE for i in range(n)})
        l2 = cache("l2", l2_size=room, promote_after=NEVER)  # a second instance: its L1 is cold
        many = cache("l2", l2_size=room, promote_after=NEVER)
        batches = [[f"q{(b * 100 + j) % n}" for j in range(100)] for b in range(n)]
        with MultiLevelCache(url, namespace=f"{prefix}-l3", l2_size=16, l3_size=room) as writer:
            push_to_l3(writer, n)
        l3 = cache("l3", l2_size=16, l3_size=room, promote_after=NEVER)
        miss = cache("miss")
        put = cache("put", l2_size=room)

        cases = [
            Case("floor: OrderedDict get", lambda i: od.get(od_keys[i]), batched=True),
            Case("floor: OrderedDict get + msgpack decode",
                 lambda i: msgpack.unpackb(od[od_keys[i]], raw=False), batched=True),
            Case("floor: PING", lambda i: client.ping(), note="redis-py round trip"),
            Case(f"floor: GET ({len(small)} B string)", lambda i: client.get(floor_key)),
            Case("floor: MGET of 100 keys", lambda i: client.mget(mget_keys)),
            Case("L1 hit", lambda i: l1.get("hot"), floor="floor: OrderedDict get", batched=True,
                 note="includes decoding the value"),
            Case("L2 hit", lambda i: l2.get(f"q{i}"), floor=f"floor: GET ({len(small)} B string)",
                 note="second instance, cold L1"),
            Case("L3 hit", lambda i: l3.get(f"q{i}"), floor=f"floor: GET ({len(small)} B string)",
                 note="the same HMGET as an L2 hit"),
            Case("miss", lambda i: miss.get(f"absent-{i}"), floor=f"floor: GET ({len(small)} B string)"),
            Case("put", lambda i: put.put(f"new-{i}", VALUE), floor=f"floor: GET ({len(small)} B string)",
                 note="new key into L2 (no demotion) + L1 copy"),
            Case("get_many(100), all L2 hits", lambda i: many.get_many(batches[i]),
                 floor="floor: MGET of 100 keys", note="one round trip, one HMGET per key"),
        ]
        measure(cases, samples, warmup, rounds)

        check(l1, "l1", warmup + samples * BATCH, "L1 hit")
        check(l2, "l2", n, "L2 hit")
        check(many, "l2", n * 100, "get_many")
        check(l3, "l3", n, "L3 hit")
        check(miss, "miss", n, "miss")

    for key in client.scan_iter(match=f"{prefix}*", count=1000):  # clean up (matters with --url)
        client.delete(key)
    client.close()
    return rows_of(cases)


def machine_facts(url: str) -> dict[str, Any]:
    return {
        **facts.machine_facts(url),
        "value_bytes": len(msgpack.packb(VALUE, use_bin_type=True)),
    }


def fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def table(rows: list[Row], facts: dict[str, Any]) -> str:
    lines = [
        f"victor_rcache {facts['victor_rcache']} | {facts['date']} | python {facts['python']} | "
        f"redis-py {facts['redis_py']} | redis-server {facts['redis_server']} | nproc {facts['nproc']}",
        f"value: {facts['value_bytes']} B msgpack | load average at start {fmt(facts['load_average'])} | "
        f"{facts['platform']}",
        "",
        f"{'operation':<40}{'samples':>8}{'median us':>11}{'p99 us':>10}  {'x floor med / p99':<19}{'x PING':>7}"
        f"  floor",
    ]
    for r in rows:
        vs = "" if r.floor is None else f"{fmt(r.x_floor_median)} / {fmt(r.x_floor_p99)}"
        floor = "" if r.floor is None else r.floor.removeprefix("floor: ")
        lines.append(f"{r.name:<40}{r.samples:>8}{r.median_us:>11.2f}{r.p99_us:>10.2f}  {vs:<19}"
                     f"{fmt(r.x_ping_median):>7}  {floor}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Latency of each victor_rcache path against floors of the same run.")
    parser.add_argument("--url", help="benchmark this Redis instead of a private redis-server")
    parser.add_argument("--samples", type=int, default=3000, help="timed samples per operation (default 3000)")
    parser.add_argument("--warmup", type=int, default=300, help="untimed calls before each measurement")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds the samples are split into")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.samples < 100 or args.warmup < 0 or not 1 <= args.rounds <= args.samples:
        parser.error("--samples must be >= 100 (p99 needs them), --warmup >= 0, 1 <= --rounds <= --samples")

    server = None if args.url else LocalRedisServer().start()
    url = args.url or (server.url if server else "")
    try:
        facts = machine_facts(url)
        rows = run(url, args.samples, args.warmup, args.rounds, prefix=f"vrcbench{os.getpid()}")
    finally:
        if server is not None:
            server.stop()
    if args.json:
        print(json.dumps({"machine": facts, "results": [asdict(r) for r in rows]}, indent=2))
    else:
        print(table(rows, facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
