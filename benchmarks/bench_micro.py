"""Issue 10's micro figures, each next to a floor measured in the same run (``python -m benchmarks run``).

* L1 hit through ``MultiLevelCache.get`` vs ``cachetools.LRUCache.get`` of the same value (a dict):
  with the default ``copy_on_read=True`` (each hit decodes its own copy: the headline figure) and
  with ``copy_on_read=False`` (every hit shares one decoded value, as cachetools does);
* L2 hit (cold L1, the entry in Redis) vs a raw redis-py ``GET`` + ``msgpack.unpackb`` of the same
  payload, on a client built from the cache's own connection settings;
* round trips per operation, counted by Redis: ``INFO commandstats`` deltas give the script calls
  (``evalsha``/``eval``), and ``SLOWLOG`` at threshold 0 tells top-level commands from the ones a
  script runs (Redis logs those with client address ``?:0``), so plain commands are counted too;
* Redis CPU per operation: ``usec_per_call`` of ``evalsha`` while only ``get.lua`` (then only
  ``put.lua``) runs, at three namespace sizes;
* Redis memory per entry: ``used_memory`` delta over the fill, per entry, minus the payload.

The timing machinery (``Case``, ``measure``, the value, ``check``) is bench_tiers.py's; the prediction
model is built as bench_prediction.py builds it (``make_warmer``).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import redis

from benchmarks.bench_prediction import make_warmer
from benchmarks.bench_tiers import BATCH, NEVER, VALUE, Case, check, measure, p99
from benchmarks.workloads import query_name
from victor_rcache import MultiLevelCache
from victor_rcache.connection import sync_client
from victor_rcache.demo import clear_namespaces
from victor_rcache.keys import KeySpace

Progress = Callable[[str], None]
FIGURES = ("l1", "l2", "round_trips", "redis_cpu", "memory")  # what ``--config`` may select in this group
HARNESS_COMMANDS = {"CONFIG", "INFO", "SLOWLOG"}  # what the counting itself sends inside a window
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro")


@dataclass(frozen=True)
class Sizes:
    samples: int  # timed samples per latency case
    warmup: int
    rounds: int
    reps: int  # operations per round-trip counting window
    namespace_sizes: tuple[int, ...]  # entries in the namespace for the Redis CPU / memory figures
    cpu_calls: int  # script calls timed by Redis at each size


SIZES = {
    "full": Sizes(3000, 300, 10, 20, (1000, 100_000, 1_000_000), 2000),
    "quick": Sizes(1000, 100, 5, 10, (1000, 10_000, 100_000), 1000),
    "tiny": Sizes(100, 10, 2, 3, (400, 700, 1000), 100),  # the smoke test: every figure, no meaning
}


def _noop(message: str) -> None:
    pass


def figure(fid: str, name: str, *, value: float | None, unit: str, measured: str, floor: str, target: str,
           passed: bool | None, **detail: Any) -> dict[str, Any]:
    """One row of the report: the figure, what it was measured against, its target, pass/fail."""
    return {"id": fid, "figure": name, "value": value, "unit": unit, "measured": measured, "floor": floor,
            "target": target, "pass": passed, "detail": detail}


def _stats(case: Case) -> dict[str, float]:
    return {"median_us": statistics.median(case.times), "p99_us": p99(case.times), "samples": len(case.times)}


# ------------------------------------------------------------------ latency: L1 and L2 against their floors


def latency(url: str, sizes: Sizes, prefix: str, want: set[str]) -> list[dict[str, Any]]:
    import cachetools  # noqa: PLC0415 - the optional "bench" extra; run() reports it missing

    n = sizes.samples + sizes.warmup
    room = 2 * n + 1000
    encoded = msgpack.packb(VALUE, use_bin_type=True)
    lru: cachetools.LRUCache[str, Any] = cachetools.LRUCache(maxsize=1000)
    lru["hot"] = VALUE
    cases: list[Case] = []
    out: list[dict[str, Any]] = []
    with ExitStack() as stack:
        if "l1" in want:
            l1 = stack.enter_context(MultiLevelCache(url, namespace=f"{prefix}-l1", fail_open=False))
            shared = stack.enter_context(MultiLevelCache(url, namespace=f"{prefix}-l1s", fail_open=False,
                                                         copy_on_read=False))
            l1.put("hot", VALUE)
            shared.put("hot", VALUE)
            cases += [Case("floor: cachetools.LRUCache.get", lambda i: lru.get("hot"), batched=True),
                      Case("L1 hit", lambda i: l1.get("hot"), floor="floor: cachetools.LRUCache.get", batched=True),
                      Case("L1 hit, copy_on_read=False", lambda i: shared.get("hot"),
                           floor="floor: cachetools.LRUCache.get", batched=True)]
        if "l2" in want:
            with MultiLevelCache(url, namespace=f"{prefix}-l2", l2_size=room, coherence=False) as writer:
                writer.put_many({f"q{i}": VALUE for i in range(n)})
            l2 = stack.enter_context(MultiLevelCache(url, namespace=f"{prefix}-l2", l2_size=room,
                                                     promote_after=NEVER, fail_open=False))
            raw = stack.enter_context(sync_client(l2.config))  # the cache's own connection settings
            raw_key = f"{prefix}-raw"
            raw.set(raw_key, encoded)
            cases += [Case("floor: GET + msgpack.unpackb", lambda i: msgpack.unpackb(raw.get(raw_key), raw=False)),
                      Case("L2 hit", lambda i: l2.get(f"q{i}"), floor="floor: GET + msgpack.unpackb")]
        measure(cases, sizes.samples, sizes.warmup, sizes.rounds)
        if "l1" in want:
            check(l1, "l1", sizes.warmup + sizes.samples * BATCH, "L1 hit")
            check(shared, "l1", sizes.warmup + sizes.samples * BATCH, "L1 hit, copy_on_read=False")
        if "l2" in want:
            check(l2, "l2", n, "L2 hit")
            raw.delete(raw_key)
    by = {c.name: c for c in cases}
    for fid, name, case, floor, bound in (
        ("l1", "L1 hit: MultiLevelCache.get / cachetools.LRUCache.get", "L1 hit",
         "floor: cachetools.LRUCache.get", 4.0),
        ("l1:shared", "L1 hit, copy_on_read=False: MultiLevelCache.get / cachetools.LRUCache.get",
         "L1 hit, copy_on_read=False", "floor: cachetools.LRUCache.get", 4.0),
        ("l2", "L2 hit: MultiLevelCache.get (cold L1) / raw GET + msgpack.unpackb", "L2 hit",
         "floor: GET + msgpack.unpackb", 1.3),
    ):
        if fid.split(":")[0] not in want:
            continue
        got, base = _stats(by[case]), _stats(by[floor])
        ratio = got["median_us"] / base["median_us"]
        out.append(figure(fid, name, value=ratio, unit="x floor (median)",
                          measured=f"{got['median_us']:.2f} us (p99 {got['p99_us']:.2f})",
                          floor=f"{base['median_us']:.2f} us (p99 {base['p99_us']:.2f})",
                          target=f"<= {bound}x", passed=ratio <= bound, case=got, floor_case=base,
                          x_floor_p99=got["p99_us"] / base["p99_us"], value_bytes=len(encoded)))
    return out


# ------------------------------------------------------------------ round trips, counted by Redis


@contextmanager
def counting(admin: redis.Redis) -> Iterator[None]:
    """SLOWLOG logs every command (threshold 0) while inside; the server's settings are restored after."""
    saved = admin.config_get("slowlog-*")
    admin.config_set("slowlog-log-slower-than", 0)
    admin.config_set("slowlog-max-len", 1_000_000)
    try:
        yield
    finally:
        for name, value in saved.items():
            admin.config_set(name, value)
        admin.slowlog_reset()


