"""Pytest fixtures for testing your own code against a real, private Redis (and Redis Cluster).

Load them as a plugin, in the ``conftest.py`` at the root of your tests::

    pytest_plugins = ["victor_rcache.testing"]

or import the ones you use into that ``conftest.py``
(``from victor_rcache.testing import rcache_redis_url``). Then:

- ``rcache_redis_url`` (session): the URL of a ``redis-server`` started for the test session on a
  free port of 127.0.0.1, keeping nothing on disk; it never touches a Redis you run on 6379.
- ``rcache_cluster_url`` (session): the URL of one node of a local Redis Cluster of 3 masters
  (give it to the cache with ``cluster=True``).
- ``rcache_namespace`` (each test): a namespace no other test uses, so tests sharing the session's
  server do not see each other's entries.

They need ``redis-server`` (and, for the cluster, ``redis-cli``) on ``PATH``; without them a test
using a fixture fails with a message that says how to install them. This module imports pytest:
import it from your tests only (the library itself never does).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest

from .local_redis import LocalRedisCluster, LocalRedisServer

__all__ = ["rcache_cluster_url", "rcache_namespace", "rcache_redis_url"]

INSTALL = ("Install Redis (Debian/Ubuntu: apt-get install redis-server, which brings redis-cli too; "
           "macOS: brew install redis), or put the folder that holds it on PATH.")


def _require(*binaries: str, fixture: str, starts: str) -> None:
    """Fail the test that asked for ``fixture``, saying how to install what is missing."""
    missing = [name for name in binaries if shutil.which(name) is None]
    if missing:
        pytest.fail(f"victor_rcache.testing: the {fixture} fixture starts {starts}, and "
                    f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH. {INSTALL}",
                    pytrace=False)


@pytest.fixture(scope="session")
def rcache_redis_url() -> Iterator[str]:
    """URL of a private ``redis-server`` for this test session (``redis://127.0.0.1:<free port>/0``)."""
    _require("redis-server", fixture="rcache_redis_url", starts="a private redis-server")
    with LocalRedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def rcache_cluster_url() -> Iterator[str]:
    """URL of one node of a private Redis Cluster (3 masters) for this test session; use ``cluster=True``."""
    _require("redis-server", "redis-cli", fixture="rcache_cluster_url", starts="a private Redis Cluster")
    with LocalRedisCluster(masters=3, replicas=0) as cluster:
        yield cluster.url


@pytest.fixture
def rcache_namespace() -> str:
    """A cache namespace of this test's own."""
    return "test-" + uuid.uuid4().hex[:12]
