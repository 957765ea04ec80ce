"""Test helpers: a fake clock, a checker of the invariants (docs/design.md#invariants) against what Redis
holds, the slot guard, and per-server access that works the same on a standalone Redis and on a Redis Cluster."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MovedError

from victor_rcache.keys import KeySpace, ShardKeys, decode_tags
from victor_rcache.tiers import split_capacity

Client: TypeAlias = redis.Redis | RedisCluster
C = TypeVar("C")


@dataclass(frozen=True)
class Backend:
    """The Redis a test runs against: a standalone server or a cluster (see conftest.py)."""

    kind: str  # "standalone" or "cluster"
    url: str

    @property
    def cluster(self) -> bool:
        return self.kind == "cluster"

    def client(self) -> Client:
        """A plain redis-py client of the right kind, to look at what Redis actually holds."""
        if self.cluster:
            return RedisCluster.from_url(self.url)
        return redis.Redis.from_url(self.url)


class FakeClock:
    """A clock (seconds) that only moves when a test says so."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def ms(self) -> int:
        return int(self.now * 1000)


@dataclass
class ShardState:
    l2: dict[bytes, float]
    l3: dict[bytes, float]
    exp: dict[bytes, float]
    stats: dict[bytes, bytes]
    fence: dict[bytes, float]
    size: dict[bytes, bytes] = field(default_factory=dict)
    entries: dict[bytes, dict[bytes, bytes]] = field(default_factory=dict)


@dataclass
class NamespaceState:
    shards: list[ShardState]

    @property
    def l2_ids(self) -> set[bytes]:
        return {i for s in self.shards for i in s.l2}

    @property
    def l3_ids(self) -> set[bytes]:
        return {i for s in self.shards for i in s.l3}

    def tier_of(self, entry_id: bytes) -> int:
        return 2 if entry_id in self.l2_ids else 3 if entry_id in self.l3_ids else 0


def read_namespace(raw: Client, namespace: str, shards: int) -> NamespaceState:
    """Everything the namespace holds in Redis, shard by shard.

    Every key of a shard starts with ``<ns>:{<tag>}:``, so all of them (entry hashes included) hash to
    the tag's slot: the shard is read from the one server holding that slot (on a cluster, its master).
    """
    space = KeySpace(namespace, shards)
    out = []
    for sk in space.shard_keys:
        try:
            out.append(_read_shard(server_of(raw, sk.l2), sk))
        except (redis.ConnectionError, redis.TimeoutError, MovedError):
            if not isinstance(raw, RedisCluster):
                raise
            # The client's slot map is out of date (a failover or a resharding happened): refresh it.
            raw.nodes_manager.initialize()
            out.append(_read_shard(server_of(raw, sk.l2), sk))
    return NamespaceState(out)


def _read_shard(server: redis.Redis, sk: ShardKeys) -> ShardState:
    pipe = server.pipeline(transaction=False)
    for index in (sk.l2, sk.l3, sk.exp):
        pipe.zrange(index, 0, -1, withscores=True)
    pipe.hgetall(sk.stats)
    pipe.zrange(sk.fence, 0, -1, withscores=True)
    pipe.hgetall(sk.size)
    l2, l3, exp, stats, fence, size = pipe.execute()  # MOVED here if the slot has moved: nothing is missed
    state = ShardState(l2=dict(l2), l3=dict(l3), exp=dict(exp), stats=stats, fence=dict(fence), size=size)
    entry_prefix = sk.entry(b"")
    names = list(server.scan_iter(match=entry_prefix + b"*", count=1000))
    pipe = server.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    for name, data in zip(names, pipe.execute(), strict=True):
        if data:  # no hash is empty: an empty reply is a key Redis expired since the SCAN found it
            state.entries[name[len(entry_prefix):]] = data
    return state


