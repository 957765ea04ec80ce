"""A TCP proxy that delays what it forwards: replication lag on demand, between a replica and its master.

``LagProxy(upstream_port, delay=(0.02, 0.05))`` listens on a free port of 127.0.0.1 (``port``); a replica
started with ``--replicaof 127.0.0.1 <port>`` then gets its master's stream through it, each chunk held a
random 20-50 ms (in order: a chunk never overtakes the one before). ``hold()`` stops forwarding towards
the replica altogether (its lag grows until ``release()``), for tests that need a replica known to be
behind. Threads only, so it runs inside the test process next to the cache it tests.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import deque

from victor_rcache.local_redis import free_port

CHUNK = 65536


class LagProxy:
    def __init__(self, upstream_port: int, delay: tuple[float, float] = (0.02, 0.05)) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._held = threading.Event()  # set: nothing moves towards the replica
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="lag-proxy-accept", daemon=True)]
        self._threads[0].start()

    def hold(self) -> None:
        """Stop forwarding the master's stream: the replica falls behind until :meth:`release`."""
        self._held.set()

    def release(self) -> None:
        self._held.clear()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                downstream, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [downstream, upstream]
            # Towards the master (the replica's commands and acks): as they come. Towards the replica: delayed.
            for src, dst, delayed in ((downstream, upstream, False), (upstream, downstream, True)):
                thread = threading.Thread(target=self._pump, args=(src, dst, delayed), name="lag-proxy", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, delayed: bool) -> None:
        queue: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()
        done = threading.Event()

        def deliver() -> None:
            while not self._stop.is_set() and not (done.is_set() and not queue):
                with ready:
                    while not queue and not done.is_set():
                        ready.wait(0.1)
                    if not queue:
                        continue
                    due, data = queue[0]
                wait = due - time.monotonic()
                if wait > 0 or self._held.is_set():  # (the proxy's own pacing: this is the lag it injects)
                    self._stop.wait(max(wait, 0.001))
                    continue
                with ready:
                    queue.popleft()
                try:
                    dst.sendall(data)
                except OSError:
                    return

        sender = threading.Thread(target=deliver, name="lag-proxy-deliver", daemon=True)
        sender.start()
        last_due = 0.0
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(CHUNK)
                except OSError:
                    break
                if not data:
                    break
                if delayed:
                    last_due = max(last_due, time.monotonic() + random.uniform(*self.delay))
                else:
                    last_due = time.monotonic()
                with ready:
                    queue.append((last_due, data))
                    ready.notify()
        finally:
            done.set()
            sender.join(timeout=5)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> LagProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
