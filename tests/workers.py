"""Caches in other OS processes, driven call by call from a test.

A :class:`Worker` is a "spawn" child (a fresh interpreter, as a separate worker of a fleet is) that
builds its own ``MultiLevelCache`` and then runs the calls the test sends it over a pipe, one at a time,
answering each with the result or the traceback it raised. The test decides the interleaving of the
processes' calls exactly, and never sleeps: it waits on the pipe with a deadline (a hung worker fails
the test, it never hangs it), and polls a worker with :func:`eventually` where a fleet promise is
"within a bound".
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable
from typing import Any

import redis

from victor_rcache import MultiLevelCache

CALL_TIMEOUT = 30.0  # seconds a worker may take to answer one call


class Worker:
    """A cache in a child process. ``call(op, *args)`` runs ``op`` there (see ``_serve`` for the ops)."""

    def __init__(self, url: str, namespace: str, **settings: Any) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, url, namespace, settings), daemon=True)
        self.process.start()
        child.close()
        self.call("ping")  # the cache is built

    def call(self, op: str, *args: Any) -> Any:
        self._conn.send((op, args))
        if not self._conn.poll(CALL_TIMEOUT):
            self.process.kill()
            raise AssertionError(f"worker {self.process.pid} did not answer {op}{args!r} in {CALL_TIMEOUT} s")
        ok, value = self._conn.recv()
        if not ok:
            raise AssertionError(f"worker {self.process.pid} raised in {op}{args!r}:\n{value}")
        return value

    def get(self, key: str) -> Any:
        return self.call("get", key)

    def put(self, key: str, value: Any, ttl: float | None = None) -> None:
        self.call("put", key, value, ttl)

    def health(self) -> dict[str, Any]:
        """This process's metrics from memory (no Redis round trip)."""
        metrics: dict[str, Any] = self.call("local_metrics")
        return metrics

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.call("close")
            finally:
                self.process.join(timeout=10)
                if self.process.is_alive():
                    self.process.kill()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"level": record.levelname, "event": getattr(record, "event", None),
                             "message": record.getMessage()})


def _cached_select(cache: MultiLevelCache, url: str, counter: str) -> Callable[[str], list[str]]:
    """A decorated function of the workers (test_decorator.py): counts its runs in Redis, takes a while.
    Its key is the default one, built the same way in every worker."""
    client: Any = (redis.RedisCluster if cache.config.cluster else redis.Redis).from_url(url)

    @cache.cached(ttl=60)
    def select(query: str) -> list[str]:
        client.incr(counter)
        time.sleep(0.3)  # the expensive part: the other workers' calls arrive meanwhile
        return [query, "file"]

    return select


def _serve(conn: Any, url: str, namespace: str, settings: dict[str, Any]) -> None:
    """The child's loop: build the cache, then answer calls until "close"."""
    records = _Records()
    logging.getLogger("victor_rcache").addHandler(records)
    cache = MultiLevelCache(url, namespace=namespace, **settings)

    def catch_up() -> None:
        listener = cache._core.coherence
        if hasattr(listener, "catch_up"):
            listener.catch_up()

    ops: dict[str, Callable[..., Any]] = {
        "ping": lambda: True,
        "get": cache.get,
        "get_many": cache.get_many,
        "put": lambda key, value, ttl=None: cache.put(key, value, ttl=ttl),
        "put_tagged": lambda key, value, tags: cache.put(key, value, tags=tags),
        "invalidate_tags": cache.invalidate_tags,
        "cached_select": lambda counter, query: _cached_select(cache, url, counter)(query),
        "delete": cache.delete,
        "invalidate": cache.invalidate,
        "get_or_set": lambda key, value: cache.get_or_set(key, lambda: value),
        "flush_bookkeeping": cache.flush_bookkeeping,
        "local_metrics": cache._core.local_metrics,
        "catch_up": catch_up,
        "logs": lambda: list(records.records),
        "close": cache.close,
    }
    while True:
        try:
            op, args = conn.recv()
        except EOFError:  # the test process is gone
            return
        try:
            conn.send((True, ops[op](*args)))
        except BaseException:  # the test shows the traceback
            conn.send((False, traceback.format_exc()))
        if op == "close":
            return


def eventually(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)