def check_invariants(raw: Client, namespace: str, shards: int, l2_size: int, l3_size: int,
                     now_ms: int | None = None, idle: tuple[float | None, float | None] = (None, None)
                     ) -> NamespaceState:
    """Assert the tier invariants (docs/design.md#invariants, 1 and 2) and the byte accounting on Redis's
    actual contents. Call it after the caches' bookkeeping was sent (``flush_bookkeeping()``): hits
    reach the indexes in batches.

    ``now_ms`` (the caches' clock) lets an index entry whose deadline has come count as an allowed
    leftover: Redis expires an entry's data at its deadline (lua/includes/shard.lua, deadline()) and the
    index member stays until a script meets it. The deadline is the absolute expiry, or with ``idle``
    (the caches' ``l2_ttl`` and ``l3_ttl``, seconds) the end of the entry's idle time, whichever comes
    first. "Come" is to the millisecond Redis expires keys by: a deadline before ``now_ms + 1``. (With a
    test clock Redis expires the data in real time, as long after the touch as the deadline is, and a
    deadline less than a millisecond away after a whole one.) Without ``now_ms`` no leftover is allowed.
    """
    state = read_namespace(raw, namespace, shards)
    caps2, caps3 = split_capacity(l2_size, shards), split_capacity(l3_size, shards)
    idle2, idle3 = (None if t is None else max(1, round(t * 1000)) for t in idle)
    assert sum(len(s.l2) for s in state.shards) <= l2_size
    assert sum(len(s.l3) for s in state.shards) <= l3_size
    for i, s in enumerate(state.shards):
        where = f"{namespace} shard {i}"
        assert len(s.l2) <= caps2[i], f"{where}: L2 holds {len(s.l2)} > {caps2[i]}"
        assert len(s.l3) <= caps3[i], f"{where}: L3 holds {len(s.l3)} > {caps3[i]}"
        assert len(s.fence) <= max(caps2[i] + caps3[i], 1024), f"{where}: {len(s.fence)} fence records"
        both = set(s.l2) & set(s.l3)
        assert not both, f"{where}: in L2 and L3 at once: {both}"

        def expired(entry_id: bytes, s: ShardState = s) -> bool:
            if now_ms is None:
                return False
            deadlines = [s.exp[entry_id]] if entry_id in s.exp else []
            if entry_id in s.l2 and idle2 and idle3:  # idle in L2, then in L3 on its way out
                deadlines.append(s.l2[entry_id] + idle2 + idle3)
            elif entry_id in s.l3 and idle3:
                deadlines.append(s.l3[entry_id] + idle3)
            return bool(deadlines) and min(deadlines) < now_ms + 1

        indexed = set(s.l2) | set(s.l3)
        for entry_id in indexed:
            data = s.entries.get(entry_id)
            assert (data and b"v" in data) or expired(entry_id), f"{where}: index entry {entry_id!r} has no data"
            assert entry_id in s.size, f"{where}: index entry {entry_id!r} has no size record"
        assert set(s.size) == indexed, f"{where}: size records {set(s.size) - indexed} for no index entry"
        for entry_id, data in s.entries.items():
            tier = 2 if entry_id in s.l2 else 3 if entry_id in s.l3 else 0
            assert tier, f"{where}: data {entry_id!r} has no index entry"
            assert set(data) <= {b"v", b"ver", b"t", b"n", b"x", b"k", b"d", b"w", b"e", b"z"}, \
                f"{where}: fields {set(data)}"
            assert data.get(b"t") == str(tier).encode(), \
                f"{where}: {entry_id!r} in L{tier} says t={data.get(b't')} (fields {sorted(data)})"
            assert int(s.size[entry_id]) == len(data[b"v"]), f"{where}: size record of {entry_id!r} is off"
            if b"x" in data:  # the exp record is when it is removed: z (fail-safe), else x
                removal = float(data.get(b"z", data[b"x"]))
                assert s.exp.get(entry_id) == removal, f"{where}: exp index disagrees for {entry_id!r}"
        for entry_id in s.exp:
            assert entry_id in s.entries or expired(entry_id), f"{where}: exp entry {entry_id!r} without data"
        for tier_bytes, ids in ((b"l2_bytes", s.l2), (b"l3_bytes", s.l3)):
            held = sum(int(s.size[i]) for i in ids if i in s.size)
            assert int(s.stats.get(tier_bytes, 0)) == held, \
                f"{where}: {tier_bytes.decode()} says {s.stats.get(tier_bytes)}, the size records {held}"
        check_tags(raw, KeySpace(namespace, shards).shard_keys[i], indexed, where)
    return state


