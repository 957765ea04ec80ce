"""Redis Cluster under change: a master killed under load, slots moved while the cache is in use.

Each test runs its own private cluster (3 masters with a replica each), since it breaks it.
Load comes from several threads; every call's outcome and duration is recorded, and the tests
assert what docs/cluster.md promises: nothing reaches the caller, every call returns within its
timeouts, and afterwards the cache serves from Redis again with the invariants intact.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from victor_rcache import MultiLevelCache
from victor_rcache.keys import KeySpace
from victor_rcache.local_redis import LocalRedisCluster

from .helpers import check_invariants

SOCKET_TIMEOUT = CONNECT_TIMEOUT = 0.5
# A call may wait for a connect and a reply; the rest is scheduling slack on a busy 2-core machine.
CALL_BOUND = SOCKET_TIMEOUT + CONNECT_TIMEOUT + 0.5
KEYS = [f"query {i}" for i in range(400)]


@pytest.fixture
def cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(masters=3, replicas=1) as private:
        yield private


@dataclass
class Load:
    """Threads doing gets and puts on a fail-open cache, recording what each call did."""

    caches: list[MultiLevelCache]
    threads: int = 4
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    slowest: float = 0.0
    calls: int = 0
    wrong: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(n,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        cache = self.caches[n % len(self.caches)]
        while not self.stop.is_set():
            key = rng.choice(KEYS)
            started = time.monotonic()
            try:
                if rng.random() < 0.8:
                    value = cache.get(key)
                    if value is not None and value != {"key": key}:
                        self.wrong.append(f"{key!r} -> {value!r}")
                else:
                    cache.put(key, {"key": key})
            except Exception as exc:  # the promise under test: nothing reaches the caller
                self.errors.append(f"{type(exc).__name__}: {exc}")
            took = time.monotonic() - started
            with self._lock:
                self.calls += 1
                self.slowest = max(self.slowest, took)
            time.sleep(0.005)  # paces this worker to a couple of hundred calls a second, not a test wait

    def finish(self) -> None:
        self.stop.set()
        for worker in self._workers:
            worker.join(timeout=30)


def make_caches(cluster: LocalRedisCluster, namespace: str, count: int, **settings: Any) -> list[MultiLevelCache]:
    return [MultiLevelCache(cluster.url, cluster=True, namespace=namespace, socket_timeout=SOCKET_TIMEOUT,
                            connect_timeout=CONNECT_TIMEOUT, **settings) for _ in range(count)]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float) -> float:
    """Poll until ``predicate`` holds; return how long it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def shard_master(raw: RedisCluster, space: KeySpace, key: str) -> int:
    return int(raw.get_node_from_key(space.entry_key(space.ref(key))).port)


