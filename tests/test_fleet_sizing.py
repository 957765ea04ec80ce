"""Fleet-wide L2/L3 sizing (adaptive_redis, docs/adaptive-sizing.md): the scripts' evidence, the lease, the decisions.

Fake clocks throughout (shared between processes through a multiprocessing.Value): no test sleeps
for an interval.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import MultiLevelCache
from victor_rcache.keys import KeySpace

from .helpers import Backend, Client, FakeClock, check_invariants, server_of

Make = Callable[..., MultiLevelCache]
INTERVAL = 10.0


def stats(raw: Client, namespace: str) -> dict[str, int]:
    space = KeySpace(namespace, 1)
    key = space.shard_keys[0].stats
    return {k.decode(): int(float(v)) for k, v in server_of(raw, key).hgetall(key).items()
            if k.decode() in ("ghost_hits", "tail_hits", "evictions")}


def test_the_scripts_count_misses_on_recent_evictions_and_hits_on_the_least_recent_entries(
        make_cache: Make, raw: Client, namespace: str, clock: FakeClock) -> None:
    cache = make_cache(shards=1, l2_size=1, l3_size=10, promote_after=10**6, clock=clock, coherence=False)
    for i in range(12):  # L2 holds 1, L3 10: k0 is evicted, and remembered (the step is 1 entry)
        cache.put(f"k{i}", i)
        clock.advance(0.01)
    space = KeySpace(namespace, 1)
    ghost = space.shard_keys[0].ghost
    assert server_of(raw, ghost).zrange(ghost, 0, -1) == [b"k0"]
    # The evidence is gathered from the reads of workers that size the fleet (adaptive_redis): only
    # fleet sizing reads it. (An interval longer than the test: no decision changes the capacities.)
    reader = make_cache(shards=1, l2_size=1, l3_size=10, promote_after=10**6, clock=clock, coherence=False,
                        adaptive_redis=True, redis_adjustment_interval=3600.0)
    assert reader.get("k0") is None  # a bigger L3 would have hit
    assert reader.get("k1") == 1  # the least recently used L3 entry: a smaller L3 would have missed
    assert reader.get("k5") == 5  # in the middle: neither
    assert reader.get("nope") is None  # never held: no evidence
    reader.flush_bookkeeping()  # the reads reach touch.lua, which counts the evidence
    assert stats(raw, namespace) == {"evictions": 1, "ghost_hits": 1, "tail_hits": 1}
    assert server_of(raw, ghost).zrange(ghost, 0, -1) == []  # a ghost counts once
    cache.put("k0", 0)  # back in Redis: no longer a ghost; what its write evicted is
    assert server_of(raw, ghost).zrange(ghost, 0, -1) == [b"k2"]


def _worker(url: str, cluster: bool, namespace: str, now: Any, commands: Any, results: Any) -> None:
    cache = MultiLevelCache(url, namespace=namespace, cluster=cluster, shards=2, l2_size=4, l3_size=40,
                            adaptive_redis=True, redis_adjustment_interval=INTERVAL, clock=lambda: now.value,
                            coherence=False, fail_open=False)
    try:
        while commands.get(timeout=60) == "go":
            cache.get("anything")  # any call takes part in the sizing when it is due: a get's, when its
            cache.flush_bookkeeping()  # bookkeeping is sent (within a window; at once here)
            results.put(cache.get_metrics()["health"]["fleet_sizing"]["holder"])
    finally:
        cache.close()


def test_two_workers_running_the_controller_decide_once_per_interval_and_a_dead_one_hands_over(
        backend: Backend, raw: Client) -> None:
    namespace = "t" + uuid.uuid4().hex[:12]
    ctx = mp.get_context("spawn")
    now = ctx.Value("d", 1_000_000.0)
    commands = [ctx.Queue(), ctx.Queue()]
    results = [ctx.Queue(), ctx.Queue()]
    workers = [ctx.Process(target=_worker, args=(backend.url, backend.cluster, namespace, now, c, r), daemon=True)
               for c, r in zip(commands, results, strict=True)]
    sizing_key = f"{namespace}:sizing".encode()

    def decisions() -> int:
        return int(server_of(raw, sizing_key).hget(sizing_key, "decisions") or 0)

    def round_of(alive: list[int]) -> list[bool]:
        with now.get_lock():
            now.value += INTERVAL
        for i in alive:
            commands[i].put("go")
        return [bool(results[i].get(timeout=60)) for i in alive]

    for w in workers:
        w.start()
    try:
        holders = [round_of([0, 1]) for _ in range(4)]
        assert all(sum(h) == 1 for h in holders), holders  # one lease holder at a time...
        assert len({h.index(True) for h in holders}) == 1, holders  # ...the same one while it lives
        assert decisions() == 4  # and one decision per interval, whoever asked first
        holder = holders[0].index(True)
        other = 1 - holder
        workers[holder].kill()
        workers[holder].join(10)
        with now.get_lock():
            now.value += INTERVAL  # the lease (two intervals) lapses
        assert round_of([other]) == [True]  # the survivor has taken over
        before = decisions()
        assert round_of([other]) == [True]
        assert decisions() == before + 1
    finally:
        for c in commands:
            c.put("stop")
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()


def test_the_fleet_l3_grows_from_ghost_evidence_within_its_maximum_then_shrinks_through_the_lru(
        make_cache: Make, raw: Client, namespace: str, clock: FakeClock) -> None:
    settings: dict[str, Any] = {"shards": 2, "l1_size": 1, "l2_size": 4, "l3_size": 40, "l3_max_size": 60,
                                "l2_max_size": 8,
                                "promote_after": 10**6, "adaptive_redis": True,
                                "redis_adjustment_interval": INTERVAL, "clock": clock, "coherence": False}
    cache = make_cache(**settings)
    keys = [f"k{i}" for i in range(46)]  # cycling 46 keys through 44 entries: every miss is a ghost

    def requests(n: int, universe: list[str]) -> None:
        for i in range(n):
            key = universe[i % len(universe)]
            if cache.get(key) is None:
                cache.put(key, key)
            clock.advance(INTERVAL / n)

    sizes = []
    for _ in range(8):
        requests(400, keys)
        clock.advance(0.001)
        cache.get("tick")  # the sizing step runs at the start of a call: a get's, that of its bookkeeping
        cache.flush_bookkeeping()
        sizes.append(cache.get_metrics()["health"]["fleet_sizing"]["l3_size"])
    assert sizes[-1] > 40  # it grew...
    assert max(sizes) <= 60  # ...never past l3_max_size
    assert sizes == sorted(sizes)
    grown = sizes[-1]

    hot = keys[:4]  # now only four keys are asked for: the tail serves nothing
    for _ in range(12):
        requests(400, hot)
        clock.advance(0.001)
        cache.get("tick")
        cache.flush_bookkeeping()
    state = cache.get_metrics()["health"]["fleet_sizing"]
    assert state["l3_size"] < grown
    assert state["last_decision"]["adjustment"] in ("shrink", "none")
    for key in keys:  # every shard is touched: each demotes and evicts down to its new bound
        cache.get(key)
    cache.flush_bookkeeping()  # the reads' touch.lua calls, which enforce the bounds
    check_invariants(raw, namespace, 2, state["l2_size"], state["l3_size"], now_ms=int(clock() * 1000))


def test_a_sizing_hash_edited_by_hand_never_fails_a_call(make_cache: Make, raw: Client, namespace: str,
                                                       clock: FakeClock) -> None:
    key = f"{namespace}:sizing".encode()
    server_of(raw, key).set(key, "garbage")
    cache = make_cache(adaptive_redis=True, redis_adjustment_interval=INTERVAL, clock=clock)
    cache.put("k", 1)
    assert cache.get("k") == 1
    assert cache.get_metrics()["health"]["fleet_sizing"]["l3_size"] == cache.config.l3_size


@pytest.mark.parametrize("settings", [
    {"l3_min_size": 200_000}, {"l3_max_size": 10}, {"l2_max_size": 5}, {"redis_target_hit_rate": 2},
    {"redis_adjustment_interval": 0}, {"l3_min_size": 1, "shards": 16},
])
def test_bad_fleet_sizing_settings_are_configuration_errors(settings: dict[str, Any]) -> None:
    from victor_rcache import ConfigurationError

    with pytest.raises(ConfigurationError):
        MultiLevelCache("redis://127.0.0.1:1/0", adaptive_redis=True, coherence=False, **settings)