def count_commands(admin: redis.Redis, fn: Callable[[int], object], reps: int) -> dict[str, Any]:
    """What ``reps`` calls of ``fn`` made Redis execute: script calls and top-level plain commands."""
    admin.config_resetstat()
    admin.slowlog_reset()
    for i in range(reps):
        fn(i)
    stats: dict[str, Any] = admin.info("commandstats")
    log = admin.slowlog_get(1_000_000)
    script_calls = sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in SCRIPT_COMMANDS)
    all_calls = sum(int(v.get("calls", 0)) for k, v in stats.items()
                    if k.startswith("cmdstat_") and k.removeprefix("cmdstat_").upper() not in HARNESS_COMMANDS)
    top: dict[str, int] = {}
    for entry in log:
        if entry["client_address"] == b"?:0":  # run by a script: not a command the client sent
            continue
        name = entry["command"].split(b" ", 1)[0].decode().upper()
        if name in HARNESS_COMMANDS:
            continue
        top[name] = top.get(name, 0) + 1
    plain = sum(count for name, count in top.items() if name.lower() not in SCRIPT_COMMANDS)
    logged_scripts = sum(count for name, count in top.items() if name.lower() in SCRIPT_COMMANDS)
    return {"script_calls": script_calls / reps, "plain_commands": plain / reps,
            "per_op": (script_calls + plain) / reps, "all_commands_incl_script_internal": all_calls / reps,
            "top_level": {k: v / reps for k, v in sorted(top.items())},
            "slowlog_agrees": logged_scripts == script_calls, "reps": reps}


