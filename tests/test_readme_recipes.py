"""The documented redis-cli recipes (docs/key-layout.md) answer what they say, run verbatim through the
real `redis-cli`.

Each ```sh block the page introduces as redis-cli commands for an operator is parsed, pointed at a
private server holding the page's own example data, and every command must answer (exit 0, non-empty
output) with what its comment promises.
"""

from __future__ import annotations

import calendar
import os
import re
import shlex
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from victor_rcache import MultiLevelCache, PredictiveCacheWarmer
from victor_rcache.keys import KeySpace
from victor_rcache.local_redis import LocalRedisServer

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "key-layout.md"
AT_14_UTC = float(calendar.timegm((2026, 11, 26, 14, 5, 0)))

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")


def recipes(after: str) -> list[list[str]]:
    """The redis-cli commands (as argv, comments dropped) of the first ```sh block after ``after``."""
    text = RECIPES.read_text("utf-8")
    start = text.index(after)
    block = re.search(r"```sh\n(.*?)```", text[start:], re.DOTALL)
    assert block is not None, f"no sh block after {after!r} in {RECIPES.name}"
    commands = [shlex.split(line, comments=True) for line in block[1].splitlines()]
    return [c for c in commands if c and c[0] == "redis-cli"]


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRedisServer]:
    with LocalRedisServer() as srv:
        yield srv


def run(server: LocalRedisServer, argv: list[str]) -> str:
    done = subprocess.run(["redis-cli", "-p", str(server.port), *argv[1:]], capture_output=True, text=True,
                          check=False, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), argv
    assert not done.stdout.startswith(("(nil)", "(error)")), (argv, done.stdout)
    return done.stdout


def test_the_model_recipes_answer_with_what_the_model_learned(server: LocalRedisServer, tmp_path: Path) -> None:
    section = "What the model believes, with `redis-cli`"
    with MultiLevelCache(server.url, namespace="tools", fail_open=False) as cache:
        warmer = PredictiveCacheWarmer(cache, clock=lambda: AT_14_UTC)
        for _ in range(3):
            for query, tools in (("read the file", ["read"]), ("analyze code", ["read", "search"]),
                                 ("write tests", ["write"])):
                warmer.record_query(query, tools, session="agent-7")
        warmer.flush()  # the model thread sends records within refresh_interval; now, here
        commands = recipes(section)
        assert len(commands) == 7
        answers = [run(server, argv) for argv in commands]
        # The sketch's estimate is a shell loop (hashing with sha1sum): run verbatim in sh.
        [loop] = [line for line in sh_lines(section) if not line.startswith("redis-cli")]
        done = subprocess.run(["sh", "-c", loop], env=pointed_at(server, tmp_path), capture_output=True, text=True,
                              check=False, timeout=60)
        assert done.returncode == 0, done.stderr
    assert answers[0].split("\n")[0] == "analyze code"  # what follows "read the file"
    assert answers[1].split("\n")[0] == "write tests"  # after "read the file", "analyze code"
    assert {"read the file", "analyze code", "write tests"} <= set(answers[2].split("\n"))
    assert answers[3].strip() == '["read","search"]'
    assert "records" in answers[4].split("\n")
    assert int(answers[5]) > 0
    assert int(answers[6]) == 4 * 16384 // 2  # 4 rows of 16,384 4-bit counters, from the first record on
    assert done.stdout.strip() == "3"  # "read the file" was followed three times


# --------------------------------------------------------------------------- "Inspecting with redis-cli"

def sh_lines(after: str) -> list[str]:
    """The lines of the first ```sh block after the heading ``after``, verbatim: one shell command each."""
    text = RECIPES.read_text("utf-8")
    block = re.search(r"```sh\n(.*?)```", text[text.index(after):], re.DOTALL)
    assert block is not None, f"no sh block after {after!r} in {RECIPES.name}"
    return [line for line in block[1].splitlines() if line.strip()]


