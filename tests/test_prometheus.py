"""The Prometheus exporter (victor_rcache/contrib/prometheus.py), the latency observer hook and structured logging.

Scrapes a private ``CollectorRegistry`` after known operations against a real Redis (standalone and
cluster) and checks exact values: per-tier counters, gauges, the latency histogram's counts per
operation and outcome (sync and async front ends), the circuit breaker, the warmer's prediction
numbers. No sleeps, no timing assertions.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import victor_rcache
from victor_rcache import (
    AsyncMultiLevelCache,
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    MultiLevelCache,
    Prediction,
    PredictiveCacheWarmer,
)
from victor_rcache.contrib.prometheus import CacheCollector, register, serve
from victor_rcache.local_redis import free_port
from victor_rcache.metrics import Timing

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

DEAD_ADDRESS = f"127.0.0.1:{free_port()}"
DEAD = f"redis://{DEAD_ADDRESS}/0"
HOUR_6 = 86400.0 * 19_700 + 6 * 3600 + 1234  # a wall clock stopped in one hour (the model buckets by hour)


def scrape(registry: CollectorRegistry) -> Samples:
    """One scrape: every sample by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value for family in registry.collect() for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def tiers(samples: Samples, name: str, ns: str) -> tuple[float | None, ...]:
    return tuple(value(samples, name, namespace=ns, tier=t) for t in ("l1", "l2", "l3"))


def latency_counts(samples: Samples, ns: str) -> dict[tuple[str, str], int]:
    """(operation, outcome) -> number of calls observed, from the histogram's _count samples."""
    out = {}
    for (name, labels), v in samples.items():
        if name == "victor_rcache_operation_seconds_count":
            d = dict(labels)
            if d["namespace"] == ns:
                out[d["operation"], d["outcome"]] = int(v)
    return out


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    yield reg
    for collector in list(getattr(reg, "_collector_to_names", {})):
        if isinstance(collector, CacheCollector):
            collector.close()


# ------------------------------------------------------------------------------ counters and gauges


def test_per_tier_counters_gauges_and_latency_after_known_calls(make_cache: Make, namespace: str,
                                                                 registry: CollectorRegistry) -> None:
    writer = make_cache()
    cache = make_cache(promote_after=100)  # L2 hits stay in L2: no L1 copies
    collector = register(cache, registry=registry)
    writer.put_many({"a": 1, "b": 2})
    cache.put("c", 3)
    assert [cache.get("c"), cache.get("c"), cache.get("c")] == [3, 3, 3]  # 3 L1 hits (its own write)
    assert [cache.get("a"), cache.get("b")] == [1, 2]  # 2 L2 hits
    assert cache.get("nope", "default") == "default"  # 1 miss
    assert cache.get_or_set("d", lambda: 4) == 4  # a miss: the loader runs
    assert cache.get_or_set("d", lambda: 5) == 4  # its own fill: an L1 hit

    s = scrape(registry)
    assert tiers(s, "victor_rcache_hits_total", namespace) == (4, 2, 0)
    assert tiers(s, "victor_rcache_misses_total", namespace) == (4, 2, 2)  # 8 lookups: 4 reached L2, 2 L3
    assert value(s, "victor_rcache_gets_total", namespace=namespace) == 8
    assert value(s, "victor_rcache_puts_total", namespace=namespace) == 2  # c, and d's fill
    assert value(s, "victor_rcache_loads_total", namespace=namespace) == 1
    assert tiers(s, "victor_rcache_entries", namespace) == (2, 4, 0)  # L1: c, d; L2 (Redis): a, b, c, d
    assert value(s, "victor_rcache_redis_up", namespace=namespace) == 1
    assert value(s, "victor_rcache_breaker_state", namespace=namespace) == 0
    assert value(s, "victor_rcache_coherence_channel_up", namespace=namespace) == 1
    assert value(s, "victor_rcache_redis_errors_total", namespace=namespace) == 0
    assert latency_counts(s, namespace) == {("put", "ok"): 1, ("get", "l1"): 3, ("get", "l2"): 2,
                                            ("get", "miss"): 1, ("get_or_set", "miss"): 1, ("get_or_set", "l1"): 1}
    assert value(s, "victor_rcache_operation_seconds_bucket", namespace=namespace, operation="get", outcome="l1",
                 le="+Inf") == 3
    assert collector.registry is registry
    # The exposition format renders (no duplicate families, valid names).
    text = generate_latest(registry).decode()
    assert f'victor_rcache_hits_total{{namespace="{namespace}",tier="l2"}} 2.0' in text


