"""No process keeps serving a value another process has overwritten, whatever Redis went through.

The fleet promise (docs/design.md#invariant-3-coherent-l1-copies): once a write returns, every other
process stops serving the old value within milliseconds, whether or not Redis still remembers that a
copy exists, and a write Redis never confirmed leaves no trusted copy behind. Each scenario below runs
real faults against a private redis-server, with the caches in separate OS processes (tests/workers.py),
and ends with every process serving the newest value:

* an outage: Redis killed and restarted empty on the same port; one process's put fails while it is
  down; its subscriber is back while its circuit breaker is still open; another process then writes the
  key, which is the key's first write in the new Redis;
* Redis evicting entries itself under each evicting ``maxmemory-policy`` (allkeys-lru, -lfu, -random,
  volatile-lru, -lfu, -random, -ttl), the cache's own index keys included under allkeys-*;
* Redis at ``maxmemory`` with ``noeviction``: stored entries are still read by every process,
  ``invalidate()`` still empties the namespace, writes fail open with the documented log line, and
  everything works again once memory is back, without restarting a process.

These describe what a user sees (values served, keys Redis holds), not how the library does it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from victor_rcache.keys import KeySpace
from victor_rcache.local_redis import LocalRedisServer

from .helpers import check_invariants
from .test_resilience import private_server, restart
from .workers import Worker, eventually

pytestmark = pytest.mark.slow

FAST_FAILURE: dict[str, Any] = {"socket_timeout": 0.2, "connect_timeout": 0.2}


@pytest.fixture
def server() -> Iterator[LocalRedisServer]:
    with private_server() as started:
        yield started


@pytest.fixture
def ns() -> str:
    return "f" + uuid.uuid4().hex[:10]


def raw_client(server: LocalRedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def channel_up(worker: Worker) -> bool:
    return bool(worker.health()["coherence"]["channel"] == "up")


def heard(worker: Worker, before: int) -> bool:
    """The worker's listener has applied a message beyond the ``before`` it had."""
    worker.call("catch_up")
    return int(worker.health()["coherence"]["invalidations"]) > before


# ------------------------------------------------------------------------------------- an outage


def test_a_write_redis_never_confirmed_is_not_served_over_another_process_write(server: LocalRedisServer,
                                                                              ns: str) -> None:
    # A's breaker opens at its first failure and stays open for a while: its subscriber is back first.
    with Worker(server.url, ns, promote_after=1, breaker_threshold=1, breaker_cooldown=4.0, **FAST_FAILURE) as a, \
            Worker(server.url, ns, promote_after=1, **FAST_FAILURE) as b:
        a.put("k", "before the outage")
        eventually(lambda: b.get("k") == "before the outage", "B reads A's write")

        server.kill()
        a.put("k", "never confirmed")  # fails open: Redis is down
        assert a.health()["health"]["breaker"]["state"] == "open"
        # While Redis cannot be asked, A still answers with its own write (fail-open)...
        assert a.get("k") == "never confirmed"

        restart(server)  # empty, same port
        eventually(lambda: channel_up(a) and channel_up(b), "both subscribers are back")
        assert a.health()["health"]["breaker"]["state"] == "open", "the scenario needs A's breaker still open"
        before = int(a.health()["coherence"]["invalidations"])
        b.put("k", "B's write")  # the key's first write in the new Redis
        eventually(lambda: heard(a, before), "A hears B's write")

        # ...but from now on A never serves a value older than B's: a miss while its breaker is open,
        # then B's value once it reads Redis again.
        seen: list[Any] = []

        def serves_b() -> bool:
            seen.append(a.get("k"))
            return seen[-1] == "B's write"

        eventually(serves_b, "A serves B's write")
        assert set(seen) <= {None, "B's write"}, f"A served an overwritten value: {seen}"
        assert b.get("k") == "B's write"


def test_a_put_refused_while_redis_is_down_does_not_outlive_the_outage(server: LocalRedisServer, ns: str) -> None:
    """Without another writer: once Redis answers again, what it holds wins over the unconfirmed write."""
    with Worker(server.url, ns, promote_after=1, breaker_threshold=1, breaker_cooldown=0.5, **FAST_FAILURE) as a:
        a.put("k", "confirmed")
        server.kill()
        a.put("k", "never confirmed")
        restart(server)
        eventually(lambda: a.get("k") is None, "A reads Redis (empty now) instead of its unconfirmed write")


# -------------------------------------------------------------------- Redis evicting by itself

EVICTING = ["allkeys-lru", "allkeys-lfu", "allkeys-random",
            "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"]
KEYS = [f"key{i}" for i in range(40)]


