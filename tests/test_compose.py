"""The compose/ files, brought up for real with testcontainers' DockerCompose.

Each file gets a smoke test: two caches put and get through it, and each sees the other's
invalidation (its L1 copy is dropped and the next get returns the new value). The cluster test also
checks what makes compose/cluster.yml usable from the host: CLUSTER SLOTS and MOVED name
127.0.0.1 and a published port, a redis-py RedisCluster on the host reaches every master, and a
second `up` leaves the cluster as it was (cluster-init finds it formed and creates nothing).

These tests need a Docker engine with Compose v2; without one (`docker info` fails) they are
skipped, and the skip says why. Each run uses a project name of its own, so a Redis or cluster you
started from these files yourself is never touched; compose/redis.yml is published on a free port.
compose/cluster.yml's ports are fixed (7000-7005, the ports its nodes announce): if one is taken on
127.0.0.1 the cluster test is skipped, saying which.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MovedError
from testcontainers.compose import DockerCompose

from victor_rcache import MultiLevelCache

COMPOSE_DIR = Path(__file__).resolve().parent.parent / "compose"
CLUSTER_PORTS = range(7000, 7006)
LIVENESS = 10.0  # seconds a cache may take to subscribe or hear an invalidation; only a hang reaches it
CLUSTER_INIT_DEADLINE = 120.0  # seconds cluster-init may take to exit once `up` returned
MISS = "<miss>"


def docker_problem() -> str | None:
    """Why these tests cannot run here, or None when a Docker engine and Compose v2 answer."""
    if shutil.which("docker") is None:
        return "no Docker engine: the docker client is not on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "no Docker engine: `docker info` did not answer within 30 s"
    if info.returncode != 0:
        reason = next((line.strip() for line in info.stderr.splitlines() if line.strip()), "no output")
        return f"no Docker engine: `docker info` failed ({reason})"
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30,
                             check=False)
    if version.returncode != 0:
        return "a Docker engine runs but `docker compose` (Compose v2) is missing: install the Compose plugin"
    return None


@pytest.fixture(scope="module")
def docker() -> None:
    """Skip the module's tests, saying why, unless a Docker engine with Compose v2 answers."""
    problem = docker_problem()
    if problem is not None:
        pytest.skip(f"{problem}; the compose/ files are brought up only where Docker runs")


