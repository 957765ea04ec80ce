"""`make demo` end to end: the demo runs as a program, against the session's Redis (standalone, and a
cluster with ``--cluster``) and on its fallback, and its table says what the brief promises; plus the
pieces that need no Redis (the request streams, the once-per-fleet check, the progress bar)."""

from __future__ import annotations

import io
import itertools
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from victor_rcache.demo import (
    ACTIONS,
    SUBJECTS,
    ProgressBar,
    Settings,
    Workload,
    agent_streams,
    overlaps,
)

from .helpers import Backend

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^  (no cache|per-process LRU|fleet cache|fleet \+ prewarming)\s+(\d+\.\d)%\s+(\d+\.\d+) ms"
                 r"\s+(\d+\.\d+) ms\s+(\d+)(?: \+ (\d+))?\s+(\d+|-)\s+(?:(\d+) / (\d+)|-)$", re.MULTILINE)
# Small and fast: a selection costs 2 ms, an agent thinks 4 ms; L2 and L3 are smaller than the
# queries the fleet asks, so Redis evicts and prewarming has entries to bring back.
SMALL = ("--workers", "2", "--requests", "120", "--cost-ms", "2", "--think-ms", "4", "--l2-size", "16",
         "--l3-size", "32")


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "victor_rcache.demo", *args], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=env, check=False)


def table(out: str) -> dict[str, dict[str, float]]:
    """The demo's table: configuration -> its numbers."""
    rows = {}
    for m in ROW.finditer(out):
        rows[m[1]] = {"hit_rate": float(m[2]), "mean_ms": float(m[3]), "p99_ms": float(m[4]), "calls": int(m[5]),
                      "background": int(m[6] or 0), "completed": int(m[8] or 0), "useful": int(m[9] or 0)}
    assert set(rows) == {"no cache", "per-process LRU", "fleet cache", "fleet + prewarming"}, out
    return rows


def test_demo_table_shows_what_sharing_and_prewarming_save(backend: Backend, namespace: str) -> None:
    cluster = ["--cluster"] if backend.cluster else []
    done = run_demo("--url", backend.url, *cluster, *SMALL, "--namespace", namespace)

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    rows = table(out)
    none, local, fleet, prewarm = (rows[k] for k in ("no cache", "per-process LRU", "fleet cache",
                                                     "fleet + prewarming"))
    assert none["calls"] == 240
    assert none["hit_rate"] == 0.0
    assert fleet["calls"] < local["calls"] < none["calls"]  # sharing saves more than caching alone
    assert fleet["hit_rate"] > local["hit_rate"] > 0
    # Prewarming computed predicted selections in the background, and some were asked for afterwards.
    # (Its hit rate is usually above the plain fleet's, but with a run this small not always.)
    assert prewarm["background"] >= prewarm["completed"] > 0
    assert 0 < prewarm["useful"] <= prewarm["completed"]
    # The demo's own checks: never two computations of a selection at once, recomputations only after
    # evictions, every answer equal to a fresh selection, fleet counters equal to the workers' sum.
    assert out.count("Check passed") == 2, out
    assert "ERROR" not in out
    assert "WARNING" not in out

    follow = "-c " if backend.cluster else ""  # redis-cli follows MOVED to the node holding each key
    assert f"redis-cli {follow}-u {backend.url} --scan --pattern '{namespace}:*'" in out
    assert f"victor-rcache stats --url {backend.url} --namespace {namespace}" in out
    assert done.stderr.count("240/240 requests") == 4, done.stderr  # one bar per configuration

    client = backend.client()  # on a cluster, scan_iter visits every master
    try:  # the last configuration's cache and model stay, for redis-cli and victor-rcache stats
        assert any(client.scan_iter(match=f"{namespace}:{{s*}}:e:*"))
        assert any(client.scan_iter(match=f"{namespace}:{{{namespace}.model}}:next:*"))
    finally:
        client.close()


def test_demo_falls_back_to_fakeredis_without_redis_server() -> None:
    pytest.importorskip("fakeredis")
    pytest.importorskip("lupa")
    env = {k: v for k, v in os.environ.items() if k not in ("VICTOR_RCACHE_URL", "REDIS_URL")}
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if d and not (Path(d) / "redis-server").exists())

    done = run_demo("--workers", "2", "--requests", "50", "--cost-ms", "2", "--think-ms", "2", env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "no redis-server found: running on an embedded fakeredis server; results are illustrative" in done.stdout
    rows = table(done.stdout)
    assert rows["no cache"]["calls"] == 100
    assert rows["fleet cache"]["calls"] < 100
    assert "ERROR" not in done.stdout


# --------------------------------------------------------------------------- without Redis

SETTINGS = Settings(url="redis://unused", namespace="demo", requests=100, agents=3, session_length=8, seed=1,
                    zipf_s=1.0, cost_ms=0, think_ms=0, l1_size=24, l2_size=32, l3_size=64)


def test_request_streams_are_fixed_by_the_seed() -> None:
    streams = agent_streams(SETTINGS, worker=0)
    assert streams == agent_streams(SETTINGS, worker=0)
    assert streams != agent_streams(SETTINGS, worker=1)
    assert streams != agent_streams(replace(SETTINGS, seed=2), worker=0)
    assert sum(len(s) for s in streams) == 100
    # Agent a runs sessions a, a + agents, ... whole, one after the other: 13 sessions of 8 and one of 4.
    sessions = [sess for stream in streams for sess, _ in stream]
    assert len(set(sessions)) == 13
    assert [sess for sess, _ in streams[1][:9]] == ["w0-s1"] * 8 + ["w0-s4"]


def test_sessions_walk_the_chain() -> None:
    workload = Workload(seed=1, zipf_s=1.0)
    assert len(workload.vocabulary) == len(ACTIONS) * len(SUBJECTS) == 150
    steps = usual = same_subject = 0
    for stream in agent_streams(replace(SETTINGS, requests=4000), worker=0):
        for (s1, q1), (s2, q2) in itertools.pairwise(stream):
            if s1 != s2:
                continue
            steps += 1
            a1 = next(a for a in ACTIONS if q1.startswith(a + " "))
            a2 = next(a for a in ACTIONS if q2.startswith(a + " "))
            usual += a2 in workload.next_actions[a1]
            same_subject += q1[len(a1):] == q2[len(a2):]
    # 95% of the steps follow one of the action's three usual successors on the same subject; the rest
    # jump anywhere (sometimes to a usual successor too).
    assert same_subject / steps > 0.93
    assert usual / steps > 0.93


def test_overlapping_computations_of_one_selection_are_found() -> None:
    assert overlaps([("a", 0.0, 1.0), ("a", 1.0, 2.0), ("b", 0.5, 1.5)]) == 0  # one after the other
    assert overlaps([("a", 0.0, 1.0), ("a", 0.9, 2.0)]) == 1
    assert overlaps([("a", 0.0, 3.0), ("a", 1.0, 1.5), ("a", 2.0, 2.5)]) == 2


def test_progress_bar_prints_one_line_when_not_on_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar("fleet cache", 200, stream=stream, width=10)
    bar.update(50)
    assert stream.getvalue() == ""  # not a terminal: no redrawing
    assert bar.line(50) == "  fleet cache          [##........]  25%  50/200 requests"
    bar.finish()
    assert re.fullmatch(r"  fleet cache {10}\[#{10}\] 100%  200/200 requests in \d+\.\d s\n", stream.getvalue())