def test_promotions_demotions_and_evictions_are_this_process_calls(make_cache: Make, namespace: str,
                                                                    registry: CollectorRegistry) -> None:
    """One shard, L1 of 1, L2 of 1, L3 of 1: three puts demote two entries and evict one from L3; a
    reader's second L3 hit promotes the entry (L3 -> L2) and demotes another once its bookkeeping is
    sent, and its next read (an L2 hit of an entry the fleet read twice) copies it into its L1."""
    small = {"shards": 1, "l1_size": 1, "l2_size": 1, "l3_size": 1}
    writer = make_cache(**small)
    register(writer, registry=registry)
    writer.put("a", 1)
    writer.put("b", 2)  # a -> L3 (and out of this L1: its size is 1)
    writer.put("c", 3)  # b -> L3, which evicts a
    s = scrape(registry)
    assert tiers(s, "victor_rcache_demotions_total", namespace) == (0, 2, 0)
    assert tiers(s, "victor_rcache_evictions_total", namespace) == (2, 0, 1)  # L1 dropped a then b
    assert tiers(s, "victor_rcache_entries", namespace) == (1, 1, 1)

    reader_registry = CollectorRegistry()
    reader = make_cache(shards=1, l2_size=1, l3_size=1, promote_after=2)
    collector = register(reader, registry=reader_registry)
    assert [reader.get("b"), reader.get("b")] == [2, 2]  # two L3 hits
    reader.flush_bookkeeping()  # touch.lua applies them: b reaches promote_after, L3 -> L2
    assert [reader.get("b"), reader.get("b")] == [2, 2]  # an L2 hit that copies it into L1, then an L1 hit
    r = scrape(reader_registry)
    assert tiers(r, "victor_rcache_hits_total", namespace) == (1, 1, 2)
    assert tiers(r, "victor_rcache_promotions_total", namespace) == (1, 1, 0)  # a copy into L1; L3 -> L2
    assert tiers(r, "victor_rcache_demotions_total", namespace) == (0, 1, 0)  # c made room
    assert latency_counts(r, namespace) == {("get", "l3"): 2, ("get", "l2"): 1, ("get", "l1"): 1}
    collector.close()