def round_trips(url: str, sizes: Sizes, prefix: str) -> list[dict[str, Any]]:
    reps = sizes.reps
    ns = f"{prefix}-rt"
    admin = redis.Redis.from_url(url)
    with ExitStack() as stack:
        cache, warmer = make_warmer(url, ns, {})
        stack.enter_context(cache)
        space = KeySpace(cache.namespace, cache.config.shards)
        many = [[f"m{r}-{j}" for j in range(100)] for r in range(reps + 1)]
        with MultiLevelCache(url, namespace=ns, coherence=False) as writer:  # another instance: cache's L1 is cold
            writer.put_many({f"g{i}": VALUE for i in range(reps + 1)})
            writer.put_many({key: VALUE for keys in many for key in keys})
        for q in range(5):
            warmer.record_query(query_name(q), session="seed")
        session = iter(range(10**9))
        ops: list[tuple[str, Callable[[int], object], str, Callable[[float], bool] | None]] = [
            ("get (L2 hit, cold L1)", lambda i: cache.get(f"g{i}"), "1", lambda x: x == 1),
            ("put", lambda i: cache.put(f"p{i}", VALUE), "1", lambda x: x == 1),
            ("get_many(100) (L2 hits, cold L1)", lambda i: cache.get_many(many[i]), "<= shards touched", None),
            ("get_or_set miss", lambda i: cache.get_or_set(f"o{i}", lambda: VALUE), "(no target)", None),
            ("record_query", lambda i: warmer.record_query(query_name(next(session) % 5), session="s"), "1",
             lambda x: x == 1),
            ("predict_next_queries", lambda i: warmer.predict_next_queries(query_name(i % 5), top_k=5), "1",
             lambda x: x == 1),
        ]
        out = []
        with counting(admin):
            for name, fn, bound, ok in ops:
                target = bound
                fn(reps)  # one untimed call first: scripts loaded, connections open
                counted = count_commands(admin, fn, reps)
                detail: dict[str, Any] = dict(counted)
                passed = None if ok is None else ok(counted["per_op"])
                if name.startswith("get_many"):
                    touched = statistics.mean(len({space.ref(k).shard for k in many[i]}) for i in range(reps))
                    detail["shards_touched"] = touched
                    target = f"<= {touched:g} (shards touched)"
                    passed = counted["per_op"] <= touched
                out.append(figure(f"rt:{name.split(' ')[0]}", f"round trips per op: {name}", value=counted["per_op"],
                                  unit="commands/op",
                                  measured=f"{counted['script_calls']:g} script + {counted['plain_commands']:g} plain",
                                  floor="1 (one command, one round trip)", target=target, passed=passed, **detail))
        warmer.clear_patterns()
    clear_namespaces(url, [ns])
    admin.close()
    return out


