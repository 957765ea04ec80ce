"""Several OS processes sharing one Redis namespace (invariants 1, 2, 4 and 5 of docs/design.md#invariants).

Workers are started with the "spawn" context, so each is a fresh interpreter that builds its own
``MultiLevelCache`` from the URL, exactly as separate worker processes of a fleet would. Workers are
module-level functions (spawn pickles them by name) and report back through a queue; the parent
never sleeps, it waits on the queue and on ``Process.join`` with deadlines.

* Four processes hammer 32 keys at once (put, put with a ttl, put_many, get, get_many, delete) with
  tiers far smaller than the key set. Afterwards: no worker raised, every value read was written by
  some worker for that very key, Redis's contents satisfy invariants 1 and 2 (with the server's
  TIME as "now", so expired leftovers are allowed), and every process's counters add up and sum to
  the fleet's. Some ttls are a few ms, so values also expire while the others work.
* A process started after another one exited reads everything it wrote as L2 hits.
* Once the server's clock passes a value's ttl, a new process gets nothing and no bytes remain.

These tests use the server's TIME (no fake clock), so nothing here asserts on timing. They run on
both backends: each worker builds its cache from the backend (URL, ``cluster`` flag) it is given.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

from victor_rcache import MultiLevelCache

from .helpers import Backend, Client, check_invariants, guard_slots, server_ms

# Small tiers, many more keys than L2 + L3 hold: promotion, demotion and eviction all happen.
TIERS: dict[str, Any] = {"shards": 2, "l1_size": 4, "l2_size": 8, "l3_size": 16, "promote_after": 2}
BIG_TIERS: dict[str, Any] = {**TIERS, "l2_size": 64, "l3_size": 64}  # room for every key in L2
# A writer whose L1 holds all it writes: it evicts nothing, so it has no bookkeeping to send (which would
# run a script on a shard: a sweep).
WRITER_TIERS: dict[str, Any] = {**BIG_TIERS, "l1_size": 64}
KEYS = [f"key{i}" for i in range(32)]
WORKERS = 4
OPS = 3000
TTLS = (0.002, 0.05, 30.0)  # seconds: some values expire mid-run, some outlive it
DEADLINE = 60.0  # seconds the parent waits for all workers; a hung worker fails the test, never hangs it

Result = dict[str, Any]


# ------------------------------------------------------------------ workers (run in child processes)


def _report(results: Any, body: Callable[[], Result]) -> None:
    """Run ``body`` and put its result, or the traceback it raised, on the queue."""
    out: Result = {"pid": os.getpid()}
    try:
        out.update(body())
    except BaseException:  # the parent asserts no worker raised and shows the traceback
        out["error"] = traceback.format_exc()
    results.put(out)


def hammer(backend: Backend, namespace: str, worker: int, seed: int, start: Any, results: Any) -> None:
    """Run OPS random operations on the shared keys; return what was written, read and counted."""

    def body() -> Result:
        rng = random.Random(seed)
        writes: list[tuple[str, int]] = []  # (key, n) of every value this worker wrote
        reads: list[tuple[str, Any]] = []
        gets = 0

        def value(key: str, n: int) -> dict[str, Any]:
            writes.append((key, n))
            return {"key": key, "by": worker, "n": n}

        try:
            cache = guard_slots(MultiLevelCache(backend.url, namespace=namespace, fail_open=False,
                                                cluster=backend.cluster, **TIERS))
        except BaseException:
            start.abort()  # the other workers must not wait for this one
            raise
        try:
            start.wait(timeout=DEADLINE)  # every worker is up: the operations really overlap
            for n in range(OPS):
                op = rng.random()
                key = rng.choice(KEYS)
                if op < 0.20:
                    cache.put(key, value(key, n))
                elif op < 0.30:
                    cache.put(key, value(key, n), ttl=rng.choice(TTLS))
                elif op < 0.40:
                    chosen = rng.sample(KEYS, rng.randint(2, 6))
                    cache.put_many({k: value(k, n) for k in chosen}, ttl=rng.choice((None, *TTLS)))
                elif op < 0.75:
                    gets += 1
                    got = cache.get(key)
                    if got is not None:
                        reads.append((key, got))
                elif op < 0.92:
                    chosen = rng.choices(KEYS, k=rng.randint(2, 8))
                    gets += len(set(chosen))
                    reads += list(cache.get_many(chosen).items())
                else:
                    cache.delete(key)
            # This process's last reads' bookkeeping: what it applies in Redis (promotions, demotions,
            # evictions, expirations) is counted in the process's counters too, so send it before reading them.
            cache.flush_bookkeeping()
            metrics = cache.get_metrics()  # this process's own counters (close() does not change them)
        finally:
            cache.close()
        return {"worker": worker, "writes": writes, "reads": reads, "gets": gets, "metrics": metrics}

    _report(results, body)


def put_keys(backend: Backend, namespace: str, count: int, ttl: float | None, results: Any) -> None:
    def body() -> Result:
        with guard_slots(MultiLevelCache(backend.url, namespace=namespace, fail_open=False,
                                         cluster=backend.cluster, **WRITER_TIERS)) as cache:
            cache.put_many({f"key{i}": {"key": f"key{i}", "n": i} for i in range(count)}, ttl=ttl)
            # The expiries the puts recorded, from the expiry index (Redis may have expired the entries'
            # data already: their Redis expiry is their ttl).
            space = cache._core.space
            refs = [space.ref(f"key{i}") for i in range(count)]
            expiries = [cache.client.zscore(space.shard_keys[ref.shard].exp, ref.id) for ref in refs]
            return {"metrics": cache.get_metrics(), "expiries": expiries}

    _report(results, body)


def read_keys(backend: Backend, namespace: str, count: int, results: Any) -> None:
    def body() -> Result:
        with guard_slots(MultiLevelCache(backend.url, namespace=namespace, fail_open=False,
                                         cluster=backend.cluster, **BIG_TIERS)) as cache:
            values = [cache.get(f"key{i}") for i in range(count)]
            return {"values": values, "metrics": cache.get_metrics()}

    _report(results, body)


# ------------------------------------------------------------------------------ parent side


def run_processes(jobs: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> list[Result]:
    """Start one spawned process per job, wait for all their results, assert each exited cleanly."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, results)) for target, args in jobs]
    for p in procs:
        p.start()
    out: list[Result] = []
    deadline = time.monotonic() + DEADLINE
    try:
        while len(out) < len(procs):
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(out)} of {len(procs)} workers reported within {DEADLINE}s"
            try:
                out.append(results.get(timeout=min(left, 1.0)))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"worker(s) died without reporting: {[(p.pid, p.exitcode) for p in dead]}"
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            assert p.exitcode == 0, f"worker {p.pid} exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [r["error"] for r in out if "error" in r]
    assert not errors, "a worker raised:\n" + "\n".join(errors)
    return out


