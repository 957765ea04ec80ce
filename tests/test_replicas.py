"""Reads from replicas behind the version fence (docs/replicas.md, victor_rcache/replicas.py).

Real servers only: a master with a replica that gets the master's stream through tests/lag_proxy.py (each
chunk held 20-50 ms, or held back entirely while a test needs a replica known to be behind), standalone
or on a cluster of its own (one master with every slot, announcing the proxy's port as its own, and its
replica: see Replicated); and the session's test cluster (3 masters, one replica each), without lag.

* Settings: every wrong combination is a ConfigurationError naming the fix.
* The fence alone (no Redis): what it trusts, its bound, and the floors its evictions raise.
* A replica known to be behind: a hit it holds too old, and a miss of an entry it has not received, are
  both read again on the master; get_or_set never runs its loader because a replica lagged.
* The acceptance run, standalone and on a cluster: another OS process writes 10,000 increasing values
  while this process reads through a lagging replica. Every value read is at least as new as the newest
  version the reader knew of when it asked, reads never go back in time, the replica served the hits (its
  INFO commandstats), and its lag was met (reads fenced off to the master).
* A replica that is down never fails a call: reads fall back to the master.
* Cluster of three masters: reads go to the masters' replicas (their commandstats), sync and asyncio, and
  the fence holds under another process's writes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from victor_rcache import AsyncMultiLevelCache, CacheConfig, ConfigurationError, MultiLevelCache
from victor_rcache.local_redis import LocalRedisCluster, LocalRedisServer
from victor_rcache.replicas import VersionFence

from .lag_proxy import LagProxy
from .workers import eventually

WRITES = 10_000
KEYS = [f"item{i}" for i in range(64)]
DEADLINE = 120.0  # seconds the writer may take (it fails the test, never hangs it)


# ------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("settings", "says"), [
    ({"replica_urls": ["redis://r:6379/0"]}, "read_from_replicas is not"),
    ({"read_from_replicas": True}, "needs replicas"),
    ({"read_from_replicas": True, "cluster": True, "replica_urls": ["redis://r:6379/0"]}, "standalone Redis"),
    ({"read_from_replicas": True, "replica_urls": ["http://r:6379"]}, "must be a Redis URL"),
    ({"read_from_replicas": True, "replica_urls": 6379}, "must be a list of Redis URLs"),
    ({"read_from_replicas": "yes", "cluster": True}, "must be True or False"),
])
def test_replica_settings_are_checked(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        CacheConfig(**settings)


def test_replica_settings_from_the_environment() -> None:
    config = CacheConfig.from_env({"VICTOR_RCACHE_READ_FROM_REPLICAS": "1",
                                   "VICTOR_RCACHE_REPLICA_URLS": "redis://a:1/0, redis://b:2/0"})
    assert config.read_from_replicas
    assert config.replica_urls == ("redis://a:1/0", "redis://b:2/0")
    assert CacheConfig(read_from_replicas=True, cluster=True).replica_urls == ()


# ------------------------------------------------------------------------------------------- the fence


def test_fence_trusts_a_replica_that_applied_what_it_knows() -> None:
    fence = VersionFence(shards=4)
    fence.saw(b"a", 500, shard=1)
    assert fence.needed(b"a", 1) == 500
    assert fence.needed(b"b", 1) == 0
    assert fence.trusts(b"a", 1, applied=500, version=None)  # the replica has applied 500: even a miss
    assert not fence.trusts(b"a", 1, applied=499, version=None)  # behind: a miss says nothing
    assert fence.trusts(b"a", 1, applied=0, version=500)  # behind, but holds the entry that new
    assert not fence.trusts(b"a", 1, applied=499, version=499)
    fence.saw(b"a", 400, shard=1)  # an older version learnt late lowers nothing
    assert fence.needed(b"a", 1) == 500
    fence.flushed(1, 700)
    assert fence.needed(b"b", 1) == 700
    assert fence.needed(b"b", 2) == 0


def test_fence_is_bounded_and_forgetting_raises_the_shard_floor() -> None:
    fence = VersionFence(shards=2, capacity=3)
    for i, version in enumerate((10, 20, 30, 40)):
        fence.saw(b"k%d" % i, version, shard=i % 2)
    assert len(fence) == 3
    assert fence.forgotten == 1
    # k0 (shard 0, version 10) was forgotten: every entry of shard 0 now needs 10, shard 1 nothing new.
    assert fence.needed(b"other", 0) == 10
    assert fence.needed(b"other", 1) == 0
    assert fence.needed(b"k2", 0) == 30
    # A hashed id's shard cannot be told from the id: forgetting one raises the floor of hashed ids.
    fence = VersionFence(shards=2, capacity=1)
    fence.saw(b"#" + b"f" * 64, 50)
    fence.saw(b"#" + b"e" * 64, 60)
    assert fence.needed(b"#" + b"0" * 64, 1) == 50
    assert fence.needed(b"plain", 1) == 0


# --------------------------------------------------------------------------------------- the servers


class Replicated:
    """A master, a lag proxy and a replica of the master through the proxy; ``url`` is the master's address
    for clients.

    Standalone: the replica is started with ``--replicaof`` the proxy. Cluster: a cluster of its own, one
    master holding every slot and its replica (set up by hand: ``redis-cli --cluster create`` wants three
    masters). The master announces the proxy's port as its own (``cluster-announce-port``; its bus port
    stays its own), and the replica meets it there, so it replicates through the proxy; the clients the
    cluster sends to that port pass through it too, undelayed (the proxy delays replication connections
    only)."""

    def __init__(self, cluster: bool = False) -> None:
        self.cluster = cluster
        if not cluster:
            self.master = LocalRedisServer(extra_args=("--repl-diskless-sync-delay", "0")).start()
            self.proxy = LagProxy(self.master.port)
            self.replica = LocalRedisServer(extra_args=("--replicaof", "127.0.0.1", str(self.proxy.port))).start()
            self.url = self.master.url
        else:
            self._nodes = LocalRedisCluster(masters=1, replicas=1)  # (its nodes' settings; started here)
            self.master, self.replica = self._nodes.nodes
            self.master.start()
            self.proxy = LagProxy(self.master.port)
            self.url = f"redis://127.0.0.1:{self.proxy.port}/0"
            try:
                self._replicate_through_the_proxy()
            except BaseException:
                self.proxy.close()
                self._nodes.stop()
                raise
        self.client = redis.Redis(port=self.replica.port)
        eventually(self.in_sync, "the replica is in sync with its master")

    def _replicate_through_the_proxy(self) -> None:
        self.replica.start()
        bus = self.master.port + 10000  # (LocalRedisServer picks a cluster node's port with its bus port free)
        with redis.Redis(port=self.master.port) as master, redis.Redis(port=self.replica.port) as replica:
            master.config_set("cluster-announce-port", self.proxy.port)
            master.config_set("cluster-announce-bus-port", bus)
            master.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            master_id = master.execute_command("CLUSTER", "MYID").decode()
            replica.execute_command("CLUSTER", "MEET", "127.0.0.1", self.proxy.port, bus)
            eventually(lambda: master_id.encode() in replica.execute_command("CLUSTER", "NODES"),
                       "the replica met the master")
            replica.execute_command("CLUSTER", "REPLICATE", master_id)
            self._nodes.wait_until_ok()
            assert replica.info("replication")["master_port"] == self.proxy.port
            master.set("replicated", 1)  # Redis lists a replica in CLUSTER SLOTS once it has replicated something
        eventually(lambda: _replicas_listed(self.url), "the cluster lists its replica")

    def in_sync(self) -> bool:
        info = self.client.info("replication")
        if info.get("master_link_status") != "up":
            return False
        master = redis.Redis(port=self.master.port)
        try:
            return int(master.info("replication")["master_repl_offset"]) == int(info["slave_repl_offset"])
        finally:
            master.close()

    def hmgets(self) -> int:
        return int(self.client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))

    def close(self) -> None:
        self.client.close()
        self.replica.stop()
        self.proxy.close()
        self.master.stop()


@pytest.fixture
def replicated(request: pytest.FixtureRequest) -> Iterator[Replicated]:
    """Standalone servers; a cluster of its own where a test is parametrized so (indirect, "cluster")."""
    servers = Replicated(cluster=getattr(request, "param", "standalone") == "cluster")
    yield servers
    servers.close()


def _reader(servers: Replicated, namespace: str, **settings: Any) -> MultiLevelCache:
    replicas = {"cluster": True} if servers.cluster else {"replica_urls": [servers.replica.url]}
    settings = {"namespace": namespace, "fail_open": False, "read_from_replicas": True, **replicas, **settings}
    return MultiLevelCache(servers.url, **settings)


def _heard(cache: MultiLevelCache, key: str, version: int) -> None:
    """Wait until ``cache``'s fence knows ``version`` of ``key`` (its listener applied the announcement)."""
    core, ref = cache._core, cache._core.space.ref(key)
    assert core.fence is not None
    eventually(lambda: core.fence is not None and core.fence.needed(ref.id, ref.shard) >= version,
               f"the reader heard of version {version} of {key!r}")


