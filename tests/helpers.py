"""Test helpers: a fake clock and a checker of DESIGN.md §5 invariants against what Redis holds."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from victor_rcache.keys import KeySpace
from victor_rcache.tiers import split_capacity


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
    gone: dict[bytes, float]
    fence: dict[bytes, float]
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


def read_namespace(raw: redis.Redis, namespace: str, shards: int) -> NamespaceState:
    """Everything the namespace holds in Redis, shard by shard."""
    space = KeySpace(namespace, shards)
    out = []
    for sk in space.shard_keys:
        state = ShardState(
            l2=dict(raw.zrange(sk.l2, 0, -1, withscores=True)),
            l3=dict(raw.zrange(sk.l3, 0, -1, withscores=True)),
            exp=dict(raw.zrange(sk.exp, 0, -1, withscores=True)),
            stats=raw.hgetall(sk.stats),
            gone=dict(raw.zrange(sk.gone, 0, -1, withscores=True)),
            fence=dict(raw.zrange(sk.fence, 0, -1, withscores=True)),
        )
        entry_prefix = sk.entry(b"")
        for name in raw.scan_iter(match=entry_prefix + b"*", count=1000):
            state.entries[name[len(entry_prefix):]] = raw.hgetall(name)
        out.append(state)
    return NamespaceState(out)


def check_invariants(raw: redis.Redis, namespace: str, shards: int, l2_size: int, l3_size: int,
                     now_ms: int | None = None) -> NamespaceState:
    """Assert DESIGN.md §5 invariants 1 and 2 (and byte accounting) on Redis's actual contents.

    ``now_ms`` (the cache's clock) lets an index entry whose absolute ttl has passed count as an
    allowed "expired leftover"; without it no leftover is allowed.
    """
    state = read_namespace(raw, namespace, shards)
    caps2, caps3 = split_capacity(l2_size, shards), split_capacity(l3_size, shards)
    assert sum(len(s.l2) for s in state.shards) <= l2_size
    assert sum(len(s.l3) for s in state.shards) <= l3_size
    for i, s in enumerate(state.shards):
        where = f"{namespace} shard {i}"
        assert len(s.l2) <= caps2[i], f"{where}: L2 holds {len(s.l2)} > {caps2[i]}"
        assert len(s.l3) <= caps3[i], f"{where}: L3 holds {len(s.l3)} > {caps3[i]}"
        for records in (s.gone, s.fence):
            assert len(records) <= max(caps2[i] + caps3[i], 1024), f"{where}: {len(records)} gone/fence records"
        both = set(s.l2) & set(s.l3)
        assert not both, f"{where}: in L2 and L3 at once: {both}"

        def expired(entry_id: bytes, s: ShardState = s) -> bool:
            return now_ms is not None and entry_id in s.exp and s.exp[entry_id] <= now_ms

        for entry_id in set(s.l2) | set(s.l3):
            data = s.entries.get(entry_id)
            assert (data and b"v" in data) or expired(entry_id), f"{where}: index entry {entry_id!r} has no data"
        for entry_id, data in s.entries.items():
            assert entry_id in s.l2 or entry_id in s.l3, f"{where}: data {entry_id!r} has no index entry"
            fields = {b"v", b"s", b"n", b"ver", b"x", b"k", b"f", b"d"}
            assert set(data) <= fields, f"{where}: unexpected fields {set(data)}"
            assert int(data[b"s"]) == len(data[b"v"]), f"{where}: size field of {entry_id!r} is off"
            if b"x" in data:
                assert s.exp.get(entry_id) == float(data[b"x"]), f"{where}: exp index disagrees for {entry_id!r}"
        for entry_id in s.exp:
            assert entry_id in s.entries or expired(entry_id), f"{where}: exp entry {entry_id!r} without data"
        for tier, ids in ((b"l2_bytes", s.l2), (b"l3_bytes", s.l3)):
            held = sum(len(s.entries[i][b"v"]) for i in ids if i in s.entries)
            assert int(s.stats.get(tier, 0)) == held, f"{where}: {tier.decode()} says {s.stats.get(tier)}, holds {held}"
    return state