def test_processes_hammering_one_namespace_keep_every_invariant(backend: Backend, raw: Client,
                                                                namespace: str) -> None:
    start = mp.get_context("spawn").Barrier(WORKERS)
    jobs = [(hammer, (backend, namespace, w, 1000 + w, start)) for w in range(WORKERS)]
    results = sorted(run_processes(jobs), key=lambda r: r["worker"])

    # Every value read is one some worker wrote, for that very key.
    written = {(r["worker"], key, n) for r in results for key, n in r["writes"]}
    reads = [(key, got) for r in results for key, got in r["reads"]]
    for key, got in reads:
        assert isinstance(got, dict), f"read {got!r} under {key!r}"
        assert got.get("key") == key, f"read {got!r}, another key's value, under {key!r}"
        assert (got["by"], key, got["n"]) in written, f"read {got!r} under {key!r}, which nobody wrote"
    assert len(reads) > OPS, "the workers should have found plenty of each other's values"
    assert len({got["by"] for _, got in reads}) == WORKERS, "every worker's writes should be read somewhere"

    # Invariants 1 and 2 on what Redis holds; leftovers past their absolute ttl would be allowed.
    check_invariants(raw, namespace, TIERS["shards"], TIERS["l2_size"], TIERS["l3_size"], now_ms=server_ms(raw))

    # Invariant 5: each process's counters add up, and the fleet's are the sum of the processes'.
    procs = [r["metrics"] for r in results]
    for r, m in zip(results, procs, strict=True):
        assert m["combined"]["gets"] == r["gets"], f"worker {r['worker']} made {r['gets']} gets"
        assert m["l1"]["hits"] + m["l1"]["misses"] == r["gets"]
        assert m["l2"]["hits"] + m["l2"]["misses"] == m["l1"]["misses"]
        assert m["l3"]["hits"] + m["l3"]["misses"] == m["l2"]["misses"]
        assert m["combined"]["total_hits"] + m["combined"]["total_misses"] == r["gets"]
    with MultiLevelCache(backend.url, namespace=namespace, fail_open=False, cluster=backend.cluster,
                         **TIERS) as observer:
        fleet = observer.get_metrics("fleet")
    f, c = fleet, fleet["combined"]
    assert c["gets"] == sum(r["gets"] for r in results)
    assert c["total_hits"] + c["total_misses"] == c["gets"]
    assert f["l2"]["hits"] + f["l2"]["misses"] == f["l1"]["misses"]
    assert f["l3"]["hits"] + f["l3"]["misses"] == f["l2"]["misses"]
    for tier, field in (("l1", "hits"), ("l2", "hits"), ("l3", "hits"), ("l3", "misses"), ("l1", "evictions"),
                        ("l2", "promotions"), ("l2", "demotions"), ("l3", "evictions")):
        assert f[tier][field] == sum(m[tier][field] for m in procs), f"fleet {tier} {field}"
    assert c["total_misses"] == sum(m["combined"]["total_misses"] for m in procs)
    assert c["puts"] == sum(m["combined"]["puts"] for m in procs)

    print("fleet metrics:", fleet)  # shown with -s, or when the test fails
    # The workload really did exercise every movement between tiers.
    for tier, field in (("l1", "hits"), ("l1", "promotions"), ("l2", "hits"), ("l3", "hits"),
                        ("l2", "promotions"), ("l2", "demotions"), ("l3", "evictions")):
        assert f[tier][field] > 0, f"the workload never produced any {tier} {field}"