def _version(cache: MultiLevelCache, key: str) -> int:
    entry = cache._core.l1.peek(cache._core.space.ref(key).id)
    assert entry is not None
    return entry.version


def test_a_replica_behind_is_not_trusted(replicated: Replicated, namespace: str) -> None:
    with MultiLevelCache(replicated.master.url, namespace=namespace, fail_open=False) as writer, \
            _reader(replicated, namespace, l1_size=1) as reader:
        writer.put("old", 1)
        eventually(replicated.in_sync, "the replica got the first write")
        assert reader.get("old") == 1  # from the replica, which has it
        replicated.proxy.hold()  # the replica gets nothing more until released
        writer.put("old", 2)
        writer.put("new", "fresh")
        _heard(reader, "old", _version(writer, "old"))
        _heard(reader, "new", _version(writer, "new"))
        fenced = reader._core.fenced
        assert reader.get("old") == 2  # the replica's 1 is older than the announced version: the master's
        assert reader.get("new") == "fresh"  # the replica's miss is not trusted either
        assert reader.get_many(["old", "new"]) == {"old": 2, "new": "fresh"}
        assert reader.get_or_set("new", lambda: pytest.fail("a lagging replica made the loader run")) == "fresh"
        assert reader._core.fenced >= fenced + 4
        replicated.proxy.release()
        eventually(replicated.in_sync, "the replica caught up")
        served = replicated.hmgets()
        assert reader.get("new") == "fresh"
        assert replicated.hmgets() > served


