"""Connections and threads per process do not grow with namespaces (docs/design.md, "Connections and
threads per process").

A worker process (a "spawn" child: a fresh interpreter holding nothing else) builds the tool-selection
cache (three namespaces) and five more caches on one Redis, and uses them all from its one thread,
long enough for the background thread to send bookkeeping many times while the caller holds the
pooled connection for its own round trips. It then reports what it holds, counted outside the
library: its own established TCP sockets to the Redis port (from /proc), and its threads by name.
The parent checks those sockets against the server's CLIENT LIST. Closing every cache leaves none.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import threading
import traceback
from typing import Any

import pytest

from victor_rcache import AsyncMultiLevelCache, MultiLevelCache
from victor_rcache.prediction import ToolSelectionCache, ToolSelectionConfig

from .helpers import Backend, Client

DEADLINE = 60.0  # seconds the parent waits for the worker at each step; a hung worker fails the test
MORE = 5  # namespaces besides the tool-selection cache's three
ROUNDS = 400  # rounds of calls over every namespace: many background rounds happen meanwhile


def own_sockets_to(port: int) -> list[int]:
    """The local ports of this process's established TCP connections to ``port`` (Linux /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port and inode in inodes:
                    ports.append(int(local.rsplit(":", 1)[1], 16))
    return sorted(ports)


def threads_by_name() -> dict[str, int]:
    names: dict[str, int] = {}
    for thread in threading.enumerate():
        if thread.name.startswith("victor-rcache"):
            names[thread.name] = names.get(thread.name, 0) + 1
    return names


def many_namespaces(url: str, base: str, port: int, out: Any, go_on: Any) -> None:
    """The worker: build, use from one thread, report; close once told to, report again."""
    try:
        tools = ToolSelectionCache(ToolSelectionConfig.from_env(redis_url=url, base=base))
        caches = [MultiLevelCache(url, namespace=f"{base}-more{i}") for i in range(MORE)]
        for n in range(ROUNDS):
            key = f"k{n % 50}"
            tools.put_query(key, {"tools": ["a", "b"]}, tools=["a", "b"])
            tools.get_query(f"missing{n}")  # a miss: bookkeeping for the background thread to send
            tools.put_context(key, {"tools": ["c"]}, tools=["c"])
            tools.get_context(key)
            tools.get_rl(f"missing{n}")
            for cache in caches:
                cache.put(key, n)
                cache.get(f"missing{n}")
                cache.get_or_set(f"computed{n % 20}", lambda n=n: n)
        channels = sum(len(c._core.space.channels) for c in [*tools.caches.values(), *caches])
        out.put({"sockets": own_sockets_to(port), "threads": threads_by_name(), "channels": channels})
        if not go_on.wait(DEADLINE):
            raise TimeoutError("the parent never answered")
        tools.close()
        for cache in caches:
            cache.close()
        out.put({"sockets": own_sockets_to(port), "threads": threads_by_name()})
    except BaseException:
        out.put({"error": traceback.format_exc()})


@pytest.mark.standalone_only(reason="counts the connections to one server; on a cluster a process holds one "
                                    "command connection per node it sends to (docs/cluster.md)")
def test_a_process_with_eight_namespaces_holds_two_connections_and_one_listener_thread(
        backend: Backend, raw: Client, namespace: str) -> None:
    port = int(backend.url.rsplit(":", 1)[1].split("/")[0])
    ctx = mp.get_context("spawn")
    out, go_on = ctx.Queue(), ctx.Event()
    worker = ctx.Process(target=many_namespaces, args=(backend.url, namespace, port, out, go_on), daemon=True)
    worker.start()
    try:
        used = out.get(timeout=DEADLINE)
        assert "error" not in used, used.get("error")
        # The server sees exactly those connections: one command connection, one subscriber.
        clients = {int(c["addr"].rsplit(":", 1)[1]): c for c in raw.client_list()}
        mine = [clients[p] for p in used["sockets"] if p in clients]
        assert len(mine) == len(used["sockets"]), (used["sockets"], sorted(clients))
        subscribers = [c for c in mine if "P" in c["flags"]]
        commands = [c for c in mine if "P" not in c["flags"]]
        assert (len(commands), len(subscribers)) == (1, 1), mine
        assert int(subscribers[0]["ssub"]) == used["channels"], "every namespace's shard channels on the one connection"
        assert used["threads"].get("victor-rcache-invalidation") == 1, used["threads"]
        assert used["threads"].get("victor-rcache-background") == 1, used["threads"]

        go_on.set()
        closed = out.get(timeout=DEADLINE)
        assert "error" not in closed, closed.get("error")
        assert closed == {"sockets": [], "threads": {}}, "the last cache out closes the shared connections"
    finally:
        worker.join(DEADLINE)
        if worker.is_alive():
            worker.kill()


def test_async_caches_share_the_listener_and_background_threads(backend: Backend, namespace: str) -> None:
    """An asyncio process holds one listener thread and one background thread for all its caches too
    (each async cache still has a redis.asyncio client of its own per event loop: docs/api.md)."""
    before = threads_by_name()

    async def scenario() -> dict[str, int]:
        caches = [AsyncMultiLevelCache(backend.url, namespace=f"{namespace}-{i}", cluster=backend.cluster)
                  for i in range(4)]
        for n, cache in enumerate(caches):
            await cache.put("k", n)
            assert await cache.get("k") == n
            await cache.get("missing")  # bookkeeping for the background thread
        threads = threads_by_name()
        for cache in caches:
            await cache.close()
        return threads

    threads = asyncio.run(scenario())
    for name in ("victor-rcache-invalidation", "victor-rcache-background"):  # (other tests' caches may hold one)
        assert threads.get(name) == max(1, before.get(name, 0)), (name, before, threads)
