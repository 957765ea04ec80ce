"""Reads from replicas (``read_from_replicas=True``), made safe by a version fence.

A plain read of a hit (an ``HMGET`` of the entry, no script) may be served by a replica: a standalone
master's replicas (``replica_urls``) or, on a cluster, the replicas of the master that owns the
entry's slot (connections in ``READONLY`` mode). Everything that writes, and everything that decides
(scripts: puts, deletes, leases, the bookkeeping flushes), goes to the masters.

A replica lags its master. The **version fence** keeps that lag from ever showing: this process never
serves a version older than one it has seen announced (an invalidation), written itself, or read on a
master. It is made of three facts:

* every version comes from the shard's counter (``seq`` in the shard's ``stats`` hash, raised by the
  script that writes, in the same atomic step as the write), so a replica whose ``seq`` is at least
  ``v`` has applied every write of that shard up to version ``v``;
* a replica read asks the shard's ``seq`` *before* the entries (one round trip: ``HGET`` then the
  ``HMGET`` s), so what it answers about the entries is at least as new as that ``seq``;
* :class:`VersionFence` remembers, per entry, the highest version this process knows of.

A reply is trusted when the replica has applied that version (``seq >= needed``), or, for a hit, when the
entry it holds is at least that new (``ver >= needed``). Anything else is read again on the master in one
more round trip (counted ``fenced``). A miss is trusted by the first rule only: a replica that has not
applied a write this process knows of cannot tell a missing entry from one it has not received yet.

**The bound.** The fence remembers at most ``capacity`` entries (``FENCE_ENTRIES``, 65,536 by default:
a few MiB at most). When it is full, the entry recorded longest ago is forgotten, and its version raises
its shard's **floor**: every later read of that shard needs ``seq >=`` the floor, or a hit at least that
new. Because the forgotten entries are the oldest ones, replicas have almost always applied them
already, so forgetting costs nothing but in the rare case where more than ``capacity`` writes happen
within one replication lag. An entry stored under a hashed id (keys over 1 KiB or starting with ``#``)
has no shard that can be told from its id: when one of those is forgotten, its version raises the
floor of every *hashed* entry instead. A flush of a shard (``invalidate()``) raises the shard's floor
to the flush's version.

A replica that fails (down, timing out, refusing) never fails a call: the read goes to the master, and
a breaker per replica keeps it off limits for ``breaker_cooldown`` after ``breaker_threshold``
failures in a row.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from . import forksafe
from .config import CacheConfig, redact
from .connection import (
    IO_ERRORS,
    _checked,
    acquire_sync_client,
    as_redis_error,
    async_client,
    release_sync_client,
    send_packed,
    send_packed_async,
)
from .resilience import CircuitBreaker, CircuitOpenError
from .scripts import Command, pack

SLOT_MAP_AGE = 5.0  # seconds: a slot map that showed a master without replicas is read again after this long
log = logging.getLogger("victor_rcache")

FENCE_ENTRIES = 65_536  # entries the fence remembers exactly; see the module docstring for what happens beyond
HASHED = b"#"  # the first byte of a hashed entry id (keys.py)


class VersionFence:
    """The highest version this process knows of, per entry (bounded), and per-shard floors.

    Thread-safe: the invalidation listener's thread records what it hears, callers record their own writes
    and master reads, and readers ask :meth:`needed` without taking the lock (one dict lookup and one list
    index, each atomic under the GIL: a record racing a lookup is as if it came just after it)."""

    def __init__(self, shards: int, capacity: int = FENCE_ENTRIES) -> None:
        self.shards = shards
        self.capacity = capacity
        self._seen: OrderedDict[bytes, tuple[int, int]] = OrderedDict()  # id -> (version, shard or -1)
        self._floors = [0] * shards  # per shard: flushes, and the versions of entries forgotten
        self._hashed_floor = 0  # versions of forgotten hashed entries whose shard was not known
        self.forgotten = 0  # entries forgotten to stay within capacity
        self._lock = threading.Lock()
        forksafe.register(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # (what the parent saw stays true: versions only grow)

    def _shard_of(self, entry_id: bytes) -> int:
        """The shard of an entry id, when the id tells it (a hashed id does not: -1)."""
        return -1 if entry_id.startswith(HASHED) else zlib.crc32(entry_id) % self.shards

    def saw(self, entry_id: bytes, version: int, shard: int = -1) -> None:
        """This process learnt that ``entry_id`` has ``version`` (announced, written or read on a master)."""
        if shard < 0:
            shard = self._shard_of(entry_id)
        with self._lock:
            known = self._seen.get(entry_id)
            if known is not None and known[0] >= version:
                return
            self._seen[entry_id] = (version, shard if shard >= 0 else (known[1] if known else -1))
            self._seen.move_to_end(entry_id)
            while len(self._seen) > self.capacity:
                _, (old, old_shard) = self._seen.popitem(last=False)
                self.forgotten += 1
                if old_shard >= 0:
                    self._floors[old_shard] = max(self._floors[old_shard], old)
                else:
                    self._hashed_floor = max(self._hashed_floor, old)

    def flushed(self, shard: int, version: int) -> None:
        """Shard ``shard`` was flushed at ``version``: every entry of it needs that version at least."""
        if 0 <= shard < self.shards:
            with self._lock:
                self._floors[shard] = max(self._floors[shard], version)

    def needed(self, entry_id: bytes, shard: int) -> int:
        """The version a replica must have applied (or the entry must have) for a read of it to be trusted."""
        known = self._seen.get(entry_id)
        need = self._floors[shard]
        if known is not None and known[0] > need:
            need = known[0]
        if self._hashed_floor > need and entry_id.startswith(HASHED):
            need = self._hashed_floor
        return need

    def trusts(self, entry_id: bytes, shard: int, applied: int, version: int | None) -> bool:
        """May a replica's answer be served? ``applied``: the shard's ``seq`` the replica answered first;
        ``version``: the entry's version it answered (None: a miss)."""
        need = self.needed(entry_id, shard)
        return need <= applied or (version is not None and version >= need)

    def __len__(self) -> int:
        return len(self._seen)


