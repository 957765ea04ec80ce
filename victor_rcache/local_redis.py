"""A private, throwaway ``redis-server`` on a free port (used by the demo and the test suite).

It keeps nothing on disk and never touches a Redis you already run on 6379.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import redis

from .errors import CacheError


def free_port(cluster_bus: bool = False) -> int:
    """A TCP port nobody listens on right now (and, for a cluster node, its bus port +10000 too)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not cluster_bus:
            return port
        if port + 10000 <= 65535:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class LocalRedisServer:
    """Start with ``LocalRedisServer().start()`` or as a context manager; ``url`` points at it."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = (),
                 binary: str | None = None) -> None:
        self.binary = binary or shutil.which("redis-server")
        if self.binary is None:
            raise CacheError(
                "redis-server is not on PATH; install it (Debian/Ubuntu: apt-get install redis-server, "
                "macOS: brew install redis) or point the cache at a running Redis with redis_url="
            )
        self.extra_args = extra_args
        self._cluster_node = "--cluster-enabled" in extra_args
        self._auto_port = port is None  # a port picked here may be taken meanwhile: pick another then
        self.port = port or free_port(self._cluster_node)
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedisServer:
        """Launch the server (again, after :meth:`kill`) and wait until it answers PING."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="vrc-redis-")
        for _ in range(5):
            if self._launch(timeout):
                return self
            self.port = free_port(self._cluster_node)  # someone took the port first: try another
        raise CacheError("could not find a free port for redis-server after 5 tries")

    def _launch(self, timeout: float) -> bool:
        """Start on ``self.port``; False if that port was taken (only when the port was picked here)."""
        assert self._dir is not None
        args = [self.binary or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self._dir.name,
                "--logfile", str(Path(self._dir.name) / "redis.log"), *self.extra_args]
        self.process = process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                if process.poll() is not None:
                    err = process.stderr.read().decode() if process.stderr else ""
                    self.process = None
                    log = Path(self._dir.name) / "redis.log"
                    taken = "Address already in use" in err + (log.read_text() if log.exists() else "")
                    if taken and self._auto_port:
                        return False
                    raise CacheError(f"redis-server exited at start (port {self.port}): {err.strip()}")
                try:
                    # It must be *our* server answering, not another one that got the port first.
                    if int(client.info("server")["process_id"]) == process.pid:
                        return True
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise CacheError(f"redis-server on port {self.port} did not answer within {timeout}s")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (its folder stays, so it can be started again)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            if self.process.stderr:
                self.process.stderr.close()
            self.process = None

    def stop(self) -> None:
        """Kill the server and remove its scratch folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> LocalRedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class LocalRedisCluster:
    """A private Redis Cluster: ``masters`` masters with ``replicas`` replicas each, on free ports.

    Started with ``redis-cli --cluster create``; :meth:`start` returns once every node reports
    ``cluster_state:ok`` and agrees on the slot map. Nothing is kept on disk.
    """

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.masters = masters
        self.replicas = replicas
        # No diskless-sync delay, and replicas may always take over: a test cluster is ready to fail
        # over as soon as start() returns.
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--repl-diskless-sync-delay", "0",
                "--cluster-replica-validity-factor", "0")
        self.nodes = [LocalRedisServer(extra_args=args) for _ in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 60.0) -> LocalRedisCluster:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise CacheError("redis-cli is not on PATH; it comes with redis-server (apt-get install redis-tools)")
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas),
                            "--cluster-yes"], check=True, capture_output=True, timeout=timeout)
            self.wait_until_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ok(self, timeout: float = 60.0, nodes: list[LocalRedisServer] | None = None) -> None:
        """Return once every running node says cluster_state:ok, they agree on who serves what, and no
        node that is down (killed, stopped) serves anything in that view.

        Right after a master is killed the survivors still say ok and still name it (for about the node
        timeout, until they agree it failed and its replica takes over); only its replica's link going
        down held the check back, and a replica not scheduled since the kill has not seen that yet."""
        deadline = time.monotonic() + timeout
        running = [n for n in (nodes or self.nodes) if n.process is not None]
        down = {n.port for n in self.nodes if n.process is None}
        while True:
            views = []
            for node in running:
                client = redis.Redis(port=node.port, socket_timeout=1, socket_connect_timeout=1)
                try:
                    if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):  # type: ignore[no-untyped-call]
                        break
                    slots = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
                    views.append(sorted((s[0], s[1], s[2][1]) for s in slots))
                except redis.RedisError:
                    break
                finally:
                    client.close()
            else:
                if (views and all(view == views[0] for view in views) and not any(port in down for *_, port in views[0])
                        and self._replicas_in_sync(running)):
                    return
            if time.monotonic() > deadline:
                raise CacheError(f"the local cluster did not reach cluster_state:ok within {timeout}s")
            time.sleep(0.05)

    @staticmethod
    def _replicas_in_sync(nodes: list[LocalRedisServer]) -> bool:
        for node in nodes:
            client = redis.Redis(port=node.port, socket_timeout=1, socket_connect_timeout=1)
            try:
                info = client.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def master_ports(self) -> list[int]:
        """Ports of the nodes serving slots right now."""
        client = redis.Redis(port=next(n.port for n in self.nodes if n.process is not None))
        try:
            slots = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            return sorted({int(s[2][1]) for s in slots})
        finally:
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextmanager
def redis_url(url: str | None = None, say: Callable[[str], object] | None = None) -> Iterator[str]:
    """The Redis to use for an example or a demo: ``url``, else ``VICTOR_RCACHE_URL``, else ``REDIS_URL``,
    else a private redis-server started for the block (``say`` is told so), stopped at its end."""
    url = url or os.environ.get("VICTOR_RCACHE_URL") or os.environ.get("REDIS_URL")
    if url is not None:
        yield url
        return
    with LocalRedisServer() as server:
        if say is not None:
            say(f"no Redis URL given: started a private redis-server at {server.url}")
        yield server.url
