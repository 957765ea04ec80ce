"""Fixtures: private Redis servers per test session (never the one on 6379), a namespace per test.

One suite, two backends: every test that uses Redis runs against a standalone ``redis-server`` and
against a local Redis Cluster (3 masters with a replica each), unless it is marked
``standalone_only`` (with the reason in the marker). ``xfail_on_cluster(reason=...)`` names a known
library bug on a cluster: the cluster variant is a strict xfail (it must keep failing with an
AssertionError until the bug is fixed). A slot guard checks every script call any test's cache
sends, sync or async: all its keys in one hash slot. Helpers for server commands that must reach
every cluster node (or the right one) are in helpers.py.
"""

from __future__ import annotations

import gc
import shutil
import subprocess
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from victor_rcache import AsyncMultiLevelCache, MultiLevelCache
from victor_rcache.local_redis import LocalRedisCluster, LocalRedisServer

from .helpers import Backend, Client, FakeClock, guard_slots

NO_REDIS = (
    "The integration tests need a real Redis and none could be started: install redis-server "
    "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or run a Docker engine "
    "(testcontainers starts redis:7). fakeredis does not stand in: its Lua is not Redis's."
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "standalone_only(reason): runs against the standalone backend only")
    config.addinivalue_line("markers", "xfail_on_cluster(reason): a known library bug on a cluster; the cluster "
                                       "variant must fail with an AssertionError (strict xfail) until it is fixed")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """No garbage collection while pytest renders a report (it parses the failing source with ast).

    On CPython < 3.11.8 / 3.12.2 (gh-106905) an ``ast.parse`` nested inside another corrupts the
    AST module's recursion counter: ``SystemError: AST constructor recursion depth mismatch``, a
    pytest INTERNALERROR that ends the run. A collection during pytest's parse can run such a nested
    parse: e.g. an asyncio Task left over from a failed test logs "Task exception was never
    retrieved" from ``__del__``, and Python 3.11's traceback formatting calls ``ast.parse``.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        if enabled:
            gc.enable()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("standalone_only")
        bug = metafunc.definition.get_closest_marker("xfail_on_cluster")
        for marker in (only, bug):
            if marker is not None and not marker.kwargs.get("reason"):
                raise pytest.UsageError(f"{metafunc.definition.nodeid}: say why, {marker.name}(reason=...)")
        cluster: Any = "cluster"
        if bug is not None:
            cluster = pytest.param("cluster", marks=pytest.mark.xfail(
                strict=True, raises=AssertionError, reason=f"library bug on a cluster: {bug.kwargs['reason']}"))
        metafunc.parametrize("backend", ["standalone"] if only else ["standalone", cluster], indirect=True,
                             scope="session")


def _docker_running() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=20).returncode == 0


@pytest.fixture(scope="session")
def standalone_url() -> Iterator[str]:
    """URL of a throwaway standalone Redis for this test session."""
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


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """URL of one node of a throwaway Redis Cluster (3 masters, 1 replica each) for this test session."""
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.exit("The cluster tests need redis-server and redis-cli on PATH (they come together). " + NO_REDIS,
                    returncode=3)
    with LocalRedisCluster(masters=3, replicas=1) as cluster:
        yield cluster.url


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    """The Redis this test runs against (parametrized: standalone and cluster)."""
    kind = getattr(request, "param", "standalone")
    return Backend(kind, request.getfixturevalue(f"{kind}_url"))


@pytest.fixture(scope="session")
def redis_url(backend: Backend) -> str:
    return backend.url


@pytest.fixture
def raw(backend: Backend) -> Iterator[Client]:
    """A plain redis-py client, to look at what Redis actually holds."""
    client = backend.client()
    yield client
    client.close()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def made_caches() -> list[MultiLevelCache | AsyncMultiLevelCache]:
    """Every cache ``make_cache`` and ``make_async_cache`` built in this test, in order."""
    return []


@pytest.fixture
def make_cache(backend: Backend, namespace: str, made_caches: list[Any]) -> Iterator[Callable[..., MultiLevelCache]]:
    """Build caches on this test's backend and namespace; fail-closed so errors surface."""
    made: list[MultiLevelCache] = []

    def make(**settings: Any) -> MultiLevelCache:
        settings.setdefault("namespace", namespace)
        settings.setdefault("fail_open", False)
        settings.setdefault("cluster", backend.cluster)
        cache = guard_slots(MultiLevelCache(backend.url, **settings))
        made.append(cache)
        made_caches.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


@pytest.fixture
def make_async_cache(backend: Backend, namespace: str, made_caches: list[Any]) -> Callable[..., AsyncMultiLevelCache]:
    """Build async caches like ``make_cache`` does (same backend, namespace, fail-closed, slot guard);
    the test closes them in its own event loop (``async with make_async_cache() as cache``)."""

    def make(**settings: Any) -> AsyncMultiLevelCache:
        settings.setdefault("namespace", namespace)
        settings.setdefault("fail_open", False)
        settings.setdefault("cluster", backend.cluster)
        cache = guard_slots(AsyncMultiLevelCache(backend.url, **settings))
        made_caches.append(cache)
        return cache

    return make


@pytest.fixture
def flush_all(made_caches: list[Any]) -> Callable[[], None]:
    """Send the buffered bookkeeping of every cache this test made, now.

    Hits and misses reach Redis in batches (LRU stamps, hit counts, promotions, fleet counters), so a
    test that looks at what Redis holds after reads calls this first. For an async cache it does what
    ``await cache.flush_bookkeeping()`` does, from the calling thread: the flusher has a sync client of
    its own, so it may be called inside a running event loop too (it blocks the loop for one round trip).
    """

    def flush() -> None:
        for cache in made_caches:
            cache._flusher.flush()

    return flush