def evict_until_gone(raw: redis.Redis, policy: str, entry: bytes) -> None:
    """Fill Redis past a small maxmemory under ``policy`` until it has evicted ``entry`` itself."""
    raw.config_set("maxmemory-policy", policy)
    raw.config_set("maxmemory", int(raw.info("memory")["used_memory"]) + 512 * 1024)
    filler = b"x" * 20_000
    for i in range(4000):
        # Fillers with a ttl are eviction candidates under volatile-* too; a long one, so that
        # volatile-ttl evicts the cache's entries (whose Redis ttl is their idle deadline) first.
        raw.set(f"filler:{i}", filler, ex=10**7)
        if not raw.exists(entry):
            break
    else:
        raise AssertionError(f"{policy}: Redis never evicted {entry!r}")
    raw.config_set("maxmemory", 0)


@pytest.mark.parametrize("policy", EVICTING)
def test_an_entry_redis_evicts_leaves_no_stale_copy_and_the_namespace_heals(server: LocalRedisServer, ns: str,
                                                                           policy: str) -> None:
    raw = raw_client(server)
    settings = {"promote_after": 1, "shards": 2, **FAST_FAILURE}
    with Worker(server.url, ns, **settings) as a, Worker(server.url, ns, **settings) as b:
        for key in KEYS:
            a.put(key, f"{key}: 1")
        assert b.call("get_many", KEYS) == {key: f"{key}: 1" for key in KEYS}  # B holds L1 copies now
        entry = KeySpace(ns, 2).ref("key7").entry
        evict_until_gone(raw, policy, entry)

        before = int(b.health()["coherence"]["invalidations"])
        a.put("key7", "key7: 2")  # Redis has no record of B's copy any more
        eventually(lambda: heard(b, before), "B hears A's write")
        assert b.get("key7") == "key7: 2"

        # Whatever else Redis dropped, every key reads as what was last written or as a miss,
        # never as anything older...
        got = b.call("get_many", KEYS)
        for key, value in got.items():
            assert value == (f"{key}: 2" if key == "key7" else f"{key}: 1"), (key, value)
        # ...and once the reads' bookkeeping and a write have gone through, the shards' indexes, size
        # records and byte totals agree with what Redis holds again.
        b.call("flush_bookkeeping")
        before = int(b.health()["coherence"]["invalidations"])
        for key in KEYS:
            a.put(key, f"{key}: 3")
        a.call("flush_bookkeeping")
        check_invariants(raw, ns, 2, 10_000, 100_000)
        # (B stops serving its copies once their announcements reach it, one message per put: invariant 3
        # allows that moment to come after A's put returned, so B reads once it has applied them all.)
        eventually(lambda: heard(b, before + len(KEYS) - 1), "B hears every one of A's writes")
        assert b.call("get_many", KEYS) == {key: f"{key}: 3" for key in KEYS}
    raw.close()


# ---------------------------------------------------------------------- out of memory, noeviction


def test_out_of_memory_degrades_the_cache_and_it_recovers_on_its_own(server: LocalRedisServer, ns: str) -> None:
    raw = raw_client(server)
    with Worker(server.url, ns, promote_after=1, **FAST_FAILURE) as a, \
            Worker(server.url, ns, promote_after=1, **FAST_FAILURE) as b:
        for key in KEYS:
            a.put(key, f"{key}: stored")
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", int(raw.info("memory")["used_memory"]) // 2)  # over it now
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            raw.set("probe", "x")  # the scenario: Redis refuses writes

        # Stored entries are still served, from Redis, to every process (B never read them before).
        assert b.call("get_many", KEYS) == {key: f"{key}: stored" for key in KEYS}
        assert b.get("key3") == "key3: stored"
        assert a.get("key3") == "key3: stored"

        # Writes fail open, with the log line that says why and what to do.
        errors = int(a.health()["health"]["redis_errors"])
        a.put("key3", "refused")
        assert int(a.health()["health"]["redis_errors"]) == errors + 1
        assert any(r["event"] == "redis_failed" and "out of memory" in r["message"] for r in a.call("logs"))
        assert b.get("key3") == "key3: stored"  # nothing was written
        assert a.call("get_or_set", "computed", "by a loader") == "by a loader"  # computed, not cached

        # invalidate() frees the memory even now.
        a.call("invalidate")
        assert not list(raw.scan_iter(match=f"{ns}:*:e:*")), "entries left after invalidate()"
        for sk in KeySpace(ns, 16).shard_keys:
            assert raw.zcard(sk.l2) + raw.zcard(sk.l3) == 0

        # Memory back: no process restarted, writes work again, and A's refused write is nowhere.
        raw.config_set("maxmemory", 0)
        b.put("key3", "B after the recovery")
        eventually(lambda: a.get("key3") == "B after the recovery", "A reads B's write")
        errors = int(a.health()["health"]["redis_errors"])
        a.put("fresh", "A after the recovery")
        assert int(a.health()["health"]["redis_errors"]) == errors
        assert b.get("fresh") == "A after the recovery"
    raw.close()
