"""Sharded invalidation on a Redis Cluster (docs/coherence.md, docs/cluster.md): every write's message
goes to the master owning the shard's slot (SPUBLISH on ``<ns>:{<tag>}:inval``), and every process
subscribes each shard's channel there (SSUBSCRIBE), following the cluster when a slot moves or a master
fails over.

Three worker processes ("spawn" children, tests/workers.py) share a namespace on a private cluster
(3 masters with a replica each): one writes, two hold L1 copies (``promote_after=1``, an ``l1_ttl``
far beyond every deadline here, so a copy only goes away when an invalidation is heard). Each step
holds a copy in both readers, checks it is served from L1, writes, and polls until both readers serve
the new value: a reader that did not hear the write would serve its copy until the deadline. That is
done first as is, then after the shard's slot moved to another master, then after that master was
killed and its replica took over. Before and after, only the owner of the shard's slot (and its
replica, by replication) counts the shard channel's subscribers and receives the shard's messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from victor_rcache.keys import KeySpace
from victor_rcache.local_redis import LocalRedisCluster

from .workers import Worker, eventually

SETTINGS: dict[str, Any] = {"cluster": True, "promote_after": 1, "l1_ttl": 600.0, "fail_open": True,
                            "socket_timeout": 0.5, "connect_timeout": 0.5}
KEY = "the key"
DEADLINE = 20.0  # seconds a fleet promise may take here (a failover takes about 2 s of them)


@pytest.fixture
def cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(masters=3, replicas=1) as private:
        yield private


def node(port: int) -> redis.Redis:
    return redis.Redis(port=port)


def info(port: int) -> dict[str, Any]:
    with node(port) as client:
        return _parse(client.execute_command("CLUSTER", "INFO"))


def _parse(raw: bytes | str) -> dict[str, Any]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return {k: v for k, _, v in (line.strip().partition(":") for line in text.splitlines()) if k}


def node_id(port: int) -> str:
    with node(port) as client:
        return str(client.execute_command("CLUSTER", "MYID").decode())


def owner_of(cluster: LocalRedisCluster, channel: bytes) -> int:
    """The port of the master that owns ``channel``'s slot, as the masters themselves say."""
    slot = redis.crc.key_slot(channel)
    for port in cluster.master_ports():  # (the URL's node may be the one a test killed)
        with node(port) as client:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
    raise AssertionError(f"no master owns slot {slot}")


def move_slot(cluster: LocalRedisCluster, slot: int, source: int, target: int) -> None:
    """Migrate one slot, keys and all, the way ``redis-cli --cluster reshard`` does it for each slot."""
    source_id, target_id = node_id(source), node_id(target)
    with node(source) as src, node(target) as dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    for port in cluster.master_ports():
        if port not in (source, target):
            with node(port) as other:
                other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    cluster.wait_until_ok(timeout=30)


def shard_subscribers(cluster: LocalRedisCluster, channel: bytes) -> dict[int, int]:
    """PUBSUB SHARDNUMSUB of ``channel`` on every master."""
    out = {}
    for port in cluster.master_ports():
        with node(port) as client:
            [(_, count)] = client.pubsub_shardnumsub(channel)
            out[port] = int(count)
    return out


def bus_messages(cluster: LocalRedisCluster) -> dict[int, int]:
    """Pub/sub messages each live node has received over the cluster bus (classic and sharded)."""
    out = {}
    for server in cluster.nodes:
        try:
            stats = info(server.port)
        except redis.ConnectionError:  # a node the test killed
            continue
        out[server.port] = sum(int(stats.get(f"cluster_stats_messages_{kind}_received", 0))
                               for kind in ("publish", "publishshard"))
    return out


def replica_of(master: int) -> int:
    """The port of ``master``'s replica, as the master says (redis-py parses INFO: ``slave0`` is a dict)."""
    with node(master) as client:
        replication = client.info("replication")
    assert replication.get("connected_slaves") == 1, f"master {master} has no single replica: {replication}"
    return int(replication["slave0"]["port"])


