"""Fleet coherence against a real Redis (docs/design.md#invariant-3-coherent-l1-copies, docs/coherence.md).

* Two spawned OS processes, A and B: B holds a value in its L1, A replaces it, deletes it or
  invalidates the namespace; B stops serving the old value within 100 ms, measured by B polling
  ``get`` against a deadline. Each B also holds a cache with ``coherence=False`` as a control: it
  still serves the old copy, so the coherent cache's fresh answer is the invalidation's doing.
* ``CLIENT KILL`` of B's subscriber connection makes B's listener flush B's L1 at once, by itself
  (readers do no I/O; a value changed in Redis without any publish proves the flush), and B
  resubscribes and serves from L1 again. With an ACL
  user that may not SUBSCRIBE, the channel stays down as long as the test wants: L1 is bypassed
  meanwhile, and copies filled while down are flushed when the subscription is back.
* A read-heavy workload with promotions, demotions, evictions, idle moves and expiries (and the
  bookkeeping that applies them) publishes nothing; one put over an existing key publishes exactly one
  parseable message.
* Which script calls publish: every write (a first put, a delete of an absent key, an entry's rewrite
  after Redis dropped it), never a read; version floors against a fill racing an invalidation, and ids
  of any bytes.
* Closing twice is harmless; a holder drops its copy of an entry evicted long ago once it is rewritten.

Messages are observed with a raw redis-py subscriber on the namespace's shard channels
``<ns>:{<tag>}:inval`` (sharded pub/sub), each with a private fence channel of the same hash tag:
Redis delivers one connection's messages in publish order, so publishing a shard's fence and reading
until it arrives yields exactly what that shard published before, with no timing involved. On a
cluster each shard's channel lives on the master owning its slot; the tap holds one connection per
master, and reads until every fence has arrived. The only timing assertion is the
acceptance's 100 ms bound; every other wait polls a condition against a generous deadline.

Every test here runs on both backends. On a cluster the server commands (CLIENT LIST/KILL, PUBSUB
NUMSUB, ACL) go to the node that matters, or to every node: a subscriber may sit on any of them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from victor_rcache import CacheClosedError, MultiLevelCache
from victor_rcache.codec import Envelope, MsgpackCodec
from victor_rcache.coherence import parse_announcements, parse_invalidation
from victor_rcache.config import CacheConfig
from victor_rcache.keys import KeySpace
from victor_rcache.l1 import LocalCache
from victor_rcache.tiers import feed

from .helpers import (
    Backend,
    Client,
    FakeClock,
    check_invariants,
    guard_slots,
    held_value,
    server_at,
    server_of,
    servers,
    subscribers,
)

Make = Callable[..., MultiLevelCache]
Flush = Callable[[], None]

BOUND = 0.1  # seconds: another process stops serving an old value within this (invariant 3, docs/design.md)
LIVENESS = 5.0  # seconds any other awaited condition may take; only a hang ever reaches it
MISS = "<miss>"  # the default a worker passes to get(), so a miss is visible across processes


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = LIVENESS) -> None:
    """Poll ``predicate`` until it holds; fail (never hang) if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"


def entry_id(cache: MultiLevelCache, key: str | bytes) -> bytes:
    return cache._core.space.ref(key).id


def flushes(cache: MultiLevelCache) -> int:
    """How many times the cache's listener has flushed L1 (no Redis call)."""
    return int(cache._core.coherence_state()["l1_flushes"])


def held(cache: MultiLevelCache, key: str | bytes) -> bool:
    """Whether the cache's L1 holds a live copy of ``key`` (not counted as a request)."""
    return cache._core.l1.get(entry_id(cache, key)) is not None



def entry_key(cache: MultiLevelCache, key: str | bytes) -> bytes:
    return cache._core.space.entry_key(cache._core.space.ref(key))


def redis_version_of(raw: Client, cache: MultiLevelCache, key: str | bytes) -> int:
    ver = raw.hget(entry_key(cache, key), "ver")
    assert ver is not None, f"{key!r} has no entry in Redis"
    return int(ver)


class ChannelTap:
    """A raw subscriber on the namespace's shard channels ``<ns>:{<tag>}:inval`` (those of every shard
    count a test may use), each with a private fence channel of the same hash tag, so on the same node
    and the same connection."""

    def __init__(self, raw: Client, namespace: str) -> None:
        self.raw = raw
        run = uuid.uuid4().hex
        self.channels = sorted({c for n in range(1, 17) for c in KeySpace(namespace, n).channels})
        self.fences = {channel: channel[:-len(b"inval")] + f"test-fence-{run}".encode() for channel in self.channels}
        # One pubsub per master, holding the channels (and fences) of that master's slots.
        self.taps: dict[str, tuple[Any, list[bytes]]] = {}
        for channel in self.channels:
            server = server_of(raw, channel)
            name = repr(server.connection_pool.connection_kwargs.get("port"))
            if name not in self.taps:
                self.taps[name] = (server.pubsub(), [])
            pubsub, fences = self.taps[name]
            pubsub.ssubscribe(channel)  # one channel per SSUBSCRIBE: on a cluster they must share a slot
            pubsub.ssubscribe(self.fences[channel])
            fences.append(self.fences[channel])
        wanted = set(self.channels) | set(self.fences.values())
        confirmed: set[bytes] = set()
        deadline = time.monotonic() + LIVENESS
        while confirmed != wanted:  # subscribed before anything under test runs
            assert time.monotonic() < deadline, "the tap's SSUBSCRIBE was not confirmed"
            for pubsub, _ in self.taps.values():
                msg = pubsub.get_sharded_message(timeout=0.01)
                if msg is not None and msg["type"] == "ssubscribe":
                    confirmed.add(msg["channel"])

    def collect(self) -> list[bytes]:
        """Every message published on the shard channels since the last collect, in order per shard (each
        shard's fence is published after whatever its shard published, and read from the same connection)."""
        out: list[bytes] = []
        for pubsub, fences in self.taps.values():
            tokens = {}
            for fence in fences:
                token = uuid.uuid4().hex.encode()
                assert server_of(self.raw, fence).spublish(fence, token) == 1, "the fence has one subscriber: the tap"
                tokens[fence] = token
            deadline = time.monotonic() + LIVENESS
            while tokens:
                assert time.monotonic() < deadline, f"the fences never all arrived; got {out!r} so far"
                msg = pubsub.get_sharded_message(timeout=0.5)
                if msg is None or msg["type"] != "smessage":
                    continue
                if msg["channel"] in tokens:
                    assert tokens.pop(msg["channel"]) == msg["data"]
                    continue
                assert msg["channel"] in self.fences, msg
                out.append(msg["data"])
        return out

    def close(self) -> None:
        for pubsub, _ in self.taps.values():
            pubsub.close()


