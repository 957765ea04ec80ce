"""`make demo` end to end: the demo runs as a program, against the session's Redis (standalone, and a
cluster with ``--cluster``) and on its fallback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import Backend

ROOT = Path(__file__).resolve().parent.parent
RATES = re.compile(r"combined hit rate: baseline (\d+\.\d)% -> fleet (\d+\.\d)%")


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # --cost-ms 0: the demo's stand-in for a model call is a sleep; the test does not need it.
    return subprocess.run([sys.executable, "-m", "victor_rcache.demo", "--cost-ms", "0", *args],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=env, check=False)


def test_demo_shows_tiers_and_the_fleet_beating_the_baseline(backend: Backend, namespace: str) -> None:
    cluster = ["--cluster"] if backend.cluster else []
    done = run_demo("--url", backend.url, *cluster, "--workers", "2", "--requests", "100", "--namespace", namespace)

    assert done.returncode == 0, done.stderr
    out = done.stdout
    for column in ("L1 hit", "L2 hit", "L3 hit", "combined", "computed"):
        assert column in out
    # lookups: 100 requests, plus one more for each time the worker waited for the other's fill
    assert re.search(r"^\s+worker 0\s+\d+\s+1\d\d\s+\d+\.\d%\s+\d+\.\d%\s+\d+\.\d%\s+\d+\.\d%\s+\d+$", out,
                     re.MULTILINE)
    fleet_gets = re.search(r'get_metrics\(scope="fleet"\): gets (\d+)', out)
    assert fleet_gets is not None, out
    assert 200 <= int(fleet_gets.group(1)) < 300
    assert "get_or_set computes each once per fleet" in out  # no eviction at these sizes: exactly once
    assert "(equal to the sum of the workers' own counters)" in out
    found = RATES.search(out)
    assert found is not None, out
    baseline, fleet = (float(x) for x in found.groups())
    assert fleet > baseline
    assert "The fleet computed" in out
    assert "ERROR" not in out
    follow = "-c " if backend.cluster else ""  # redis-cli follows MOVED to the node holding each key
    assert f"redis-cli {follow}-u {backend.url} --scan --pattern '{namespace}:*'" in out

    client = backend.client()  # on a cluster, scan_iter visits every master
    try:
        assert list(client.scan_iter(match=f"{namespace}-solo-*")) == []  # the baseline cleans up after itself
        assert any(client.scan_iter(match=f"{namespace}:*"))  # the shared namespace stays, for redis-cli
    finally:
        client.close()


def test_demo_falls_back_to_fakeredis_without_redis_server() -> None:
    pytest.importorskip("fakeredis")
    pytest.importorskip("lupa")
    env = {k: v for k, v in os.environ.items() if k not in ("VICTOR_RCACHE_URL", "REDIS_URL")}
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if d and not (Path(d) / "redis-server").exists())

    done = run_demo("--workers", "2", "--requests", "50", env=env)

    assert done.returncode == 0, done.stderr
    assert "no redis-server found: running on an embedded fakeredis server; results are illustrative" in done.stdout
    assert RATES.search(done.stdout) is not None, done.stdout
    assert "The fleet computed" in done.stdout