class ReplicaReads(list[Command]):
    """A batch of plain reads for a replica: per shard, ``HGET <stats> seq`` and then the shard's HMGETs.
    ``groups``: (start, end) of each shard's commands; ``packed``: each command packed (standalone)."""

    groups: list[tuple[int, int]]
    packed: list[bytes]


class _Routing:
    """What the sync and async readers share: the replicas' breakers and counters, the turn, and which node
    of a cluster answers which commands of a batch. The readers only do the I/O."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.urls = list(config.replica_urls)
        self._turn = itertools.count()
        self._refresh = False  # re-read the cluster's slot map before the next batch
        self._map_read_at = 0.0  # when the cluster's slot map was last read (time.monotonic())
        names = [redact(url) for url in self.urls] or [f"replicas of {redact(config.url)}"]
        self.breakers = [CircuitBreaker(config.breaker_threshold, config.breaker_cooldown, name=name,
                                        namespace=config.namespace) for name in names]
        self.reads = 0  # batches a replica answered
        self.failures = 0  # batches a replica failed (the master answered them)
        self.closed = False

    def _pick(self) -> int | None:
        """The next replica whose breaker lets it be asked (a cluster's replicas share breaker 0), or None."""
        n = len(self.breakers)
        first = next(self._turn)
        for i in ((first + k) % n for k in range(n)):
            if self.breakers[i].allow():
                return i
        return None

    def _settle(self, i: int, outcome: list[Any] | BaseException) -> list[Any] | RedisError:
        """Tell breaker ``i`` how a try went; the replies, or the failure as a RedisError."""
        breaker = self.breakers[i]
        if isinstance(outcome, list):
            breaker.success()
            self.reads += 1
            return outcome
        if isinstance(outcome, Exception):  # whatever went wrong with a replica, the master answers instead
            breaker.failure()
            self.failures += 1
            self._refresh = True
            if not isinstance(outcome, IO_ERRORS):
                log.warning("reading replica %s failed unexpectedly (%s: %s); reading the master instead",
                            breaker.name, type(outcome).__name__, outcome,
                            extra={"event": "replica_failed", "namespace": self.config.namespace,
                                   "redis_url": breaker.name, "error": str(outcome)})
            return as_redis_error(outcome)
        breaker.abandon()  # interrupted (cancelled, KeyboardInterrupt): no verdict on the replica
        raise outcome

    def _settings(self, url: str) -> CacheConfig:
        """The cache's connection settings for one replica's URL."""
        return replace(self.config, redis_url=url, read_from_replicas=False, replica_urls=(), cluster=False)

    def _plan(self, batch: ReplicaReads, slots_cache: dict[int, list[Any]],
              keyslot: Callable[[bytes], int]) -> list[tuple[Any, list[int]]]:
        """For a cluster: each node to ask and the indexes of ``batch`` it answers. A shard's commands all go
        to one replica of its slot's master (the fence compares its ``seq`` with its entries)."""
        turn = next(self._turn)
        plans: dict[str, tuple[Any, list[int]]] = {}
        for start, end in batch.groups:
            nodes = slots_cache.get(keyslot(batch[start][1]))
            if not nodes:
                raise RedisClusterException(f"no node of the cluster serves the slot of {batch[start][1]!r}")
            replicas = nodes[1:] or nodes  # a master without replicas answers for its own slots
            if len(nodes) < 2 and time.monotonic() - self._map_read_at > SLOT_MAP_AGE:
                # Redis lists a replica in CLUSTER SLOTS only once it has replicated something, and a replica
                # may have been added since: look again now and then.
                self._refresh = True
            node = replicas[turn % len(replicas)]
            plans.setdefault(node.name, (node, []))[1].extend(range(start, end))
        return list(plans.values())

    def _map_due(self) -> bool:
        """Is the slot map to be read again before this batch (a replica failed, or none was listed)?"""
        if not self._refresh:
            return False
        self._refresh, self._map_read_at = False, time.monotonic()
        return True

    def snapshot(self) -> dict[str, Any]:
        return {"reads": self.reads, "failures": self.failures,
                "breakers": {b.name: b.snapshot()["state"] for b in self.breakers}}


class ReplicaReader(_Routing):
    """Sends :class:`ReplicaReads` to a replica (sync I/O), never raising for a replica's failure: the
    core then reads the master. Standalone: the ``replica_urls`` in turn, each behind its own breaker.
    Cluster: a client in ``READONLY`` mode, and for each shard of a batch one replica of the slot's master."""

    def __init__(self, config: CacheConfig) -> None:
        super().__init__(config)
        self._clients: list[redis.Redis | None] = [None] * len(self.urls)
        self._cluster: RedisCluster | None = None
        self._lock = threading.Lock()
        forksafe.register(self)

    def _after_fork(self) -> None:
        # The parent's connections must not be shared: the child makes its own on its first read.
        self._lock = threading.Lock()
        self._clients = [None] * len(self.urls)
        self._cluster = None

    def send(self, batch: ReplicaReads) -> list[Any] | RedisError:
        """One round trip to one replica (per node, on a cluster): the replies, or the RedisError that stopped
        it (an open breaker included: no I/O then)."""
        i = self._pick()
        if i is None:
            return CircuitOpenError("the circuit breaker of every replica is open; reading the master meanwhile")
        try:
            replies = self._send_cluster(batch) if self.config.cluster else send_packed(self._client(i), batch.packed)
        except BaseException as exc:  # told to the breaker; only an interruption is raised again
            return self._settle(i, exc)
        return self._settle(i, replies)

    def _client(self, i: int) -> redis.Redis:
        client = self._clients[i]
        if client is None:
            with self._lock:
                client = self._clients[i]
                if client is None:  # the process's client of that server, shared as the masters' are
                    client = self._clients[i] = cast(redis.Redis, acquire_sync_client(self._settings(self.urls[i])))
        return client

    def _cluster_client(self) -> Any:  # (redis-py's cluster client is untyped)
        client = self._cluster
        if client is None:
            with self._lock:
                client = self._cluster
                if client is None:
                    client = self._cluster = _checked(RedisCluster.from_url, self.config, Retry(NoBackoff(), 0),
                                                      **_readonly_options())
                    self._refresh, self._map_read_at = False, time.monotonic()
        elif self._map_due():  # the cluster may have moved on (failover, slots moved, replicas added)
            client.nodes_manager.initialize()
        return client

    def _send_cluster(self, batch: ReplicaReads) -> list[Any]:
        client = self._cluster_client()
        replies: list[Any] = [None] * len(batch)
        for node, indexes in self._plan(batch, client.nodes_manager.slots_cache, client.keyslot):
            pipe: Any = client.get_redis_connection(node).pipeline(transaction=False)
            for i in indexes:
                pipe.execute_command(*batch[i])
            for i, reply in zip(indexes, pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        return replies

    def close(self) -> None:
        self.closed = True
        shared, cluster = self._clients, self._cluster
        self._clients = [None] * len(self.urls)
        self._cluster = None
        for url, client in zip(self.urls, shared, strict=True):
            if client is not None:
                release_sync_client(self._settings(url), client)
        if cluster is not None:
            cluster.close()


READONLY = pack(("READONLY",))


class AsyncReplicaReader(_Routing):
    """:class:`ReplicaReader` for the asyncio front end. Each event loop gets clients of its own (a client's
    connections belong to the loop that made them). On a cluster, a client of the cluster reads the slot map,
    and each replica is read through a plain client of its own, the batch preceded by ``READONLY`` in the
    same write (a replica answers reads of its master's slots only on a connection in that mode)."""

    def __init__(self, config: CacheConfig) -> None:
        super().__init__(config)
        self._loops: dict[asyncio.AbstractEventLoop, dict[str, Any]] = {}  # loop -> client name -> client

    def _clients(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        clients = self._loops.get(loop)
        if clients is None:
            self._loops = {lp: c for lp, c in self._loops.items() if not lp.is_closed()}  # (ended loops' go)
            clients = self._loops[loop] = {}
        return clients

    async def send(self, batch: ReplicaReads) -> list[Any] | RedisError:
        """:meth:`ReplicaReader.send`, awaited."""
        i = self._pick()
        if i is None:
            return CircuitOpenError("the circuit breaker of every replica is open; reading the master meanwhile")
        try:
            if self.config.cluster:
                replies = await self._send_cluster(batch)
            else:
                replies = await send_packed_async(self._client(self.urls[i]), batch.packed)
        except BaseException as exc:  # told to the breaker; only an interruption is raised again
            return self._settle(i, exc)
        return self._settle(i, replies)

    def _client(self, url: str) -> Any:
        clients = self._clients()
        client = clients.get(url)
        if client is None:
            client = clients[url] = async_client(self._settings(url))
        return client

    async def _send_cluster(self, batch: ReplicaReads) -> list[Any]:
        clients = self._clients()
        cluster: Any = clients.get("")  # (the cluster client, under "": no URL is empty)
        if cluster is None:
            cluster = clients[""] = async_client(replace(self.config, read_from_replicas=False))
            await cluster.initialize()
            self._refresh, self._map_read_at = False, time.monotonic()
        elif self._map_due():
            await cluster.nodes_manager.initialize()
        plan = self._plan(batch, cluster.nodes_manager.slots_cache, cluster.keyslot)
        answers = await asyncio.gather(*(
            send_packed_async(self._client(_node_url(self.config.url, node.host, node.port)),
                              [READONLY, *(batch.packed[i] for i in indexes)])
            for node, indexes in plan))
        replies: list[Any] = [None] * len(batch)
        for (_, indexes), answer in zip(plan, answers, strict=True):
            if isinstance(answer[0], Exception):  # READONLY refused: not a node that serves reads
                raise as_redis_error(answer[0])
            for i, reply in zip(indexes, answer[1:], strict=True):
                replies[i] = reply
        return replies

    async def close(self) -> None:
        """Close the running loop's clients (an ended loop took its connections with it)."""
        self.closed = True
        clients = self._loops.pop(asyncio.get_running_loop(), {})
        self._loops = {}
        for client in clients.values():
            await client.aclose()


def _node_url(url: str, host: str, port: int) -> str:
    """``url`` (its scheme, user, password and database) pointed at another node."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}:{port}" if auth else f"{host}:{port}"))


def _readonly_options() -> dict[str, Any]:
    """A cluster client whose node connections are in READONLY mode (so replicas answer reads of their
    master's slots). redis-py >= 5.1 says so with a replicas-only load balancing strategy (it deprecates
    ``read_from_replicas``); older releases with ``read_from_replicas``. Nodes are picked here, not by it."""
    strategies = getattr(redis.cluster, "LoadBalancingStrategy", None)
    if strategies is None:
        return {"read_from_replicas": True}
    return {"load_balancing_strategy": strategies.ROUND_ROBIN_REPLICAS}