@pytest.fixture
def tap(raw: Client, namespace: str) -> Iterator[ChannelTap]:
    t = ChannelTap(raw, namespace)
    yield t
    t.close()


def single_invalidation(messages: list[bytes]) -> list[tuple[bytes, int]]:
    assert len(messages) == 1, f"expected exactly one invalidation, got {messages!r}"
    return parse_invalidation(messages[0])


# ---------------------------------------------------------------- 1. two OS processes, within 100 ms


def _run_command(caches: dict[str, MultiLevelCache], command: tuple[Any, ...]) -> dict[str, Any]:
    cache, blind = caches["coherent"], caches["blind"]
    op, *args = command
    if op == "put":
        key, value, *ttl = args
        cache.put(key, value, *ttl)
        return {"done_at": time.monotonic()}
    if op == "redis_hits":  # the coherent cache's reads Redis answered so far (this process's counts)
        m = cache.get_metrics()
        return {"redis_hits": m["l2"]["hits"] + m["l3"]["hits"], "l1_hits": m["l1"]["hits"]}
    if op == "delete":
        (key,) = args
        deleted = cache.delete(key)
        return {"done_at": time.monotonic(), "deleted": deleted}
    if op == "invalidate":
        cache.invalidate()
        return {"done_at": time.monotonic()}
    if op == "hold":  # read the keys into both caches' L1s, then read them again from L1
        (keys,) = args
        out: dict[str, Any] = {}
        for name, c in caches.items():
            first = [c.get(k, MISS) for k in keys]
            in_l1 = [held(c, k) for k in keys]
            hits = c.get_metrics()["l1"]["hits"]
            again = [c.get(k, MISS) for k in keys]
            out[name] = {"first": first, "held": in_l1, "again": again,
                         "l1_hits": c.get_metrics()["l1"]["hits"] - hits}
        return out
    if op == "await":  # poll get() until it returns `expected` or the 100 ms deadline passes
        keys, expected, written_at = args
        start = time.monotonic()
        deadline = start + BOUND
        seen: list[dict[str, Any]] = []
        polls = 0
        while True:
            got = {k: cache.get(k, MISS) for k in keys}
            now = time.monotonic()
            polls += 1
            if not seen or seen[-1] != got:
                seen.append(got)
            if got == expected or now >= deadline:
                break
        return {"got": got, "elapsed": now - start, "since_write": now - written_at, "polls": polls,
                "seen": seen, "blind": {k: blind.get(k, MISS) for k in keys},
                "coherence": cache.get_metrics()["coherence"]}
    raise ValueError(f"unknown command {command!r}")


def fleet_worker(backend: Backend, namespace: str, commands: Any, replies: Any) -> None:
    """One worker process: a coherent cache and a blind one (coherence=False), run commands in order."""
    caches: dict[str, MultiLevelCache] = {}
    try:
        settings: dict[str, Any] = {"namespace": namespace, "fail_open": False, "promote_after": 1,
                                    "cluster": backend.cluster}
        caches["coherent"] = guard_slots(MultiLevelCache(backend.url, **settings))
        caches["blind"] = guard_slots(MultiLevelCache(backend.url, coherence=False, **settings))
        wait_until(lambda: caches["coherent"].get_metrics()["coherence"]["channel"] == "up",
                   "the worker's subscription")
        replies.put({"pid": os.getpid()})
        while True:
            command = commands.get()
            if command[0] == "stop":
                break
            try:
                replies.put(_run_command(caches, command))
            except BaseException:  # the parent shows the traceback
                replies.put({"error": traceback.format_exc()})
    except BaseException:
        replies.put({"error": traceback.format_exc()})
    finally:
        for c in caches.values():
            c.close()


