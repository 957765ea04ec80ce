"""The ``victor-rcache`` console script, run as installed (``.venv/bin/victor-rcache``) against real Redis.

Data is seeded with the library; ``--json`` output is checked against what Redis holds (and what the
library reports), with a few checks on the human tables. Backend tests run on the standalone server and
on the cluster (``--cluster``); doctor's ACL and memory-policy findings use private servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from victor_rcache import MultiLevelCache, PredictiveCacheWarmer
from victor_rcache.cli.common import Context
from victor_rcache.cli.doctor import acl_probes
from victor_rcache.keys import KeySpace
from victor_rcache.local_redis import LocalRedisServer, free_port
from victor_rcache.prediction.model import ModelKeys
from victor_rcache.tiers import default_scripts

from .helpers import Backend, Client, server_of, servers
from .test_bad_input_and_security import set_documented_user

CLI = Path(sys.executable).with_name("victor-rcache")
LONG = "long key " + "x" * 2000  # over 1 KiB: stored under '#' + sha256
Make = Callable[..., MultiLevelCache]
RATES = {"gets", "hits", "misses", "l1_hits", "l2_hits", "l3_hits", "puts", "deletes", "promotions", "demotions",
         "evictions", "expirations", "records", "predictions_judged", "prewarm_completed"}


def clean_env() -> dict[str, str]:
    """This environment without settings of the cache: the command line says everything."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VICTOR_RCACHE_") and k != "REDIS_URL"}


