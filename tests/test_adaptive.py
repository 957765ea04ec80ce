"""AdaptiveLRUCache: evidence-based sizing (docs/adaptive-sizing.md), with a fake clock and seeded Zipf workloads.

Pure logic: no Redis. The "smallest size that reaches the target" is measured in the test itself
by replaying the same request stream through fixed-size LRU caches.
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import AdaptiveLRUCache, ConfigurationError
from victor_rcache.adaptive import Interval, SegmentedLRU, SizingRule, decide

from .helpers import FakeClock

TARGET = 0.6
PER_INTERVAL = 5000  # requests between two decisions
INTERVAL = 10.0  # seconds of fake time per interval


def zipf(universe: int, s: float, seed: int) -> Callable[[], int]:
    weights = [1 / (k + 1) ** s for k in range(universe)]
    cumulative, total = [], 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    rng = random.Random(seed)
    return lambda: bisect.bisect(cumulative, rng.random() * total)


def lru_hit_rate(size: int, requests: list[int]) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    warm = len(requests) // 3
    for i, key in enumerate(requests):
        if key in cache:
            cache.move_to_end(key)
            hits += i >= warm
        else:
            cache[key] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return hits / (len(requests) - warm)


def smallest_size_reaching(target: float, requests: list[int], sizes: range) -> int:
    """Binary search over sizes (the LRU hit rate grows with the size: LRU is a stack algorithm)."""
    lo, hi = sizes.start, sizes.stop
    while lo < hi:
        mid = (lo + hi) // 2
        if lru_hit_rate(mid, requests) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def run(cache: AdaptiveLRUCache, clock: FakeClock, draw: Callable[[], int], intervals: int) -> list[dict[str, Any]]:
    results = []
    for _ in range(intervals):
        for _ in range(PER_INTERVAL):
            key = draw()
            if cache.get(key) is None:
                cache.put(key, b"x" * 100)
            clock.advance(INTERVAL / PER_INTERVAL)
        clock.advance(1e-6)  # past the interval, whatever the float sums came to
        assert cache.should_adjust()
        results.append(cache.adjust_size())
    return results


def test_segmented_lru_tells_hits_in_the_last_tail_size_entries_of_the_lru_order() -> None:
    lru: SegmentedLRU[int, str] = SegmentedLRU(capacity=5, tail_size=2)
    for k in range(5):
        lru.put(k, str(k))  # LRU order, least recent first: 0 1 2 3 4; the tail is 0, 1
    assert lru.touch(1) == ("1", True)  # order: 0 2 3 4 1 -> tail 0, 2
    assert lru.touch(4) == ("4", False)  # order: 0 2 3 1 4
    assert lru.touch(2) == ("2", True)  # order: 0 3 1 4 2 -> tail 0, 3
    assert lru.put(5, "5") == [(0, "0")]  # the least recent goes: 3 1 4 2 5
    assert [k for k, _ in lru.items()] == [3, 1, 4, 2, 5]
    assert lru.touch(3) == ("3", True)
    assert lru.resize(3, 1) == [(1, "1"), (4, "4")]
    assert [k for k, _ in lru.items()] == [2, 5, 3]
    assert lru.touch(2) == ("2", True)
    assert lru.touch(0) is None


def test_a_miss_on_a_recently_evicted_key_is_evidence_for_growing() -> None:
    clock = FakeClock()
    cache = AdaptiveLRUCache(initial_size=10, min_size=10, max_size=100, min_accesses=1, clock=clock)
    for k in range(11):
        cache.put(k, k)  # 0 is evicted: a ghost (the step is 1 entry here)
    assert cache.get(0) is None
    assert cache.get(99) is None  # never held: no evidence
    assert cache.get(10) == 10
    m = cache.get_metrics()["performance"]
    assert (m["hits"], m["misses"], m["ghost_hits"]) == (1, 2, 1)


def test_a_fresh_cache_on_no_traffic_decides_nothing() -> None:
    """The earlier design expanded a fresh cache on all-zero metrics."""
    clock = FakeClock()
    cache = AdaptiveLRUCache(initial_size=100, clock=clock, adjustment_interval=1)
    assert not cache.should_adjust()
    clock.advance(1)
    assert cache.should_adjust()
    result = cache.adjust_size()
    assert (result["adjustment"], result["new_size"]) == ("none", 100)
    assert "0 requests" in result["reason"]
    assert not cache.should_adjust()


@pytest.mark.parametrize(("seen", "expected"), [
    (Interval(hits=50, misses=50, ghost_hits=20), "expand"),  # below target, and a bigger cache would hit
    (Interval(hits=50, misses=50, ghost_hits=0), "none"),  # below target, but growing would not help
    (Interval(hits=90, misses=10, tail_hits=5), "shrink"),  # 85% without the tail: still above 60% + 2%
    (Interval(hits=65, misses=35, tail_hits=10), "none"),  # 55% without the tail: keep
    (Interval(hits=10, misses=10, ghost_hits=10), "none"),  # too few requests to decide
])
def test_each_decision_follows_the_evidence_and_says_why(seen: Interval, expected: str) -> None:
    adjustment, new, reason = decide(SizingRule(min_size=10, max_size=1000, min_accesses=100), 500, seen)
    assert adjustment == expected
    assert new == {"expand": 550, "shrink": 450, "none": 500}[expected]
    assert "%" in reason or "requests" in reason


def test_sizes_stay_within_min_and_max() -> None:
    rule = SizingRule(min_size=100, max_size=105, min_accesses=1)
    assert decide(rule, 100, Interval(hits=1, misses=9, ghost_hits=9))[:2] == ("expand", 105)
    assert decide(rule, 105, Interval(hits=1, misses=9, ghost_hits=9))[:2] == ("none", 105)
    assert decide(rule, 100, Interval(hits=10))[:2] == ("none", 100)


def test_a_cache_started_small_converges_near_the_smallest_size_that_meets_the_target_and_stays() -> None:
    """Acceptance: Zipf over 5000 keys needs about 800 entries for a 60% hit rate. Started at 100,
    the cache grows by 10% steps: within ceil(log(800 / 100) / log(1.1)) + 8 = 30 intervals it is
    within 20% of the smallest size meeting the target, and over 20 more intervals it does not move."""
    draw = zipf(5000, 0.9, seed=1)
    reference = [draw() for _ in range(60_000)]
    smallest = smallest_size_reaching(TARGET, reference, range(100, 2000))
    assert 600 <= smallest <= 1000  # the workload is what the test says it is

    clock = FakeClock()
    cache = AdaptiveLRUCache(initial_size=100, min_size=100, max_size=2000, target_hit_rate=TARGET,
                             adjustment_interval=INTERVAL, clock=clock)
    results = run(cache, clock, zipf(5000, 0.9, seed=2), 30)
    assert abs(cache.size - smallest) <= 0.2 * smallest, (cache.size, smallest)
    assert any(r["adjustment"] == "expand" for r in results)
    settled = cache.size
    later = run(cache, clock, zipf(5000, 0.9, seed=3), 20)
    assert {r["new_size"] for r in later} == {settled}, [r["reason"] for r in later if r["delta"]]
    assert all(r["metrics"]["hit_rate"] >= TARGET - 0.02 for r in later)
    assert cache.get_metrics()["adaptive"]["adjustments"] == sum(r["delta"] != 0 for r in results + later)


def test_when_the_working_set_shrinks_the_cache_shrinks_and_keeps_the_target() -> None:
    clock = FakeClock()
    cache = AdaptiveLRUCache(initial_size=800, min_size=100, max_size=2000, target_hit_rate=TARGET,
                             adjustment_interval=INTERVAL, clock=clock)
    run(cache, clock, zipf(5000, 0.9, seed=4), 5)
    before = cache.size
    results = run(cache, clock, zipf(600, 0.9, seed=5), 40)
    assert cache.size < before / 2
    assert any(r["adjustment"] == "shrink" for r in results)
    assert all(r["metrics"]["hit_rate"] >= TARGET for r in results[-10:])


def test_memory_usage_is_the_bytes_held() -> None:
    cache = AdaptiveLRUCache(initial_size=100, min_size=2, max_size=100)
    cache.put("a", b"x" * 10)
    cache.put("b", "é" * 5)  # 10 bytes of UTF-8
    cache.put("a", b"y" * 3)
    assert cache.get_metrics()["memory_usage"] == 13
    cache.delete("b")
    assert cache.get_metrics()["memory_usage"] == 3
    assert "bytes" in cache.get_metrics()["memory_usage_unit"]


def test_auto_adjust_decides_at_the_interval_without_anyone_calling_adjust_size() -> None:
    clock = FakeClock()
    cache = AdaptiveLRUCache(initial_size=100, min_size=100, max_size=500, min_accesses=10, adjustment_interval=5,
                             auto_adjust=True, clock=clock)
    for i in range(1000):  # 105 keys cycling through 100 entries: every miss is on a key just evicted
        if cache.get(i % 105) is None:
            cache.put(i % 105, i)
        clock.advance(0.1)
    assert cache.size == 110  # one step: from then on all 105 keys fit, and every request hits
    assert cache.get_metrics()["adaptive"]["adjustments"] == 1
    assert cache.get_metrics()["performance"]["hit_rate"] > 0.8


@pytest.mark.parametrize("settings", [
    {"min_size": 0}, {"min_size": 300, "max_size": 200}, {"initial_size": 50}, {"target_hit_rate": 1.5},
    {"adjustment_interval": 0}, {"step_fraction": 0}, {"min_accesses": 0},
])
def test_bad_settings_are_configuration_errors(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        AdaptiveLRUCache(**settings)


def test_multilevel_cache_with_adaptive_l1_resizes_its_l1_on_its_own(make_cache: Callable[..., Any]) -> None:
    """adaptive_l1=True: the L1 decides at its interval (the cache's clock), with no caller involved."""
    clock = FakeClock()
    cache = make_cache(adaptive_l1=True, l1_size=100, l1_min_size=50, l1_max_size=400, l1_adjustment_interval=10,
                       promote_after=1, clock=clock, coherence=False)
    keys = [f"k{i}" for i in range(105)]
    cache.put_many({k: k for k in keys})
    for i in range(3000):  # 105 keys cycling through a 100-entry L1: each L1 miss is on a key just evicted
        assert cache.get(keys[i % 105]) == keys[i % 105]
        clock.advance(0.01)
    l1 = cache.get_metrics()["l1"]
    assert cache._core.l1.max_entries == 110
    assert l1["adaptive"]["adjustments"] == 1
    assert l1["adaptive"]["last_adjustment"]["adjustment"] in ("expand", "none")
    assert l1["hits"] > 2000  # once it fits, every read is an L1 hit


def test_a_sizeof_that_raises_changes_nothing() -> None:
    def sizeof(value: Any) -> int:
        if value == "bad":
            raise ValueError("cannot size")
        return 10

    cache = AdaptiveLRUCache(initial_size=100, min_size=1, max_size=100, sizeof=sizeof)
    cache.put("k", "good")
    with pytest.raises(ValueError, match="cannot size"):
        cache.put("k", "bad")
    assert (cache.get("k"), cache.get_metrics()["memory_usage"]) == ("good", 10)
    cache.delete("k")
    assert cache.get_metrics()["memory_usage"] == 0