class Worker:
    """The parent's handle on one spawned worker: send a command, wait for its reply."""

    def __init__(self, ctx: Any, backend: Backend, namespace: str) -> None:
        self.commands = ctx.Queue()
        self.replies = ctx.Queue()
        self.process = ctx.Process(target=fleet_worker, args=(backend, namespace, self.commands, self.replies))
        self.process.start()

    def reply(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"worker {self.process.pid} did not reply within {timeout} s"
            try:
                out: dict[str, Any] = self.replies.get(timeout=min(left, 0.5))
            except queue.Empty:
                assert self.process.is_alive(), f"worker died with exit code {self.process.exitcode}"
                continue
            assert "error" not in out, f"worker {self.process.pid} raised:\n{out['error']}"
            return out

    def ask(self, *command: Any) -> dict[str, Any]:
        self.commands.put(command)
        return self.reply(timeout=LIVENESS)

    def stop(self) -> None:
        if self.process.is_alive():
            self.commands.put(("stop",))
            self.process.join(timeout=LIVENESS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(LIVENESS)


@pytest.fixture(scope="module")
def fleet(backend: Backend) -> Iterator[tuple[Worker, Worker, str]]:
    """Processes A and B on one fresh namespace (shared by this module's three acceptance tests)."""
    namespace = "t" + uuid.uuid4().hex[:12]
    ctx = mp.get_context("spawn")
    workers = [Worker(ctx, backend, namespace) for _ in range(2)]
    try:
        pids = {w.reply()["pid"] for w in workers}
        assert len(pids) == 2
        assert os.getpid() not in pids
        yield workers[0], workers[1], namespace
    finally:
        for w in workers:
            w.stop()
    assert all(w.process.exitcode == 0 for w in workers), [w.process.exitcode for w in workers]


def hold_in_b(b: Worker, keys: list[str], expected: list[Any]) -> None:
    """B reads ``keys``: both its caches now hold them in L1 and serve them from there."""
    held_by = b.ask("hold", keys)
    for name in ("coherent", "blind"):
        got = held_by[name]
        assert (got["first"], got["again"]) == (expected, expected), f"B's {name} cache read {got}"
        assert got["held"] == [True] * len(keys), f"B's {name} cache did not copy {keys} into L1: {got}"
        assert got["l1_hits"] == len(keys), f"B's {name} cache did not serve {keys} from L1: {got}"


def assert_b_caught_up(seen: dict[str, Any], expected: dict[str, Any], old: dict[str, Any], what: str) -> None:
    report = (f"{what}: B saw {seen['seen']} in {seen['polls']} polls; {seen['elapsed'] * 1000:.2f} ms after B "
              f"started polling, {seen['since_write'] * 1000:.2f} ms after A's call returned; "
              f"coherence {seen['coherence']}")
    print(report)  # shown with -s: the measured latencies
    assert seen["got"] == expected, f"B still served an old value within {BOUND * 1000:.0f} ms. {report}"
    assert seen["elapsed"] <= BOUND, f"B took longer than {BOUND * 1000:.0f} ms. {report}"
    # Control: B's cache without coherence still serves its old L1 copy, so the copy was really
    # there and only the invalidation removed it from the coherent cache.
    assert seen["blind"] == old, f"the blind control cache returned {seen['blind']}, not the old {old}"
    assert seen["coherence"]["channel"] == "up"
    assert seen["coherence"]["invalidations"] >= 1


def test_a_put_in_process_a_reaches_process_bs_l1_within_100_ms(fleet: tuple[Worker, Worker, str]) -> None:
    a, b, _ = fleet
    a.ask("put", "replaced", "v1")
    hold_in_b(b, ["replaced"], ["v1"])
    written = a.ask("put", "replaced", "v2")
    seen = b.ask("await", ["replaced"], {"replaced": "v2"}, written["done_at"])
    assert_b_caught_up(seen, {"replaced": "v2"}, {"replaced": "v1"}, "put v2")


@pytest.mark.parametrize(("ttl", "read_again"), [(None, False), (60.0, True)], ids=["no-ttl", "ttl"])
def test_a_small_value_written_in_process_a_replaces_bs_copy_in_place_unless_it_has_a_ttl(
        fleet: tuple[Worker, Worker, str], ttl: float | None, read_again: bool) -> None:
    """The announcement of a small value without a ttl carries it: B's L1 copy becomes the new value with no
    read of Redis. A value with a ttl is only announced: B drops its copy and reads the new one from Redis."""
    a, b, _ = fleet
    key = f"in-place-{ttl}"
    a.ask("put", key, {"v": 1})
    hold_in_b(b, [key], [{"v": 1}])
    before = b.ask("redis_hits")
    written = a.ask("put", key, {"v": 2}, ttl)
    seen = b.ask("await", [key], {key: {"v": 2}}, written["done_at"])
    assert_b_caught_up(seen, {key: {"v": 2}}, {key: {"v": 1}}, f"put with ttl={ttl}")
    after = b.ask("redis_hits")
    assert (after["redis_hits"] > before["redis_hits"]) is read_again, (before, after)
    if not read_again:
        assert after["l1_hits"] > before["l1_hits"], "B's new value came from somewhere else than its L1"


def test_a_delete_in_process_a_reaches_process_bs_l1_within_100_ms(fleet: tuple[Worker, Worker, str]) -> None:
    a, b, _ = fleet
    a.ask("put", "deleted", "v1")
    hold_in_b(b, ["deleted"], ["v1"])
    done = a.ask("delete", "deleted")
    assert done["deleted"] is True
    seen = b.ask("await", ["deleted"], {"deleted": MISS}, done["done_at"])
    assert_b_caught_up(seen, {"deleted": MISS}, {"deleted": "v1"}, "delete")


def test_invalidate_in_process_a_reaches_process_bs_l1_within_100_ms(fleet: tuple[Worker, Worker, str]) -> None:
    a, b, namespace = fleet
    keys = [f"flushed-{i}" for i in range(4)]
    space = KeySpace(namespace, CacheConfig().shards)  # the workers use the default shard count
    assert len({space.ref(k).shard for k in keys}) > 1, "the keys should span several shards"
    for k in keys:
        a.ask("put", k, f"v1-{k}")
    hold_in_b(b, keys, [f"v1-{k}" for k in keys])
    done = a.ask("invalidate")
    seen = b.ask("await", keys, dict.fromkeys(keys, MISS), done["done_at"])
    assert_b_caught_up(seen, dict.fromkeys(keys, MISS), {k: f"v1-{k}" for k in keys}, "invalidate()")


# ------------------------------------------------------------------------ 2. a killed subscriber


def subscriber_client(raw: Client, cache: MultiLevelCache) -> tuple[redis.Redis, dict[str, str]]:
    """The server ``cache``'s (first shard's) subscriber connection is on (on a cluster: the master
    owning the channel's slot) and that connection's CLIENT LIST entry there (with the server's address
    as ``node``), found by its local address."""
    conn = cache._core.coherence._conn  # type: ignore[attr-defined]
    assert conn is not None, "the cache has no subscriber connection"
    server = server_at(raw, conn.host, conn.port)
    host, port = conn._sock.getsockname()[:2]
    mine = [c for c in server.client_list() if c["addr"] == f"{host}:{port}"]
    assert len(mine) == 1, f"no single client at {host}:{port} on {conn.host}:{conn.port}: {mine}"
    client: dict[str, str] = {**mine[0], "node": f"{conn.host}:{conn.port}"}
    assert int(client["ssub"]) > 0, f"not a subscriber of shard channels: {client}"
    assert "P" in client["flags"], f"not a subscriber: {client}"
    return server, client


def test_killing_the_subscriber_connection_flushes_l1_at_once(make_cache: Make, raw: Client,
                                                              namespace: str, flush_all: Flush) -> None:
    a, b = make_cache(), make_cache(promote_after=1)
    old, new = "stale-copy", "fresh-data"
    envelope = Envelope(MsgpackCodec())
    assert len(envelope.wrap(old)) == len(envelope.wrap(new))  # so the size records stay exact
    keys = ["killed-1", "killed-2"]
    for k in keys:
        a.put(k, old)
        assert b.get(k) == old
        assert held(b, k)
    channel = KeySpace(namespace, b.config.shards).channels[0]  # (any shard's)
    assert subscribers(raw, channel) == 1  # A and B are caches of one process: they share one subscription

    # Change the values in Redis behind every cache's back: no script runs, nothing is published.
    for k in keys:
        raw.hset(entry_key(b, k), "v", envelope.wrap(new))
    assert [b.get(k) for k in keys] == [old, old], "B should still serve its L1 copies (nothing told it)"
    before = b.get_metrics()

    server, victim = subscriber_client(raw, b)
    assert server.client_kill_filter(_id=victim["id"]) == 1

    # B's listener notices the loss by itself and flushes L1 (no read is needed for that); then a
    # read finds no copy and the value comes from Redis.
    wait_until(lambda: flushes(b) > before["coherence"]["l1_flushes"], "B's listener noticing the kill")
    assert b.get(keys[0]) == new
    assert b.get(keys[1]) == new
    after = b.get_metrics()
    assert after["coherence"]["l1_flushes"] > before["coherence"]["l1_flushes"], after["coherence"]
    assert after["l1"]["hits"] == before["l1"]["hits"], "a read after the kill was served from L1"
    assert after["l2"]["hits"] == before["l2"]["hits"] + 2

    # B resubscribes by itself, then trusts and serves its L1 again, and hears invalidations again.
    wait_until(lambda: b.get_metrics()["coherence"]["channel"] == "up", "B's resubscription")
    _, resubscribed = subscriber_client(raw, b)
    assert (resubscribed["node"], resubscribed["id"]) != (victim["node"], victim["id"])  # ids are per server
    assert subscribers(raw, channel) == 1
    assert b.get(keys[0]) == new  # L1 was flushed again on resubscribing: this read fills it
    hits = b.get_metrics()["l1"]["hits"]
    assert b.get(keys[0]) == new
    assert b.get_metrics()["l1"]["hits"] == hits + 1, "B does not serve from L1 after resubscribing"
    a.put(keys[0], "after")
    wait_until(lambda: b.get(keys[0]) == "after", "B hearing an invalidation on its new subscription")
    flush_all()  # B's hits reach the indexes with its bookkeeping
    check_invariants(raw, namespace, b.config.shards, b.config.l2_size, b.config.l3_size)


def test_namespaces_sharing_a_subscriber_each_lose_it_and_closing_one_keeps_the_other(
        make_cache: Make, raw: Client, namespace: str) -> None:
    """Two namespaces of one process share the subscriber: killing its connection flushes and bypasses both
    L1s until each has its own channels back; closing one cache unsubscribes its channels only, and the
    other namespace goes on hearing its writes."""
    a = make_cache(namespace=f"{namespace}-a", promote_after=1)
    b = make_cache(namespace=f"{namespace}-b", promote_after=1)
    writer_b = make_cache(namespace=f"{namespace}-b")
    assert a._core.coherence.subscriber is b._core.coherence.subscriber  # type: ignore[attr-defined]
    a.put("k", "v1")
    writer_b.put("k", "v1")
    for cache in (a, b):
        assert cache.get("k") == "v1"
        assert held(cache, "k")
    before = {cache: flushes(cache) for cache in (a, b)}
    server, victim = subscriber_client(raw, a)
    assert server.client_kill_filter(_id=victim["id"]) == 1
    wait_until(lambda: all(flushes(cache) > before[cache] for cache in (a, b)), "both namespaces flushing L1")
    assert not held(a, "k")
    assert not held(b, "k")
    wait_until(lambda: all(c.get_metrics()["coherence"]["channel"] == "up" for c in (a, b)), "both channels back")

    channel_a, channel_b = a._core.space.channels[0], b._core.space.channels[0]
    assert (subscribers(raw, channel_a), subscribers(raw, channel_b)) == (1, 1)
    a.close()
    wait_until(lambda: subscribers(raw, channel_a) == 0, "A's channels unsubscribed")
    assert subscribers(raw, channel_b) == 1, "closing A unsubscribed B's channels too"
    assert b.get_metrics()["coherence"]["channel"] == "up"
    assert b.get("k") == "v1"
    assert held(b, "k")
    writer_b.put("k", "v2")  # (a small value without a ttl: its announcement carries it)
    wait_until(lambda: held_value(b, "k", MISS) == "v2", "B hearing a write after A closed")
    assert b.get("k") == "v2"


@pytest.fixture
def acl_user(raw: Client, backend: Backend, namespace: str) -> Iterator[tuple[str, str]]:
    """A Redis ACL user of this test's own (name, URL), so its permissions can change mid-test.
    ACLs are per server: on a cluster the user is made (and later changed) on every node."""
    name, password = f"coherence-{namespace}", uuid.uuid4().hex
    for server in servers(raw):
        server.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                           commands=["+@all"])
    scheme, rest = backend.url.split("://", 1)
    yield name, f"{scheme}://{name}:{password}@{rest}"
    for server in servers(raw):
        server.acl_deluser(name)


def test_l1_is_bypassed_while_the_subscription_is_down_and_flushed_when_it_is_back(
        make_cache: Make, raw: Client, namespace: str, acl_user: tuple[str, str], backend: Backend) -> None:
    """B's user may no longer SSUBSCRIBE, so after CLIENT KILL its channels stay down until the test
    allows it again: a deterministic window in which L1 must not be served, and after which the
    copies B filled while down (one is made stale behind its back) must be gone."""
    user, url = acl_user
    a = make_cache()
    b = guard_slots(MultiLevelCache(url, namespace=namespace, fail_open=False, promote_after=1,
                                    cluster=backend.cluster))
    try:
        envelope = Envelope(MsgpackCodec())
        one, two, three = "value-one", "value-two", "value-3rd"
        assert len({len(envelope.wrap(v)) for v in (one, two, three)}) == 1  # the size records stay exact
        a.put("k", one)
        assert b.get("k") == one
        assert held(b, "k")
        server, victim = subscriber_client(raw, b)
        assert victim["user"] == user
        for node in servers(raw):  # the live subscription is not affected
            node.execute_command("ACL", "SETUSER", user, "-ssubscribe")
        assert b.get_metrics()["coherence"]["channel"] == "up"

        raw.hset(entry_key(b, "k"), "v", envelope.wrap(two))  # no publish
        assert b.get("k") == one, "B should still serve its L1 copy (nothing told it)"
        flushed = flushes(b)
        assert server.client_kill_filter(_id=victim["id"]) == 1
        wait_until(lambda: flushes(b) > flushed, "B's listener noticing the kill")
        assert b.get("k") == two, "B served its L1 copy after its subscriber connection was killed"
        m = b.get_metrics()
        assert m["coherence"]["channel"] == "down"  # SSUBSCRIBE is refused now
        l1_hits = m["l1"]["hits"]
        for _ in range(3):  # down: every read goes to Redis, though each one copies the value into L1
            assert b.get("k") == two
        assert held(b, "k")
        assert b.get_metrics()["l1"]["hits"] == l1_hits, "L1 was served while the channel was down"

        raw.hset(entry_key(b, "k"), "v", envelope.wrap(three))  # B's copy made while down is stale now
        for node in servers(raw):
            node.execute_command("ACL", "SETUSER", user, "+ssubscribe")
        wait_until(lambda: b.get_metrics()["coherence"]["channel"] == "up", "B's resubscription")
        assert b.get("k") == three, "a copy filled while the channel was down survived the resubscription"
        l1_hits = b.get_metrics()["l1"]["hits"]
        assert b.get("k") == three
        assert b.get_metrics()["l1"]["hits"] == l1_hits + 1, "B does not serve from L1 after resubscribing"
    finally:
        b.close()


def test_close_ends_the_subscription(make_cache: Make, raw: Client, namespace: str) -> None:
    cache = make_cache()
    channel = KeySpace(namespace, cache.config.shards).channels[0]
    assert subscribers(raw, channel) == 1
    cache.close()
    wait_until(lambda: subscribers(raw, channel) == 0, "the subscriber connection closing")


def test_closing_a_cache_twice_is_harmless(make_cache: Make) -> None:
    cache = make_cache()
    cache.close()
    cache.close()


# ------------------------------------------------------------- 3. no messages for a read-only workload


def test_a_read_heavy_workload_publishes_no_invalidation(make_cache: Make, raw: Client, namespace: str,
                                                         clock: FakeClock) -> None:
    common: dict[str, Any] = {"shards": 2, "l1_size": 2, "l2_ttl": 5.0, "l3_ttl": 20.0, "promote_after": 2,
                              "clock": clock}
    seeder = make_cache(l2_size=8, l3_size=16, **common)  # makes every write, reads nothing
    # Readers, two with smaller tiers: their first calls evict (LRU) from Redis what the seeder left.
    caches = [make_cache(l2_size=8, l3_size=16, **common), make_cache(l2_size=4, l3_size=8, **common),
              make_cache(l2_size=4, l3_size=8, **common)]
    keys = [f"q{i}" for i in range(30)]
    tap = ChannelTap(raw, namespace)
    try:
        seeder.put_many({k: {"k": k} for k in keys[:24]})
        seeder.put_many({k: {"k": k} for k in keys[24:]}, ttl=3.0)  # these expire during the reads
        # The seeding's announcements, all of them (on a cluster they come from several masters), and
        # every reader has heard them: from here on, anything heard was published by the reads.
        seeding = tap.collect()
        assert [i for i, _ in announced(seeding)] == sorted(k.encode() for k in keys)
        wait_until(lambda: all(c.get_metrics()["coherence"]["invalidations"] == len(seeding) for c in caches),
                   "the readers hearing the seeding")
        rng = random.Random(7)
        for n in range(900):
            cache = rng.choice(caches)
            if n % 3:
                cache.get(rng.choice(keys[:12]) if rng.random() < 0.8 else rng.choice(keys))
            else:
                cache.get_many(rng.sample(keys, rng.randint(2, 6)))
            if n % 10 == 9:
                # The reads' bookkeeping (LRU stamps, hit counts, promotions, sweeps, bounds) is part of
                # the workload: send it often, so hits count towards promotion and L1 fills.
                for c in caches:
                    c.flush_bookkeeping()
            if n % 40 == 39:
                clock.advance(rng.choice((0.5, 1.0, 2.0, 3.0)))  # idle moves, idle drops, expiry
        for c in caches:
            c.flush_bookkeeping()
        messages = tap.collect()
        metrics = [c.get_metrics() for c in caches]
        total = {name: sum(m[tier][field] for m in metrics) for name, (tier, field) in {
            "l1 fills": ("l1", "promotions"), "l1 evictions": ("l1", "evictions"), "l1 hits": ("l1", "hits"),
            "promotions": ("l2", "promotions"), "demotions": ("l2", "demotions"), "evictions": ("l3", "evictions"),
            "l3 hits": ("l3", "hits")}.items()}
        total["expirations"] = sum(m["combined"]["total_expirations"] for m in metrics)
        print("read-only workload:", total)
        assert messages == [], f"a read-only workload published {len(messages)} invalidations: {messages[:5]!r}"
        assert [m["coherence"]["invalidations"] for m in metrics] == [len(seeding)] * 3
        assert all(m["coherence"]["channel"] == "up" for m in metrics)
        assert all(n > 0 for n in total.values()), f"the workload did not exercise every movement: {total}"
        state = check_invariants(raw, namespace, 2, 8, 16, now_ms=clock.ms, idle=(common["l2_ttl"], common["l3_ttl"]))

        # Control: one put over an existing key publishes exactly one message, with the new version.
        key = next(k for k in keys if state.tier_of(k.encode()))
        seeder.put(key, "changed")
        [(changed, version)] = single_invalidation(tap.collect())
        assert changed == key.encode()
        assert version == redis_version_of(raw, seeder, key)
    finally:
        tap.close()


# ------------------------------------------------------------------------------- 4. publish rules


def announced(messages: list[bytes]) -> list[tuple[bytes, int]]:
    """Every (id, version) line of ``messages``, sorted (messages of several shards may arrive in any order)."""
    return sorted(line for message in messages for line in parse_invalidation(message))


def test_every_write_publishes_and_reads_publish_nothing(make_cache: Make, raw: Client, tap: ChannelTap,
                                                         flush_all: Flush) -> None:
    cache, reader = make_cache(shards=2), make_cache(shards=2)
    space = cache._core.space

    cache.put("k", 1)
    first = redis_version_of(raw, cache, "k")
    assert single_invalidation(tap.collect()) == [(b"k", first)], "a first write is announced too"
    cache.put_many({"n1": 1, "n2": 2})
    messages = tap.collect()
    assert len(messages) == len({space.ref(k).shard for k in ("n1", "n2")}), f"one message per shard: {messages}"
    assert announced(messages) == sorted((k.encode(), redis_version_of(raw, cache, k)) for k in ("n1", "n2"))
    for _ in range(4):
        assert reader.get("k") == 1
        assert reader.get_many(["n1", "n2", "absent"]) == {"n1": 1, "n2": 2}
        flush_all()  # the reads' bookkeeping (stamps, hit counts, then L1 fills) is part of reading
    assert reader.get_metrics()["l1"]["promotions"] == 3, "the reader's L1 filled as the entries got hot"
    assert tap.collect() == [], "reads (their bookkeeping and L1 fills) publish nothing"

    cache.put("k", 2)
    second = redis_version_of(raw, cache, "k")
    assert second > first
    assert single_invalidation(tap.collect()) == [(b"k", second)]

    assert cache.delete("k") is True
    [(deleted, version)] = single_invalidation(tap.collect())
    assert deleted == b"k"
    assert version > second
    shard = space.shard_keys[space.ref("k").shard]
    assert int(raw.hget(shard.stats, "seq") or 0) == version, "a delete announces the shard's next version"
    assert raw.zscore(shard.fence, b"k") is not None, "fills that started before the delete are refused"

    # A delete of a key Redis does not hold is announced too: some process may hold a copy of a value
    # Redis no longer has (evicted, or written while this Redis was away).
    for key in ("never-there", "k"):
        assert cache.delete(key) is False
        [(deleted, version)] = single_invalidation(tap.collect())
        assert deleted == key.encode()
        sk = space.shard_keys[space.ref(key).shard]
        assert version == int(raw.hget(sk.stats, "seq") or 0)
        assert raw.zscore(sk.fence, key.encode()) is not None
    cache.put("k", 3)  # written afresh: announced like any write
    assert single_invalidation(tap.collect()) == [(b"k", redis_version_of(raw, cache, "k"))]


def test_put_many_publishes_one_message_per_shard_naming_every_entry(make_cache: Make, raw: Client,
                                                                     tap: ChannelTap) -> None:
    cache = make_cache(shards=2)
    space = cache._core.space
    keys = [f"m{i}" for i in range(8)]
    by_shard = {s: [k for k in keys if space.ref(k).shard == s] for s in (0, 1)}
    assert all(by_shard.values()), by_shard

    def expected(written: list[str]) -> list[list[tuple[bytes, int]]]:
        """Per shard, one line per entry written there, in the order they were given."""
        return sorted([(k.encode(), redis_version_of(raw, cache, k)) for k in written if space.ref(k).shard == s]
                      for s in (0, 1))

    cache.put_many(dict.fromkeys(keys, "old"))  # first writes
    assert sorted(parse_invalidation(m) for m in tap.collect()) == expected(keys)
    cache.put_many({**dict.fromkeys(keys, "new"), "fresh": "new"})  # replacements and a first write
    messages = tap.collect()
    assert len(messages) == 2, messages
    assert sorted(parse_invalidation(m) for m in messages) == expected([*keys, "fresh"])


def test_invalidate_publishes_a_star_per_shard_and_every_l1_is_cleared(make_cache: Make, tap: ChannelTap,
                                                                       raw: redis.Redis) -> None:
    cache, holder = make_cache(shards=3), make_cache(shards=3, promote_after=1)
    values = {f"i{i}": i for i in range(6)}
    cache.put_many(values)
    puts = tap.collect()
    assert announced(puts) == sorted((k.encode(), redis_version_of(raw, cache, k)) for k in values)
    for i in range(6):
        assert holder.get(f"i{i}") == i
    assert len(holder._core.l1) == 6
    wait_until(lambda: holder.get_metrics()["coherence"]["invalidations"] == len(puts), "the holder hearing the puts")
    assert len(holder._core.l1) == 6, "the puts' own announcements leave copies of those very versions"
    assert tap.collect() == []
    cache.invalidate()
    flushes = tap.collect()
    assert sorted(m.split(b" ")[0] for m in flushes) == [b"*0", b"*1", b"*2"]  # "*<shard> <version>"
    for message in flushes:
        shard = int(message[1:].split(b" ")[0])
        stats = cache._core.space.shard_keys[shard].stats
        assert int(message.split(b" ")[1]) == int(raw.hget(stats, "seq") or 0), "a flush announces a new version"
    wait_until(lambda: holder.get_metrics()["coherence"]["invalidations"] == len(puts) + 3,
               "the holder hearing the flush")
    assert len(holder._core.l1) == 0
    assert holder.get_many([f"i{i}" for i in range(6)]) == {}


def test_an_unreadable_message_clears_l1(make_cache: Make, raw: Client, namespace: str) -> None:
    holder = make_cache(promote_after=1)
    holder.put("u", 1)
    wait_until(lambda: holder.get_metrics()["coherence"]["invalidations"] == 1, "the holder hearing its own put")
    assert held(holder, "u"), "its own put's announcement leaves its copy of that very version"
    channel = KeySpace(namespace, holder.config.shards).channels[0]
    server_of(raw, channel).spublish(channel, b"garbage without a length")
    wait_until(lambda: holder.get_metrics()["coherence"]["invalidations"] == 2, "the holder reading the message")
    assert len(holder._core.l1) == 0
    assert holder.get_metrics()["coherence"]["channel"] == "up"


@pytest.mark.parametrize("write", ["put", "delete"])
def test_an_entry_evicted_while_cached_in_an_l1_is_dropped_there_when_written_again(
        make_cache: Make, raw: Client, tap: ChannelTap, write: str) -> None:
    """Redis keeps no record of which process holds a copy: a write of a key Redis no longer holds is
    announced like any other, so the copy of an evicted entry goes when the key changes, not before."""
    tiny: dict[str, Any] = {"shards": 1, "l2_size": 1, "l3_size": 1}
    writer, holder = make_cache(**tiny), make_cache(promote_after=1, **tiny)
    writer.put("x", "old")
    assert holder.get("x") == "old"
    assert held(holder, "x")
    assert single_invalidation(tap.collect()) == [(b"x", redis_version_of(raw, writer, "x"))]
    writer.put("y", 1)  # x -> L3
    version_y = redis_version_of(raw, writer, "y")
    writer.put("z", 1)  # y -> L3, which is over capacity: x, its least recently used entry, is evicted
    assert not raw.exists(entry_key(writer, "x"))
    assert [parse_invalidation(m) for m in tap.collect()] == [[(b"y", version_y)],
                                                              [(b"z", redis_version_of(raw, writer, "z"))]], \
        "LRU eviction publishes nothing; only the two puts are announced"
    assert holder.get("x") == "old"  # still the current value: nobody changed it

    if write == "put":  # absent from Redis: announced with the new version all the same
        writer.put("x", "new")
        assert single_invalidation(tap.collect()) == [(b"x", redis_version_of(raw, writer, "x"))]
        wait_until(lambda: holder.get("x") == "new", "the holder dropping its copy of the evicted entry")
    else:
        writer.delete("x")  # nothing to remove in Redis, but some L1 may hold it: announced
        [(deleted, _)] = single_invalidation(tap.collect())
        assert deleted == b"x"
        wait_until(lambda: holder.get("x", MISS) == MISS, "the holder dropping its copy of the evicted entry")


def test_a_holder_drops_its_copy_even_after_many_other_evictions(make_cache: Make, tap: ChannelTap,
                                                                 clock: FakeClock) -> None:
    tiny: dict[str, Any] = {"shards": 1, "l2_size": 1, "l3_size": 1, "clock": clock}
    writer, holder = make_cache(**tiny), make_cache(promote_after=1, **tiny)
    writer.put("x", "old")
    assert holder.get("x") == "old"
    assert held(holder, "x")
    for i in range(2):  # x leaves Redis
        clock.advance(1.0)
        writer.put(f"other{i}", i)
    clock.advance(1.0)
    # churn: more entries leave after it than the shard keeps any record of removals for (1024 at least)
    writer.put_many({f"churn{i}": i for i in range(1100)})
    clock.advance(1.0)
    tap.collect()
    writer.put("x", "new")
    messages = tap.collect()
    wait_until(lambda: holder.get("x") == "new",
               f"the holder dropping its copy (published for the put: {messages})", timeout=1.0)


# --------------------------------------------------------------------------------- 5. version floors


def test_l1_refuses_a_copy_older_than_an_announced_version() -> None:
    clock = FakeClock()
    l1 = LocalCache(10, 60.0, clock)
    assert l1.set(b"k", b"v5", 5)
    assert l1.invalidate(b"k", 7) is True
    assert l1.get(b"k") is None
    assert l1.set(b"k", b"v5 again", 5) is False, "a fill that read v5 before the message must not land"
    assert l1.set(b"k", b"v6", 6) is False
    assert l1.set(b"k", b"v7", 7) is True  # the announced version itself may be cached
    assert l1.invalidate(b"k", 7) is False  # not older: kept
    assert l1.get(b"k") is not None
    # A floor is remembered even when no copy was held.
    assert l1.invalidate(b"other", 10) is False
    assert l1.set(b"other", b"v9", 9) is False
    assert l1.set(b"other", b"v11", 11) is True
    assert l1.set(b"other", b"v0", 0) is False  # no version is exempt (an unconfirmed write is held aside)
    # A clear refuses copies requested before it, whatever their version.
    requested = clock()
    clock.advance(0.001)
    l1.clear()
    assert l1.set(b"k", b"v8", 8, since=requested) is False
    assert l1.set(b"k", b"v8", 8, since=clock()) is True


@pytest.mark.parametrize("write", ["put", "delete", "invalidate"])
def test_a_fill_racing_an_invalidation_never_leaves_the_older_value_in_l1(make_cache: Make, write: str) -> None:
    """The reader's plain read (the old value, hot enough to be copied into L1) is held back until the
    writer's change has been applied to the reader's L1; then the core gets the reply and tries to copy
    the old value."""
    writer, reader = make_cache(), make_cache(promote_after=1)  # every L2 hit is copied into L1
    listener = reader._core.coherence
    writer.put("race", "old")
    # The reader hears the old value's own announcement first: the one awaited below is the change's.
    wait_until(lambda: listener.messages == 1, "the reader hearing the first put")  # type: ignore[attr-defined]
    assert reader.get("warm-up") is None  # the namespace's settings checked: the next get is one read
    step = reader._core.get("race")
    batch, _ = feed(step, None)
    assert isinstance(batch, list)
    assert [c[0] for c in batch] == ["HMGET"]
    replies = reader._send(batch)
    assert isinstance(replies, list)
    assert replies[0][0] == Envelope(MsgpackCodec()).wrap("old")

    heard = listener.messages  # type: ignore[attr-defined]
    if write == "put":
        writer.put("race", "new")
    elif write == "delete":
        assert writer.delete("race") is True
    else:
        writer.invalidate()
    needed = reader.config.shards if write == "invalidate" else 1  # a flush announces every shard
    wait_until(lambda: listener.trusted() and listener.messages >= heard + needed,  # type: ignore[attr-defined]
               "the reader applying the invalidation")
    instruction, value = feed(step, replies)
    assert instruction is None
    assert value == "old"  # the read began before the write: returning the old value once is fine
    assert not held(reader, "race"), "the stale fill landed in L1 after the invalidation"
    assert reader.get_metrics()["l1"]["promotions"] == 0
    assert reader.get("race", MISS) == ("new" if write == "put" else MISS)


WEIRD_KEYS: list[str | bytes] = ["read the file", "a:b:c", "10:x 5\n", "line\nbreak", "naïve café ✓",
                                 b"\x00\xff\n: \r\x01", "#starts with a hash", "k" * 2000]


def test_ids_of_any_bytes_round_trip_through_a_real_publish(make_cache: Make, raw: Client,
                                                            tap: ChannelTap) -> None:
    writer, holder = make_cache(shards=1), make_cache(shards=1, promote_after=1)
    ids = [entry_id(writer, k) for k in WEIRD_KEYS]
    assert [i[:1] for i in ids[-2:]] == [b"#", b"#"]  # long or '#' keys are stored hashed
    writer.put_many({k: "old" for k in WEIRD_KEYS})  # one message, one line per entry
    assert single_invalidation(tap.collect()) == [(i, redis_version_of(raw, writer, k))
                                                  for k, i in zip(WEIRD_KEYS, ids, strict=True)]
    for k in WEIRD_KEYS:
        assert holder.get(k) == "old"
        assert held(holder, k)

    for k, i in zip(WEIRD_KEYS, ids, strict=True):  # one message per put
        writer.put(k, "new")
        assert single_invalidation(tap.collect()) == [(i, redis_version_of(raw, writer, k))]
    writer.put_many({k: "newer" for k in WEIRD_KEYS})  # one message, one line per entry
    assert single_invalidation(tap.collect()) == [(i, redis_version_of(raw, writer, k))
                                                  for k, i in zip(WEIRD_KEYS, ids, strict=True)]
    wait_until(lambda: all(holder.get(k) == "newer" for k in WEIRD_KEYS), "the holder dropping every copy")


def test_parse_announcements_reads_payloads_by_their_length() -> None:
    data = b"1:a 5 4:x y\n\n2:bb 6\n3:c\nd 7 0:\n"
    assert parse_announcements(data) == [(b"a", 5, b"x y\n"), (b"bb", 6, None), (b"c\nd", 7, b"")]
    assert parse_invalidation(data) == [(b"a", 5), (b"bb", 6), (b"c\nd", 7)]
    for bad in (b"1:a 5 4:xyz\n", b"1:a 5 2:xyz\n", b"1:a 5 x:yz\n", b"1:a 5 3:xyz", b"1:a 5 \n"):
        with pytest.raises(ValueError):  # noqa: PT011 - the parser raises plain ValueError
            parse_announcements(bad)


def test_put_announces_a_small_value_without_a_ttl_with_the_value_itself(make_cache: Make, raw: Client,
                                                                          tap: ChannelTap) -> None:
    """What travels (lua/includes/shard.lua's UPDATE_BYTES): the payload Redis holds, for a value of at most
    1,024 encoded bytes written without a ttl; a value with a ttl or a larger one is announced by version."""
    writer = make_cache(shards=1)
    space = KeySpace(writer.namespace, 1)
    writer.put("small", "x" * 10)
    writer.put("timed", "x" * 10, ttl=60)
    writer.put("large", "x" * 2000)
    announced = [line for message in tap.collect() for line in parse_announcements(message)]
    payload = raw.hget(space.entry_key(space.ref("small")), "v")
    assert announced == [(b"small", redis_version_of(raw, writer, "small"), payload),
                         (b"timed", redis_version_of(raw, writer, "timed"), None),
                         (b"large", redis_version_of(raw, writer, "large"), None)]


def test_an_update_replaces_only_an_older_copy_and_adds_none(make_cache: Make, raw: Client) -> None:
    """L1.invalidate with a payload, as the listener applies a carried value: an older copy held becomes
    the new one (with a fresh l1_ttl); a newer copy, or none, is left as it is (L1 holds only what this
    process reads)."""
    cache = make_cache(promote_after=1, coherence=False)
    cache.put("held", "old")
    l1, envelope = cache._core.l1, cache._core.envelope
    ref, version = entry_id(cache, "held"), l1.get(entry_id(cache, "held")).version  # type: ignore[union-attr]
    assert l1.invalidate(ref, version + 1, envelope.wrap("new"))
    assert held_value(cache, "held", MISS) == "new"
    assert not l1.invalidate(ref, version, envelope.wrap("older"))  # not newer than the copy: nothing changes
    assert held_value(cache, "held", MISS) == "new"
    assert not l1.invalidate(entry_id(cache, "absent"), version + 5, envelope.wrap("never read"))
    assert not held(cache, "absent")
    assert cache.get("held") == "new"


def test_parse_invalidation_reads_lengths_not_separators() -> None:
    assert parse_invalidation(b"") == []
    assert parse_invalidation(b"7:a b\n1 2 3\n3:x:y 9\n") == [(b"a b\n1 2", 3), (b"x:y", 9)]
    for bad in (b"5:abc 1\n", b"3:abc1\n", b"x:abc 1\n", b"3:abc 1"):
        with pytest.raises(ValueError):  # noqa: PT011 - the parser raises plain ValueError
            parse_invalidation(bad)


def test_a_closed_cache_serves_nothing_from_its_l1(make_cache: Make, backend: Backend) -> None:
    """Nobody applies invalidations for a closed cache any more: its L1 copies must never be served. (Its
    calls raise CacheClosedError, even with the application's own client, which outlives the cache.)"""
    client = backend.client()
    writer = make_cache()
    reader = make_cache(client=client, promote_after=1)
    writer.put("k", "v1")
    assert reader.get("k") == "v1"
    assert held(reader, "k")
    reader.close()
    writer.put("k", "v2")
    with pytest.raises(CacheClosedError):
        reader.get("k")
    assert client.ping()
    client.close()


def _forked_child_reads(cache: MultiLevelCache, key: str, out: Any) -> None:
    out.put(cache.get(key))


def _forked_child_reads_from_a_trusted_l1(cache: MultiLevelCache, key: str, out: Any) -> None:
    # The child's listener subscribes afresh; until then L1 is bypassed. Once it is trusted, a get takes
    # the L1 path, and its lock.
    wait_until(cache._core.coherence.trusted, "the child's subscription")
    out.put(cache.get(key))


def test_a_forked_child_starts_with_a_working_cache_even_mid_traffic(make_cache: Make) -> None:
    """Threads hammer L1 while the process forks: the child must not inherit a held lock."""
    cache = make_cache(promote_after=1)
    cache.put("k", "v")
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            cache.get("k")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    ctx = mp.get_context("fork")
    try:
        for _ in range(10):
            out = ctx.Queue()
            child = ctx.Process(target=_forked_child_reads, args=(cache, "k", out))
            child.start()
            child.join(timeout=20)
            if child.is_alive():
                child.kill()
            assert child.exitcode == 0, "the forked child hung or failed"
            assert out.get(timeout=5) == "v"
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_a_forked_child_never_waits_for_an_l1_lock_a_parent_thread_held(make_cache: Make) -> None:
    """The case the test above hits by chance, made certain: another thread holds L1's lock while the
    process forks. That thread does not exist in the child, so the child must not use that lock."""
    cache = make_cache(promote_after=1)
    cache.put("k", "v")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache._core.l1._lock:
            held.set()
            release.wait(LIVENESS)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(LIVENESS), "the holder thread never took the lock"
        out = mp.get_context("fork").Queue()
        child = mp.get_context("fork").Process(target=_forked_child_reads_from_a_trusted_l1, args=(cache, "k", out))
        child.start()
        child.join(timeout=2 * LIVENESS)
        if child.is_alive():
            child.kill()
            child.join(LIVENESS)
        assert child.exitcode == 0, "the forked child waited for a lock a thread of its parent held at fork()"
        assert out.get(timeout=LIVENESS) == "v"
    finally:
        release.set()
        holder.join()