def cli(*args: str, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    assert CLI.exists(), f"{CLI} is missing: pip install -e '.[dev]' installs the console script"
    done = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=60, env=clean_env(),
                          stdin=stdin, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def on(backend: Backend, namespace: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command on the test's backend and namespace."""
    cluster = ["--cluster"] if backend.cluster else []
    return cli("--url", backend.url, "--namespace", namespace, *cluster, *args, **kwargs)


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def entry(raw: Client, namespace: str, key: str) -> tuple[dict[Any, Any], float | None, float | None]:
    """An entry's fields and its L2 and L3 scores, as Redis holds them."""
    space = KeySpace(namespace, 16)
    ref = space.ref(key)
    sk = space.shard_keys[ref.shard]
    node = server_of(raw, sk.l2)
    return node.hgetall(space.entry_key(ref)), node.zscore(sk.l2, ref.id), node.zscore(sk.l3, ref.id)


def size_record(raw: Client, namespace: str, key: str) -> int:
    """The payload bytes the entry's shard accounts for it (its record in the shard's ``size`` hash)."""
    space = KeySpace(namespace, 16)
    ref = space.ref(key)
    sk = space.shard_keys[ref.shard]
    return int(server_of(raw, sk.l2).hget(sk.size, ref.id) or -1)


def contents(raw: Client, key: bytes) -> Any:
    """What a key holds, whatever its type (its value, not its encoding: DUMP of a hash in the middle of
    an incremental rehash changes on a plain read, which writes nothing)."""
    kind = raw.type(key)
    if kind == b"hash":
        return raw.hgetall(key)
    if kind == b"zset":
        return raw.zrange(key, 0, -1, withscores=True)
    if kind == b"list":
        return raw.lrange(key, 0, -1)
    return raw.dump(key)


def snapshot(raw: Client, namespace: str) -> dict[bytes, tuple[Any, Any, int]]:
    """Every key of the namespace: type, contents and absolute expiry."""
    return {key: (raw.type(key), contents(raw, key), int(raw.execute_command("PEXPIRETIME", key)))  # type: ignore[no-untyped-call]
            for key in raw.scan_iter(match=namespace.encode() + b":*", count=1000)}


@dataclass
class Seeded:
    selected: dict[str, Any]


@pytest.fixture
def seeded(make_cache: Make) -> Seeded:
    """Entries with known hit counts, a ttl, a long key, a delete, a learned model, an accurate prediction
    and a prewarmed entry. The reader never copies into L1 (promote_after=1000): every get is a Redis hit."""
    writer = make_cache()
    writer.put("read the file", {"tools": ["read", "search"]})
    writer.put("forecast", {"rain": 0.2}, ttl=600)
    writer.put(LONG, "long value")
    writer.put("gone", 1)
    assert writer.delete("gone")
    reader = make_cache(promote_after=1000, coherence=False)
    for _ in range(4):
        assert reader.get("read the file") == {"tools": ["read", "search"]}
    assert reader.get("forecast") == {"rain": 0.2}
    assert reader.get("never cached") is None
    warmer = PredictiveCacheWarmer(writer, background=False)  # each record in Redis when it returns
    for _ in range(3):
        for query, tools in (("read the file", ["read"]), ("analyze code", ["grep"]), ("write tests", ["edit"])):
            warmer.record_query(query, tools, session="s1")
    assert warmer.predict_next_queries("write tests", session="s1").queries[0] == "read the file"
    warmer.record_query("read the file", ["read"], session="s1")  # the prediction was right
    prediction = warmer.predict_next_queries("read the file", session="s2", remember=False)
    assert prediction.queries[0] == "analyze code"
    selected = {"analyze code": {"tools": ["grep"]}}
    report = asyncio.run(warmer.prewarm_predictions(prediction, lambda q: selected[q]))
    assert report.completed == 1
    for cache in (writer, reader):  # their reads' bookkeeping (hit counts, fleet counters) reaches Redis now
        cache.flush_bookkeeping()
    return Seeded(selected)


# ----------------------------------------------------------------------------- stats


def test_stats_shows_the_fleet_numbers_the_library_reports(backend: Backend, namespace: str, make_cache: Make,
                                                           seeded: Seeded, raw: Client) -> None:
    s = as_json(on(backend, namespace, "stats", "--json"))
    m = make_cache().get_metrics("fleet")
    model = PredictiveCacheWarmer(make_cache()).get_statistics()
    for tier in ("l1", "l2", "l3"):
        got, want = s["tiers"][tier], m[tier]
        assert (got["hits"], got["misses"], got["promotions"], got["demotions"], got["evictions"]) == (
            want["hits"], want["misses"], want["promotions"], want["demotions"], want["evictions"])
        assert (got["entries"], got["bytes"]) == (want["entry_count"], want["total_size"])
    assert s["tiers"]["l2"]["entries"] == 4  # read the file, forecast, the long key, analyze code (prewarmed)
    assert s["tiers"]["l2"]["hits"] == 5
    c = s["combined"]
    assert (c["gets"], c["hits"], c["misses"], c["puts"]) == (
        m["combined"]["gets"], m["combined"]["total_hits"], m["combined"]["total_misses"], m["combined"]["puts"])
    assert c["deletes"] == 1
    assert s["prediction"]["records"] == model["records"]["total"] == 10
    p = s["prediction"]
    assert (p["predictions_judged"], p["correct"], p["accuracy"]) == (1, 1, 1.0)
    assert p["patterns"] == model["patterns"]["total"]
    assert s["prewarming"] == {k: model["prewarming"][k] for k in ("completed", "useful", "skipped", "failed")}
    assert s["prewarming"]["completed"] == 1
    assert s["breaker"] == "closed"
    assert s["namespace"] == namespace

    human = on(backend, namespace, "stats")
    assert human.returncode == 0, human.stderr
    (l2_row,) = [line.split() for line in human.stdout.splitlines() if line.startswith("L2 ")]
    assert l2_row[1:5] == ["5", "1", "83.3%", "4"]  # hits, misses (the key never cached), hit rate, entries
    assert "accuracy 100.0% (1 of 1 judged)" in human.stdout


def test_stats_watch_prints_one_json_line_per_refresh_with_rates(backend: Backend, namespace: str,
                                                                 seeded: Seeded) -> None:
    done = on(backend, namespace, "stats", "--watch", "0.05", "--count", "2", "--json")
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first["rates"] is None
    assert first["interval_seconds"] is None
    assert second["interval_seconds"] > 0
    assert set(second["rates"]) == RATES
    assert all(isinstance(v, (int, float)) and v >= 0 for v in second["rates"].values())
    assert second["tiers"]["l2"]["entries"] == 4

    human = on(backend, namespace, "stats", "--watch", "0.05", "--count", "2")
    assert human.returncode == 0, human.stderr
    assert human.stdout.count("victor-rcache stats --watch: every 0.05 s") == 2
    assert "per second over the last" in human.stdout


# ---------------------------------------------------------------------------- inspect


def test_inspect_shows_an_entry_without_counting_a_hit_or_moving_it(backend: Backend, namespace: str,
                                                                    seeded: Seeded, raw: Client) -> None:
    got = {}
    for key in ("read the file", "analyze code", "forecast", LONG):
        before = entry(raw, namespace, key)
        got[key] = e = as_json(on(backend, namespace, "inspect", key, "--json"))
        assert entry(raw, namespace, key) == before, f"inspect {key[:20]!r} changed the entry"
        fields, l2_score, _ = before
        assert e["cached"]
        assert e["tier"] == "l2"
        assert fields[b"t"] == b"2"
        assert e["last_used_ms"] == l2_score
        assert (e["hits"], e["version"]) == (int(fields[b"n"]), int(fields[b"ver"]))
        assert e["size"] == len(fields[b"v"]) == size_record(raw, namespace, key)
        assert e["idle_seconds"] >= 0
        assert e["decode_error"] is None

    e = got["read the file"]
    assert (e["hits"], e["value"], e["ttl_seconds"], e["prewarmed"]) == (4, {"tools": ["read", "search"]}, None, False)
    e = got["analyze code"]
    assert (e["hits"], e["value"], e["prewarmed"]) == (0, seeded.selected["analyze code"], True)
    e = got["forecast"]
    assert e["expires_at_ms"] == int(entry(raw, namespace, "forecast")[0][b"x"])
    assert 0 < e["ttl_seconds"] <= 600
    e = got[LONG]
    assert (e["key"], e["hashed"], e["value"]) == (LONG, True, "long value")
    assert e["id"].startswith("#")
    assert len(e["id"]) == 65

    human = on(backend, namespace, "inspect", "analyze code")
    assert human.returncode == 0, human.stderr
    lines = dict(line.split(None, 1) for line in human.stdout.splitlines())
    assert lines["tier"].startswith("L2 (shard ")
    assert lines["prewarmed"] == "yes, not hit yet"
    assert lines["value"] == "{'tools': ['grep']}"


def test_inspect_of_a_key_that_is_not_cached_exits_1(backend: Backend, namespace: str, seeded: Seeded) -> None:
    done = on(backend, namespace, "inspect", "never cached")
    assert done.returncode == 1
    assert "not cached" in done.stderr
    assert done.stderr.startswith("error: ")
    done = on(backend, namespace, "inspect", "never cached", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["cached"] is False


def test_inspect_and_top_find_an_entry_in_l3(backend: Backend, namespace: str, make_cache: Make,
                                             raw: Client) -> None:
    small = make_cache(l2_size=16)  # one L2 entry per shard: a second put in a shard demotes the first
    space = KeySpace(namespace, 16)
    older, newer = same_shard(space)
    small.put(older, "old")
    small.put(newer, "new")
    assert entry(raw, namespace, older)[2] is not None, "not demoted to L3"
    e = as_json(on(backend, namespace, "inspect", older, "--json"))
    assert (e["tier"], e["value"], e["hits"]) == ("l3", "old", 0)
    top = as_json(on(backend, namespace, "top", "--tier", "l3", "--json"))
    assert [(r["key"], r["tier"]) for r in top["entries"]] == [(older, "l3")]


def same_shard(space: KeySpace) -> tuple[str, str]:
    """Two keys of one shard."""
    keys = [f"key {i}" for i in range(200)]
    shard = space.ref(keys[0]).shard
    older, newer = [k for k in keys if space.ref(k).shard == shard][:2]
    return older, newer


# ------------------------------------------------------------------------- top, keys


def test_top_lists_the_entries_with_the_most_redis_hits_and_reads_only(backend: Backend, namespace: str, seeded: Seeded,
                                                        raw: Client) -> None:
    before = snapshot(raw, namespace)
    top = as_json(on(backend, namespace, "top", "-n", "2", "--json"))
    assert on(backend, namespace, "keys", "*").returncode == 0
    assert on(backend, namespace, "stats").returncode == 0
    assert snapshot(raw, namespace) == before, "a reading command wrote to Redis"
    rows = top["entries"]
    assert [(r["key"], r["hits"], r["tier"]) for r in rows] == [("read the file", 4, "l2"), ("forecast", 1, "l2")]
    for r in rows:
        fields, l2_score, _ = entry(raw, namespace, r["key"])
        assert (r["hits"], r["size"], r["last_used_ms"]) == (int(fields[b"n"]), len(fields[b"v"]), l2_score)
        assert r["size"] == size_record(raw, namespace, r["key"])
    everything = as_json(on(backend, namespace, "top", "--json"))["entries"]
    assert {r["key"] for r in everything} == {"read the file", "forecast", LONG, "analyze code"}
    assert as_json(on(backend, namespace, "top", "--tier", "l3", "--json"))["entries"] == []

    human = on(backend, namespace, "top", "-n", "2")
    assert human.returncode == 0, human.stderr
    header, first, second = human.stdout.splitlines()
    assert header.split() == ["#", "hits", "tier", "idle", "size", "key"]
    assert first.split()[:3] == ["1", "4", "L2"]
    assert first.endswith("read the file")
    assert second.endswith("forecast")


def test_keys_lists_the_entries_matching_a_glob_on_every_master(backend: Backend, namespace: str, seeded: Seeded,
                                                                make_cache: Make, raw: Client) -> None:
    cache = make_cache()
    cache.put_many({"user:1": 1, "user:2": 2, "a}:e:user:9": 9})  # '{*}' in the SCAN pattern spans '}:e:' here
    found = as_json(on(backend, namespace, "keys", "user:*", "--json"))["entries"]
    assert [(r["key"], r["tier"]) for r in found] == [("user:1", "l2"), ("user:2", "l2")]
    everything = as_json(on(backend, namespace, "keys", "*", "--json"))["entries"]
    in_redis = list(raw.scan_iter(match=f"{namespace}:*:e:*", count=1000))
    assert len(everything) == len(in_redis) == 7
    assert {r["key"] for r in everything} == {"read the file", "forecast", LONG, "analyze code", "user:1",
                                              "user:2", "a}:e:user:9"}
    hashed = as_json(on(backend, namespace, "keys", "#*", "--json"))["entries"]
    assert [r["key"] for r in hashed] == [LONG]  # a long key matches on its '#<sha256>' id

    human = on(backend, namespace, "keys", "user:*")
    assert human.stdout.splitlines() == ["L2   user:1", "L2   user:2", "(2 entries)"]


# --------------------------------------------------------------------------- predict


def test_predict_shows_the_confidence_parts_and_writes_nothing(backend: Backend, namespace: str, seeded: Seeded,
                                                               raw: Client) -> None:
    before = snapshot(raw, namespace)
    p = as_json(on(backend, namespace, "predict", "read the file", "--session", "s1", "--top-k", "3", "--json"))
    assert snapshot(raw, namespace) == before, "predict wrote to Redis"
    first = p["predictions"][0]
    assert (first["query"], first["transition"], first["tools"]) == ("analyze code", 1.0, ["grep"])
    assert len(p["predictions"]) == 3
    for row in p["predictions"]:  # the default weights 0.6/0.3/0.1
        weighted = 0.6 * row["transition"] + 0.3 * row["ngram"] + 0.1 * row["hour"]
        assert row["confidence"] == pytest.approx(weighted)
    assert p["total_confidence"] == pytest.approx(sum(r["confidence"] for r in p["predictions"]))
    model = raw.hgetall(ModelKeys(namespace).stats)
    assert int(model[b"predictions_total"]) == 1  # the CLI's prediction is not remembered, nor judged

    human = on(backend, namespace, "predict", "read the file", "--min-confidence", "0.5")
    lines = human.stdout.splitlines()
    assert lines[2].split() == ["query", "confidence", "transition", "n-gram", "hour", "tools"]
    assert lines[3].startswith("analyze code")
    assert lines[3].endswith("grep")
    assert lines[4] == ""  # --min-confidence dropped the others


# ----------------------------------------------------------------------- delete, flush


def test_delete_removes_the_entry_and_says_whether_there_was_one(backend: Backend, namespace: str, seeded: Seeded,
                                                                 raw: Client) -> None:
    assert as_json(on(backend, namespace, "delete", "read the file", "--json")) == {"key": "read the file",
                                                                                     "deleted": True}
    assert entry(raw, namespace, "read the file") == ({}, None, None)
    again = on(backend, namespace, "delete", "read the file")
    assert again.returncode == 0
    assert again.stdout.strip() == "'read the file' was not cached: nothing deleted"


def _entries(raw: Client, namespace: str) -> int:
    return len(list(raw.scan_iter(match=f"{namespace}:*:e:*", count=1000)))


@contextmanager
def answering(text: str) -> Iterator[int]:
    """A terminal as stdin, with ``text`` typed in it."""
    leader, follower = pty.openpty()
    os.write(leader, text.encode())
    try:
        yield follower
    finally:
        os.close(follower)
        os.close(leader)


def test_flush_asks_first_and_does_nothing_without_a_yes(backend: Backend, namespace: str, seeded: Seeded,
                                                         raw: Client) -> None:
    assert _entries(raw, namespace) == 4
    done = on(backend, namespace, "flush")  # stdin is not a terminal: nobody can say yes
    assert done.returncode == 1
    assert "--yes" in done.stderr
    with answering("n\n") as terminal:
        done = on(backend, namespace, "flush", stdin=terminal)
    assert done.returncode == 1
    assert f"Flush every entry of namespace {namespace} at {backend.url}? [y/N]" in done.stderr
    assert "not confirmed" in done.stderr
    assert _entries(raw, namespace) == 4

    with answering("y\n") as terminal:
        done = on(backend, namespace, "flush", stdin=terminal)
    assert done.returncode == 0, done.stderr
    assert _entries(raw, namespace) == 0
    assert raw.exists(ModelKeys(namespace).stats), "flush is for the tiers: the model stays"


def test_flush_yes_removes_every_entry(backend: Backend, namespace: str, seeded: Seeded, raw: Client) -> None:
    assert as_json(on(backend, namespace, "flush", "--yes", "--json")) == {"namespace": namespace, "flushed": True,
                                                                           "entries": 4}
    assert _entries(raw, namespace) == 0
    space = KeySpace(namespace, 16)
    assert all(server_of(raw, sk.l2).zcard(sk.l2) == 0 for sk in space.shard_keys)


# ---------------------------------------------------------------------------- doctor


def test_doctor_passes_on_a_healthy_server(backend: Backend, namespace: str, seeded: Seeded) -> None:
    report = as_json(on(backend, namespace, "doctor", "--json"))
    assert report["ok"] is True
    assert {c["check"]: c["status"] for c in report["checks"]} == {
        "connectivity": "ok", "server version": "ok", "cluster state": "ok", "ACL permissions": "ok",
        "pub/sub mode": "ok", "scripts": "ok", "memory policy": "ok", "namespace config": "ok"}
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["scripts"]["result"].startswith("all 11 scripts load")
    human = on(backend, namespace, "doctor")
    assert human.returncode == 0, human.stdout
    assert human.stdout.rstrip().endswith("all checks passed")


def test_doctor_reports_sharded_pubsub_and_warns_about_broadcast_subscribers(backend: Backend, raw: Client,
                                                                            namespace: str, make_cache: Make) -> None:
    """This release's processes subscribe each shard's channel; a subscriber of the broadcast channel
    ``<ns>:inval`` is a process of an earlier release, which hears none of this release's writes."""
    cache = make_cache()
    report = as_json(on(backend, namespace, "doctor", "--json"))
    pubsub = {c["check"]: c for c in report["checks"]}["pub/sub mode"]
    assert pubsub["status"] == "ok", pubsub
    assert pubsub["details"]["mode"] == "sharded"
    assert pubsub["result"].startswith(f"sharded: SPUBLISH/SSUBSCRIBE on 16 shard channels {namespace}:{{*}}:inval")
    assert sum(pubsub["details"]["shard_subscriptions"].values()) == len(cache._core.space.channels)

    old = servers(raw)[-1].pubsub()  # an earlier release's subscriber (on a cluster: on a replica, say)
    old.subscribe(f"{namespace}:inval")
    try:
        confirmed = old.get_message(timeout=10.0)  # (waits for the reply, up to a generous deadline)
        assert confirmed is not None
        assert confirmed["type"] == "subscribe", confirmed
        done = on(backend, namespace, "doctor", "--json")
        assert done.returncode == 0, done.stdout  # a warning, not a failure
        pubsub = {c["check"]: c for c in json.loads(done.stdout)["checks"]}["pub/sub mode"]
        assert pubsub["status"] == "warn", pubsub
        assert f"1 subscriber(s) of the broadcast channel {namespace}:inval" in pubsub["result"]
        assert ("Redis Cluster" in pubsub["result"]) == backend.cluster
        assert "upgrade every worker" in pubsub["fix"]
        human = on(backend, namespace, "doctor")
        assert "WARN  pub/sub mode" in human.stdout
    finally:
        old.close()


def test_doctor_checks_the_scripts_and_commands_the_cache_uses(make_cache: Make) -> None:
    """Every script the cache runs is loaded, and every command it sends is probed: the scripts' own, and
    those it sends itself, among them the HMGET of a Redis hit."""
    cache = make_cache()
    assert [s.name for s in default_scripts().all()] == ["touch", "put", "delete", "flush", "untag", "release",
                                                         "lease", "sizing", "record", "predict", "view"]
    probed = {p.args[0] for p in acl_probes(Context(argparse.Namespace(json=True), cache))}
    probes = acl_probes(Context(argparse.Namespace(json=True), cache))
    assert {"evalsha", "eval", "hmget", "set", "pttl", "exists", "del", "hsetnx", "hgetall", "spublish",
            "ssubscribe", "sunsubscribe"} <= probed  # sent by the library itself
    on_channels = {(p.args[0], p.target) for p in probes if p.args[0] in ("spublish", "ssubscribe", "sunsubscribe")}
    assert on_channels == {(name, channel.decode()) for name in ("spublish", "ssubscribe", "sunsubscribe")
                           for channel in cache._core.space.channels}, "every shard channel is probed"
    for script in default_scripts().all():
        used = {m.decode().lower() for m in re.findall(rb"redis\.p?call\('(\w+)'", script.source)}
        assert used <= probed, (script.name, used - probed)


def test_doctor_reports_a_missing_acl_permission_and_the_fix() -> None:
    with LocalRedisServer() as server, redis.Redis(port=server.port) as admin:
        url = f"redis://{set_documented_user(admin)}127.0.0.1:{server.port}/0"
        ok = as_json(cli("--url", url, "--namespace", "tools", "doctor", "--json"))
        checks = {c["check"]: c for c in ok["checks"]}
        assert checks["ACL permissions"]["status"] == "ok", "the README's rule set lacks a command the cache sends"
        assert checks["memory policy"]["status"] == "unknown"  # CONFIG is not in the rule set: not a failure

        set_documented_user(admin, "-evalsha")
        done = cli("--url", url, "--namespace", "tools", "doctor", "--json")
        assert done.returncode == 1
        acl = {c["check"]: c for c in json.loads(done.stdout)["checks"]}["ACL permissions"]
        assert acl["status"] == "fail"
        assert acl["details"]["missing_commands"] == ["+evalsha"]
        assert "ACL SETUSER cache +evalsha" in acl["fix"]
        assert "README section 'Security'" in acl["fix"]
        human = cli("--url", url, "--namespace", "tools", "doctor")
        assert "FAIL  ACL permissions   user cache: missing +evalsha" in human.stdout


def test_doctor_warns_about_an_allkeys_eviction_policy() -> None:
    policy = ("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru")
    with LocalRedisServer(extra_args=policy) as server:
        done = cli("--url", server.url, "doctor", "--json")
        assert done.returncode == 0, done.stdout  # a warning, not a failure
        memory = {c["check"]: c for c in json.loads(done.stdout)["checks"]}["memory policy"]
        assert memory["status"] == "warn"
        assert "allkeys-lru" in memory["result"]
        assert "noeviction" in memory["fix"]
        assert cli("--url", server.url, "doctor", "--strict").returncode == 1


# ---------------------------------------------------------------------- errors, demo


def test_bad_settings_and_unreachable_redis_give_a_message_and_an_exit_code() -> None:
    done = cli("--url", "http://localhost:6379", "stats")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert "redis://" in done.stderr
    done = cli("--namespace", "a b", "stats")
    assert done.returncode == 2
    assert "namespace" in done.stderr
    assert cli("stats", "--no-such-option").returncode == 2
    assert cli().returncode == 2  # no command

    down = f"redis://127.0.0.1:{free_port()}/0"
    done = cli("--url", down, "inspect", "k")
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: Redis at {down}")
    assert "reachable" in done.stderr
    report = cli("--url", down, "doctor", "--json")
    assert report.returncode == 1
    statuses = [c["status"] for c in json.loads(report.stdout)["checks"]]
    assert statuses == ["fail"] + ["skip"] * 7


def test_demo_hands_its_arguments_to_the_fleet_demo() -> None:
    done = cli("demo", "--help")
    assert done.returncode == 0, done.stderr
    assert "--workers" in done.stdout


def test_stats_watch_stops_cleanly_on_ctrl_c(backend: Backend, namespace: str, seeded: Seeded) -> None:
    cluster = ["--cluster"] if backend.cluster else []
    with subprocess.Popen([str(CLI), "--url", backend.url, "--namespace", namespace, *cluster, "stats", "--watch",
                           "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                          stdin=subprocess.DEVNULL) as watch:
        assert watch.stdout is not None
        assert watch.stderr is not None
        assert json.loads(watch.stdout.readline())["tiers"]["l2"]["entries"] == 4  # the first refresh
        watch.send_signal(signal.SIGINT)  # Ctrl-C, during the 2 s wait for the next refresh
        assert watch.wait(timeout=30) == 0
        assert "Traceback" not in watch.stderr.read()
