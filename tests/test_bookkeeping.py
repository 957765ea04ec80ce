"""Deferred bookkeeping (docs/design.md#where-decisions-are-made): what a Redis hit leaves to do goes out
in batches, from a thread of the cache, never on the caller's path.

* a get sends one plain read and nothing else: the batch (touch.lua) goes from the cache's own thread;
* what the batch carries lands in Redis within the bookkeeping window without anyone calling anything,
  at ``flush_bookkeeping()`` at once, and at ``close()``;
* a process's own metrics are exact at once; the fleet's follow its batches;
* L1 hits, which cost Redis nothing, reach the fleet counters too;
* a batch Redis refuses is dropped and counted: bookkeeping only, never a value;
* a forked child starts with an empty buffer: the parent's buffered hits are the parent's to send.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import MultiLevelCache
from victor_rcache.bookkeeping import WINDOW

from .helpers import Client, read_namespace
from .workers import eventually

Make = Callable[..., MultiLevelCache]


def fleet(cache: MultiLevelCache) -> dict[str, Any]:
    return dict(cache.get_metrics("fleet")["combined"])


def test_a_get_sends_one_plain_read_and_the_batch_goes_from_the_cache_thread(make_cache: Make) -> None:
    writer, reader = make_cache(), make_cache()
    writer.put("k", "v")
    reader.get("other")  # a cache's first call agrees on the namespace's settings with the fleet first
    sent: list[tuple[str, list[str]]] = []
    send = reader._send

    def recording(batch: list[Any]) -> Any:
        sent.append((threading.current_thread().name, [str(c[0]) for c in batch]))
        return send(batch)

    reader._send = recording  # type: ignore[method-assign]
    for _ in range(5):
        reader._core.l1.clear()
        assert reader.get("k") == "v"
    reader.flush_bookkeeping()
    assert [commands for _, commands in sent] == [["HMGET"]] * 5, "the caller's path sent more than a read"
    assert {thread for thread, _ in sent} == {threading.current_thread().name}
    assert fleet(reader)["gets"] == 6  # ...and the hits (and the first miss) still reached Redis, from elsewhere


def test_the_window_sends_a_batch_without_any_call(make_cache: Make, raw: Client, namespace: str) -> None:
    writer, reader = make_cache(shards=1), make_cache(shards=1)
    writer.put("k", "v")
    before = read_namespace(raw, namespace, 1).shards[0].l2[b"k"]
    assert reader.get("k") == "v"
    # Nobody calls the cache again: its thread sends the hit within a window (the stamp moves).
    eventually(lambda: read_namespace(raw, namespace, 1).shards[0].l2[b"k"] > before,
               "the hit's LRU stamp reaches Redis", timeout=20 * WINDOW + 5)


def test_process_metrics_are_exact_at_once_and_the_fleet_follows_the_batches(make_cache: Make) -> None:
    writer, reader = make_cache(), make_cache()
    writer.put_many({f"k{i}": i for i in range(10)})
    for i in range(10):
        reader.get(f"k{i}")
    reader.get("missing")
    mine = reader.get_metrics()["combined"]
    assert (mine["gets"], mine["total_hits"], mine["total_misses"]) == (11, 10, 1)
    reader.flush_bookkeeping()
    writer.flush_bookkeeping()
    assert fleet(reader)["gets"] == 11


def test_l1_hits_reach_the_fleet_counters_though_they_cost_redis_nothing(make_cache: Make) -> None:
    cache = make_cache()
    cache.put("k", "v")  # this process's own write: in its L1
    for _ in range(5):
        assert cache.get("k") == "v"
    cache.flush_bookkeeping()
    counted = cache.get_metrics("fleet")
    assert counted["l1"]["hits"] == 5
    cache.get("k")
    cache.close()  # the last L1 hit goes out with close()
    assert make_cache().get_metrics("fleet")["l1"]["hits"] == 6


def test_a_batch_redis_refuses_is_dropped_and_counted_never_a_value(make_cache: Make, raw: Client,
                                                                    backend: Any) -> None:
    if backend.cluster:
        pytest.skip("CONFIG SET maxmemory of one standalone server is the fault here")
    writer, reader = make_cache(), make_cache(fail_open=True)
    writer.put("k", "v")
    assert reader.get("k") == "v"
    raw.config_set("maxmemory-policy", "noeviction")
    raw.config_set("maxmemory", int(raw.info("memory")["used_memory"]) // 2)
    try:
        reader.flush_bookkeeping()  # touch.lua writes: refused at maxmemory
        assert reader.get_metrics()["health"]["bookkeeping"]["dropped_batches"] >= 1
        reader._core.l1.clear()
        assert reader.get("k") == "v"  # the value was never at stake
    finally:
        raw.config_set("maxmemory", 0)


def _child_pending(cache: MultiLevelCache, out: Any) -> None:
    out.put(cache._core.book.pending())


@pytest.mark.standalone_only(reason="fork-and-buffer semantics are the client's, the same on both backends")
def test_a_forked_child_starts_with_an_empty_buffer(make_cache: Make) -> None:
    cache = make_cache()
    cache.put("k", "v")
    cache._core.l1.clear()
    cache.get("k")
    cache.get("missing")
    assert cache._core.book.pending() == 2
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_pending, args=(cache, out))
    child.start()
    child.join(timeout=30)
    assert out.get(timeout=5) == 0, "the child would send the parent's hits a second time"
    assert cache._core.book.pending() == 2  # still the parent's to send


def test_a_hit_whose_hits_all_count_goes_as_one_item_and_a_partly_counted_one_as_two() -> None:
    """touch.lua's items: ``2n``/``3n`` (stamp and count, three arguments) when every hit of the batch counts,
    as a first hit's do; a stamp and an ``n`` item when only some did (the reader saw the count rise)."""
    from victor_rcache.bookkeeping import COUNTED, L2_HIT, L3_HIT, Bookkeeping
    from victor_rcache.metrics import Counters

    book = Bookkeeping(Counters(served=lambda: 0))
    book.events.extend([(L2_HIT, 0, b"first", COUNTED), (L3_HIT, 0, b"cold", COUNTED),
                        (L2_HIT, 0, b"warm", COUNTED), (L2_HIT, 0, b"warm", 0), (L2_HIT, 0, b"hot", 0)])
    book.collect()
    (batch,) = book.due(force=True)
    items = batch.items()
    assert [tuple(items[i:i + 3]) for i in range(0, len(items), 3)] == [
        ("2n", b"first", 1), ("3n", b"cold", 1), ("2", b"warm", 2), ("2", b"hot", 1), ("n", b"warm", 1)]


def test_batches_are_smaller_where_they_carry_fleet_sizing_evidence(make_cache: Make) -> None:
    """A batch of a cache that sizes the fleet (adaptive_redis) is due at EVIDENCE_BATCH events: its tail hits
    are ranked in an LRU order that lags by what is still buffered. Others wait for BATCH (fewer, cheaper calls)."""
    from victor_rcache import bookkeeping

    assert make_cache()._core.book.batch() == bookkeeping.BATCH
    assert make_cache(adaptive_redis=True)._core.book.batch() == bookkeeping.EVIDENCE_BATCH
    assert bookkeeping.EVIDENCE_BATCH < bookkeeping.BATCH