def test_read_redis_false_scrapes_from_memory_without_a_round_trip(make_cache: Make, namespace: str,
                                                                    registry: CollectorRegistry,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache()
    register(cache, registry=registry, read_redis=False)
    cache.put("k", 1)
    assert cache.get("k") == 1
    sent: list[Any] = []
    real_send = cache._send
    monkeypatch.setattr(cache, "_send", lambda batch: sent.append(batch) or real_send(batch))
    s = scrape(registry)
    assert sent == []
    assert tiers(s, "victor_rcache_hits_total", namespace) == (1, 0, 0)
    assert tiers(s, "victor_rcache_entries", namespace) == (1, None, None)  # Redis's sizes need a round trip
    assert value(s, "victor_rcache_redis_up", namespace=namespace) is None


def test_one_collector_per_registry_exports_each_namespace_once(make_cache: Make, namespace: str,
                                                                 registry: CollectorRegistry) -> None:
    first, second = make_cache(), make_cache(namespace=namespace + "b")
    collector = register(first, registry=registry)
    assert register(second, registry=registry) is collector
    assert register(first, registry=registry) is collector  # again: nothing changes
    first.put("k", 1)
    second.put("k", 2)
    second.get("k")
    s = scrape(registry)
    assert value(s, "victor_rcache_hits_total", namespace=namespace, tier="l1") == 0
    assert value(s, "victor_rcache_hits_total", namespace=namespace + "b", tier="l1") == 1
    with pytest.raises(ConfigurationError, match="one cache per namespace"):
        register(make_cache(), registry=registry)  # the same namespace again: its series would clash
    with pytest.raises(ConfigurationError, match="buckets"):
        register(second, registry=registry, buckets=(0.1, 1.0))


def test_an_observer_of_the_users_own_is_kept(make_cache: Make, registry: CollectorRegistry) -> None:
    seen: list[tuple[str, str]] = []

    class Mine:
        def observe(self, operation: str, outcome: str, seconds: float) -> None:
            seen.append((operation, outcome))

    cache = make_cache()
    cache.set_observer(Mine())
    with pytest.raises(ConfigurationError, match="observe=False"):
        register(cache, registry=registry)
    collector = register(cache, registry=registry, observe=False)
    cache.put("k", 1)
    assert seen == [("put", "ok")]
    assert latency_counts(scrape(registry), cache.namespace) == {}
    collector.close()
    assert isinstance(cache.observer, Mine)  # close() removes only the exporter's own observer


# --------------------------------------------------------------------------------------- async


def test_async_cache_latency_outcomes_and_scrapes_from_another_thread(make_async_cache: MakeAsync, namespace: str,
                                                                       registry: CollectorRegistry) -> None:
    async def scenario() -> tuple[Samples, Samples, list[str]]:
        loads: list[str] = []

        async def loader() -> str:
            loads.append("ran")
            return "computed"

        async with make_async_cache() as writer, make_async_cache(promote_after=100) as cache:
            register(cache, registry=registry)  # on the loop: the scrape thread asks this loop for sizes
            await writer.put("a", 1)
            await cache.put("c", 3)
            got = [await cache.get("c"), await cache.get("a"), await cache.get("nope")]
            assert got == [3, 1, None]
            # Two concurrent calls: the first computes, the second waits for it (coalesced).
            assert await asyncio.gather(cache.get_or_set("d", loader), cache.get_or_set("d", loader)) == \
                ["computed", "computed"]
            assert await cache.get_many(["a", "c"]) == {"a": 1, "c": 3}
            assert await cache.delete("a") is True
            with pytest.raises(InvalidKeyError):
                await cache.get(b"")
            from_thread = await asyncio.to_thread(scrape, registry)
            on_loop = scrape(registry)  # the loop's own thread: from memory, never waiting for itself
            return from_thread, on_loop, loads

    from_thread, on_loop, loads = asyncio.run(scenario())
    assert loads == ["ran"]
    assert latency_counts(from_thread, namespace) == {
        ("put", "ok"): 1, ("get", "l1"): 1, ("get", "l2"): 1, ("get", "miss"): 1, ("get_or_set", "miss"): 1,
        ("get_or_set", "coalesced"): 1, ("get_many", "ok"): 1, ("delete", "ok"): 1, ("get", "error"): 1}
    assert tiers(from_thread, "victor_rcache_hits_total", namespace) == (2, 2, 0)  # get_many: c in L1, a in L2
    assert value(from_thread, "victor_rcache_entries", namespace=namespace, tier="l2") == 2  # c, d
    assert value(from_thread, "victor_rcache_redis_up", namespace=namespace) == 1
    assert value(on_loop, "victor_rcache_entries", namespace=namespace, tier="l2") is None
    assert tiers(on_loop, "victor_rcache_hits_total", namespace) == (2, 2, 0)


# ------------------------------------------------------------------------------- breaker, failures


def test_breaker_state_after_failures_on_a_dead_port(registry: CollectorRegistry) -> None:
    cache = MultiLevelCache(DEAD, namespace="down", breaker_threshold=1, breaker_cooldown=60.0,
                            socket_timeout=0.05, connect_timeout=0.05)
    try:
        register(cache, registry=registry)
        s = scrape(registry)
        assert value(s, "victor_rcache_breaker_state", namespace="down") == 2  # the scrape's own call opened it
        cache.put("k", 1)  # rejected at once; this process keeps its own write
        assert cache.get("k") == 1
        assert cache.get("other", "missing") == "missing"  # rejected: a miss, in microseconds
        s = scrape(registry)
        assert value(s, "victor_rcache_breaker_state", namespace="down") == 2
        assert value(s, "victor_rcache_breaker_opens_total", namespace="down") == 1
        # Not sent: the put, both gets (L1 is not trusted while the invalidation channel is down, so the
        # first one asked Redis too, then fell back to L1's copy) and the second scrape's metrics call.
        assert value(s, "victor_rcache_breaker_rejected_calls_total", namespace="down") == 4
        assert value(s, "victor_rcache_redis_errors_total", namespace="down") == 5
        assert value(s, "victor_rcache_redis_up", namespace="down") == 0
        assert value(s, "victor_rcache_coherence_channel_up", namespace="down") == 0
        assert value(s, "victor_rcache_entries", namespace="down", tier="l2") is None
        assert latency_counts(s, "down") == {("put", "ok"): 1, ("get", "l1"): 1, ("get", "miss"): 1}
    finally:
        cache.close()


def test_fail_closed_cache_is_still_scraped_when_redis_is_down(registry: CollectorRegistry) -> None:
    cache = MultiLevelCache(DEAD, namespace="down", fail_open=False, socket_timeout=0.05, connect_timeout=0.05,
                            coherence=False)
    register(cache, registry=registry)
    with pytest.raises(victor_rcache.CacheUnavailableError):
        cache.get("k")
    s = scrape(registry)
    assert value(s, "victor_rcache_redis_up", namespace="down") == 0
    assert value(s, "victor_rcache_redis_errors_total", namespace="down") == 2  # the get and the scrape's call
    assert latency_counts(s, "down") == {("get", "error"): 1}


def test_redis_failures_are_logged_with_structured_fields(caplog: pytest.LogCaptureFixture) -> None:
    cache = MultiLevelCache(DEAD, namespace="logged", breaker_threshold=1, breaker_cooldown=60.0,
                            socket_timeout=0.05, connect_timeout=0.05, coherence=False)
    with caplog.at_level(logging.INFO, logger="victor_rcache"):
        assert cache.get("k", "default") == "default"
    ours = [r for r in caplog.records if r.name == "victor_rcache"]
    assert all(r.namespace == "logged" for r in ours)  # type: ignore[attr-defined]
    by_event = {r.event: r for r in ours}  # type: ignore[attr-defined]
    assert set(by_event) == {"breaker_opened", "redis_failed"}
    failed = by_event["redis_failed"]
    assert failed.levelno == logging.WARNING
    assert (failed.op, failed.error_type, failed.redis_url) == ("get", "ConnectionError", DEAD)  # type: ignore[attr-defined]
    assert DEAD_ADDRESS in failed.error  # type: ignore[attr-defined]
    opened = by_event["breaker_opened"]
    assert (opened.state, opened.failures, opened.cooldown) == ("open", 1, 60.0)  # type: ignore[attr-defined]
    cache.close()


def test_the_library_never_prints() -> None:
    """Programs (the demo, the CLI) print; the library only logs, to the "victor_rcache" logger."""
    package = Path(victor_rcache.__file__).parent
    for path in sorted(package.glob("*.py")):
        if path.name in ("demo.py", "cli.py"):
            continue
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path.name}:{node.lineno} prints"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "getLogger" and node.args:
                name = getattr(node.args[0], "value", None)
                assert name == "victor_rcache", f"{path.name}:{node.lineno} logs elsewhere"


