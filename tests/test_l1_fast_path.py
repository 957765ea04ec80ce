"""The L1 fast path: an L1 hit is plain code with one lock, values nobody can mutate are
decoded once and shared, mutable ones stay isolated unless ``copy_on_read=False``, counters stay
exact under threads, and the invalidation listener applies messages by itself (readers do no I/O).

Waits poll a condition against a generous deadline; nothing here asserts on timing.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import (
    AsyncMultiLevelCache,
    CacheConfig,
    ConfigurationError,
    InvalidKeyError,
    InvalidTTLError,
    MultiLevelCache,
)
from victor_rcache.codec import Envelope, MsgpackCodec, immutable
from victor_rcache.coherence import InvalidationListener
from victor_rcache.keys import MAX_RAW_KEY_BYTES, REFS_BYTES, KeySpace
from victor_rcache.l1 import LocalCache
from victor_rcache.metrics import Counters

from .helpers import FakeClock, held_value

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]
LIVENESS = 5.0  # seconds a condition may take to hold; only a hang ever reaches it
MISS = "<miss>"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = LIVENESS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"


def held(cache: MultiLevelCache, key: str) -> bool:
    """Whether the cache's L1 holds a live copy of ``key`` (not counted as a request)."""
    return cache._core.l1.get(cache._core.space.ref(key).id) is not None



class Outcomes:
    """An observer that records (operation, outcome) of every call."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def observe(self, operation: str, outcome: str, seconds: float) -> None:
        self.seen.append((operation, outcome))


# ------------------------------------------------------------------------------ no Redis


@pytest.mark.parametrize("value", [None, True, 0, 2**70, 1.5, "text", b"\x00\xff", (), (1, "a", (b"x", None)),
                                   ((((1,),),),)])
def test_values_nobody_can_mutate_are_recognised(value: Any) -> None:
    assert immutable(value)


class Text(str):
    pass


@pytest.mark.parametrize("value", [[], {}, [1], {"a": 1}, (1, [2]), ((1,), {"k": 1}), bytearray(b"x"),
                                   Text("a subclass may carry state"), {1, 2}])
def test_values_someone_could_mutate_are_not(value: Any) -> None:
    assert not immutable(value)


def test_serve_counts_the_hits_it_finds_and_get_counts_nothing() -> None:
    clock = FakeClock()
    l1 = LocalCache(10, 5.0, clock)
    l1.set(b"k", b"v", 1)
    assert l1.serve(b"k") is not None
    assert l1.serve(b"absent") is None
    assert l1.get(b"k") is not None  # a look (tests, tools): not a request
    clock.advance(5.0)
    assert l1.serve(b"k") is None  # expired: not a hit
    assert l1.hits == 1


def test_concurrent_serves_count_every_hit() -> None:
    l1 = LocalCache(10, None, FakeClock())
    l1.set(b"k", b"v", 1)
    threads, calls = 8, 5000

    def serve() -> None:
        for _ in range(calls):
            assert l1.serve(b"k") is not None
            assert l1.serve(b"absent") is None

    workers = [threading.Thread(target=serve) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert l1.hits == threads * calls


def test_counters_add_the_hits_counted_elsewhere_to_gets_and_l1_hits() -> None:
    served = [0]
    counters = Counters(served=lambda: served[0])
    counters.add(gets=3, l2_hits=1, misses=2)
    served[0] = 5
    snap = counters.snapshot()
    assert (snap["gets"], snap["l1_hits"], snap["l2_hits"], snap["misses"]) == (8, 5, 1, 2)
    assert snap["l1_hits"] + snap["l2_hits"] + snap["l3_hits"] + snap["misses"] == snap["gets"]


def test_copy_on_read_is_a_validated_setting_read_from_the_environment() -> None:
    assert CacheConfig().copy_on_read is True
    assert CacheConfig(copy_on_read=False).copy_on_read is False
    for bad in (0, 1, "false", None):
        with pytest.raises(ConfigurationError, match="copy_on_read"):
            CacheConfig(copy_on_read=bad)  # type: ignore[arg-type]
    assert CacheConfig.from_env({"VICTOR_RCACHE_COPY_ON_READ": "false"}).copy_on_read is False
    with pytest.raises(ConfigurationError, match="VICTOR_RCACHE_COPY_ON_READ"):
        CacheConfig.from_env({"VICTOR_RCACHE_COPY_ON_READ": "sometimes"})


def test_located_keys_are_remembered_within_a_byte_bound() -> None:
    """An L1 hit locates its key first (KeySpace.ref): a key is located once and remembered, up to
    REFS_BYTES of key bytes in all, so a stream of distinct keys cannot grow the memory without bound."""
    space = KeySpace("ns", 16)
    ref = space.ref("k")
    assert space.ref("k") is ref, "a hot key is located once"
    assert space.ref(b"k") == ref  # one key however it is spelled
    assert ref.entry == space.shard_keys[ref.shard].entry(ref.id)
    long_key = "q" * (MAX_RAW_KEY_BYTES + 1)
    assert space.ref(long_key) is not space.ref(long_key), "a long key is located anew (its digest is its id)"
    assert space.ref(Text("k")) == ref  # a str subclass is located like its text, but not remembered
    size = 1000
    for i in range(2 * REFS_BYTES // size):  # twice what the bound holds
        key = f"{i:0{size}d}"
        assert space.ref(key).key == key.encode()
        assert space.refs_bytes <= REFS_BYTES
        assert sum(len(r.key) for r in space.refs.values()) == space.refs_bytes
    assert space.ref("k") == ref  # a key forgotten when the bound was reached is located again, the same way


@pytest.mark.parametrize("signing_key", [None, b"k" * 32])
def test_an_l1_copy_decodes_without_a_second_check(signing_key: bytes | None) -> None:
    envelope = Envelope(MsgpackCodec(), signing_key)
    value = {"t": (1, b"\x00"), "l": [1.5, None]}
    payload = envelope.wrap(value)
    assert envelope.decode_checked(payload) == envelope.unwrap(payload) == value


class FakeSubscriber:
    """A subscribed connection whose socket never has data: SSUBSCRIBE is confirmed, then silence.
    Any other use than the listener thread's is recorded."""

    def __init__(self) -> None:
        self._sock, self._peer = socket.socketpair()
        self.reads_by: set[str] = set()
        self._replies: list[Any] = []

    def connect(self) -> None:
        return None

    def send_command(self, *args: Any) -> None:
        if args[0] == "SSUBSCRIBE":
            self._replies.append([b"ssubscribe", args[1], 1])

    def read_response(self, push_request: bool = False) -> Any:
        return self._replies.pop(0)

    def can_read(self, timeout: float = 0) -> bool:
        self.reads_by.add(threading.current_thread().name)
        return bool(self._replies)

    def disconnect(self) -> None:
        self._sock.close()
        self._peer.close()