def test_caches_of_a_process_share_their_connection_to_a_replica(replicated: Replicated, namespace: str) -> None:
    """Like their masters' (docs/design.md, connections per process): the caches of one process reading
    from one replica hold one connection to it between them, and the last one closed closes it."""
    def connections() -> int:
        return sum(1 for c in replicated.client.client_list() if c.get("cmd") not in ("client|list", "info"))

    with _reader(replicated, namespace) as writer:
        writer.put_many({"a": 1, "b": 2})
    eventually(replicated.in_sync, "the replica has the entries")
    before = connections()
    first, second = _reader(replicated, namespace), _reader(replicated, f"{namespace}-2")
    try:
        assert first.get("a") == 1
        assert second.get("b") is None
        assert replicated.hmgets() > 0
        assert connections() == before + 1
        first.close()
        assert second.get("a") is None  # (another namespace: a miss, still read on the replica)
        assert connections() == before + 1
    finally:
        first.close()
        second.close()
    eventually(lambda: connections() == before, "the last cache out closed its replica connection")


def test_a_replica_down_falls_back_to_the_master(replicated: Replicated, namespace: str) -> None:
    with _reader(replicated, namespace, l1_size=1) as reader:
        reader.put("k", "v")
        reader.put("other", "w")
        replicated.replica.stop()
        for _ in range(20):  # every read answered (fail_open=False: a replica's failure would raise)
            assert reader.get("k") == "v"
            assert reader.get("other") == "w"
        state = reader.get_metrics()["health"]["replicas"]
        assert state["failures"] >= 1
        assert state["fallbacks"] >= 1
        assert "open" in state["breakers"].values()  # the breaker keeps the dead replica off limits