def held_and_refreshed(writer: Worker, readers: list[Worker], value: str, new: str) -> None:
    """Both readers hold ``value`` in L1 (a second get is an L1 hit); the writer writes ``new``; both
    readers serve ``new`` before the deadline (an L1 copy nobody invalidated would outlive it)."""
    writer.put(KEY, value)
    for reader in readers:
        eventually(lambda r=reader: r.health()["coherence"]["channel"] == "up", "the reader's channels up", DEADLINE)
        eventually(lambda r=reader: r.get(KEY) == value, "the reader reading the value", DEADLINE)
        hits = reader.health()["l1"]["hits"]
        assert reader.get(KEY) == value
        assert reader.health()["l1"]["hits"] == hits + 1, "the reader does not serve its copy from L1"
    writer.put(KEY, new)
    for reader in readers:
        eventually(lambda r=reader: r.get(KEY) == new, f"the reader hearing the write of {new!r}", DEADLINE)


def test_every_process_hears_a_shards_writes_after_a_slot_move_and_a_failover(cluster: LocalRedisCluster) -> None:
    namespace = "sh" + uuid.uuid4().hex[:8]
    space = KeySpace(namespace, 16)
    channel = space.channels[space.ref(KEY).shard]
    slot = redis.crc.key_slot(channel)
    assert slot == redis.crc.key_slot(space.shard_keys[space.ref(KEY).shard].l2), "the channel is in the shard's slot"
    with Worker(cluster.url, namespace, **SETTINGS) as writer, Worker(cluster.url, namespace, **SETTINGS) as a, \
            Worker(cluster.url, namespace, **SETTINGS) as b:
        readers = [a, b]
        owner = owner_of(cluster, channel)

        # As built: the three processes subscribe the channel on its owner, and nowhere else.
        held_and_refreshed(writer, readers, "v1", "v2")
        assert shard_subscribers(cluster, channel) == {p: (3 if p == owner else 0) for p in cluster.master_ports()}
        # A write's message travels the bus only to the owner's replica, not to the other nodes. The bus
        # is asynchronous: the replica's copy may arrive after the readers heard the write, so wait for
        # it (the bus did carry the message), then look at who else got one.
        replica = replica_of(owner)
        before = bus_messages(cluster)
        writer.put(KEY, "v2b")
        for reader in readers:
            eventually(lambda r=reader: r.get(KEY) == "v2b", "the reader hearing v2b", DEADLINE)
        eventually(lambda: bus_messages(cluster)[replica] > before[replica], "the owner's replica receiving "
                   "the write's message over the bus", DEADLINE)
        after = bus_messages(cluster)
        grew = {port for port in after if after[port] > before[port]}
        assert grew == {replica}, f"nodes other than the owner's replica received it: {grew - {replica}}"

        # The shard's slot moves to another master: every process subscribes there, and hears again.
        target = next(p for p in cluster.master_ports() if p != owner)
        move_slot(cluster, slot, owner, target)
        assert owner_of(cluster, channel) == target
        eventually(lambda: shard_subscribers(cluster, channel).get(target) == 3, "the processes subscribing on the "
                   "new owner", DEADLINE)
        held_and_refreshed(writer, readers, "v3", "v4")
        assert shard_subscribers(cluster, channel) == {p: (3 if p == target else 0) for p in cluster.master_ports()}

        # The new owner is killed; its replica takes over: every process subscribes there, and hears again.
        victim = next(server for server in cluster.nodes if server.port == target)
        victim.kill()
        cluster.wait_until_ok(timeout=30)  # (until the survivors agree, with the victim serving nothing)
        promoted = owner_of(cluster, channel)
        assert promoted != target
        eventually(lambda: shard_subscribers(cluster, channel).get(promoted) == 3,
                   "the processes subscribing on the promoted replica", DEADLINE)
        held_and_refreshed(writer, readers, "v5", "v6")
        for worker in (writer, a, b):
            assert worker.call("logs") is not None  # (the workers answered throughout)