def test_trusted_is_a_flag_read_no_io_and_no_lock() -> None:
    conn = FakeSubscriber()
    listener = InvalidationListener(lambda _node: conn, b"ns:inval", LocalCache(10, None, FakeClock()))
    listener.start(wait=LIVENESS)
    try:
        wait_until(listener.trusted, "the subscription")
        with listener._lock:  # the thread is busy: a reader neither waits nor gives up on L1
            assert listener.trusted()
        for _ in range(100):
            assert listener.trusted()
        assert threading.current_thread().name not in conn.reads_by, "a reader touched the subscriber socket"
    finally:
        listener.close()
    assert not listener.trusted()


def test_a_listener_thread_that_dies_leaves_l1_untrusted(caplog: pytest.LogCaptureFixture) -> None:
    conn = FakeSubscriber()
    listener = InvalidationListener(lambda _node: conn, b"ns:inval", LocalCache(10, None, FakeClock()))
    listener.start(wait=LIVENESS)
    try:
        wait_until(listener.trusted, "the subscription")

        def broken() -> None:
            raise RuntimeError("a bug in the listener")

        listener.subscriber._keep_alive = broken  # type: ignore[method-assign]
        wait_until(lambda: not listener._thread.is_alive(), "the listener thread ending")
        assert not listener.trusted(), "L1 is still trusted with nobody applying invalidations"
        assert "invalidation_listener_failed" in {getattr(r, "event", None) for r in caplog.records}
    finally:
        listener.close()


# ------------------------------------------------------------------------------ real Redis


def test_values_nobody_can_mutate_are_decoded_once_and_shared(make_cache: Make) -> None:
    cache = make_cache()
    values = {"s": "a string", "b": b"bytes", "n": 2**40, "t": (1, "x", (b"y", None)), "f": 0.25}
    cache.put_many(values)
    for key, value in values.items():
        first, second = cache.get(key), cache.get(key)
        assert first == value
        assert second is first, f"{key}: an immutable value was decoded again"
    many = cache.get_many(list(values))
    assert all(many[k] is cache.get(k) for k in values)
    assert cache.get_metrics()["l1"]["hits"] == 3 * len(values) + len(values)