def test_a_master_killed_under_load_fails_over_without_reaching_a_caller(cluster: LocalRedisCluster) -> None:
    namespace = "fo" + uuid.uuid4().hex[:8]
    space = KeySpace(namespace, 16)
    writer, *readers = make_caches(cluster, namespace, 3, promote_after=10**9, l1_size=1)  # readers go to Redis
    writer.put_many({key: {"key": key} for key in KEYS})
    raw = RedisCluster.from_url(cluster.url)
    victim_port = cluster.master_ports()[1]
    victim_keys = [k for k in KEYS if shard_master(raw, space, k) == victim_port]
    assert victim_keys
    # Any cache may be the first to need a script on the new master (it then holds it for all).
    reloads_before = sum(c.get_metrics()["health"]["script_reloads"] for c in (writer, *readers))

    load = Load([writer, *readers]).start()
    try:
        wait_for(lambda: load.calls > 200, "load to build up", 30)
        victim = next(node for node in cluster.nodes if node.port == victim_port)
        victim.kill()
        cluster.wait_until_ok(timeout=30)  # the replica has taken over and every survivor agrees
        assert victim_port not in cluster.master_ports()
        probe = readers[0]
        back = wait_for(lambda: probe.get(victim_keys[0]) is not None and probe.get_metrics()["health"][
            "redis_available"], "the cache to serve the failed-over shard from Redis", timeout=10)
        # Subscribers on the dead node move to a live one: every cache trusts its L1 again.
        wait_for(lambda: all(c.get_metrics()["coherence"]["channel"] == "up" for c in (writer, *readers)),
                 "every invalidation channel to be back", timeout=10)
        calls_after = load.calls
        wait_for(lambda: load.calls > calls_after + 200, "more load after the failover", 30)
    finally:
        load.finish()

    assert load.errors == [], load.errors[:5]
    assert load.wrong == [], load.wrong[:5]
    assert load.slowest <= CALL_BOUND, f"a call took {load.slowest:.3f} s"
    assert back < 5.0, f"served from Redis again {back:.2f} s after cluster_state:ok"
    health = [r.get_metrics()["health"] for r in readers]
    assert sum(h["redis_errors"] for h in health) > 0, "the outage was not even seen"
    reloads = sum(c.get_metrics()["health"]["script_reloads"] for c in (writer, *readers))
    assert reloads > reloads_before, "the new master never needed the scripts"
    # The promoted replica holds a consistent copy of its shards: every invariant holds there.
    check_invariants(raw, namespace, 16, 10_000, 100_000)
    for cache in (writer, *readers):
        cache.close()
    raw.close()


def _node_ids(port: int) -> tuple[str, dict[int, str]]:
    client = redis.Redis(port=port)
    try:
        myself = client.execute_command("CLUSTER", "MYID").decode()
        slots = client.execute_command("CLUSTER", "SLOTS")
        return myself, {int(s[2][1]): s[2][2].decode() for s in slots}
    finally:
        client.close()


def shard_homes(raw: RedisCluster, space: KeySpace) -> dict[int, int]:
    """Which master port serves each shard now."""
    raw.nodes_manager.initialize()  # re-read the slot map: it is what the test asks about
    return {sk.index: int(raw.get_node_from_key(sk.l2).port) for sk in space.shard_keys}


def test_moving_slots_while_the_cache_is_used_loses_nothing_else_and_raises_nothing(
        cluster: LocalRedisCluster) -> None:
    namespace = "rs" + uuid.uuid4().hex[:8]
    space = KeySpace(namespace, 16)
    writer, reader = make_caches(cluster, namespace, 2, promote_after=10**9, l1_size=1)
    writer.put_many({key: {"key": key} for key in KEYS})
    raw = RedisCluster.from_url(cluster.url)
    source, target = cluster.master_ports()[:2]
    _, ids = _node_ids(source)
    homes_before = shard_homes(raw, space)

    load = Load([writer, reader]).start()
    try:
        wait_for(lambda: load.calls > 200, "load to build up", 30)
        # 2,000 of the source's slots move, and with them some of the namespace's 16 shard tags.
        subprocess.run(["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source}", "--cluster-from", ids[source],
                        "--cluster-to", ids[target], "--cluster-slots", "2000", "--cluster-yes"],
                       check=True, capture_output=True, timeout=120)
        cluster.wait_until_ok(timeout=30)
        calls_after = load.calls
        wait_for(lambda: load.calls > calls_after + 200, "more load after the move", 30)
    finally:
        load.finish()

    assert load.errors == [], load.errors[:5]
    assert load.wrong == [], load.wrong[:5]
    assert load.slowest <= CALL_BOUND, f"a call took {load.slowest:.3f} s"
    homes_after = shard_homes(raw, space)
    moved = {shard for shard in homes_before if homes_before[shard] != homes_after[shard]}
    assert moved, "the move did not touch the namespace: pick more slots"
    assert all(homes_after[shard] == target for shard in moved)
    lost = [k for k in KEYS if reader.get(k) is None and space.ref(k).shard not in moved]
    assert lost == [], f"entries outside the moved slots were lost: {lost[:5]}"
    check_invariants(raw, namespace, 16, 10_000, 100_000)
    writer.close()
    reader.close()
    raw.close()