# ------------------------------------------------------------------------------------- the warmer


def test_prediction_accuracy_and_prewarm_counts(make_cache: Make, namespace: str,
                                                registry: CollectorRegistry) -> None:
    cache = make_cache()
    warmer = PredictiveCacheWarmer(cache, clock=lambda: HOUR_6)
    register(cache, registry=registry, warmer=warmer)

    def record(query: str, session: str) -> None:  # and wait for its round: the next answer knows it
        warmer.record_query(query, session=session)
        warmer.flush()

    for session in ("t0", "t1", "t2", "t3", "t4"):
        record("A", session)
        record("B", session)
    record("A", "u")
    assert warmer.predict_next_queries("A", session="u").queries == ["B"]
    record("B", "u")  # predicted: correct
    assert warmer.predict_next_queries("B", session="u").queries == []
    record("A", "u")
    assert warmer.predict_next_queries("A", session="u").queries == ["B"]
    record("Z", "u")  # not predicted: wrong
    prediction = Prediction("A", queries=["B"], confidences=[0.9], tools=[[]], parts=[(0.9, 0.9, 0.9)])
    report = asyncio.run(warmer.prewarm_predictions(prediction, lambda q: f"result of {q}"))
    assert report.completed == 1

    s = scrape(registry)
    assert value(s, "victor_rcache_predictions_made_total", namespace=namespace) == 3
    assert value(s, "victor_rcache_predictions_checked_total", namespace=namespace) == 2
    assert value(s, "victor_rcache_predictions_correct_total", namespace=namespace) == 1
    assert value(s, "victor_rcache_prediction_accuracy", namespace=namespace, scope="process") == 0.5
    assert value(s, "victor_rcache_prediction_accuracy", namespace=namespace, scope="fleet") == 0.5
    assert value(s, "victor_rcache_fleet_predictions", namespace=namespace, kind="total") == 2
    assert value(s, "victor_rcache_fleet_predictions", namespace=namespace, kind="correct") == 1
    assert value(s, "victor_rcache_records_total", namespace=namespace) == 14
    assert value(s, "victor_rcache_prewarms_total", namespace=namespace, outcome="completed") == 1
    assert value(s, "victor_rcache_prewarms_total", namespace=namespace, outcome="failed") == 0
    assert value(s, "victor_rcache_fleet_prewarms", namespace=namespace, kind="completed") == 1
    assert value(s, "victor_rcache_model_queries", namespace=namespace) == 3  # A, B, Z

    memory_only = CollectorRegistry()
    collector = register(cache, registry=memory_only, warmer=warmer, read_redis=False, observe=False)
    m = scrape(memory_only)
    assert value(m, "victor_rcache_prediction_accuracy", namespace=namespace, scope="process") == 0.5
    assert value(m, "victor_rcache_prediction_accuracy", namespace=namespace, scope="fleet") is None
    assert value(m, "victor_rcache_model_queries", namespace=namespace) is None
    collector.close()