@pytest.mark.parametrize("value", [{"tools": ["a"]}, ["a", ["b"]], (1, ["nested list"])])
def test_mutable_values_are_a_fresh_copy_for_every_caller_by_default(make_cache: Make, value: Any) -> None:
    cache = make_cache()
    cache.put("m", value)
    first, second = cache.get("m"), cache.get("m")
    assert first == second == value
    assert first is not second
    (first[-1] if isinstance(first, (list, tuple)) else first["tools"]).append("mutated")
    assert cache.get("m") == value
    assert cache.get_many(["m"]) == {"m": value}


def test_copy_on_read_false_shares_every_value_from_l1(make_cache: Make) -> None:
    cache = make_cache(copy_on_read=False)
    cache.put("m", {"tools": ["a"]})
    first = cache.get("m")
    assert cache.get("m") is first
    assert cache.get_many(["m"])["m"] is first
    first["tools"].append("shared")  # documented: do not mutate; if you do, the next hit sees it
    assert cache.get("m") == {"tools": ["a", "shared"]}
    other = make_cache(copy_on_read=False)
    assert other.get("m") == {"tools": ["a"]}, "only this process's L1 copy is shared, never Redis's value"


def test_a_new_value_is_decoded_afresh(make_cache: Make) -> None:
    cache = make_cache(copy_on_read=False)
    cache.put("k", "one")
    assert cache.get("k") == "one"
    cache.put("k", "two")
    assert cache.get("k") == "two"
    cache.delete("k")
    assert cache.get("k", MISS) == MISS


def test_an_observed_cache_reports_which_tier_served_each_get(make_cache: Make) -> None:
    writer, reader = make_cache(), make_cache(promote_after=1)
    writer.put("k", "v")
    outcomes = Outcomes()
    reader.set_observer(outcomes)
    assert reader.get("k") == "v"  # from Redis, copied into L1
    assert reader.get("k") == "v"
    assert reader.get("absent", MISS) == MISS
    assert outcomes.seen == [("get", "l2"), ("get", "l1"), ("get", "miss")]


def test_the_async_cache_takes_the_same_fast_path(make_async_cache: MakeAsync) -> None:
    async def scenario() -> dict[str, Any]:
        async with make_async_cache() as cache:
            outcomes = Outcomes()
            cache.set_observer(outcomes)
            await cache.put_many({"s": "shared", "m": {"isolated": [1]}})
            s1, s2, m1, m2 = [await cache.get(k) for k in ("s", "s", "m", "m")]
            missed = await cache.get("absent", MISS)
            metrics = await cache.get_metrics()
        return {"shared": s1 is s2, "isolated": m1 is not m2 and m1 == m2 == {"isolated": [1]}, "missed": missed,
                "seen": outcomes.seen, "l1": metrics["l1"], "combined": metrics["combined"]}

    got = asyncio.run(scenario())
    assert (got["shared"], got["isolated"], got["missed"]) == (True, True, MISS)
    assert got["seen"] == [("put_many", "ok")] + [("get", "l1")] * 4 + [("get", "miss")]
    assert (got["l1"]["hits"], got["l1"]["misses"], got["combined"]["gets"]) == (4, 1, 5)


def test_get_or_set_served_from_l1_calls_no_loader_and_counts_one_request(make_cache: Make) -> None:
    """get_or_set's L1 hit takes the same fast path (no flight, no generator): the loader is not called,
    the request is counted once, as an L1 hit; a miss is still counted once (by the flight's leader)."""
    cache = make_cache()
    outcomes = Outcomes()
    cache.set_observer(outcomes)
    calls: list[str] = []

    def loader() -> dict[str, list[int]]:
        calls.append("k")
        return {"v": [1]}

    first = cache.get_or_set("k", loader)  # a miss: computed, and in this process's L1 (a local fill)
    second, third = cache.get_or_set("k", loader), cache.get_or_set("k", loader)
    assert first == second == third == {"v": [1]}
    assert second is not third  # isolated copies by default
    assert calls == ["k"]
    with pytest.raises(InvalidTTLError):
        cache.get_or_set("k", loader, ttl=-1)  # a bad ttl is refused even though L1 holds the key
    m = cache.get_metrics()
    assert (m["combined"]["gets"], m["l1"]["hits"], m["combined"]["total_misses"]) == (3, 2, 1)
    assert [o for _, o in outcomes.seen if _ == "get_or_set"] == ["miss", "l1", "l1", "error"]


