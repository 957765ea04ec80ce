"""Cost acceptance against a real Redis: what one cache call sends, counted three independent ways.

A get that reaches Redis is one plain read (HMGET, no script); get_many is one round trip of HMGETs;
a put and a delete are one EVALSHA each, put_many one round trip with one EVALSHA per shard; the hits
and misses are sent later, in batches, at most one touch.lua EVALSHA per shard per batch. The
bookkeeping thread's own schedule is not measured: each test makes it wait for ``flush_bookkeeping()``
(see ``quiet_bookkeeping``), so a measured window holds the call alone, and the bookkeeping is measured
on its own.

* round trips: the cache's redis-py client counts ``send_packed_command`` calls on its connections
  (a pipeline is one call per server it goes to, i.e. one round trip per server);
* commands the cache sent: MONITOR on a separate connection to each server, keeping lines not issued
  by a script (Redis shows the commands a script runs as client ``lua``), up to a sentinel ECHO;
* ``INFO commandstats`` after ``CONFIG RESETSTAT``, summed over the servers. Redis counts the
  commands a script runs there too, so it shows ``evalsha`` = the script calls, no ``eval`` (no
  reload), and otherwise only commands the called scripts contain.

On a cluster "the servers" are the masters (the cache reads and writes there only): a batch costs
one round trip per master whose slots it touches, and the counting client is a ``RedisCluster``
with the same counting connection class. Its connection to a master opens (with a handshake of its
own) on first use, so before measuring, each test opens them all with a call touching every shard.

``CONFIG RESETSTAT`` is global to a server; the suite runs sequentially in one process, and each
measurement only looks at what happened between its RESETSTAT and its INFO.

On a cluster the cache's pipelines route script calls by their KEYS: redis-py 8.1's sync
``ClusterPipeline`` would otherwise ask a node ``COMMAND GETKEYS`` for each script call first (one
extra round trip each); these tests are what shows it does not.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.connection import Connection
from redis.crc import key_slot

from victor_rcache import MultiLevelCache, bookkeeping
from victor_rcache.keys import KeySpace
from victor_rcache.scripts import Script
from victor_rcache.tiers import default_scripts

from .helpers import Backend, Client, FakeClock, read_namespace, server_of, servers

Make = Callable[..., MultiLevelCache]

# What the measurement itself sends inside the window, and what a cluster replica sends its master
# (REPLCONF ACK, every second): neither is the cache's.
HARNESS_COMMANDS = {"CONFIG", "INFO", "REPLCONF"}


@dataclass
class RoundTrips:
    sends: int = 0


@pytest.fixture(autouse=True)
def quiet_bookkeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bookkeeping thread sends a batch when it is a window old or holds a batch of events; either could
    fall inside a measured window and be counted as the measured call's cost. Raised out of reach, they
    leave ``flush_bookkeeping()`` as the only sender, at the moment a test chooses. (Set before the
    test's caches are made: their threads then wait as long.)"""
    monkeypatch.setattr(bookkeeping, "WINDOW", 3600.0)
    monkeypatch.setattr(bookkeeping, "BATCH", 10**9)
    monkeypatch.setattr(bookkeeping, "EVIDENCE_BATCH", 10**9)