# ------------------------------------------------------------------------- the extra, the hook, serve


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import prometheus_client -> ImportError
    monkeypatch.setitem(sys.modules, "prometheus_client.core", None)
    cache = MultiLevelCache(DEAD, namespace="x", coherence=False)
    with pytest.raises(ConfigurationError, match=r"pip install victor-rcache\[prometheus\]"):
        register(cache)
    with pytest.raises(ConfigurationError, match=r"pip install victor-rcache\[prometheus\]"):
        serve(cache, port=free_port(), addr="127.0.0.1")
    assert cache.observer is None
    cache.close()


def test_the_library_does_not_import_prometheus_client() -> None:
    code = ("import sys, victor_rcache, victor_rcache.contrib.prometheus; "
            "assert 'prometheus_client' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_unobserved_cache_times_nothing(make_cache: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an observer no Timing is ever made; results are the same with one and without."""
    def no_timing(*args: Any) -> None:
        raise AssertionError("an unobserved call was timed")

    cache = make_cache()
    assert cache.observer is None

    def calls() -> list[Any]:
        cache.invalidate()
        cache.put("a", 1)
        cache.put_many({"b": 2, "c": None})
        return [cache.get("a"), cache.get("zz", "d"), cache.get_many(["a", "b", "c", "zz"]),
                cache.get_or_set("e", lambda: 5), cache.get_or_set("e", lambda: 6), cache.delete("b"),
                cache.delete("b")]

    with monkeypatch.context() as patch:
        patch.setattr(Timing, "__init__", no_timing)
        unobserved = calls()
    seen: list[tuple[str, str]] = []

    class Recorder:
        def observe(self, operation: str, outcome: str, seconds: float) -> None:
            assert seconds >= 0
            seen.append((operation, outcome))

    cache.set_observer(Recorder())
    assert calls() == unobserved == [1, "d", {"a": 1, "b": 2, "c": None}, 5, 5, True, False]
    assert seen == [("invalidate", "ok"), ("put", "ok"), ("put_many", "ok"), ("get", "l1"), ("get", "miss"),
                    ("get_many", "ok"), ("get_or_set", "miss"), ("get_or_set", "l1"), ("delete", "ok"),
                    ("delete", "ok")]
    cache.set_observer(None)
    with monkeypatch.context() as patch:
        patch.setattr(Timing, "__init__", no_timing)
        assert cache.get("a") == 1
    with pytest.raises(InvalidArgumentError, match="observe"):
        cache.set_observer(object())  # type: ignore[arg-type]


def test_a_failing_observer_does_not_break_the_call(make_cache: Make, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def observe(self, operation: str, outcome: str, seconds: float) -> None:
            raise RuntimeError("broken observer")

    cache = make_cache()
    cache.set_observer(Broken())
    with caplog.at_level(logging.ERROR, logger="victor_rcache"):
        cache.put("k", 1)
        assert cache.get("k") == 1
    assert [getattr(r, "event", None) for r in caplog.records] == ["observer_failed", "observer_failed"]


def test_serve_answers_on_http(make_cache: Make, namespace: str, registry: CollectorRegistry) -> None:
    cache = make_cache()
    port = free_port()
    collector = serve(cache, port=port, registry=registry, addr="127.0.0.1")
    cache.put("k", 1)
    assert cache.get("k") == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert f'victor_rcache_hits_total{{namespace="{namespace}",tier="l1"}} 1.0' in text
    assert f'victor_rcache_operation_seconds_count{{namespace="{namespace}",operation="get",outcome="l1"}} 1.0' \
        in text
    collector.close()
    assert cache.observer is None
    assert scrape(registry) == {}  # the collector left the registry
