"""victor_rcache.testing used the way a user's test suite uses it, in a pytest run of its own.

Each test writes a small user project (a conftest.py and a test file) with pytest's ``pytester`` and
runs pytest on it in a subprocess, as the user's ``pytest`` would: the fixtures load as a plugin
(``pytest_plugins``) or imported into conftest.py, their tests put and get through MultiLevelCache on
the fixture's server or cluster, and without redis-server a test using a fixture fails saying how to
install it.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = '''
import pytest

from victor_rcache import MultiLevelCache

SEEN = set()


def test_put_then_get(rcache_redis_url, rcache_namespace):
    assert not rcache_redis_url.endswith(":6379/0")
    with MultiLevelCache(rcache_redis_url, namespace=rcache_namespace) as cache:
        cache.put("query", {"tools": ["read", "search"]})
        assert cache.get("query") == {"tools": ["read", "search"]}
    with MultiLevelCache(rcache_redis_url, namespace="shared") as writer:
        writer.put("answer", 42)  # read by the next test


def test_the_server_lives_for_the_session(rcache_redis_url, rcache_namespace):
    with MultiLevelCache(rcache_redis_url, namespace="shared") as reader:
        assert reader.get("answer") == 42
    with MultiLevelCache(rcache_redis_url, namespace=rcache_namespace) as other:
        assert other.get("answer", default="absent") == "absent"


@pytest.mark.parametrize("run", range(3))
def test_each_test_has_its_own_namespace(rcache_namespace, run):
    assert rcache_namespace not in SEEN
    SEEN.add(rcache_namespace)
'''
USER_PASSED = 5


def run_user_suite(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in a subprocess, from the user project's folder, with this interpreter."""
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def test_plugin_fixtures_give_a_private_redis(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["victor_rcache.testing"]\n')
    pytester.makepyfile(test_user=USER_TESTS)
    result = run_user_suite(pytester)
    result.assert_outcomes(passed=USER_PASSED)


def test_fixtures_imported_into_conftest(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("from victor_rcache.testing import rcache_namespace, rcache_redis_url  # noqa: F401\n")
    pytester.makepyfile(test_user=USER_TESTS)
    result = run_user_suite(pytester)
    result.assert_outcomes(passed=USER_PASSED)


@pytest.mark.slow
def test_cluster_fixture_gives_a_private_cluster(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["victor_rcache.testing"]\n')
    pytester.makepyfile(test_user='''
from redis.cluster import RedisCluster

from victor_rcache import MultiLevelCache


def test_put_then_get_on_a_cluster(rcache_cluster_url, rcache_namespace):
    with RedisCluster.from_url(rcache_cluster_url) as client:
        assert len(client.get_primaries()) == 3
    values = {f"key-{i}": i for i in range(64)}  # every master's shards
    with MultiLevelCache(rcache_cluster_url, namespace=rcache_namespace, cluster=True, fail_open=False) as a:
        a.put_many(values)
    with MultiLevelCache(rcache_cluster_url, namespace=rcache_namespace, cluster=True, fail_open=False) as b:
        assert b.get_many(list(values)) == values
''')
    result = run_user_suite(pytester)
    result.assert_outcomes(passed=1)


def test_without_redis_server_the_test_fails_saying_how_to_install_it(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest('pytest_plugins = ["victor_rcache.testing"]\n')
    pytester.makepyfile(test_user='''
def test_needs_redis(rcache_redis_url):
    raise AssertionError("never reached")


def test_needs_a_cluster(rcache_cluster_url):
    raise AssertionError("never reached")


def test_needs_no_redis(rcache_namespace):
    assert rcache_namespace
''')
    # An empty PATH: no redis-server, no redis-cli (pytester starts the interpreter by its absolute path).
    monkeypatch.setenv("PATH", str(pytester.mkdir("no-redis-here")))
    result = run_user_suite(pytester)
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines([
        "*the rcache_redis_url fixture starts a private redis-server, and redis-server is not on PATH*",
        "*the rcache_cluster_url fixture starts a private Redis Cluster, and redis-server and redis-cli are not "
        "on PATH*",
    ])
    result.stdout.fnmatch_lines(["*apt-get install redis-server*brew install redis*"])
    result.stdout.no_fnmatch_line("*never reached*")