def pointed_at(server: LocalRedisServer, tmp_path: Path) -> dict[str, str]:
    """An environment whose ``redis-cli`` (every one of a pipeline's) talks to ``server``."""
    real = shutil.which("redis-cli")
    assert real is not None
    folder = tmp_path / "bin"
    folder.mkdir()
    wrapper = folder / "redis-cli"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(real)} -p {server.port} "$@"\n')
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_the_inspecting_recipes_answer_each_operator_question(tmp_path: Path) -> None:
    """Each line of the section runs verbatim in ``sh`` (pipes, loops and all), every ``redis-cli`` in it
    pointed at a private server where namespace ``tools`` has something to answer every question with:
    entries in both tiers, a clear hottest entry, a learned transition, fleet counters and a selection
    being computed (its fill lease pending) while the recipes run. The caches send their reads'
    bookkeeping (hit counts, fleet counters) before the recipes look, as the page says they must."""
    commands = sh_lines("## Inspecting with redis-cli")
    assert len(commands) == 15
    space = KeySpace("tools", 16)
    others = [f"query {i}" for i in range(60)]
    # Shard 13 holds "read the file" and at least two others: with 2 L2 entries per shard, its L3 is not empty.
    assert sum(space.ref(q).shard == 13 for q in others) >= 2
    with LocalRedisServer() as server, \
            MultiLevelCache(server.url, namespace="tools", l2_size=32, l3_size=1000, fail_open=False) as writer, \
            MultiLevelCache(server.url, namespace="tools", l2_size=32, l3_size=1000, fail_open=False,
                            promote_after=1000) as reader, \
            MultiLevelCache(server.url, namespace="tools", l2_size=32, l3_size=1000, fail_open=False) as computer:
        writer.put_many({q: {"tools": ["grep"], "n": i} for i, q in enumerate(others)})
        writer.put("read the file", {"tools": ["read_file", "grep"]})
        writer.put("analyze code", {"tools": ["read_file", "search"]})
        for _ in range(5):  # promote_after=1000: hits are never copied into the reader's L1, each reaches Redis
            assert reader.get("read the file") is not None
        for _ in range(2):
            assert reader.get("analyze code") is not None
        warmer = PredictiveCacheWarmer(writer, clock=lambda: AT_14_UTC)
        for session, second in (("a1", "analyze code"), ("a2", "analyze code"), ("a3", "write tests")):
            warmer.record_query("read the file", ["read_file"], session=session)
            warmer.record_query(second, ["search"], session=session)
        warmer.flush()
        metrics = writer.get_metrics()

        started, release = threading.Event(), threading.Event()

        def slow_selection() -> dict[str, list[str]]:
            started.set()
            release.wait(30)
            return {"tools": ["deploy"]}

        pending = threading.Thread(target=computer.get_or_set, args=("deploy the CLI", slow_selection))
        pending.start()
        try:
            assert started.wait(10)  # its worker holds the fill lease while the selection runs
            for cache in (writer, reader, computer):  # the reads' hit counts and counters reach Redis now
                cache.flush_bookkeeping()
            env = pointed_at(server, tmp_path)
            answers = []
            for line in commands:
                done = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=env, check=False,
                                      timeout=60)
                assert done.returncode == 0, (line, done.stderr)
                assert done.stderr == "", (line, done.stderr)
                assert done.stdout.strip(), line
                assert not re.search(r"^(ERR|WRONGTYPE|\(error\))", done.stdout, re.MULTILINE), (line, done.stdout)
                answers.append(done.stdout.splitlines())
            with redis.Redis.from_url(server.url) as raw:  # what the answers should say, read directly
                l2_all = {m.decode() for sk in space.shard_keys for m in raw.zrange(sk.l2, 0, -1)}
                entry_size = raw.hstrlen(space.entry_key(space.ref("read the file")), "v")
        finally:
            release.set()
            pending.join(10)

    (l2_13, l3_13, l2_ns, hot, n2, n3, value_bytes, memory, predicted, counters, where, fields, size, pttl,
     leases) = answers
    assert l2_13[0] == "read the file"
    assert len(l2_13) == 4
    assert len(l3_13) >= 2
    assert all(space.ref(m).shard == 13 for m in l3_13[0::2])
    assert set(l2_ns) == l2_all
    assert {"read the file", "analyze code"} <= l2_all
    assert hot[:2] == ["5 tools:{s13.1}:e:read the file", "2 tools:{s15.42}:e:analyze code"]
    assert int(n2[0]) == metrics["l2"]["entry_count"] == 32
    assert int(n3[0]) == metrics["l3"]["entry_count"] == 62 - 32
    assert int(value_bytes[0]) == metrics["l2"]["total_size"] + metrics["l3"]["total_size"] > 0
    assert int(memory[0]) > int(value_bytes[0])
    probabilities = [line.split(" ", 1) for line in predicted]
    assert [q for _, q in probabilities] == ["analyze code", "write tests"]
    assert float(probabilities[0][0]) > float(probabilities[1][0]) > 0
    assert abs(sum(float(p) for p, _ in probabilities) - 1) < 0.02
    fleet = {name: int(value) for name, value in (line.split(" ") for line in counters)}
    assert fleet["puts"] == 62
    assert fleet["l2_hits"] == 7
    assert fleet["misses"] == 1
    assert re.fullmatch(r"l2 \d+(\.\d+)?", where[0])
    assert where[1].strip() == "l3"
    assert fields == ["5", fields[1], "2"]  # 5 Redis hits, its version, tier 2
    assert int(fields[1]) > 0
    assert size == [str(entry_size)]
    assert entry_size > 0
    # Its Redis expiry is its idle deadline in L2: last use + l2_ttl + l3_ttl (the defaults, 1 h + 24 h),
    # more than L3's alone.
    assert 86400 * 1000 < int(pttl[0]) <= (3600 + 86400) * 1000
    assert len(leases) == 1
    ms_left, lease = leases[0].split(" ", 1)
    assert lease == "tools:{s14.41}:lease:deploy the CLI"
    assert 0 < int(ms_left) <= 30_000