def test_async_reads_take_the_same_fence(replicated: Replicated, namespace: str) -> None:
    with MultiLevelCache(replicated.master.url, namespace=namespace, fail_open=False) as writer:
        writer.put("old", 1)
        eventually(replicated.in_sync, "the replica got the first write")

        async def run() -> None:
            async with AsyncMultiLevelCache(replicated.master.url, namespace=namespace, fail_open=False, l1_size=1,
                                            read_from_replicas=True, replica_urls=[replicated.replica.url]) as reader:
                served = replicated.hmgets()
                assert await reader.get("old") == 1
                assert replicated.hmgets() > served  # the replica served it
                replicated.proxy.hold()
                writer.put("old", 2)
                writer.put("new", "fresh")
                core, ref = reader._core, reader._core.space.ref("new")
                assert core.fence is not None
                # (Announcements are applied in order: once "new" is heard, so is "old", written before it.)
                await asyncio.to_thread(eventually, lambda: core.fence is not None and core.fence.needed(
                    ref.id, ref.shard) >= _version(writer, "new"), "the reader heard of the write")
                assert await reader.get("old") == 2
                assert await reader.get_many(["old", "new"]) == {"old": 2, "new": "fresh"}
                assert core.fenced >= 3
                replicated.proxy.release()
                replicated.replica.stop()  # down: the master answers, nothing raises (fail_open=False)
                assert await reader.get("new") == "fresh"
                assert (await reader.get_metrics())["health"]["replicas"]["failures"] >= 1

        asyncio.run(run())


# ------------------------------------------------------------------------- the acceptance run, lagging


def write_increasing(url: str, namespace: str, cluster: bool, writes: int, start: Any, results: Any) -> None:
    """(A child process.) Write 0, 1, 2, ... to the keys in turn; report each write's version."""
    out: dict[str, Any] = {"pid": os.getpid()}
    try:
        with MultiLevelCache(url, namespace=namespace, fail_open=False, cluster=cluster, l1_size=len(KEYS)) as cache:
            start.wait(DEADLINE)
            versions = []
            for n in range(writes):
                key = KEYS[n % len(KEYS)]
                cache.put(key, n)
                versions.append((key, n, _version(cache, key)))
            out["versions"] = versions
    except BaseException:
        out["error"] = traceback.format_exc()
    results.put(out)


