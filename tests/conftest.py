"""Fixtures: a private redis-server per test session (never the one on 6379), a namespace per test."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from victor_rcache import MultiLevelCache
from victor_rcache.local_redis import LocalRedisCluster, LocalRedisServer

from .helpers import FakeClock

NO_REDIS = (
    "The integration tests need a real Redis and none could be started: install redis-server "
    "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or run a Docker engine "
    "(testcontainers starts redis:7). fakeredis does not stand in: its Lua is not Redis's."
)


def _docker_running() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=20).returncode == 0


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a throwaway Redis for this test session."""
    if shutil.which("redis-server"):
        with LocalRedisServer() as server:
            yield server.url
        return
    if _docker_running():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7.0") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    pytest.exit(NO_REDIS, returncode=3)


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client, to look at what Redis actually holds."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_cache(redis_url: str, namespace: str) -> Iterator[Callable[..., MultiLevelCache]]:
    """Build caches on the session's Redis and this test's namespace; fail-closed so errors surface."""
    made: list[MultiLevelCache] = []

    def make(**settings: Any) -> MultiLevelCache:
        settings.setdefault("namespace", namespace)
        settings.setdefault("fail_open", False)
        cache = MultiLevelCache(redis_url, **settings)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """URL of one node of a throwaway Redis Cluster (3 masters, 1 replica each) for this test session."""
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.exit("The cluster tests need redis-server and redis-cli on PATH (they come together). " + NO_REDIS,
                    returncode=3)
    with LocalRedisCluster(masters=3, replicas=1) as cluster:
        yield cluster.url
