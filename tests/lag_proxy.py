"""A TCP proxy that delays what it forwards: replication lag on demand, between a replica and its master.

``LagProxy(upstream_port, delay=(0.02, 0.05))`` listens on a free port of 127.0.0.1 (``port``); a replica
that connects to its master through it (standalone: started with ``--replicaof 127.0.0.1 <port>``; a
cluster: the master announces ``<port>`` as its own, ``cluster-announce-port``) then gets its master's
stream through it, each chunk held a random 20-50 ms (in order: a chunk never overtakes the one before).
``hold()`` stops forwarding towards the replica altogether (its lag grows until ``release()``), for tests
that need a replica known to be behind.

Only replication connections are delayed: a connection is one once its client sends ``REPLCONF`` (which
only a replica does, in its handshake, after a ``PING`` whose answer is not delayed), and from then on
what its server sends is held. Every other connection (a cluster's clients, redirected to the announced
port) is forwarded as it comes, both ways. Threads only, so it runs inside the test process next to the
cache it tests.
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
REPLCONF = b"$8\r\nREPLCONF\r\n"  # the command's name, as a replica sends it (RESP)
HANDSHAKE = 1024  # bytes of a connection's start looked at for it (a replica's PING, AUTH, then REPLCONF)


class LagProxy:
    def __init__(self, upstream_port: int, delay: tuple[float, float] = (0.02, 0.05)) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._held = threading.Event()  # set: nothing moves towards the replica
        self._sockets: list[socket.socket] = []
        self.replications = 0  # connections it recognised as a replica's, and delays
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
            # Towards the server (a replica's commands and acks): as they come, watched for REPLCONF. Towards
            # the client: delayed once the client showed itself a replica.
            replica = threading.Event()
            for src, dst, sniff in ((downstream, upstream, True), (upstream, downstream, False)):
                thread = threading.Thread(target=self._pump, args=(src, dst, replica, sniff), name="lag-proxy",
                                          daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, replica: threading.Event, sniff: bool) -> None:
        """Forward ``src`` to ``dst``. ``sniff``: the client's direction, which sets ``replica`` on a REPLCONF
        in the connection's first bytes; else the server's, delayed once ``replica`` is set."""
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
                if wait > 0 or (delayed and self._held.is_set()):  # (the proxy's pacing: the lag it injects)
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
        delayed = False  # (this direction, once it carries a master's stream: only it is paced and held)
        seen = b""
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(CHUNK)
                except OSError:
                    break
                if not data:
                    break
                if sniff and len(seen) < HANDSHAKE:
                    seen += data
                    if REPLCONF in seen.upper():
                        replica.set()  # (before forwarding it: every answer to it comes later, and is delayed)
                        self.replications += 1
                delayed = delayed or (not sniff and replica.is_set())
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
                sock.shutdown(socket.SHUT_RDWR)  # (wakes a thread blocked in recv(), which close() alone does not)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> LagProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
