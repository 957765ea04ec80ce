"""SCRIPT FLUSH under load: no error reaches a caller, and a busy cache reloads each script once per
server, not once per call that hit NOSCRIPT.

The load is puts (put.lua, from every caller thread) and plain reads, whose bookkeeping the cache's
own thread sends as touch.lua calls: two scripts, each to be reloaded once on every master."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from victor_rcache import MultiLevelCache

from .helpers import Client, flush_scripts, servers

Make = Callable[..., MultiLevelCache]
THREADS = 8
KEYS = [f"hot key {i}" for i in range(64)]  # every shard, so every master runs put.lua and touch.lua
LOADED = ("put", "touch")  # the scripts the load runs


def eval_calls(raw: Client) -> int:
    """EVAL commands the masters received since their last CONFIG RESETSTAT (EVAL = a reload)."""
    total = 0
    for server in servers(raw, replicas=False):
        total += int(server.info("commandstats").get("cmdstat_eval", {}).get("calls", 0))
    return total


def test_script_flush_under_load_reloads_each_script_once_per_server(make_cache: Make, raw: Client) -> None:
    cache = make_cache(promote_after=10**9, l1_size=1)  # reads never fill L1: they go to Redis
    cache.put_many({key: key for key in KEYS})  # put.lua is cached on every master now
    assert cache.get_many(KEYS) == {key: key for key in KEYS}
    cache.flush_bookkeeping()  # touch.lua too
    errors: list[str] = []
    done = [0] * THREADS
    stop = threading.Event()
    start = threading.Barrier(THREADS + 1)

    def hammer(n: int) -> None:
        start.wait()
        i = n
        while not stop.is_set():
            key, other = KEYS[i % len(KEYS)], KEYS[(i + 1) % len(KEYS)]
            try:
                cache.put(key, key)
                assert cache.get(other) == other  # L1 holds one entry, the put's: a read of Redis
            except Exception as exc:  # what the test is about: nothing reaches a caller
                errors.append(f"{type(exc).__name__}: {exc}")
            done[n] += 1
            i += THREADS

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    masters = servers(raw, replicas=False)
    for server in masters:
        server.config_resetstat()
    reloads_before = cache.get_metrics()["health"]["script_reloads"]
    start.wait()
    flush_scripts(raw)  # under load: puts and reads are in flight on every thread
    after_flush = list(done)
    deadline = time.monotonic() + 30
    while min(d - a for d, a in zip(done, after_flush, strict=True)) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the workers' progress
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    cache.flush_bookkeeping()  # the reads' last bookkeeping: touch.lua has met the flush on every master

    assert errors == [], errors[:5]
    assert min(d - a for d, a in zip(done, after_flush, strict=True)) >= 20, "the workers stalled"
    reloads = cache.get_metrics()["health"]["script_reloads"] - reloads_before
    expected = len(LOADED) * len(masters)
    assert eval_calls(raw) == expected, f"EVAL calls: expected one per script ({LOADED}) and master ({len(masters)})"
    assert reloads == expected