def test_counts_stay_exact_when_threads_share_a_cache(make_cache: Make) -> None:
    cache = make_cache()
    cache.put_many({f"hot{i}": i for i in range(4)})
    threads, rounds = 6, 300

    def read() -> None:
        for n in range(rounds):
            assert cache.get(f"hot{n % 4}") == n % 4  # L1 hits
            assert cache.get(f"absent{n % 7}", MISS) == MISS  # misses, through Redis
        assert cache.get_many(["hot0", "absent0"]) == {"hot0": 0}

    workers = [threading.Thread(target=read) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    m = cache.get_metrics()
    calls = threads * (2 * rounds + 2)
    assert m["combined"]["gets"] == calls
    assert m["l1"]["hits"] == threads * (rounds + 1)
    assert m["l1"]["hits"] + m["l1"]["misses"] == calls
    assert m["l2"]["hits"] + m["l2"]["misses"] == m["l1"]["misses"]
    assert m["l3"]["hits"] + m["l3"]["misses"] == m["l2"]["misses"]
    assert m["combined"]["total_hits"] + m["combined"]["total_misses"] == calls
    # Every L1 hit reaches the fleet's totals exactly once, with the cache's bookkeeping (sent in the
    # background as well: twice here, and nothing is counted twice).
    cache.flush_bookkeeping()
    fleet = cache.get_metrics("fleet")
    assert fleet["l1"]["hits"] == m["l1"]["hits"]
    assert fleet["combined"]["gets"] == calls
    cache.flush_bookkeeping()
    assert cache.get_metrics("fleet")["l1"]["hits"] == m["l1"]["hits"]


def test_the_listener_applies_an_invalidation_with_no_read_at_all(make_cache: Make) -> None:
    """No reader drains the socket any more: the listener's thread applies what arrives by itself."""
    writer, holder = make_cache(), make_cache(promote_after=1)
    writer.put("k", "old")
    assert holder.get("k") == "old"
    assert held(holder, "k")
    writer.put("k", "new")  # a small value without a ttl: its announcement carries it
    wait_until(lambda: held_value(holder, "k", MISS) == "new", "the holder's listener replacing its copy, unasked")
    hits = holder.get_metrics()["l1"]["hits"]
    assert holder.get("k") == "new"
    assert holder.get_metrics()["l1"]["hits"] == hits + 1
    writer.put("k", "timed", ttl=60)  # a value with a ttl is only announced: the copy goes
    wait_until(lambda: not held(holder, "k"), "the holder's listener dropping its copy, unasked")
    assert holder.get("k") == "timed"
    writer.delete("k")
    wait_until(lambda: holder.get("k", MISS) == MISS, "the holder dropping its copy of the deleted key")


def test_an_l1_hit_survives_the_located_keys_being_forgotten(make_cache: Make) -> None:
    """The L1 hit path looks its key up among the KeySpace's located keys; when their byte bound empties
    them, a hit locates the key again and is served and counted all the same."""
    cache = make_cache()
    cache.put("hot", "v")
    assert cache.get("hot") == "v"
    space = cache._core.space
    assert "hot" in space.refs
    size = 1000
    for i in range(REFS_BYTES // size + 1):  # other keys located (as other calls would) past the bound
        space.ref(f"{i:0{size}d}")
    assert "hot" not in space.refs
    hits = cache.get_metrics()["l1"]["hits"]
    assert cache.get("hot") == "v"
    assert cache.get_metrics()["l1"]["hits"] == hits + 1
    assert "hot" in space.refs


def test_the_fast_path_checks_keys_as_strictly_as_before(make_cache: Make) -> None:
    cache = make_cache()
    cache.put(b"k", "v")
    assert cache.get(b"k") == "v"
    assert cache.get("k") == "v"  # the same entry id, whether its ref was remembered or not
    long_key = "x" * 5000
    cache.put(long_key, "long")
    assert cache.get(long_key) == cache.get(long_key) == "long"
    for bad in (memoryview(b"k"), bytearray(b"k"), 5, ["k"], "", b""):
        with pytest.raises(InvalidKeyError):
            cache.get(bad)  # type: ignore[arg-type]
    assert cache.get_metrics()["l1"]["hits"] == 4
