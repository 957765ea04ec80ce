"""A private, throwaway ``redis-server`` on a free port (used by the demo and the test suite).

It keeps nothing on disk and never touches a Redis you already run on 6379.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from .errors import CacheError


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
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
        self.port = port or free_port()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedisServer:
        """Launch the server and wait until it answers PING."""
        self._dir = tempfile.TemporaryDirectory(prefix="vrc-redis-")
        args = [self.binary or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self._dir.name,
                "--logfile", str(Path(self._dir.name) / "redis.log"), *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise CacheError(f"redis-server exited at start (port {self.port}): {err.strip()}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise CacheError(f"redis-server on port {self.port} did not answer within {timeout}s") from None
                    time.sleep(0.02)
        finally:
            client.close()

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
