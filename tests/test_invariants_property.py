"""Property-based test of invariants 1, 2, 4 and 5 (docs/design.md#invariants) against a real Redis.

A Hypothesis state machine drives three ``MultiLevelCache`` instances (standing in for worker
processes) that share one namespace and one ``FakeClock``, with tiny tiers so that promotion,
demotion, idle expiry, absolute expiry and eviction all happen within a few dozen steps. After
every step it checks, on what Redis actually holds and on what the caches report:

(a) ``check_invariants``: tier bounds, one tier per entry, data/index agreement, byte totals;
(b) every value a get returns is one the model allows (below), never another key's value;
(c) no value is served at or after its absolute ttl (invariant 4);
(d) hits + misses == gets per tier and combined, per cache and for the fleet, and the per-call
    hit/miss counts match what the calls returned; the fleet's movement counters equal the sum of
    the caches' own (invariant 5).

The oracle, i.e. which values a get may return. Every write stores a unique value
``{"key": k, "w": n}`` (``n`` numbers the writes), so a returned value names the write it came from.
Redis only ever holds the newest write of a key (or nothing), so a get by cache ``i`` of key ``k`` may
return:

* a miss, always: eviction, idle expiry and L1's LRU make misses legitimate at any time;
* the model's current value of ``k``, if it has not reached its absolute ttl;
* the value cache ``i``'s own L1 *may* still hold, until the copy's deadline. The model does not
  count on cross-process invalidation (its messages arrive asynchronously), so another cache's
  ``put``/``delete``/``invalidate`` may leave ``i``'s L1 copy; the copy lives until
  ``min(filled + l1_ttl, value's expiry)``. The model
  records per cache and key the one value its L1 may hold and the latest deadline it may have:
  set by the cache's own put (always filled), by a get served from Redis that may have filled L1
  (exact for ``get`` via the cache's own ``l1_fills``/``l1_hits`` counters, an over-approximation
  for ``get_many``), cleared by the cache's own delete/invalidate and by a miss (an L1 miss means
  the copy is gone). L1 LRU evictions are not modelled, which only makes the allowed set larger.
* the write another cache put without a ttl, if cache ``i``'s L1 may have held an older copy of ``k``:
  the announcement carries such a value, and a copy it finds is replaced in place (a fresh
  ``l1_ttl`` from then; applied within the step, as ``invalidations_received_are_applied`` does).

Two stricter checks: "reads see own writes" (right after a cache puts a key, its own get is an L1
hit with that value), and idle expiry (docs/design.md#ttl-meanings): a value nobody has touched in Redis
(put or Redis hit) for ``l2_ttl + l3_ttl`` is gone from L2 and L3 once a sweep has run on its shard
since, and L1 copies are younger than that, so it is never served after such a sweep (1 ms of slack for
the scripts' touch stamps, which run up to 0.001 ms per touch ahead of the clock). With a test clock a
sweep is what applies idle times (Redis's own expiry runs in real time): every put and delete sweeps its
shard at once, a read's bookkeeping when it is sent (touch.lua sweeps a shard once per second of the
scripts' clock; this clock only moves by whole minutes, so the first batch of a step sweeps, at that
step's time). Before any sweep a read of an idle entry may still hit: the documented lag, which the model
allows.

Bookkeeping: a Redis hit or miss is applied in Redis (LRU stamp, hit count, promotion, sweep, fleet
counters) when its cache's buffered bookkeeping is sent. Every invariant check sends every cache's first,
so each step's reads are applied at the clock of that step (the flusher thread may send some earlier,
within the step, at the same clock); which reads fill L1 then depends on when hit counts arrived, which
the model reads from the caches' own counters.

It runs in full (same examples, same steps) on both backends; on a cluster the caches' shards sit
on three masters and their invalidations travel over the cluster bus (see put_then_get_own_write).

All durations are fake-clock multiples of UNIT / 4 (exact in binary floating point), so "exactly at the
ttl" is exact. Redis expires an entry's data in real time, as long after the write or touch as the test
clock's deadline is (it cannot follow the test clock): UNIT is so long that no run lasts a quarter of it,
so Redis's own expiry never fires before the test clock reaches the deadline. Failures shrink; a failing
run can take minutes to shrink, hence the test's longer timeout (a passing run takes seconds).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from victor_rcache import MultiLevelCache
from victor_rcache.keys import KeySpace

from .helpers import Backend, Client, FakeClock, check_invariants, guard_slots

SHARDS, L1_SIZE, L2_SIZE, L3_SIZE, PROMOTE_AFTER = 2, 3, 4, 6, 2
UNIT = 256.0  # fake-clock seconds: the shortest time until a deadline is UNIT / 4, over a minute of real time
L1_TTL, L2_TTL, L3_TTL = 3.0 * UNIT, 5.0 * UNIT, 10.0 * UNIT
CACHES = 3
VALUE_TTLS = tuple(None if t is None else t * UNIT for t in (None, None, 1.0, 2.5, 4.0, 7.5))  # None = no ttl
ADVANCES = tuple(t * UNIT for t in (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 12.0))  # exact in binary floats
OFFSETS = tuple(t * UNIT for t in (0.0, 0.0, -0.25, 0.25))  # around a boundary
STAMP_SLACK = 0.001  # seconds
SETTINGS = settings(max_examples=100, stateful_step_count=40, deadline=None, database=None,
                    report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow])


def _keys_per_shard(per_shard: int) -> list[str]:
    """Keys spread evenly over the shards: more per shard than L2 + L3 hold, so L3 evicts."""
    space = KeySpace("x", SHARDS)
    chosen: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    n = 0
    while any(len(v) < per_shard for v in chosen.values()):
        key = f"k{n}"
        n += 1
        bucket = chosen[space.ref(key).shard]
        if len(bucket) < per_shard:
            bucket.append(key)
    return [k for s in range(SHARDS) for k in chosen[s]]


KEYS = _keys_per_shard(L2_SIZE // SHARDS + L3_SIZE // SHARDS + 1)
SHARD_OF = {key: KeySpace("x", SHARDS).ref(key).shard for key in KEYS}  # the shard is the key's, in any namespace
HOT_KEYS = KEYS[:: len(KEYS) // SHARDS]  # one per shard, drawn half the time: keys get reused and hit
MISS: Any = object()

cache_ids = st.integers(min_value=0, max_value=CACHES - 1)
keys = st.one_of(st.sampled_from(HOT_KEYS), st.sampled_from(KEYS))
value_ttls = st.sampled_from(VALUE_TTLS)


@dataclass(frozen=True)
class Write:
    key: str
    expiry: float | None  # absolute, fake-clock seconds


class CacheMachine(RuleBasedStateMachine):
    def __init__(self, backend: Backend, raw: Client) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.ns = "p" + uuid.uuid4().hex[:12]
        self.raw = raw  # the test's, shared by every example (a cluster client is costly to set up)
        self.caches = [
            guard_slots(MultiLevelCache(backend.url, namespace=self.ns, fail_open=False, clock=self.clock,
                                        shards=SHARDS, l1_size=L1_SIZE, l2_size=L2_SIZE, l3_size=L3_SIZE,
                                        promote_after=PROMOTE_AFTER, l1_ttl=L1_TTL, l2_ttl=L2_TTL, l3_ttl=L3_TTL,
                                        cluster=backend.cluster))
            for _ in range(CACHES)
        ]
        self.writes: list[Write] = []
        self.current: dict[str, int] = {}  # key -> index in self.writes of what Redis may hold
        self.l1_may_hold: list[dict[str, tuple[int, float]]] = [{} for _ in range(CACHES)]
        # What another cache's put may have turned that copy into: its announcement carries a value without
        # a ttl, and a cache holding an older copy replaces it (docs/coherence.md), when it applies it.
        self.l1_updated: list[dict[str, tuple[int, float]]] = [{} for _ in range(CACHES)]
        self.last_touch: dict[str, float] = {}  # key -> latest put or (possible) Redis hit
        # Moments something becomes due, from the rules alone (never from what a call returned, which
        # may depend on when a listener thread applied an invalidation): advance_to_a_boundary draws
        # from these, and Hypothesis requires the same steps to draw the same way.
        self.due_points: set[tuple[float, str]] = set()
        self.gets = [0] * CACHES
        self.hits = [0] * CACHES
        # Per shard, the latest clock time a sweep certainly ran at, and the shards whose sweep waits for
        # the bookkeeping of this step's reads (sent before the invariants are checked, at this clock).
        self.swept = [float("-inf")] * SHARDS
        self.sweeps_pending: set[int] = set()

    # ------------------------------------------------------------------ model

    def _write(self, key: str, ttl: float | None) -> dict[str, Any]:
        now = self.clock.now
        self.writes.append(Write(key, None if ttl is None else now + ttl))
        return {"key": key, "w": len(self.writes) - 1}

    def _swept_now(self, keys: Any) -> None:
        """A put or delete swept these keys' shards, at once."""
        for key in keys:
            self.swept[SHARD_OF[key]] = self.clock.now

    def _record_puts(self, i: int, values: dict[str, dict[str, Any]], ttl: float | None) -> None:
        now = self.clock.now
        life = L1_TTL if ttl is None else min(L1_TTL, ttl)
        self._swept_now(values)
        for key, value in values.items():
            self.current[key] = value["w"]
            self.last_touch[key] = now
            self.l1_may_hold[i][key] = (value["w"], now + life)
            self.l1_updated[i].pop(key, None)
            for other in range(CACHES):
                if ttl is None and other != i and (key in self.l1_may_hold[other] or key in self.l1_updated[other]):
                    self.l1_updated[other][key] = (value["w"], now + L1_TTL)  # (applied within the step)
            self.due_points |= {(now + life, key), (now + L2_TTL, key), (now + L2_TTL + L3_TTL, key)}
            if ttl is not None:
                self.due_points.add((now + ttl, key))

    def _fill_deadline(self, w: int) -> float:
        expiry = self.writes[w].expiry
        deadline = self.clock.now + L1_TTL
        return deadline if expiry is None else min(deadline, expiry)

    def _check_read(self, i: int, key: str, value: Any) -> int:
        """Assert a value cache ``i`` returned for ``key`` is allowed; return its write number."""
        assert isinstance(value, dict), f"cache {i} returned {value!r} for {key!r}"
        assert set(value) == {"key", "w"}, f"cache {i} returned {value!r} for {key!r}"
        assert value["key"] == key, f"cache {i} returned another key's value {value!r} for {key!r}"
        w = value["w"]
        assert 0 <= w < len(self.writes), f"cache {i} returned a value nobody wrote: {value!r}"
        now = self.clock.now
        expiry = self.writes[w].expiry
        assert expiry is None or now < expiry, (
            f"cache {i} served write {w} of {key!r} at t={now}, at or after its ttl ended at t={expiry}")
        idle_end = self.last_touch[key] + L2_TTL + L3_TTL + STAMP_SLACK
        swept = self.swept[SHARD_OF[key]]
        assert now < idle_end or swept < idle_end, (
            f"cache {i} served {key!r} at t={now}, untouched since t={self.last_touch[key]}: past l2_ttl + l3_ttl, "
            f"and its shard was swept at t={swept}")
        held = self._l1_copy(i, key, w)
        from_l1 = held is not None and now < held[1]
        assert w == self.current.get(key) or from_l1, (
            f"cache {i} served write {w} of {key!r}; allowed: current={self.current.get(key)}, its L1 copy={held}")
        return w

    def _l1_copy(self, i: int, key: str, w: int) -> tuple[int, float] | None:
        """The copy of write ``w`` of ``key`` cache ``i``'s L1 may hold, (w, deadline), or None."""
        for copies in (self.l1_may_hold[i], self.l1_updated[i]):
            held = copies.get(key)
            if held is not None and held[0] == w:
                return held
        return None

    def _forget(self, i: int, key: str) -> None:
        """Cache ``i``'s L1 holds no copy of ``key`` any more (a miss, a delete, a read not copied)."""
        self.l1_may_hold[i].pop(key, None)
        self.l1_updated[i].pop(key, None)

    def _counters(self, i: int) -> tuple[int, int, int]:
        m = self.caches[i].get_metrics()
        return m["l1"]["hits"], m["l1"]["promotions"], m["combined"]["gets"]

    # ------------------------------------------------------------------ rules

    @rule(i=cache_ids, key=keys, ttl=value_ttls)
    def put(self, i: int, key: str, ttl: float | None) -> None:
        value = self._write(key, ttl)
        self.caches[i].put(key, value, ttl=ttl)
        self._record_puts(i, {key: value}, ttl)

    @rule(i=cache_ids, chosen=st.lists(keys, min_size=1, max_size=5, unique=True), ttl=value_ttls)
    def put_many(self, i: int, chosen: list[str], ttl: float | None) -> None:
        values = {key: self._write(key, ttl) for key in chosen}
        self.caches[i].put_many(values, ttl=ttl)
        self._record_puts(i, values, ttl)

    @rule(i=cache_ids, key=keys, ttl=value_ttls)
    def put_then_get_own_write(self, i: int, key: str, ttl: float | None) -> None:
        """Reads see their own writes: the very next get is an L1 hit with the new value.

        Even when a shard flush from an earlier ``invalidate()`` arrives late (pub/sub is asynchronous;
        on a cluster it may cross the cluster bus): it carries the flush's version and drops only
        older copies, never this newer one.
        """
        value = self._write(key, ttl)
        self.caches[i].put(key, value, ttl=ttl)
        self._record_puts(i, {key: value}, ttl)
        l1_before = self._counters(i)[0]
        got = self.caches[i].get(key, MISS)
        self.gets[i] += 1
        assert got == value, f"cache {i} put {value!r} under {key!r} and then read {got!r}"
        self.hits[i] += 1
        self._check_read(i, key, got)
        assert self._counters(i)[0] == l1_before + 1, "a get right after a local put must be an L1 hit"

    @rule(i=cache_ids, key=keys)
    def get(self, i: int, key: str) -> None:
        self._get(i, key)

    def _settle(self) -> None:
        """Apply every invalidation that has reached each cache (the listener threads may not have run
        yet): L1's state, and so the model's draws, then depend on the steps only, not on thread timing
        (Hypothesis replays steps and insists that the same steps draw the same way)."""
        for cache in self.caches:
            catch_up = getattr(cache._core.coherence, "catch_up", None)
            if catch_up is not None:
                catch_up()

    def _get(self, i: int, key: str) -> None:
        self._settle()
        l1_hits, fills, gets = self._counters(i)
        got = self.caches[i].get(key, MISS)
        self.gets[i] += 1
        l1_hits_after, fills_after, gets_after = self._counters(i)
        assert gets_after == gets + 1
        if l1_hits_after == l1_hits:  # read from Redis: its bookkeeping sweeps the shard
            self.sweeps_pending.add(SHARD_OF[key])
        if got is MISS:
            assert (l1_hits_after, fills_after) == (l1_hits, fills), "a miss neither hit nor filled L1"
            self._forget(i, key)  # an L1 miss drops whatever copy there was
            return
        self.hits[i] += 1
        w = self._check_read(i, key, got)
        if l1_hits_after == l1_hits + 1:
            held = self._l1_copy(i, key, w)
            may = (self.l1_may_hold[i].get(key), self.l1_updated[i].get(key))
            assert held is not None, f"L1 hit on {key!r} served write {w}, the model says it may hold {may}"
            assert self.clock.now < held[1], f"L1 served {key!r} after its copy's deadline t={held[1]}"
            assert fills_after == fills
        elif fills_after == fills + 1:
            self._forget(i, key)
            self.l1_may_hold[i][key] = (w, self._fill_deadline(w))
            self.last_touch[key] = self.clock.now
        else:
            assert (l1_hits_after, fills_after) == (l1_hits, fills)
            self._forget(i, key)
            self.last_touch[key] = self.clock.now

    @rule(i=cache_ids, chosen=st.lists(keys, min_size=1, max_size=8))
    def get_many(self, i: int, chosen: list[str]) -> None:
        l1_hits, fills, gets = self._counters(i)
        got = self.caches[i].get_many(chosen)
        unique = list(dict.fromkeys(chosen))
        self.gets[i] += len(unique)
        l1_hits_after, fills_after, gets_after = self._counters(i)
        assert gets_after == gets + len(unique), "get_many counts one get per distinct key"
        assert set(got) <= set(unique), f"get_many returned keys nobody asked for: {set(got) - set(unique)}"
        self.hits[i] += len(got)
        assert l1_hits_after - l1_hits <= len(got)
        assert fills_after - fills <= len(got) - (l1_hits_after - l1_hits)
        for key in unique:
            if key not in got:
                self._forget(i, key)
                self.sweeps_pending.add(SHARD_OF[key])  # a miss was read from Redis
                continue
            w = self._check_read(i, key, got[key])
            held = self._l1_copy(i, key, w)
            if w != self.current.get(key):
                continue  # only L1 could have served an older write: its copy is unchanged
            self.last_touch[key] = self.clock.now  # maybe a Redis hit (an over-approximation)
            if fills_after == fills and l1_hits_after == l1_hits:
                self._forget(i, key)  # came from Redis and was not copied into L1
                continue
            # Served by L1, or by Redis and maybe copied into L1: the copy may live until the later deadline.
            deadline = self._fill_deadline(w)
            if held is not None:
                deadline = max(deadline, held[1])
            self._forget(i, key)
            self.l1_may_hold[i][key] = (w, deadline)

    @rule(i=cache_ids, readers=st.lists(cache_ids, min_size=1, max_size=4), key=keys)
    def get_from_several(self, i: int, readers: list[int], key: str) -> None:
        """Several caches read one key in turn: fleet-wide hit counts grow, so entries get promoted."""
        for reader in [i, *readers]:
            self._get(reader, key)

    @rule(i=cache_ids, key=keys, how=st.sampled_from(("delete", "delete", "delete", "invalidate_key",
                                                       "invalidate_key", "invalidate_all")))
    def remove(self, i: int, key: str, how: str) -> None:
        if how == "invalidate_all":
            self.caches[i].invalidate()
            self.current.clear()
            self.l1_may_hold[i].clear()
            self.l1_updated[i].clear()
            for sk in KeySpace(self.ns, SHARDS).shard_keys:
                assert self.raw.zcard(sk.l2) == self.raw.zcard(sk.l3) == self.raw.zcard(sk.exp) == 0
            return
        if how == "delete":
            existed = self.caches[i].delete(key)
            if existed:
                assert key in self.current or key in self.l1_may_hold[i] or key in self.l1_updated[i], \
                    f"delete({key!r}) found a key nobody wrote"
        else:
            self.caches[i].invalidate(key)
        self._swept_now([key])
        self.current.pop(key, None)
        self._forget(i, key)

    @rule(seconds=st.sampled_from(ADVANCES))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def _boundaries(self) -> list[tuple[float, str]]:
        """Moments something is due for a key, as its puts set them: its absolute expiry, the putting
        cache's L1 deadline, its idle move to L3 and its idle removal (Redis hits, which move the last
        two, depend on L1's state and are left out: see due_points)."""
        self.due_points = {p for p in self.due_points if p[0] > self.clock.now}
        return sorted(self.due_points)

    @precondition(lambda self: bool(self._boundaries()))
    @rule(data=st.data(), offset=st.sampled_from(OFFSETS), reader=st.none() | cache_ids)
    def advance_to_a_boundary(self, data: st.DataObject, offset: float, reader: int | None) -> None:
        """Move the clock exactly onto a moment something is due for a key (or a quarter UNIT either
        side), and maybe read that key right then."""
        target, key = data.draw(st.sampled_from(self._boundaries()))
        self.clock.now = max(self.clock.now, target + offset)
        if reader is not None:
            self._get(reader, key)

    # ------------------------------------------------------------- invariants

    def _flush(self) -> None:
        """Send every cache's buffered bookkeeping (at this step's clock): Redis then reflects every read."""
        for cache in self.caches:
            cache.flush_bookkeeping()
        for shard in self.sweeps_pending:
            self.swept[shard] = self.clock.now
        self.sweeps_pending.clear()

    @invariant()
    def invalidations_received_are_applied(self) -> None:
        self._settle()

    @invariant()
    def redis_holds_a_consistent_namespace(self) -> None:
        self._flush()
        check_invariants(self.raw, self.ns, SHARDS, L2_SIZE, L3_SIZE, now_ms=self.clock.ms, idle=(L2_TTL, L3_TTL))

    @invariant()
    def counters_add_up(self) -> None:
        self._flush()  # the fleet's counters in Redis include every cache's reads
        processes = [cache.get_metrics() for cache in self.caches]
        for i, m in enumerate(processes):
            c = m["combined"]
            assert c["gets"] == self.gets[i], f"cache {i} counted {c['gets']} gets, made {self.gets[i]}"
            assert m["l1"]["hits"] + m["l1"]["misses"] == self.gets[i]
            assert m["l2"]["hits"] + m["l2"]["misses"] == m["l1"]["misses"]
            assert m["l3"]["hits"] + m["l3"]["misses"] == m["l2"]["misses"]
            assert c["total_hits"] == m["l1"]["hits"] + m["l2"]["hits"] + m["l3"]["hits"] == self.hits[i]
            assert c["total_misses"] == m["l3"]["misses"] == self.gets[i] - self.hits[i]
        fleet = self.caches[-1].get_metrics("fleet")
        f, c = fleet, fleet["combined"]
        dropped = [cache.get_metrics()["health"]["bookkeeping"]["dropped_batches"] for cache in self.caches]
        assert c["gets"] == sum(self.gets), (
            f"fleet counted {c['gets']} gets, the caches made {sum(self.gets)} (batches dropped: {dropped})")
        assert c["total_hits"] + c["total_misses"] == c["gets"]
        assert c["total_hits"] == sum(self.hits)
        assert f["l2"]["hits"] + f["l2"]["misses"] == f["l1"]["misses"]
        assert f["l3"]["hits"] + f["l3"]["misses"] == f["l2"]["misses"]
        for tier, field in (("l1", "hits"), ("l2", "hits"), ("l3", "hits"), ("l3", "misses"),
                            ("l1", "evictions"), ("l2", "promotions"), ("l2", "demotions"), ("l3", "evictions")):
            total = sum(m[tier][field] for m in processes)
            assert f[tier][field] == total, f"fleet {tier} {field} = {f[tier][field]}, the caches' sum = {total}"
        for field in ("total_expirations", "puts"):
            total = sum(m["combined"][field] for m in processes)
            assert c[field] == total, f"fleet {field} = {c[field]}, the caches' sum = {total}"

    def teardown(self) -> None:
        for cache in self.caches:
            cache.close()
        names = list(self.raw.scan_iter(match=self.ns + ":*", count=1000))
        if names:
            self.raw.delete(*names)


@pytest.mark.timeout(900)  # passing takes seconds; a failure may shrink for minutes
def test_invariants_hold_under_random_operations(backend: Backend, raw: Client) -> None:
    run_state_machine_as_test(lambda: CacheMachine(backend, raw), settings=SETTINGS)