def check_tags(raw: Client, sk: ShardKeys, indexed: set[bytes], where: str) -> None:
    """Tag records follow their entries: the shard's ``tags`` hash and its tag sets name only indexed
    entries, and agree with each other."""
    records = {entry_id: set(decode_tags(encoded)) for entry_id, encoded in raw.hgetall(sk.tags).items()}  # type: ignore[union-attr]
    assert set(records) <= indexed, f"{where}: tag records of entries no index holds: {set(records) - indexed}"
    node, prefix = server_of(raw, sk.l2), sk.tag(b"")
    members: dict[bytes, set[bytes]] = {}
    for key in node.scan_iter(match=prefix + b"*", count=1000):
        for entry_id in node.smembers(key):
            members.setdefault(entry_id, set()).add(key[len(prefix):])
    assert members == records, f"{where}: tag sets {members} disagree with the entries' tag records {records}"


# ------------------------------------------------------------------ one server or every cluster node
#
# On a cluster, redis-py sends server commands (INFO, CONFIG RESETSTAT, CLIENT LIST/KILL, PUBSUB
# NUMSUB, TIME, ACL ...) to one default node, and SCRIPT FLUSH/EXISTS to the masters only. These
# helpers name the server(s) a test means. The clients they return belong to ``raw`` (closed with it).


def servers(raw: Client, replicas: bool = True) -> list[redis.Redis]:
    """The standalone server, or every node of the cluster (only the masters with ``replicas=False``)."""
    if isinstance(raw, RedisCluster):
        nodes = raw.get_nodes() if replicas else raw.get_primaries()
        return [raw.get_redis_connection(node) for node in sorted(nodes, key=lambda n: n.name)]
    return [raw]


def server_of(raw: Client, key: bytes | str) -> redis.Redis:
    """The server that holds ``key``: the standalone one, or the master serving its slot."""
    if isinstance(raw, RedisCluster):
        return raw.get_redis_connection(raw.get_node_from_key(key))
    return raw


def server_at(raw: Client, host: str, port: int) -> redis.Redis:
    """The server at ``host:port`` (a cluster node, or the standalone server itself)."""
    if isinstance(raw, RedisCluster):
        node = raw.get_node(host=host, port=port)
        assert node is not None, f"{host}:{port} is not a node of the cluster"
        return raw.get_redis_connection(node)
    return raw


def flush_scripts(raw: Client) -> None:
    """SCRIPT FLUSH on every server (replicas too: one may become a master)."""
    for server in servers(raw):
        server.script_flush()


def server_ms(raw: Client) -> int:
    """Redis's clock (TIME) in ms; on a cluster the earliest reading of the masters, so that a time
    this has passed has passed on whichever master runs a shard's scripts."""
    readings = []
    for server in servers(raw, replicas=False):
        seconds, micros = server.time()
        readings.append(int(seconds) * 1000 + int(micros) // 1000)
    return min(readings)


def subscribers(raw: Client, channel: bytes) -> int:
    """PUBSUB SHARDNUMSUB of the shard channel ``channel`` over every server (on a cluster only the
    master owning its slot should count any)."""
    total = 0
    for server in servers(raw):
        [(name, count)] = server.pubsub_shardnumsub(channel)
        assert name == channel
        total += int(count)
    return total


# ------------------------------------------------------------------------------------ slot guard


class SlotViolation(AssertionError):
    """A script call whose keys span more than one hash slot (Redis Cluster would refuse it)."""


def guard_slots(cache: C) -> C:
    """Check every EVALSHA/EVAL a cache (sync or async) sends: its KEYS must share one hash slot (the
    entry keys its scripts derive from KEYS[1] are in that slot by construction: test_lua_scripts).
    A script call that broke the rule fails here, in any test, on either backend."""
    send = cache._send  # type: ignore[attr-defined]

    def guarded(batch: list[Any], *more: Any, **named: Any) -> Any:
        for command in batch:
            if str(command[0]).upper() in ("EVALSHA", "EVAL"):
                keys = [k if isinstance(k, bytes) else str(k).encode() for k in command[3:3 + int(command[2])]]
                if len({key_slot(k) for k in keys}) > 1:
                    raise SlotViolation(f"script call spans slots: {keys!r}")
        # Whatever else the front end passes along (a plain read's packed form) goes through unchanged; for
        # the async front end this returns the coroutine its caller awaits.
        return send(batch, *more, **named)

    cache._send = guarded  # type: ignore[attr-defined]
    return cache


def held_value(cache: Any, key: str | bytes, missing: Any = None) -> Any:
    """The value of ``cache``'s live L1 copy of ``key``, or ``missing`` (not counted as a request)."""
    entry = cache._core.l1.get(cache._core.space.ref(key).id)
    return missing if entry is None else cache._core.envelope.unwrap(entry.payload)