# ------------------------------------------------------------------ Redis CPU and memory vs namespace size


def _usec_per_call(admin: redis.Redis, fn: Callable[[int], object], keys: list[int]) -> float:
    admin.config_resetstat()
    for k in keys:
        fn(k)
    stats: dict[str, Any] = admin.info("commandstats")
    calls = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in SCRIPT_COMMANDS)
    usec = sum(float(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in SCRIPT_COMMANDS)
    if calls != len(keys):
        raise RuntimeError(f"expected {len(keys)} script calls, Redis counted {calls}: {stats}")
    return usec / calls


# Floors for the Redis CPU figure, run by Redis on the same keys as get.lua (same run, same server):
# what an EVALSHA costs doing nothing, and doing the least a Lua LRU touch must do for a hit: find the
# entry in its tier, read its payload, and restamp it.
FLOOR_SCRIPTS = {
    "empty EVALSHA": "return 1",
    "minimal Lua LRU touch": "local s = redis.call('ZSCORE', KEYS[1], ARGV[1]) "
                             "local v = redis.call('HGET', KEYS[2], 'v') "
                             "redis.call('ZADD', KEYS[1], s + 0.001, ARGV[1]) return v",
}


def _floors(admin: redis.Redis, space: KeySpace, ids: list[str]) -> dict[str, float]:
    """usec_per_call of each FLOOR_SCRIPTS script over the entries ``ids`` (in L2)."""
    out = {}
    for name, body in FLOOR_SCRIPTS.items():
        sha = admin.script_load(body)

        def call(i: str, sha: str = sha) -> object:
            ref = space.ref(i)
            return admin.evalsha(sha, 2, space.shard_keys[ref.shard].l2, space.entry_key(ref), i)  # type: ignore[no-untyped-call]

        out[name] = _usec_per_call(admin, call, ids)
    return out


def scaling(url: str, sizes: Sizes, prefix: str, want: set[str], progress: Progress) -> list[dict[str, Any]]:
    admin = redis.Redis.from_url(url)
    payload = len(msgpack.packb(VALUE, use_bin_type=True))
    rows = []
    for n in sizes.namespace_sizes:
        ns = f"{prefix}-n{n}"
        l2 = max(n // 10, 160)  # the last l2 entries written are in L2, the others in L3
        settings = {"l2_size": l2, "l3_size": 2 * n + 1000, "coherence": False, "fail_open": False}
        before = int(admin.info("memory")["used_memory"])
        started = time.perf_counter()
        with MultiLevelCache(url, namespace=ns, l1_size=1, **settings) as writer:
            for lo in range(0, n, 10_000):
                writer.put_many({f"e{i}": VALUE for i in range(lo, min(n, lo + 10_000))})
                if n >= 100_000 and lo % 100_000 == 0:
                    progress(f"micro: filling {ns}: {lo}/{n} entries")
        fill_s = time.perf_counter() - started
        after = int(admin.info("memory")["used_memory"])
        row: dict[str, Any] = {"entries": n, "fill_seconds": round(fill_s, 2),
                               "bytes_per_entry": (after - before) / n, "payload_bytes": payload}
        row["overhead_bytes_per_entry"] = row["bytes_per_entry"] - payload
        if "redis_cpu" in want:
            rng = random.Random(n)
            calls = min(sizes.cpu_calls, l2 // 2, n - l2 - 1)
            in_l2 = rng.sample(range(n - l2 // 2, n), calls)  # in L2 (with a margin: puts below demote)
            in_l3 = rng.sample(range(1, n - l2), calls)  # e0 warms up
            with MultiLevelCache(url, namespace=ns, promote_after=NEVER, **settings) as reader:
                reader.get("e0")  # script loaded, connection open
                row["get_l2_usec_per_call"] = _usec_per_call(admin, lambda k: reader.get(f"e{k}"), in_l2)
                row["get_l3_usec_per_call"] = _usec_per_call(admin, lambda k: reader.get(f"e{k}"), in_l3)
                for name, usec in _floors(admin, reader._core.space, [f"e{k}" for k in in_l2]).items():
                    row[f"floor_{name}"] = usec
                reader.put("e0", VALUE)
                row["put_usec_per_call"] = _usec_per_call(admin, lambda k: reader.put(f"e{k}", VALUE), in_l3)
                row["calls"] = calls
        progress(f"micro: {n} entries: " + ", ".join(
            f"{k} {v:.1f}" for k, v in row.items() if k.endswith(("per_call", "bytes_per_entry")) or
            k.startswith("floor_")))
        clear_namespaces(url, [ns])
        rows.append(row)
    admin.close()
    out = []
    small, big = rows[0], rows[-1]
    if "redis_cpu" in want:
        log_bound = math.log(big["entries"]) / math.log(small["entries"])
        touch, empty = big["floor_minimal Lua LRU touch"], big["floor_empty EVALSHA"]
        for script, label in (("get_l2", "get.lua call (an L2 hit)"), ("get_l3", "get.lua call (an L3 hit)"),
                              ("put", "put.lua call (a new entry)")):
            usec = big[f"{script}_usec_per_call"]
            growth = usec / small[f"{script}_usec_per_call"]
            at = f"{big['entries']:,} entries"
            ok = growth <= log_bound and (script != "get_l2" or usec <= 10.0)
            target = (f"<= 10 us at 1,000,000 entries (this run: {at}); " if script == "get_l2" else "") + \
                f"growth <= O(log n): x{log_bound:.2f}"
            out.append(figure(f"cpu:{script}", f"Redis CPU per {label} at {at}", value=usec,
                              unit="usec/call", measured=" / ".join(
                                  f"{r[f'{script}_usec_per_call']:.1f} us @ {r['entries']:,}" for r in rows),
                              floor=f"x{usec / touch:.1f} a minimal Lua LRU touch ({touch:.1f} us), "
                                    f"x{usec / empty:.1f} an empty EVALSHA ({empty:.1f} us); "
                                    f"x{growth:.2f} from {small['entries']:,} entries",
                              target=target, passed=ok, growth=growth, log_bound=log_bound, sizes=rows))
    if "memory" in want:
        out.append(figure("memory", f"Redis memory per entry beyond the payload at {big['entries']:,} entries",
                          value=big["overhead_bytes_per_entry"], unit="bytes/entry",
                          measured=" / ".join(f"{r['overhead_bytes_per_entry']:.0f} B @ {r['entries']:,}"
                                              for r in rows),
                          floor=f"payload {payload} B", target="(no target)", passed=None, sizes=rows))
    return out


def run_micro(url: str, mode: str, figures: list[str] | None, progress: Progress = _noop) -> dict[str, Any]:
    """Every selected micro figure (default: all) at the sizes of ``mode`` (full, quick or tiny)."""
    sizes = SIZES[mode]
    want = set(figures or FIGURES)
    prefix = f"vrcmicro{random.getrandbits(24):06x}"
    started = time.perf_counter()
    out: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    if want & {"l1", "l2"}:
        try:
            import cachetools  # noqa: F401, PLC0415
        except ImportError:
            skipped.update(dict.fromkeys(want & {"l1", "l2"}, "cachetools is not installed: pip install -e '.[bench]'"))
        else:
            progress(f"micro: L1/L2 latency, {sizes.samples} samples per case")
            out += latency(url, sizes, prefix, want)
    if "round_trips" in want:
        progress(f"micro: round trips per operation ({sizes.reps} calls each)")
        out += round_trips(url, sizes, prefix)
    if want & {"redis_cpu", "memory"}:
        progress(f"micro: Redis CPU and memory at {', '.join(f'{n:,}' for n in sizes.namespace_sizes)} entries")
        out += scaling(url, sizes, prefix, want, progress)
    return {"mode": mode, "sizes": asdict(sizes), "figures": out, "skipped": skipped,
            "seconds": round(time.perf_counter() - started, 1)}