@pytest.fixture
def counting_client(backend: Backend) -> Iterator[tuple[Client, RoundTrips]]:
    """A redis-py client (a ``RedisCluster`` on a cluster) whose connections count every
    ``send_packed_command`` (one per round trip).

    Tests request it before ``make_cache``, so it is set up first and closed last: the caches built
    on it report their counters through it when ``make_cache`` closes them (a closed ``RedisCluster``,
    unlike a closed ``Redis``, cannot be used again)."""
    trips = RoundTrips()

    class CountingConnection(Connection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            trips.sends += 1
            super().send_packed_command(command, check_health)

    build = RedisCluster.from_url if backend.cluster else redis.Redis.from_url
    client: Client = build(backend.url, connection_class=CountingConnection)
    yield client, trips
    client.close()


@dataclass
class Measurement:
    round_trips: int = 0
    sent: list[str] = field(default_factory=list)  # command names the cache sent, per MONITOR
    calls: dict[str, int] = field(default_factory=dict)  # commandstats: command -> calls

    @property
    def evalsha_calls(self) -> int:
        return self.calls.get("evalsha", 0)


@contextmanager
def measure(raw: Client, trips: RoundTrips) -> Iterator[Measurement]:
    """Measure what the body makes the cache send; the result is filled in when the block exits."""
    result = Measurement()
    sentinel = f"vrc-sentinel-{uuid.uuid4().hex}"
    masters = servers(raw, replicas=False)
    for script in default_scripts().all():  # steady state: the reload after NOSCRIPT is test_lua_scripts'
        raw.script_load(script.source)  # type: ignore[arg-type]
    with ExitStack() as stack:
        monitors = []
        for master in masters:
            address = master.connection_pool.connection_kwargs
            # socket_timeout: a guard against a hang, not a timing
            watcher = stack.enter_context(redis.Redis(host=address["host"], port=address["port"], socket_timeout=30))
            monitors.append(stack.enter_context(watcher.monitor()))
        for master in masters:
            master.config_resetstat()
        start = trips.sends
        yield result
        result.round_trips = trips.sends - start
        stats = [master.info("commandstats") for master in masters]
        for master, monitor in zip(masters, monitors, strict=True):
            master.echo(sentinel)
            while True:
                line = monitor.next_command()
                if sentinel in line["command"]:
                    break
                name = line["command"].split(" ", 1)[0].upper()
                if line["client_type"] != "lua" and name not in HARNESS_COMMANDS:
                    result.sent.append(name)
    for server_stats in stats:
        for key, value in server_stats.items():
            name = key.removeprefix("cmdstat_")
            if name.split("|")[0].upper() not in HARNESS_COMMANDS:
                result.calls[name] = result.calls.get(name, 0) + value["calls"]


def commands_in(*scripts: Script) -> set[str]:
    """The Redis commands a script's source can run (redis.call('NAME', ...) or redis.pcall)."""
    return {name.decode().lower() for s in scripts for name in re.findall(rb"redis\.p?call\('(\w+)'", s.source)}


def assert_only_reads(m: Measurement, hmget: int) -> None:
    """The cache sent ``hmget`` plain reads and nothing else: no script ran."""
    assert m.sent == ["HMGET"] * hmget, f"the cache sent {m.sent}"
    assert m.calls == {"hmget": hmget}


def assert_only_script_calls(m: Measurement, script: Script, evalsha: int) -> None:
    assert m.sent == ["EVALSHA"] * evalsha, f"the cache sent {m.sent}"
    assert m.evalsha_calls == evalsha
    assert "eval" not in m.calls
    inner = set(m.calls) - {"evalsha"}
    assert inner <= commands_in(script), f"commands no {script.name}.lua call explains: {inner - commands_in(script)}"


# ------------------------------------------------------------------------------------ single keys

TIERS = {"shards": 1, "l2_size": 1, "l3_size": 10, "promote_after": 3}


@pytest.mark.parametrize("tier", [3, 2, 0], ids=["l3-hit", "l2-hit", "miss"])
def test_a_get_that_reaches_redis_costs_one_hmget(tier: int, counting_client: tuple[Client, RoundTrips],
                                                  make_cache: Make, raw: Client, namespace: str,
                                                  clock: FakeClock) -> None:
    client, trips = counting_client
    writer = make_cache(clock=clock, **TIERS)
    writer.put("cold", {"v": 1})
    clock.advance(1)
    writer.put("warm", {"v": 2})  # L2 holds one entry: "cold" moves down to L3
    state = read_namespace(raw, namespace, 1)
    assert (state.tier_of(b"cold"), state.tier_of(b"warm")) == (3, 2)
    key, expected = {3: ("cold", {"v": 1}), 2: ("warm", {"v": 2}), 0: ("absent", None)}[tier]

    reader = make_cache(clock=clock, client=client, **TIERS)
    assert reader.get("warm-up") is None  # the one-time handshake on <ns>:config, and a first connection
    reader.flush_bookkeeping()  # its miss: sent now, not later
    clock.advance(1)
    with measure(raw, trips) as m:
        assert reader.get(key) == expected

    assert m.round_trips == 1
    assert_only_reads(m, hmget=1)
    metrics = reader.get_metrics()  # a process's own counts are exact at once
    assert (metrics["l2"]["hits"], metrics["l3"]["hits"]) == {3: (0, 1), 2: (1, 0), 0: (0, 0)}[tier]
    with measure(raw, trips) as m:
        reader.flush_bookkeeping()  # the hit's (or miss's) bookkeeping: one touch.lua call
    assert m.round_trips == 1
    assert_only_script_calls(m, default_scripts().touch, evalsha=1)
    assert read_namespace(raw, namespace, 1).tier_of(key.encode()) == tier  # one hit: no promotion yet


def test_a_put_costs_one_evalsha(counting_client: tuple[Client, RoundTrips], make_cache: Make, raw: Client,
                                 namespace: str, clock: FakeClock) -> None:
    client, trips = counting_client
    writer = make_cache(clock=clock, client=client, **TIERS)
    writer.put("warm-up", 0)
    clock.advance(1)
    with measure(raw, trips) as m:
        writer.put("k", {"tools": ["search"]}, ttl=60)

    assert m.round_trips == 1
    assert_only_script_calls(m, default_scripts().put, evalsha=1)
    assert read_namespace(raw, namespace, 1).tier_of(b"k") == 2


def test_a_delete_costs_one_evalsha(counting_client: tuple[Client, RoundTrips], make_cache: Make,
                                    raw: Client) -> None:
    client, trips = counting_client
    cache = make_cache(client=client)
    cache.put("k", 1)
    with measure(raw, trips) as m:
        assert cache.delete("k") is True

    assert m.round_trips == 1
    assert_only_script_calls(m, default_scripts().delete, evalsha=1)


def test_an_l1_hit_costs_no_command(counting_client: tuple[Client, RoundTrips], make_cache: Make,
                                    raw: Client) -> None:
    client, trips = counting_client
    cache = make_cache(client=client)
    cache.put("local", [1, 2])
    with measure(raw, trips) as m:
        assert cache.get("local") == [1, 2]
        assert cache.get_many(["local"]) == {"local": [1, 2]}

    assert (m.round_trips, m.sent, m.calls) == (0, [], {})
    assert cache.get_metrics()["l1"]["hits"] == 2


# ------------------------------------------------------------------------------------ many keys


def hundred_keys(space: KeySpace, shards: set[int] | None) -> list[str]:
    """100 keys, spread over every shard or confined to ``shards``."""
    out: list[str] = []
    n = 0
    while len(out) < 100:
        key = f"tool query {n}"
        n += 1
        if shards is None or space.ref(key).shard in shards:
            out.append(key)
    return out


SPREADS = [pytest.param(None, id="all-shards"), pytest.param({2, 9}, id="two-shards"),
           pytest.param({5}, id="one-shard")]


def slots_touched(space: KeySpace, keys: list[str]) -> tuple[int, int]:
    shards = {space.ref(k).shard for k in keys}
    return len(shards), len({key_slot(space.shard_keys[s].l2) for s in shards})


def servers_touched(raw: Client, space: KeySpace, keys: list[str]) -> int:
    """How many servers hold the shards of ``keys``: 1 standalone, the masters involved on a cluster."""
    return len({id(server_of(raw, space.shard_keys[space.ref(k).shard].l2)) for k in keys})


@pytest.mark.parametrize("confine", SPREADS)
def test_get_many_of_100_keys_is_one_round_trip_of_hmgets(
        confine: set[int] | None, counting_client: tuple[Client, RoundTrips], make_cache: Make, raw: Client,
        namespace: str) -> None:
    client, trips = counting_client
    space = KeySpace(namespace, 16)
    keys = hundred_keys(space, confine)
    shards, slots = slots_touched(space, keys)
    assert shards == slots <= 16
    assert shards == (16 if confine is None else len(confine))
    make_cache().put_many({k: i for i, k in enumerate(keys)})

    reader = make_cache(client=client)
    assert reader.get("warm-up") is None
    reader.get_metrics()  # touches every shard: the client's connection to every server is open
    reader.flush_bookkeeping()
    with measure(raw, trips) as m:
        found = reader.get_many([*keys, *keys[:10]])  # repeats are asked for once

    assert found == {k: i for i, k in enumerate(keys)}
    assert m.round_trips <= slots  # at most one round trip per hash slot touched...
    # ...and one pipeline per server carries all its reads (standalone: one for every shard)
    assert m.round_trips == servers_touched(raw, space, keys)
    assert_only_reads(m, hmget=100)
    assert reader.get_metrics()["l2"]["hits"] == 100

    with measure(raw, trips) as m:
        reader.flush_bookkeeping()
    assert m.round_trips == servers_touched(raw, space, keys)
    assert_only_script_calls(m, default_scripts().touch, evalsha=shards)  # one per shard read: never more
    assert reader.get_metrics("fleet")["l2"]["hits"] == 100


@pytest.mark.parametrize("confine", SPREADS)
def test_put_many_of_100_keys_is_one_round_trip_with_one_evalsha_per_shard(
        confine: set[int] | None, counting_client: tuple[Client, RoundTrips], make_cache: Make, raw: Client,
        namespace: str) -> None:
    client, trips = counting_client
    space = KeySpace(namespace, 16)
    keys = hundred_keys(space, confine)
    shards, slots = slots_touched(space, keys)
    writer = make_cache(client=client)
    writer.put("warm-up", 0)
    writer.get_metrics()  # touches every shard: the client's connection to every server is open
    with measure(raw, trips) as m:
        writer.put_many({k: {"n": i} for i, k in enumerate(keys)})

    assert m.round_trips <= slots
    assert m.round_trips == servers_touched(raw, space, keys)
    assert_only_script_calls(m, default_scripts().put, evalsha=shards)
    assert make_cache().get_many(keys) == {k: {"n": i} for i, k in enumerate(keys)}


@pytest.mark.parametrize("confine", SPREADS)
def test_the_bookkeeping_of_many_gets_is_at_most_one_touch_evalsha_per_shard(
        confine: set[int] | None, counting_client: tuple[Client, RoundTrips], make_cache: Make, raw: Client,
        namespace: str) -> None:
    """110 gets, one plain read each (80 hits, 20 misses, 10 repeated hits): their bookkeeping goes out as
    one batch per shard, one touch.lua call each, all in one round trip per server."""
    client, trips = counting_client
    space = KeySpace(namespace, 16)
    keys = hundred_keys(space, confine)
    shards, _ = slots_touched(space, keys)
    make_cache().put_many({k: i for i, k in enumerate(keys[:80])})  # the other 20 keys miss
    reader = make_cache(client=client, promote_after=10**9)  # never copied into L1: every get reads Redis
    assert reader.get("warm-up") is None
    reader.get_metrics()  # touches every shard: the client's connection to every server is open
    reader.flush_bookkeeping()
    for key in [*keys, *keys[:10]]:
        reader.get(key)
    assert reader.get_metrics()["health"]["bookkeeping"]["pending"] > 0, "nothing waits to be sent"

    with measure(raw, trips) as m:
        reader.flush_bookkeeping()
    assert m.evalsha_calls <= shards, f"{m.evalsha_calls} touch.lua calls for {shards} shards"
    assert_only_script_calls(m, default_scripts().touch, evalsha=shards)
    assert m.round_trips == servers_touched(raw, space, keys)
    fleet = reader.get_metrics("fleet")["l2"]
    assert (fleet["hits"], fleet["misses"]) == (90, 21)  # the 10 repeats hit again; 20 misses and the warm-up