def _read_while_another_process_writes(reader: MultiLevelCache, url: str, writes: int
                                       ) -> tuple[list[tuple[str, int, Any]], dict[tuple[str, int], int]]:
    """Read random keys with ``reader`` while a child process writes ``writes`` values. Returns what was read,
    as (key, the version the reader knew of just before asking, value), and each written value's version."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    writer = ctx.Process(target=write_increasing, args=(url, reader.namespace, reader.config.cluster, writes, start,
                                                        results), daemon=True)
    writer.start()
    rng = random.Random(7)
    observed: list[tuple[str, int, Any]] = []
    core, fence = reader._core, reader._core.fence
    assert fence is not None
    start.set()
    while writer.is_alive() and results.empty():
        key = rng.choice(KEYS)
        ref = core.space.ref(key)
        knew = fence.needed(ref.id, ref.shard)
        observed.append((key, knew, reader.get(key)))
    out = results.get(timeout=DEADLINE)
    writer.join(timeout=10)
    assert "error" not in out, out.get("error")
    return observed, {(key, n): version for key, n, version in out["versions"]}


def _check_reads(observed: list[tuple[str, int, Any]], version_of: dict[tuple[str, int], int]) -> None:
    """No read older than a version known when it was asked; no key read going back in time."""
    last: dict[str, int] = {}
    for key, knew, value in observed:
        if value is None:
            assert knew == 0, f"{key!r} read as missing after version {knew} was known"
            continue
        assert version_of[key, value] >= knew, f"{key!r} read at {value}, older than version {knew} known"
        assert value >= last.get(key, -1), f"{key!r} went back in time: {value} after {last[key]}"
        last[key] = value


@pytest.mark.parametrize("replicated", ["standalone", "cluster"], indirect=True)
def test_no_read_is_older_than_a_version_seen_under_lag(replicated: Replicated, namespace: str) -> None:
    with _reader(replicated, namespace, l1_size=8) as reader:
        observed, version_of = _read_while_another_process_writes(reader, replicated.url, WRITES)
        state = reader.get_metrics()["health"]["replicas"]
    assert len(version_of) == WRITES
    _check_reads(observed, version_of)
    # The run did what it is for: many reads, served by the replica, and its lag was met and fenced off.
    assert len(observed) > 1000
    assert state["reads"] > 0
    assert replicated.hmgets() > 0
    assert replicated.proxy.replications >= 1  # the replica's stream came through the proxy, delayed
    assert state["fenced"] > 0


# ----------------------------------------------------------------------------------------- cluster


def _replica_hmgets(cluster_url: str) -> int:
    client = redis.RedisCluster.from_url(cluster_url)
    try:
        total = 0
        for node in client.get_replicas():
            stats = client.get_redis_connection(node).info("commandstats")
            total += int(stats.get("cmdstat_hmget", {}).get("calls", 0))
        return total
    finally:
        client.close()


def _replicas_listed(cluster_url: str) -> bool:
    """Does CLUSTER SLOTS list a replica for every master? (Redis lists one only once it replicated something.)"""
    client = redis.Redis.from_url(cluster_url)
    try:
        return all(len(entry) > 3 for entry in client.execute_command("CLUSTER", "SLOTS"))
    finally:
        client.close()


def test_cluster_reads_from_the_masters_replicas(cluster_url: str, namespace: str) -> None:
    with MultiLevelCache(cluster_url, namespace=namespace, cluster=True, fail_open=False) as first:
        first.put_many({key: -1 for key in KEYS})  # something for every master's replica to replicate
        initial = {(key, -1): _version(first, key) for key in KEYS}
    eventually(lambda: _replicas_listed(cluster_url), "the cluster lists its replicas")
    before = _replica_hmgets(cluster_url)
    with MultiLevelCache(cluster_url, namespace=namespace, fail_open=False, cluster=True, read_from_replicas=True,
                         l1_size=8) as reader:
        observed, written = _read_while_another_process_writes(reader, cluster_url, WRITES // 5)
        found = reader.get_many(KEYS)
        state = reader.get_metrics()["health"]["replicas"]
    version_of = {**initial, **written}
    _check_reads(observed, version_of)
    assert len(found) == len(KEYS)  # a get_many over every master's slots, through their replicas
    assert state["reads"] > 0
    assert _replica_hmgets(cluster_url) > before

    async def read_async() -> dict[str, Any]:
        async with AsyncMultiLevelCache(cluster_url, namespace=namespace, fail_open=False, cluster=True,
                                        read_from_replicas=True, l1_size=1) as reader:
            found = await reader.get_many(KEYS)
            assert (await reader.get_metrics())["health"]["replicas"]["reads"] > 0
            return found

    before = _replica_hmgets(cluster_url)
    found = asyncio.run(read_async())  # (a fresh reader has heard of nothing yet: any value written will do)
    assert all((key, value) in version_of for key, value in found.items())
    assert found.keys() == set(KEYS)
    assert _replica_hmgets(cluster_url) > before