@pytest.fixture
def compose_env(docker: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A project name of this test's own, and the files' settings at their defaults (docker compose
    inherits this process's environment)."""
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", f"vrc-test-{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("VICTOR_RCACHE_BIND", "127.0.0.1")
    monkeypatch.delenv("VICTOR_RCACHE_ANNOUNCE", raising=False)
    monkeypatch.setenv("VICTOR_RCACHE_PORT", "")  # set but empty: Docker picks a free host port for redis.yml


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = LIVENESS) -> None:
    """Poll ``predicate`` until it holds; fail (never hang) if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.01)  # a polling interval: each poll is a few Redis round trips


def coherence(cache: MultiLevelCache) -> dict[str, object]:
    return dict(cache.get_metrics()["coherence"])


def heard(cache: MultiLevelCache) -> int:
    """How many invalidations the cache's subscriber has received."""
    return int(str(coherence(cache)["invalidations"]))


def smoke(url: str, *, cluster: bool) -> str:
    """Two caches on one namespace: put/get both ways, and each sees the other's invalidation.

    Returns the namespace, whose key "tools" holds ["read", "search"] afterwards.
    """
    namespace = "compose" + uuid.uuid4().hex[:10]
    settings: dict[str, Any] = {"namespace": namespace, "cluster": cluster, "fail_open": False}
    with MultiLevelCache(url, **settings) as a, MultiLevelCache(url, **settings) as b:
        wait_until(lambda: coherence(a)["channel"] == coherence(b)["channel"] == "up",
                   "both caches subscribing to invalidations")

        a.put("greeting", {"hello": "world"})
        assert b.get("greeting") == {"hello": "world"}
        many = {f"key-{i}": i for i in range(64)}  # on a cluster: every master's shards
        a.put_many(many)
        assert b.get_many(list(many)) == many

        b.put("tools", ["read"])  # a new key: B's L1 holds it, nothing is published
        assert b.get("tools") == ["read"]
        before = heard(b)
        a.put("tools", ["read", "search"])  # over an existing entry: published
        wait_until(lambda: heard(b) > before, "B hearing A's invalidation")
        assert b.get("tools") == ["read", "search"], "B served its stale L1 copy after the invalidation"

        before = heard(a)
        b.delete("greeting")  # A's L1 still holds its own put
        wait_until(lambda: heard(a) > before, "A hearing B's invalidation")
        assert a.get("greeting", default=MISS) == MISS
    return namespace


def test_redis_yml_serves_two_coherent_caches(compose_env: None) -> None:
    with DockerCompose(COMPOSE_DIR, compose_file_name="redis.yml", wait=True) as compose:  # up --wait: healthy
        host, port = compose.get_service_host_and_port("redis", 6379)
        assert host, "compose/redis.yml published no address for 6379"
        assert port, "compose/redis.yml published no port for 6379"
        smoke(f"redis://{host}:{port}/0", cluster=False)


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_for_cluster_init(compose: DockerCompose, says: str) -> None:
    """Wait until the one-shot cluster-init has exited having printed ``says``; it must exit 0."""
    deadline = time.monotonic() + CLUSTER_INIT_DEADLINE
    while True:
        init = compose.get_container("cluster-init", include_all=True)
        logs = "".join(compose.get_logs("cluster-init"))
        if init.State == "exited" and says in logs:
            break
        assert time.monotonic() < deadline, (
            f"cluster-init did not finish within {CLUSTER_INIT_DEADLINE} s saying {says!r}; "
            f"state {init.State}, logs:\n{logs}")
        time.sleep(0.5)  # a polling interval: each poll runs `docker compose ps` and `logs`
    assert init.ExitCode == 0, f"cluster-init exited with {init.ExitCode}:\n{logs}"


@pytest.fixture
def cluster_up(compose_env: None) -> Iterator[DockerCompose]:
    taken = [port for port in CLUSTER_PORTS if port_taken(port)]
    if taken:
        pytest.skip(f"compose/cluster.yml needs 127.0.0.1 ports 7000-7005 and {taken} are taken "
                    "(a cluster from this file already running? `docker compose -f compose/cluster.yml down`)")
    # Not `up --wait`: it reports the one-shot cluster-init's exit as a failure. `up -d` returns once the
    # nodes are healthy and cluster-init has started; then cluster-init is awaited.
    with DockerCompose(COMPOSE_DIR, compose_file_name="cluster.yml", wait=False) as compose:
        wait_for_cluster_init(compose, "cluster_state:ok on all 6 nodes")
        yield compose


def node_ids() -> dict[int, bytes]:
    ids = {}
    for port in CLUSTER_PORTS:
        with redis.Redis(host="127.0.0.1", port=port) as node:
            ids[port] = node.execute_command("CLUSTER", "MYID")
    return ids


@pytest.mark.slow
def test_cluster_yml_is_reachable_from_the_host_and_serves_two_coherent_caches(cluster_up: DockerCompose) -> None:
    with redis.Redis(host="127.0.0.1", port=7000) as first:
        slots = first.execute_command("CLUSTER", "SLOTS")
        # What redis-py on the host is told: every node at 127.0.0.1 and a published port (replicas are
        # listed once their first sync is done, so maybe not yet).
        endpoints = {(bytes(node[0]), int(node[1])) for entry in slots for node in entry[2:]}
        assert endpoints <= {(b"127.0.0.1", port) for port in CLUSTER_PORTS}, endpoints
        masters = {int(entry[2][1]) for entry in slots}
        assert len(masters) == 3, slots
        start, end = next((e[0], e[1]) for e in slots if int(e[2][1]) != 7000)  # a range another node serves
        key = next(f"k{i}" for i in range(100_000) if start <= key_slot(f"k{i}".encode()) <= end)
        with pytest.raises(MovedError) as moved:
            first.get(key)
        assert moved.value.host == "127.0.0.1"
        assert moved.value.port in masters - {7000}

    with RedisCluster(host="127.0.0.1", port=7000) as client:  # follows MOVED to every master
        assert {(n.host, n.port) for n in client.get_primaries()} == {("127.0.0.1", p) for p in masters}
        for entry in slots:
            key = next(f"m{i}" for i in range(100_000) if entry[0] <= key_slot(f"m{i}".encode()) <= entry[1])
            client.set(key, str(entry[2][1]))
            assert client.get(key) == str(entry[2][1]).encode()

    namespace = smoke("redis://127.0.0.1:7000/0", cluster=True)

    ids = node_ids()
    cluster_up.start()  # a second `up`: cluster-init runs again and must find the cluster formed
    wait_for_cluster_init(cluster_up, "nothing to create")
    assert node_ids() == ids, "a second `up` replaced nodes"
    with MultiLevelCache("redis://127.0.0.1:7000/0", namespace=namespace, cluster=True, fail_open=False) as cache:
        assert cache.get("tools") == ["read", "search"], "the cluster lost its data on a second `up`"