def test_a_later_process_reads_another_process_writes_as_l2_hits(backend: Backend, namespace: str) -> None:
    count = 20
    [writer] = run_processes([(put_keys, (backend, namespace, count, None))])
    assert writer["metrics"]["combined"]["puts"] == count
    # A separate OS process, started after the writer exited: nothing but Redis connects them.
    [reader] = run_processes([(read_keys, (backend, namespace, count))])
    assert reader["pid"] != writer["pid"]
    assert reader["values"] == [{"key": f"key{i}", "n": i} for i in range(count)]
    m = reader["metrics"]
    assert (m["combined"]["gets"], m["l1"]["hits"], m["l2"]["hits"], m["l3"]["hits"]) == (count, 0, count, 0)
    assert m["combined"]["total_misses"] == 0


def test_a_value_expires_on_the_servers_clock_for_every_process(backend: Backend, raw: Client,
                                                                 namespace: str) -> None:
    """Invariant 4 with the server's TIME: once it passes a value's ttl no process gets it, no bytes remain."""
    count = 5
    before = server_ms(raw)
    [writer] = run_processes([(put_keys, (backend, namespace, count, 0.002))])
    assert writer["metrics"]["combined"]["puts"] == count
    expiries = [int(x or 0) for x in writer["expiries"]]
    assert all(before < x <= server_ms(raw) + 2 for x in expiries), expiries
    deadline = time.monotonic() + 10
    while server_ms(raw) < max(expiries):  # a deadline poll on Redis's clock, not a sleep
        assert time.monotonic() < deadline, "the server's clock did not reach the ttl"
    [reader] = run_processes([(read_keys, (backend, namespace, count))])
    assert reader["values"] == [None] * count
    assert reader["metrics"]["combined"]["total_misses"] == count
    # The reader's misses reached their shards when it closed: each removed what was left of an entry.
    state = check_invariants(raw, namespace, BIG_TIERS["shards"], BIG_TIERS["l2_size"], BIG_TIERS["l3_size"])
    assert not state.l2_ids
    assert not state.l3_ids
    assert not any(s.entries or s.exp for s in state.shards)
    with MultiLevelCache(backend.url, namespace=namespace, fail_open=False, cluster=backend.cluster,
                         **BIG_TIERS) as observer:
        fleet = observer.get_metrics("fleet")
    assert (fleet["l2"]["total_size"], fleet["l3"]["total_size"]) == (0, 0)
    assert fleet["combined"]["total_expirations"] == count
