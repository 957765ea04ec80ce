"""The shared prediction model (docs/prediction.md; lua/record.lua, lua/predict.lua, lua/includes/model.lua) against
a real Redis, standalone and cluster.

What Redis holds is read with redis-py under the key layout documented in lua/includes/model.lua, built
here independently of ``ModelKeys``; expected confidences are recomputed from those sorted sets. Round
trips are measured like tests/test_round_trips.py (its ``measure`` and ``counting_client`` are reused).
Prewarming and multi-process tests are elsewhere (tests/test_prewarm.py). Admission (record.lua's frequency
sketch, read back here with the documented layout) and the byte bounds are section 8b; the long-tail
acceptance run with several processes is tests/test_prediction_longtail.py. The warmers here run with
``background=False``: each call is the round trip it names, so what it did is in Redis when it returns.
The background mode, built on the same scripts, is tested in tests/test_model_background.py.

Some tests are regressions of library bugs they found (now fixed).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import pytest
import redis

from victor_rcache import (
    AsyncMultiLevelCache,
    CacheError,
    CacheUnavailableError,
    ConfigurationError,
    InvalidArgumentError,
    MultiLevelCache,
    Prediction,
    WarmerConfig,
)
from victor_rcache import AsyncPredictiveCacheWarmer as AsyncBackgroundWarmer
from victor_rcache import PredictiveCacheWarmer as BackgroundWarmer
from victor_rcache.local_redis import free_port
from victor_rcache.tiers import default_scripts

from . import test_round_trips as round_trips
from .helpers import Backend, Client, server_of

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]

counting_client = round_trips.counting_client  # the fixture, shared with tests/test_round_trips.py

PredictiveCacheWarmer = partial(BackgroundWarmer, background=False)
AsyncPredictiveCacheWarmer = partial(AsyncBackgroundWarmer, background=False)

MIDNIGHT_UTC = 86400.0 * 19_700  # 2023-12-09 00:00:00 UTC
DEAD = f"redis://127.0.0.1:{free_port()}/0"


def at_hour(hour: int) -> Callable[[], float]:
    """A wall clock stopped at ``hour``:20:34 UTC (the model's hour bucket is the UTC hour)."""
    return lambda: MIDNIGHT_UTC + hour * 3600 + 1234


# --------------------------------------------------------------------------- the documented key layout


def name_of(query: str | bytes) -> bytes:
    """A query as it appears in key names: itself, or '#' + SHA-256 hex when over 1 KiB or '#'-prefixed."""
    raw = query.encode() if isinstance(query, str) else query
    if len(raw) > 1024 or raw.startswith(b"#"):
        return b"#" + hashlib.sha256(raw).hexdigest().encode()
    return raw


def next_name(query: str | bytes) -> bytes:
    return b"next:" + name_of(query)


def ngram_name(*oldest_first: str | bytes) -> bytes:
    return b"ngram:" + b"|".join(b"%d:%s" % (len(n), n) for n in map(name_of, oldest_first))


def hour_name(hour: int) -> bytes:
    return b"hour:%02d" % hour


def is_pattern(name: bytes) -> bool:
    return name.startswith((b"next:", b"ngram:"))


SKETCHES = (b"sketch:0", b"sketch:1")  # the admission sketches of the even and odd epochs
SKETCH_ROWS = 4


def sketch_shape(max_patterns: int = 500, max_queries: int = 0, ngram_size: int = 3) -> tuple[int, int]:
    """(counters per row, records per epoch) as docs/prediction.md states them: an epoch is 10 records per
    slot of the larger bounded list; a row has the power of two (at least 64) at or above an epoch's
    records times ngram_size."""
    epoch = 10 * max(max_patterns, max_queries or max_patterns)
    width = 64
    while width < epoch * ngram_size:
        width *= 2
    return width, epoch


def sketch_cells(item: bytes, width: int) -> list[int]:
    """The item's counter in each row: row r takes hex digits 8r..8r+7 of SHA1(item), modulo the width."""
    sha = hashlib.sha1(item).hexdigest()
    return [r * width + int(sha[8 * r:8 * r + 8], 16) % width for r in range(SKETCH_ROWS)]


class Model:
    """What Redis holds for one namespace's model (every key shares the hash tag {<ns>.model})."""

    def __init__(self, raw: Client, namespace: str) -> None:
        self.raw = raw
        self.prefix = f"{namespace}:{{{namespace}.model}}:".encode()
        self.server: redis.Redis = server_of(raw, self.prefix + b"stats")

    def key(self, name: bytes | str) -> bytes:
        return self.prefix + (name.encode() if isinstance(name, str) else name)

    def names(self) -> dict[bytes, str]:
        """Every model key that exists, without the prefix, with its type."""
        keys = list(self.server.scan_iter(match=self.prefix + b"*", count=1000))
        pipe = self.server.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        return {k[len(self.prefix):]: t.decode() for k, t in zip(keys, pipe.execute(), strict=True)}

    def pattern_names(self) -> set[bytes]:
        return {n for n in self.names() if is_pattern(n)}

    def zset(self, name: bytes | str) -> dict[bytes, float]:
        return dict(self.server.zrange(self.key(name), 0, -1, withscores=True))

    def counts(self, name: bytes, decay: float) -> dict[bytes, float]:
        """A pattern set's decayed counts: its scores are decay^(1-n) times them, n its observations in `obs`
        (forward decay, record.lua's header)."""
        n = int(self.server.hget(self.key(b"obs"), name) or 1)
        return {m: score * decay ** (n - 1) for m, score in self.zset(name).items()}

    def registry(self) -> set[bytes]:
        return set(self.zset(b"patterns"))

    def stats(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.server.hgetall(self.key(b"stats")).items()}

    def estimate(self, item: bytes, width: int) -> int:
        """The admission sketch's estimate of an item (a pattern name, or b"q:" + query): the least over
        the rows of the row's counters in both sketches (u4 counters, read with BITFIELD GET)."""
        cells = sketch_cells(item, width)
        sums = [0] * SKETCH_ROWS
        for sketch in SKETCHES:
            got = self.server.execute_command(
                "BITFIELD", self.key(sketch), *[a for i in cells for a in ("GET", "u4", f"#{i}")])
            sums = [a + b for a, b in zip(sums, got, strict=True)]
        return min(sums)

    def contents(self) -> dict[bytes, Any]:
        """Every key's value (read by type), e.g. to compare two namespaces."""
        out: dict[bytes, Any] = {}
        for name, kind in self.names().items():
            key = self.key(name)
            if kind == "zset":
                out[name] = self.zset(name)
            elif kind == "hash":
                out[name] = self.server.hgetall(key)
            elif kind == "list":
                out[name] = self.server.lrange(key, 0, -1)
            elif kind == "set":
                out[name] = self.server.smembers(key)
            else:
                out[name] = self.server.get(key)
        return out

    def snapshot(self) -> dict[bytes, tuple[str, bytes | None, int]]:
        """TYPE, DUMP and PEXPIRETIME of every model key: 'nothing was written' compares two of them."""
        out = {}
        for name, kind in self.names().items():
            key = self.key(name)
            out[name] = (kind, self.server.dump(key), int(self.server.execute_command("PEXPIRETIME", key)))
        return out


def recorded(warmer: PredictiveCacheWarmer, session: str, *queries: str) -> None:
    for q in queries:
        warmer.record_query(q, session=session)


def everything(warmer: PredictiveCacheWarmer, current: str, session: str | None) -> Prediction:
    return warmer.predict_next_queries(current, top_k=1000, min_confidence=0.0, session=session)


Expected = dict[str, tuple[float, float, float, float]]  # query -> (confidence, p_t, p_n, p_h)


def expected_scores(model: Model, context_newest_first: Sequence[str], ngram_size: int, hour: int,
                    weights: tuple[float, float, float]) -> Expected:
    """The confidences the documented formula gives, from the sorted sets Redis holds.

    P_t from next:<current>; P_n from the longest n-gram context (n = ngram_size .. 3) with any count,
    else the transition itself; P_h from hour:<HH>; each a count over its set's total; the weights
    normalized to sum 1.
    """
    w_t, w_n, w_h = (w / sum(weights) for w in weights)
    transition = model.zset(next_name(context_newest_first[0]))
    ngram = transition
    for n in range(min(ngram_size, len(context_newest_first) + 1), 2, -1):
        counts = model.zset(ngram_name(*reversed(context_newest_first[:n - 1])))
        if sum(counts.values()) > 0:
            ngram = counts
            break
    by_hour = model.zset(hour_name(hour))

    def p(counts: dict[bytes, float], q: bytes) -> float:
        total = sum(counts.values())
        return counts.get(q, 0.0) / total if total > 0 else 0.0

    out: Expected = {}
    for q in {*transition, *ngram, *by_hour}:
        pt, pn, ph = p(transition, q), p(ngram, q), p(by_hour, q)
        conf = w_t * pt + w_n * pn + w_h * ph
        if conf > 0:
            out[q.decode()] = (conf, pt, pn, ph)
    return out


def ranked(expected: Expected) -> list[str]:
    return sorted(expected, key=lambda q: (-expected[q][0], q.encode()))


def assert_matches(prediction: Prediction, expected: Expected, top_k: int = 1000, min_confidence: float = 0.0) -> None:
    want = [q for q in ranked(expected) if expected[q][0] >= min_confidence][:top_k]
    assert prediction.queries == want
    for q, conf, parts in zip(prediction.queries, prediction.confidences, prediction.parts, strict=True):
        assert conf == pytest.approx(expected[q][0], rel=1e-12, abs=1e-15), q
        assert parts == pytest.approx(expected[q][1:], rel=1e-12, abs=1e-15), q
    assert prediction.confidences == sorted(prediction.confidences, reverse=True)
    assert prediction.total_confidence == pytest.approx(sum(prediction.confidences))


# ---------------------------------------------------------------------------------- 1. key layout


def test_the_model_keys_are_exactly_the_documented_ones_and_long_queries_are_hashed_in_names_only(
        make_cache: Make, raw: Client, namespace: str) -> None:
    long_query = "explain this stack trace " + "x" * 1500  # over 1 KiB
    long_session = "agent-" + "s" * 2000
    warmer = PredictiveCacheWarmer(make_cache(), ngram_size=3, clock=at_hour(7))
    warmer.record_query("A", ["read"], session="s1")
    warmer.record_query("B", ["search"], session="s1")
    warmer.record_query(long_query, ["grep"], session="s1")
    warmer.record_query("A", ["read", "write"], session="s1")
    warmer.record_query("B", session=long_session)
    after_a = warmer.predict_next_queries("A", session="s1")
    after_b = warmer.predict_next_queries("B", session="s2")

    model = Model(raw, namespace)
    long_name = name_of(long_query)
    assert long_name == b"#" + hashlib.sha256(long_query.encode()).hexdigest().encode()
    patterns = {next_name("A"), next_name("B"), next_name(long_query), ngram_name("A", "B"),
                ngram_name("B", long_query)}
    assert ngram_name("B", long_query) == b"ngram:1:B|65:" + long_name  # the name's length, not the query's
    assert model.names() == {
        b"stats": "hash", b"patterns": "zset", b"queries": "zset", b"tools": "hash", b"hour:07": "zset",
        b"hist:s1": "list", b"hist:" + name_of(long_session): "list", b"pred:s1": "hash", b"pred:s2": "hash",
        b"sketch:0": "string",  # the admission sketch of epoch 0 (the odd epochs' is made at tick 5000)
        b"obs": "hash",  # each set's observations (its forward decay's scale)
        **dict.fromkeys(patterns, "zset"),
    }
    assert model.server.hgetall(model.key(b"obs")) == {
        **{n: b"1" for n in patterns - {next_name("A")}}, next_name("A"): b"1", b"hour:07": b"5"}
    assert all(len(name) < 200 for name in model.names())  # the long query and session only hashed
    width, _ = sketch_shape()
    assert width == 16384
    assert model.server.strlen(model.key(b"sketch:0")) == SKETCH_ROWS * width // 2  # u4 counters: its full size
    assert model.estimate(next_name("A"), width) == 1
    assert model.estimate(b"q:A", width) == 2  # the query, twice; b"q:" + the query itself, even a long one
    assert model.estimate(b"q:" + long_query.encode(), width) == 1

    assert model.registry() == patterns
    lq = long_query.encode()
    assert model.zset(next_name("A")) == {b"B": 1.0}
    assert model.zset(next_name("B")) == {lq: 1.0}  # members hold the query verbatim
    assert model.zset(next_name(long_query)) == {b"A": 1.0}
    assert model.zset(ngram_name("A", "B")) == {lq: 1.0}
    assert model.zset(ngram_name("B", long_query)) == {b"A": 1.0}
    assert set(model.zset(b"hour:07")) == set(model.zset(b"queries")) == {b"A", b"B", lq}
    assert model.server.hgetall(model.key(b"tools")) == {b"A": b'["read","write"]', b"B": b'["search"]',
                                                         lq: b'["grep"]'}
    assert model.server.lrange(model.key(b"hist:s1"), 0, -1) == [b"A", lq]  # newest first, ngram_size-1 kept
    assert model.server.lrange(model.key(b"hist:" + name_of(long_session)), 0, -1) == [b"B"]
    assert model.server.hgetall(model.key(b"pred:s1")) == {b"for": b"A", b"q:B": b"1"}
    assert model.server.hgetall(model.key(b"pred:s2")) == {b"for": b"B", b"q:" + lq: b"1"}
    assert {k: model.stats()[k] for k in ("records", "tick", "sketch_epoch")} == {
        "records": 5, "tick": 5, "sketch_epoch": 0}

    assert after_a.queries == ["B"]
    assert after_b.queries == [long_query]  # predictions carry the query itself
    assert after_b.tools == [["grep"]]


# -------------------------------------------------------------------------- 2. next, not previous


def test_it_predicts_the_next_query_not_the_previous_one(make_cache: Make, raw: Client, namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), clock=at_hour(9))
    for i in range(10):
        recorded(warmer, f"s{i}", "A", "B")

    model = Model(raw, namespace)
    decay = 0.5 ** (1 / 32)
    assert model.counts(next_name("A"), decay) == {b"B": pytest.approx(sum(decay ** i for i in range(10)))}
    assert next_name("B") not in model.names()  # the earlier design counted A on B's pattern

    after_a = warmer.predict_next_queries("A", session="probe")
    assert after_a.queries == ["B"]
    assert after_a.parts[0][:2] == (1.0, 1.0)
    assert warmer.predict_next_queries("B", session="probe").queries == []  # nothing ever followed B
    only_hour = everything(warmer, "B", "probe")
    assert set(only_hour.queries) == {"A", "B"}
    assert all(parts[:2] == (0.0, 0.0) for parts in only_hour.parts)  # A and B: the hour-of-day part only

    recorded(warmer, "back", "B", "A")  # now B -> A has been seen once
    assert model.zset(next_name("B")) == {b"A": 1.0}
    assert warmer.predict_next_queries("B", session="probe").queries == ["A"]


# ------------------------------------------------------------------------------------- 3. scoring


TRAINING = {  # session -> queries (ngram_size 3: contexts of the last 1 and 2 queries)
    "a": ["X", "A", "B", "C"], "b": ["Y", "A", "C", "B"], "c": ["X", "A", "B", "D"], "d": ["Z", "A", "D"],
    "e": ["X", "A", "C"], "f": ["N1", "N2", "N1"],
}


def test_confidence_is_the_weighted_sum_of_normalized_probabilities(make_cache: Make, raw: Client,
                                                                    namespace: str) -> None:
    cache = make_cache()
    warmer = PredictiveCacheWarmer(cache, ngram_size=3, clock=at_hour(5))
    for session, queries in TRAINING.items():
        recorded(warmer, session, *queries)
    recorded(warmer, "probe", "X", "A")  # the probe session's last two queries: X, A
    model = Model(raw, namespace)

    full = everything(warmer, "A", "probe")
    expected = expected_scores(model, ["A", "X"], 3, 5, (0.6, 0.3, 0.1))
    assert model.zset(ngram_name("X", "A"))  # the n-gram part comes from X, A (not the transition)
    assert set(full.queries) == set(expected) == {"A", "B", "C", "D", "X", "Y", "Z", "N1", "N2"}
    assert_matches(full, expected)
    assert full.total_confidence == pytest.approx(1.0)  # every candidate shown: the weights' sum

    third = full.confidences[2]
    assert_matches(warmer.predict_next_queries("A", top_k=1000, min_confidence=third, session="probe"),
                   expected, min_confidence=third)  # a threshold equal to a confidence keeps it
    assert len(warmer.predict_next_queries("A", top_k=1000, min_confidence=third, session="probe")) == 3
    assert_matches(warmer.predict_next_queries("A", top_k=2, min_confidence=0.0, session="probe"), expected, top_k=2)
    default = warmer.predict_next_queries("A", session="probe")  # top 5, min_confidence 0.2
    assert_matches(default, expected, top_k=5, min_confidence=0.2)
    assert all(c >= 0.2 for c in default.confidences)
    assert default.total_confidence == pytest.approx(sum(default.confidences))

    # Custom weights are normalized (3, 1, 1 -> 0.6, 0.2, 0.2); a second "worker" with them.
    custom = PredictiveCacheWarmer(cache, ngram_size=3, clock=at_hour(5), weights=(3.0, 1.0, 1.0))
    assert custom.config.normalized_weights == pytest.approx((0.6, 0.2, 0.2))
    weighted = everything(custom, "A", "probe")
    assert_matches(weighted, expected_scores(model, ["A", "X"], 3, 5, (0.6, 0.2, 0.2)))
    assert weighted.total_confidence == pytest.approx(1.0)

    # No n-gram context seen (a fresh session): the n-gram part falls back to the transition.
    fresh = everything(warmer, "A", "fresh")
    assert_matches(fresh, expected_scores(model, ["A"], 3, 5, (0.6, 0.3, 0.1)))
    assert all(pn == pt for pt, pn, _ in fresh.parts)

    # A never-seen current query: only the hour part, so the confidences sum to w_h (not renormalized).
    unseen = everything(warmer, "never seen", "fresh")
    assert all(parts[:2] == (0.0, 0.0) for parts in unseen.parts)
    assert unseen.total_confidence == pytest.approx(0.1)


# ----------------------------------------------------------------------------- 4. n-grams decide


def test_the_last_two_queries_disambiguate_a_shared_transition(make_cache: Make, raw: Client, namespace: str) -> None:
    rounds = ["X", "A", "B", "Y", "A", "C"] * 6  # X->A->B and Y->A->C alternate; Y A C comes last
    warmer = PredictiveCacheWarmer(make_cache(), ngram_size=3, clock=at_hour(11))
    recorded(warmer, "train", *rounds)
    recorded(warmer, "px", "X", "A")
    recorded(warmer, "py", "Y", "A")

    model = Model(raw, namespace)
    transition = model.zset(next_name("A"))
    assert set(transition) == {b"B", b"C"}
    assert transition[b"C"] > transition[b"B"]  # the transition alone prefers C (seen last)
    assert set(model.zset(ngram_name("X", "A"))) == {b"B"}
    assert set(model.zset(ngram_name("Y", "A"))) == {b"C"}

    after_xa = warmer.predict_next_queries("A", session="px")
    after_ya = warmer.predict_next_queries("A", session="py")
    assert after_xa.queries[0] == "B"
    assert after_ya.queries[0] == "C"
    c_index = after_xa.queries.index("C")
    assert after_xa.parts[0][0] < after_xa.parts[c_index][0]  # B wins on the n-gram despite a lower P_t
    assert after_xa.parts[0][1] == 1.0

    # The same traffic with transitions only (ngram_size 2) cannot tell: C first either way.
    bigram = PredictiveCacheWarmer(make_cache(namespace=namespace + "-bigram"), ngram_size=2, clock=at_hour(11))
    recorded(bigram, "train", *rounds)
    recorded(bigram, "px", "X", "A")
    assert bigram.predict_next_queries("A", session="px").queries[0] == "C"
    assert not {n for n in Model(raw, namespace + "-bigram").names() if n.startswith(b"ngram:")}


# ------------------------------------------------------------------------------------ 5. sessions


def test_histories_are_per_session(make_cache: Make, raw: Client, namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), ngram_size=3, clock=at_hour(1))
    for first, second in zip(["P", "Q", "R"], ["U", "V", "W"], strict=True):  # interleaved
        warmer.record_query(first, session="s1")
        warmer.record_query(second, session="s2")

    model = Model(raw, namespace)
    assert model.registry() == {next_name("P"), next_name("Q"), next_name("U"), next_name("V"),
                                ngram_name("P", "Q"), ngram_name("U", "V")}
    assert model.zset(next_name("P")) == {b"Q": 1.0}
    assert model.zset(next_name("U")) == {b"V": 1.0}
    assert model.zset(ngram_name("P", "Q")) == {b"R": 1.0}
    assert model.zset(ngram_name("U", "V")) == {b"W": 1.0}
    assert model.server.lrange(model.key(b"hist:s1"), 0, -1) == [b"R", b"Q"]
    assert model.server.lrange(model.key(b"hist:s2"), 0, -1) == [b"W", b"V"]


def test_counts_are_fleet_wide(make_cache: Make, raw: Client, namespace: str) -> None:
    one = PredictiveCacheWarmer(make_cache(), clock=at_hour(2))
    two = PredictiveCacheWarmer(make_cache(), clock=at_hour(2))  # another worker: its own cache and client
    for i in range(3):
        recorded(one, f"one-{i}", "A", "B")
    assert two.predict_next_queries("A", session="two-probe").queries == ["B"]
    for i in range(4):
        recorded(two, f"two-{i}", "A", "C")
    assert set(Model(raw, namespace).zset(next_name("A"))) == {b"B", b"C"}
    assert one.predict_next_queries("A", session="one-probe", min_confidence=0.0).queries[0] == "C"
    assert one.get_statistics()["records"] == {"total": 14, "process": 6}


def test_a_session_continued_by_a_worker_that_never_saw_it_records_the_right_transition(
        make_cache: Make, raw: Client, namespace: str) -> None:
    one = PredictiveCacheWarmer(make_cache(), ngram_size=3, clock=at_hour(3))
    two = PredictiveCacheWarmer(make_cache(), ngram_size=3, clock=at_hour(3))
    recorded(one, "shared", "A", "B")
    two.record_query("C", session="shared")  # two knows nothing of "shared": it resyncs first

    model = Model(raw, namespace)
    assert model.zset(next_name("B")) == {b"C": 1.0}
    assert model.zset(ngram_name("A", "B")) == {b"C": 1.0}
    assert model.registry() == {next_name("A"), next_name("B"), ngram_name("A", "B")}
    assert model.server.lrange(model.key(b"hist:shared"), 0, -1) == [b"C", b"B"]
    assert two._core.counters.snapshot().get("history_resyncs") == 1
    assert one._core.counters.snapshot().get("history_resyncs", 0) == 0

    one.record_query("D", session="shared")  # one's copy of the history (B, A) is stale now
    assert model.zset(next_name("C")) == {b"D": 1.0}
    assert model.zset(ngram_name("B", "C")) == {b"D": 1.0}
    assert model.zset(next_name("B")) == {b"C": 1.0}  # not B -> D
    assert one._core.counters.snapshot().get("history_resyncs") == 1
    assert one.predict_next_queries("C", session="other").queries == ["D"]


# --------------------------------------------------------------------------------------- 6. tools


def test_predictions_carry_the_latest_tools_of_each_query(make_cache: Make, raw: Client, namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), clock=at_hour(4))
    warmer.record_query("A", ["read"], session="s1")
    warmer.record_query("B", ["read", "search"], session="s1")
    warmer.record_query("A", session="s2")
    warmer.record_query("C", session="s2")  # C never had tools
    warmer.record_query("A", session="s3")
    warmer.record_query("B", [{"name": "grep", "args": {"n": 3}}], session="s3")  # B's latest selection

    p = warmer.predict_next_queries("A", min_confidence=0.0, session="probe")
    tools = dict(zip(p.queries, p.tools, strict=True))
    assert tools == {"B": [{"name": "grep", "args": {"n": 3}}], "C": [], "A": ["read"]}
    model = Model(raw, namespace)
    assert model.server.hgetall(model.key(b"tools")) == {b"A": b'["read"]',
                                                         b"B": b'[{"name":"grep","args":{"n":3}}]'}

    warmer.record_query("B", None, session="s4")  # no tools given: the stored ones are kept
    assert model.server.hget(model.key(b"tools"), b"B") == b'[{"name":"grep","args":{"n":3}}]'


# ---------------------------------------------------------------------------- 7. accuracy counters


def test_accuracy_is_checked_against_the_sessions_next_query(make_cache: Make, raw: Client, namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), clock=at_hour(6))
    other = PredictiveCacheWarmer(make_cache(), clock=at_hour(6))  # another worker
    for i in range(5):
        recorded(warmer, f"t{i}", "A", "B")
    model = Model(raw, namespace)

    warmer.record_query("A", session="u")
    assert warmer.predict_next_queries("A", session="u").queries == ["B"]
    assert model.server.hgetall(model.key(b"pred:u")) == {b"for": b"A", b"q:B": b"1"}
    warmer.record_query("B", session="u")  # predicted: correct
    assert model.server.exists(model.key(b"pred:u")) == 0  # judged once, then gone
    assert (model.stats()["predictions_total"], model.stats()["predictions_correct"]) == (1, 1)

    assert warmer.predict_next_queries("B", session="u").queries == []  # nothing follows B: nothing to judge
    warmer.record_query("A", session="u")
    assert model.stats()["predictions_total"] == 1

    assert warmer.predict_next_queries("A", session="u").queries == ["B"]
    warmer.record_query("Z", session="u")  # not predicted: wrong
    assert (model.stats()["predictions_total"], model.stats()["predictions_correct"]) == (2, 1)

    assert warmer.predict_next_queries("A", session="v").queries == ["B"]
    other.record_query("B", session="v")  # the session goes on in another worker: the fleet judges it there

    stats = warmer.get_statistics()
    assert {k: stats["predictions"][k] for k in ("total", "correct", "accuracy")} == {
        "total": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    # Per process: "made" counts predict calls (the empty one too); "checked"/"correct" the verdicts
    # this process's records delivered.
    assert stats["predictions"]["process"] == {"made": 4, "checked": 2, "correct": 1, "accuracy": 0.5}
    assert other.get_statistics()["predictions"]["process"] == {"made": 0, "checked": 1, "correct": 1,
                                                               "accuracy": 1.0}
    assert other.get_statistics()["predictions"]["total"] == 3  # fleet-wide: the same in every worker
    assert warmer._core.counters.snapshot()["verdicts"] == 2


def test_an_empty_prediction_supersedes_the_pending_one(make_cache: Make, raw: Client, namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), clock=at_hour(6))
    for i in range(5):
        recorded(warmer, f"t{i}", "A", "B")
    warmer.record_query("A", session="u")
    assert warmer.predict_next_queries("A", session="u").queries == ["B"]
    assert warmer.predict_next_queries("B", session="u").queries == []  # the latest prediction: nothing
    warmer.record_query("B", session="u")
    assert Model(raw, namespace).stats().get("predictions_total", 0) == 0


def test_a_prediction_for_the_current_query_is_judged_by_the_query_after_it(make_cache: Make, raw: Client,
                                                                            namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), clock=at_hour(6))
    for i in range(5):
        recorded(warmer, f"t{i}", "A", "B")
    warmer.record_query("X", session="u")
    assert warmer.predict_next_queries(current_query="A", session="u").queries == ["B"]  # what follows A
    warmer.record_query("A", session="u")  # the current query is recorded once handled...
    warmer.record_query("B", session="u")  # ...and the predicted one comes next
    stats = Model(raw, namespace).stats()
    assert (stats.get("predictions_total", 0), stats.get("predictions_correct", 0)) == (1, 1)


# ----------------------------------------------------------------------------------------- 8. bounds


def test_successors_per_pattern_are_bounded_keeping_the_newest(make_cache: Make, raw: Client, namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), max_successors=5, clock=at_hour(12))
    for i in range(20):
        recorded(warmer, f"s{i}", "A", f"q{i:02d}")
    model = Model(raw, namespace)
    assert set(model.zset(next_name("A"))) == {b"q15", b"q16", b"q17", b"q18", b"q19"}

    for _ in range(3):  # five strong successors of M...
        for i in range(5):
            recorded(warmer, f"m{i}", "M", f"strong{i}")
    recorded(warmer, "new", "M", "newcomer")  # ...and one seen once: the lowest count, still kept
    successors = model.zset(next_name("M"))
    assert len(successors) == 5
    assert b"newcomer" in successors
    assert b"strong0" not in successors  # the weakest of the others went
    assert successors[b"newcomer"] == min(successors.values())


def test_hour_sets_and_tools_are_bounded(make_cache: Make, raw: Client, namespace: str) -> None:
    """An hour set keeps its highest counts (the query just seen always). Tools are kept for max_queries
    queries: once the list is full a new query gets in only if the admission sketch rates it above the
    least recently recorded one (which then goes with its tools), so queries asked once never push out
    the others."""
    warmer = PredictiveCacheWarmer(make_cache(), hour_size=8, max_queries=10, clock=at_hour(14))
    for i in range(30):
        warmer.record_query(f"q{i:02d}", [f"tool{i}"], session=f"s{i % 3}")
    model = Model(raw, namespace)
    hour = model.zset(b"hour:14")
    assert len(hour) == 8
    assert b"q29" in hour
    first = {f"q{i:02d}".encode() for i in range(10)}
    assert set(model.zset(b"queries")) == first  # the other 20, each seen once, tie with what they would evict
    assert set(model.server.hgetall(model.key(b"tools"))) == first
    assert model.stats()["queries_rejected"] == 20

    warmer.record_query("q25", ["again"], session="s9")  # seen twice now: rated 2, over q00's 1
    queries = model.zset(b"queries")
    assert set(queries) == first - {b"q00"} | {b"q25"}
    assert max(queries, key=queries.__getitem__) == b"q25"
    tools = model.server.hgetall(model.key(b"tools"))
    assert (b"q00" in tools, tools[b"q25"]) == (False, b'["again"]')
    assert model.stats()["queries_rejected"] == 20


def test_pattern_keys_are_bounded_and_memory_is_flat_on_an_endless_stream(make_cache: Make, raw: Client,
                                                                          namespace: str) -> None:
    """At most max_patterns registered patterns, and no key for a pattern admission refused. Evicted ones
    are noted in `evicted` and their keys deleted by the next call of any worker, so with one process:
    pattern keys = registered + the names pending deletion <= max_patterns + (ngram_size - 1), a call
    evicting at most as many as it registers. The sketches have a fixed size.

    On a stream of queries each asked once, every pattern is seen once: a new one ties with the one it
    would evict and is refused (unless other patterns raised all four of its counters: a few per cent,
    late in an epoch), until the registered ones age out of the sketch, two epochs after they were
    counted; then newcomers replace them."""
    max_patterns, ngram_size = 50, 3
    width, epoch = sketch_shape(max_patterns, 0, ngram_size)
    assert (width, epoch) == (2048, 500)
    warmer = PredictiveCacheWarmer(make_cache(), max_patterns=max_patterns, ngram_size=ngram_size,
                                   clock=at_hour(15))
    model = Model(raw, namespace)
    sizes: dict[int, tuple[int, int, int]] = {}
    registries: dict[int, set[bytes]] = {}
    for i in range(6 * epoch):
        warmer.record_query(f"query {i:06d}", ["tool"], session="stream")
        if (i + 1) % max_patterns:
            continue
        names = model.names()
        patterns = {n for n in names if is_pattern(n)}
        pending = {d[len(model.prefix):] for d in warmer._core._doomed}
        assert model.server.zcard(model.key(b"patterns")) == max_patterns
        assert set(model.zset(b"evicted")) == pending  # what this process deletes with its next call
        assert patterns == model.registry() | pending
        assert len(pending) <= ngram_size - 1
        for name in names:
            if is_pattern(name) or name.startswith((b"hour:", b"hist:")):
                assert model.server.pttl(model.key(name)) > 0, name
        for sketch in SKETCHES:
            assert model.server.strlen(model.key(sketch)) in (0, SKETCH_ROWS * width // 2)  # absent or full size
        settled = {n: kind for n, kind in names.items() if n not in pending and n != b"evicted"}
        members = sum(model.server.zcard(model.key(n)) for n, kind in settled.items() if kind == "zset")
        memory = sum(model.server.memory_usage(model.key(n), samples=0) or 0 for n in settled)
        sizes[i + 1] = (len(settled), members, memory)
        registries[i + 1] = model.registry()

    assert {n for n in model.names() if not is_pattern(n)} == {
        b"stats", b"patterns", b"evicted", b"queries", b"tools", b"hour:15", b"hist:stream", *SKETCHES, b"obs"}
    # `obs` names only sets that exist (or wait for deletion): its fields go with their keys.
    assert set(model.server.hkeys(model.key(b"obs"))) <= model.registry() | pending | {b"hour:15"}
    assert len({s[:2] for n, s in sizes.items() if n >= 2 * epoch}) == 1
    memories = [s[2] for n, s in sizes.items() if n >= 2 * epoch]
    # Flat: allocator rounding aside (at these sizes jemalloc's size classes are 256 bytes apart, and each
    # small set or hash - patterns, obs, evicted, queries, tools, hour - is one allocation that may sit a
    # class higher or lower as its field count moves by one or two), and ticks gaining a digit.
    assert max(memories) - min(memories) <= 6 * 256
    # Mostly refused, not churned: of the ~2 new patterns per record, at most a few per cent got in.
    stats = model.stats()
    assert stats["patterns_rejected"] > 0.9 * 2 * 6 * epoch
    kept = registries[max_patterns]
    assert len(kept & registries[2 * epoch - 50]) >= max_patterns // 2
    # Epoch 2: the first ones' counts have left the sketch (rated 0), so newcomers (rated 1) replace them.
    assert len(kept & registries[2 * epoch + 50]) < len(kept & registries[2 * epoch - 50])
    assert (stats["sketch_epoch"], stats["sketch_width"], stats["sketch_records"]) == (6, width, epoch)


def test_a_batch_of_records_writes_what_the_same_records_sent_one_by_one_write(
        make_cache: Make, raw: Client, namespace: str) -> None:
    """record.lua takes a round's records in one call, gathering the writes they share. With the
    registry full (admission and eviction at work) and epochs rotating, 200 records from 3 sessions
    leave exactly the same model (every key, score, tick and sketch counter) sent in batches of 8
    as sent one per call."""
    def core_of(ns: str) -> Any:
        cache = make_cache(namespace=ns)
        return PredictiveCacheWarmer(cache, max_patterns=12, max_successors=50, clock=at_hour(12))._core

    one, batched = core_of(namespace), core_of(namespace + "b")
    epoch = one._sketch_epoch
    assert epoch % 8 == 0  # batches of 8 after a first of 7: an epoch starts with a batch
    assert epoch < 200
    rng = random.Random(7)
    stream = [(f"s{rng.randrange(3)}".encode(), (f"q{rng.randrange(15)}" if rng.random() < 0.7
                                                else f"once{i}").encode()) for i in range(200)]
    source = default_scripts().record.source

    def send(core: Any, records: list[tuple[bytes, bytes]], histories: dict[bytes, list[bytes]]) -> list[Any]:
        hour, batch = core.keys.hour_at(at_hour(12)()), []
        for session, query in records:
            history = histories.get(session, [])
            batch.append((query, '["t"]', session, hour, history))
            histories[session] = [query, *history][:2]
        call = core.record_call(batch, [])
        replies, _ = raw.eval(source, len(call.keys), *call.keys, *call.args)
        return list(replies)

    alone: dict[bytes, list[bytes]] = {}
    assert all(send(one, [record], alone) == [[1, -1]] for record in stream)
    together: dict[bytes, list[bytes]] = {}
    for start, end in itertools.pairwise([0, *range(7, 200, 8), 200]):
        assert send(batched, stream[start:end], together) == [[1, -1]] * (end - start)

    a, b = Model(raw, namespace), Model(raw, namespace + "b")
    assert a.stats()["patterns_rejected"] > 0  # admission refused some...
    assert a.zset(b"evicted")  # ...and evicted others
    assert a.stats()["sketch_epoch"] >= 1
    assert a.contents() == b.contents()


def test_a_record_whose_history_moved_on_is_sent_back_with_its_sessions_later_records_only(
        make_cache: Make, raw: Client, namespace: str) -> None:
    """In a batch, a record made on a history Redis no longer holds (another worker advanced the
    session) writes nothing, nor do that session's later records in the batch, which expect it; the
    other sessions' records are applied, each after the batch's earlier records of its session."""
    core = PredictiveCacheWarmer(make_cache(), clock=at_hour(12))._core
    hour = core.keys.hour_at(at_hour(12)())
    batch = [(b"A", "", b"s1", hour, []), (b"X", "", b"s2", hour, [b"W"]), (b"B", "", b"s1", hour, [b"A"]),
             (b"Y", "", b"s2", hour, [b"X", b"W"])]
    call = core.record_call(batch, [])
    replies, pending = raw.eval(default_scripts().record.source, len(call.keys), *call.keys, *call.args)
    assert [replies, pending] == [[[1, -1], [0, []], [1, -1], [0, []]], []]
    model = Model(raw, namespace)
    assert model.server.lrange(model.key(b"hist:s1"), 0, -1) == [b"B", b"A"]
    assert model.zset(next_name("A")) == {b"B": 1.0}
    assert not model.server.exists(model.key(b"hist:s2"), model.key(next_name("W")), model.key(next_name("X")))
    assert model.zset(b"queries").keys() == {b"A", b"B"}
    assert model.stats()["records"] == 2


def test_evicted_pattern_keys_are_deleted_at_most_64_per_call(make_cache: Make, raw: Client, namespace: str) -> None:
    cache = make_cache()
    big = PredictiveCacheWarmer(cache, max_patterns=1000, clock=at_hour(16))
    for i in range(150):
        big.record_query(f"old {i:03d}", session="old")
    model = Model(raw, namespace)
    assert len(model.pattern_names()) == 149 + 148

    # A smaller limit from now on. Its sketch has another shape: the sketches start afresh, so the old
    # patterns are rated 0 and this warmer's new ones (rated 1) may replace them.
    small = PredictiveCacheWarmer(cache, max_patterns=20, clock=at_hour(16))
    pending = 0
    for i in range(10):
        small.record_query(f"new {i:03d}", session="new")
        left = pending - min(64, pending)  # this call deleted 64 of those pending
        pending = model.server.zcard(model.key(b"evicted"))
        if i == 0:
            assert pending == 149 + 148 - 20
            assert (model.stats()["sketch_width"], model.stats()["sketch_records"]) == (1024, 200)
        else:
            assert left <= pending <= left + min(i, 2)  # at most one eviction per pattern it registered
        assert len(small._core._doomed) == min(64, pending)  # deleted with its next call
        assert model.server.zcard(model.key(b"patterns")) == 20
        assert len(model.pattern_names()) == 20 + pending
    assert pending <= 2


# ---------------------------------------------------------------------- 8b. admission and bytes


def redis_cli(backend: Backend, *argv: str) -> str:
    """One command through the real ``redis-cli`` (``-c`` follows a cluster's redirections), its raw output."""
    done = subprocess.run(["redis-cli", "-u", backend.url, "-c", *argv], capture_output=True, text=True, check=False,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")
def test_a_full_registry_admits_a_new_pattern_only_if_seen_more_often_than_the_one_it_would_evict(
        make_cache: Make, raw: Client, namespace: str, backend: Backend) -> None:
    """record.lua's admission, step by step, each estimate read back from the sketch keys with the
    documented layout. max_queries=5000 makes the sketch wide (no collisions among these few items)
    and its epochs long (nothing ages here)."""
    warmer = PredictiveCacheWarmer(make_cache(), max_patterns=4, ngram_size=2, max_queries=5000, clock=at_hour(10))
    width, epoch = sketch_shape(4, 5000, 2)
    assert (width, epoch) == (131072, 50000)
    model = Model(raw, namespace)
    for k in range(3):
        recorded(warmer, f"k{k}", "K", "L")  # next:K, seen 3 times
    recorded(warmer, "fill", "p1", "p2", "p3", "p4")  # next:p1 .. next:p3: the registry is full
    full = {next_name("K"), next_name("p1"), next_name("p2"), next_name("p3")}
    assert model.registry() == full
    assert model.estimate(next_name("K"), width) == 3  # the least recently updated: the victim

    # A pattern seen once (rated 1 < 3) is refused: no key, nothing evicted, the refusal counted.
    before = model.snapshot()
    warmer.record_query("p5", session="fill")  # next:p4
    assert model.estimate(next_name("p4"), width) == 1
    assert next_name("p4") not in model.names()
    assert model.registry() == full
    assert b"evicted" not in model.names()
    assert model.stats()["patterns_rejected"] == 1
    changed = {n for n in model.snapshot() if model.snapshot()[n] != before.get(n)}
    assert changed == {b"stats", b"sketch:0", b"queries", b"hour:10", b"obs", b"hist:fill"}  # counted, not stored

    # Seen as often as the victim (3 = 3): still refused, a tie keeps the incumbent.
    for k in range(3):
        recorded(warmer, f"f{k}", "F", "G")
        assert model.estimate(next_name("F"), width) == k + 1
        assert model.registry() == full
    assert model.stats()["patterns_rejected"] == 4
    # Seen once more (4 > 3): admitted with this observation; the victim goes.
    recorded(warmer, "f3", "F", "G")
    assert model.registry() == full - {next_name("K")} | {next_name("F")}
    assert model.zset(next_name("F")) == {b"G": 1.0}  # the refused observations were only counted
    assert set(model.zset(b"evicted")) == {next_name("K")}
    assert next_name("K") in model.names()  # deleted by the next call (any worker's)
    warmer.record_query("anything", session="later")
    assert next_name("K") not in model.names()
    assert b"evicted" not in model.names()

    # The sketches, as redis-cli shows them: strings of 4 rows of `width` u4 counters, their size fixed.
    sketch = model.key(b"sketch:0").decode()
    assert redis_cli(backend, "TYPE", sketch) == "string"
    assert int(redis_cli(backend, "STRLEN", sketch)) == SKETCH_ROWS * width // 2 == 262144
    first_row = sketch_cells(next_name("F"), width)[0]
    assert redis_cli(backend, "BITFIELD", sketch, "GET", "u4", f"#{first_row}") == "4"
    assert b"sketch:1" not in model.names()  # the odd epochs' is made at tick 50000
    for i in range(20):
        warmer.record_query(f"more {i}", session=f"more {i % 3}")
    assert int(redis_cli(backend, "STRLEN", sketch)) == 262144


def test_a_pattern_unused_for_two_epochs_loses_its_place_to_a_newcomer(make_cache: Make, raw: Client,
                                                                      namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), max_patterns=4, ngram_size=2, clock=at_hour(10))
    width, epoch = sketch_shape(4, 0, 2)
    assert (width, epoch) == (128, 40)
    model = Model(raw, namespace)
    for k in range(3):
        recorded(warmer, f"k{k}", "K", "L")
    recorded(warmer, "fill", "p1", "p2", "p3", "p4", "p5")
    full = {next_name("K"), next_name("p1"), next_name("p2"), next_name("p3")}
    assert model.registry() == full  # next:p4 refused: rated 1, next:K 3
    assert model.stats()["patterns_rejected"] == 1

    for i in range(2 * epoch):  # records without a previous query: they count only their query
        warmer.record_query(f"idle {i}", session=f"idle {i}")
    stats = model.stats()
    assert stats["tick"] == 91
    assert stats["sketch_epoch"] == 2  # epoch 0's sketch (with next:K's counts) was deleted at tick 80
    assert model.estimate(next_name("K"), width) == 0

    recorded(warmer, "new", "N", "M")  # seen once, but rated above next:K's 0
    assert model.registry() == full - {next_name("K")} | {next_name("N")}
    assert model.stats()["patterns_rejected"] == 1


def test_a_1_mib_query_is_refused_before_any_io_and_nothing_is_written(
        counting_client: tuple[Client, round_trips.RoundTrips], make_cache: Make, raw: Client) -> None:
    client, trips = counting_client
    warmer = PredictiveCacheWarmer(make_cache(client=client), clock=at_hour(13))
    recorded(warmer, "s", "A", "B")
    model = Model(raw, warmer.cache.namespace)
    before = model.snapshot()
    huge = "x" * (1 << 20)
    with round_trips.measure(raw, trips) as m:
        with pytest.raises(InvalidArgumentError) as caught:
            warmer.record_query(huge, ["read"], session="s")
        message = str(caught.value)
        for call in (lambda: warmer.record_query("C", session=huge),
                     lambda: warmer.predict_next_queries(huge, session="s"),
                     lambda: warmer.predict_next_queries("A", session=huge)):
            with pytest.raises(InvalidArgumentError, match="over max_query_bytes=4096"):
                call()
    assert m.round_trips == 0
    assert model.snapshot() == before
    assert "query is 1048576 bytes, over max_query_bytes=4096" in message
    assert "pass a shorter query" in message
    assert "WarmerConfig(max_query_bytes=...)" in message
    assert warmer._core.counters.snapshot().get("records") == 2

    warmer.record_query("y" * 4096, session="s")  # the limit itself is fine
    assert b"y" * 4096 in model.zset(b"queries")
    roomy = PredictiveCacheWarmer(make_cache(client=client), max_query_bytes=1 << 20, clock=at_hour(13))
    roomy.record_query(huge, session="roomy")  # raised, the limit holds up to 1 MiB
    assert huge.encode() in model.zset(b"queries")


def test_the_session_histories_a_process_keeps_are_bounded_by_bytes(make_cache: Make, raw: Client,
                                                                     namespace: str) -> None:
    limit = 20_000
    warmer = PredictiveCacheWarmer(make_cache(), history_bytes=limit, clock=at_hour(14))
    core = warmer._core

    def query(session: int, step: int) -> str:
        return f"session {session} step {step} " + "q" * 3000

    for step in range(2):
        for session in range(10):
            warmer.record_query(query(session, step), session=f"s{session}")
            assert core._history_size <= limit
            assert core._history_size == sum(cost for _, cost in core._histories.values())
    # Each history holds two 3 KB queries: about 6.2 KB with the session's name, so three fit.
    assert list(core._histories) == [b"s7", b"s8", b"s9"]
    assert core.counters.snapshot().get("history_resyncs", 0) == 10  # step 1 found s0..s9 forgotten locally

    warmer.record_query(query(0, 2), session="s0")  # forgotten here, kept in Redis: one resync, the right keys
    model = Model(raw, namespace)
    assert model.zset(next_name(query(0, 1))) == {query(0, 2).encode(): 1.0}
    assert model.zset(ngram_name(query(0, 0), query(0, 1))) == {query(0, 2).encode(): 1.0}

    nothing = PredictiveCacheWarmer(make_cache(), history_bytes=0, clock=at_hour(14))  # only the latest kept
    recorded(nothing, "t1", "X", "Y")
    recorded(nothing, "t2", "X", "Z")
    recorded(nothing, "t1", "W")
    assert list(nothing._core._histories) == [b"t1"]
    assert model.zset(next_name("Y")) == {b"W": 1.0}


# ------------------------------------------------------------------------------ 9. decay and drift


def test_forward_decay_scales_a_set_back_before_its_scores_outgrow_a_double(
        make_cache: Make, raw: Client, namespace: str) -> None:
    """Scores are decayed counts times decay^(1-n) (n = the set's observations, in `obs`); once that factor
    would pass 2^300 the set is scaled back to plain counts and n starts again, the counts unchanged."""
    half_life = 1.0  # decay 0.5: the factor passes 2^300 after 301 observations
    warmer = PredictiveCacheWarmer(make_cache(), half_life=half_life, weights=(1.0, 0.0, 0.0), clock=at_hour(3))
    model = Model(raw, namespace)
    for i in range(305):
        recorded(warmer, f"s{i}", "A", "B" if i % 2 else "C")
        n = int(model.server.hget(model.key(b"obs"), next_name("A")))
        assert n == (i + 1 if i < 301 else i + 1 - 300)  # observation 302 counts as the second after the scale-back
        scores = model.zset(next_name("A"))
        assert max(scores.values()) < 2.0 ** 301
    counts = model.counts(next_name("A"), 0.5)
    # 305 observations, the last (304, even) of C: C = 1 + 1/4 + 1/16 + ..., B = 1/2 + 1/8 + ...
    assert counts == {b"C": pytest.approx(4 / 3, rel=1e-9), b"B": pytest.approx(2 / 3, rel=1e-9)}
    assert warmer.predict_next_queries("A", session="probe").confidences[0] == pytest.approx(2 / 3, rel=1e-9)


def test_a_changed_workload_overtakes_within_the_number_of_observations_the_decay_gives(
        make_cache: Make, raw: Client, namespace: str) -> None:
    half_life, old = 8.0, 50
    decay = 0.5 ** (1 / half_life)
    # Each observation of next:A multiplies its counts by `decay`, then adds 1 to the query seen.
    count_b = sum(decay ** i for i in range(old))
    count_c, overtake = 0.0, 0
    while not count_c > count_b:
        count_b, count_c, overtake = count_b * decay, count_c * decay + 1, overtake + 1
    assert overtake == 8  # = half_life here: C needs d**k < 1 / (2 - d**50), i.e. k > 7.92

    warmer = PredictiveCacheWarmer(make_cache(), half_life=half_life, weights=(0.6, 0.3, 0.0), clock=at_hour(17))
    model = Model(raw, namespace)
    for i in range(old):
        recorded(warmer, f"old{i}", "A", "B")
    assert model.counts(next_name("A"), decay)[b"B"] == pytest.approx((1 - decay ** old) / (1 - decay), rel=1e-12)
    for k in range(1, overtake + 3):
        recorded(warmer, f"new{k}", "A", "C")
        counts = model.counts(next_name("A"), decay)
        assert counts[b"C"] == pytest.approx((1 - decay ** k) / (1 - decay), rel=1e-12)
        assert counts[b"B"] == pytest.approx(decay ** k * (1 - decay ** old) / (1 - decay), rel=1e-12)
        top = warmer.predict_next_queries("A", session="probe").queries[0]
        assert top == ("C" if k >= overtake else "B"), f"after {k} observations of A -> C"


# ------------------------------------------------------------------------------- 10. round trips


def test_record_and_predict_are_one_evalsha_each_and_two_after_another_worker(
        counting_client: tuple[Client, round_trips.RoundTrips], make_cache: Make, raw: Client) -> None:
    client, trips = counting_client
    record, predict = default_scripts().record, default_scripts().predict
    warmer = PredictiveCacheWarmer(make_cache(client=client), clock=at_hour(18))
    warmer.record_query("warm-up", session="other")  # opens the client's connection to the model's server
    warmer.record_query("A", ["read"], session="s")

    with round_trips.measure(raw, trips) as m:
        warmer.record_query("B", ["search"], session="s")
    assert m.round_trips == 1
    round_trips.assert_only_script_calls(m, record, evalsha=1)

    with round_trips.measure(raw, trips) as m:
        assert warmer.predict_next_queries("A", session="s").queries == ["B"]
    assert m.round_trips == 1
    round_trips.assert_only_script_calls(m, predict, evalsha=1)

    with round_trips.measure(raw, trips) as m:
        warmer.record_query("C", session="brand-new")  # new to Redis too: nothing to resync
        warmer.predict_next_queries("C", session=None)
    assert m.round_trips == 2
    assert m.evalsha_calls == 2

    other = PredictiveCacheWarmer(make_cache(), clock=at_hour(18))
    other.record_query("D", session="s")
    with round_trips.measure(raw, trips) as m:
        warmer.record_query("E", session="s")  # the session moved on elsewhere: resync, then record
    assert m.round_trips == 2
    round_trips.assert_only_script_calls(m, record, evalsha=2)
    assert Model(raw, warmer.cache.namespace).zset(next_name("D")) == {b"E": 1.0}

    other.record_query("F", session="s")
    with round_trips.measure(raw, trips) as m:
        warmer.predict_next_queries("F", session="s")
    assert m.round_trips == 2
    round_trips.assert_only_script_calls(m, predict, evalsha=2)
    assert warmer._core.counters.snapshot()["history_resyncs"] == 2


# ------------------------------------------------------------------------------------ 11. bad input


@pytest.fixture
def offline() -> Iterator[PredictiveCacheWarmer]:
    """A warmer whose Redis is down and fail-closed: a check made after any I/O would raise
    CacheUnavailableError instead of InvalidArgumentError."""
    cache = MultiLevelCache(DEAD, namespace="offline", fail_open=False, coherence=False)
    yield PredictiveCacheWarmer(cache)
    cache.close()


@pytest.mark.parametrize(("call", "problem"), [
    (lambda w: w.record_query(""), "query must not be empty"),
    (lambda w: w.record_query(b""), "query must not be empty"),
    (lambda w: w.record_query(42), "must be str or bytes"),
    (lambda w: w.record_query("q", "read"), "tools must be a list"),
    (lambda w: w.record_query("q", b"read"), "tools must be a list"),
    (lambda w: w.record_query("q", [object()]), "JSON"),
    (lambda w: w.record_query("q", session=""), "session must not be empty"),
    (lambda w: w.predict_next_queries(""), "current_query must not be empty"),
    (lambda w: w.predict_next_queries("q", top_k=0), "top_k=0"),
    (lambda w: w.predict_next_queries("q", top_k=1001), "top_k=1001"),
    (lambda w: w.predict_next_queries("q", top_k=True), "top_k=True"),
    (lambda w: w.predict_next_queries("q", top_k=2.0), "top_k=2.0"),
    (lambda w: w.predict_next_queries("q", min_confidence=-0.1), "min_confidence=-0.1"),
    (lambda w: w.predict_next_queries("q", min_confidence=1.5), "min_confidence=1.5"),
    (lambda w: w.predict_next_queries("q", min_confidence=math.nan), "min_confidence=nan"),
    (lambda w: w.predict_next_queries("q", session=b""), "session must not be empty"),
    (lambda w: w.record_query("x" * (1 << 20)), r"query is 1048576 bytes, over max_query_bytes=4096"),
    (lambda w: w.record_query("q", session="s" * 4097), r"session is 4097 bytes, over max_query_bytes=4096"),
    (lambda w: w.record_query("é" * 2049), r"query is 4098 bytes"),  # counted in UTF-8 bytes
    (lambda w: w.predict_next_queries("x" * 4097), r"current_query is 4097 bytes, over max_query_bytes"),
    (lambda w: w.predict_next_queries("q", session=b"s" * 4097), r"session is 4097 bytes"),
])
def test_bad_arguments_are_refused_before_any_io(offline: PredictiveCacheWarmer,
                                                 call: Callable[[PredictiveCacheWarmer], Any], problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem) as caught:
        call(offline)
    assert isinstance(caught.value, CacheError)
    assert offline._core.counters.snapshot().get("records", 0) == 0


@pytest.mark.parametrize(("settings", "problem"), [
    ({"ngram_size": 1}, "ngram_size=1"), ({"ngram_size": 9}, "ngram_size=9"),
    ({"max_patterns": 0}, "max_patterns=0"), ({"max_patterns": True}, "max_patterns=True"),
    ({"max_successors": 0}, "max_successors=0"), ({"hour_size": 0}, "hour_size=0"),
    ({"max_queries": -1}, "max_queries=-1"),
    ({"max_query_bytes": 0}, "max_query_bytes=0"), ({"max_query_bytes": 1 << 21}, "max_query_bytes=2097152"),
    ({"max_query_bytes": 4096.0}, "max_query_bytes=4096.0"), ({"history_bytes": -1}, "history_bytes=-1"),
    ({"weights": (0.0, 0.0, 0.0)}, "not all 0"), ({"weights": (0.7, -0.1, 0.4)}, "non-negative"),
    ({"weights": (1.0, 1.0)}, "three"), ({"weights": (1.0, math.inf, 0.0)}, "weights"),
    ({"half_life": 0}, "half_life=0"), ({"half_life": -8}, "half_life=-8"), ({"half_life": math.nan}, "half_life"),
    ({"hour_half_life": 0.0}, "hour_half_life=0.0"), ({"session_ttl": 0}, "session_ttl=0"),
    ({"pattern_ttl": math.inf}, "pattern_ttl=inf"), ({"no_such_setting": 1}, "no_such_setting"),
])
def test_bad_settings_are_configuration_errors(settings: dict[str, Any], problem: str) -> None:
    cache = MultiLevelCache(DEAD, namespace="offline", coherence=False)
    with pytest.raises(ConfigurationError, match=problem):
        PredictiveCacheWarmer(cache, **settings)
    if "no_such_setting" not in settings:
        with pytest.raises(ConfigurationError, match=problem):
            WarmerConfig(**settings)
    cache.close()


WRONG_TYPED = [  # (model key written by hand as a string, the call that finds it)
    pytest.param(b"patterns", "record", id="patterns-record"),
    pytest.param(b"tools", "record", id="tools-record"),
    pytest.param(b"sketch:0", "record", id="sketch-record"),  # the admission sketch is a string of counters
    pytest.param(b"stats", "predict", id="stats-predict"),
    pytest.param(b"tools", "predict", id="tools-predict"),
    pytest.param(next_name("C"), "record", id="next-record"),  # the context of s's next query
    pytest.param(next_name("B"), "predict", id="next-predict"),
    pytest.param(b"hist:s", "predict", id="hist-predict"),
]


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
@pytest.mark.parametrize(("name", "call"), WRONG_TYPED)
def test_a_model_key_of_the_wrong_type_is_refused_before_any_write(
        name: bytes, call: str, fail_open: bool, make_cache: Make, raw: Client, namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(fail_open=fail_open), clock=at_hour(19))
    warmer.record_query("A", ["read"], session="s")
    warmer.record_query("B", ["search"], session="s")
    warmer.record_query("C", session="s")
    model = Model(raw, namespace)
    model.server.delete(model.key(name))
    kind = "list" if name in SKETCHES else "string"  # a sketch is a string: a list is its wrong type
    if kind == "list":
        model.server.rpush(model.key(name), b"written by hand")
    else:
        model.server.set(model.key(name), b"written by hand")
    before = model.snapshot()

    def act() -> Any:
        if call == "record":
            return warmer.record_query("D", session="s")
        return warmer.predict_next_queries("C" if name == b"hist:s" else "B", session="s")

    if fail_open:
        result = act()
        assert result is None if call == "record" else len(result) == 0
    else:
        with pytest.raises(CacheUnavailableError) as caught:
            act()
        message = str(caught.value)
        assert f"VRC_WRONGTYPE {model.key(name).decode()} is a {kind}" in message
        assert "Delete the key named above" in message
    assert model.snapshot() == before


# ---------------------------------------------------------------- 12. bad ARGV reaches the scripts


def test_the_scripts_refuse_bad_arguments_before_the_first_write(make_cache: Make, raw: Client,
                                                                  namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), clock=at_hour(20))
    recorded(warmer, "s", "Z", "A")
    model = Model(raw, namespace)
    record, predict = default_scripts().record.source, default_scripts().predict.source
    fixed = [model.key(n) for n in (b"stats", b"patterns", b"queries", b"tools", b"evicted", *SKETCHES, b"obs")]
    record_keys = [*fixed, model.key(b"hist:s"), model.key(b"pred:s"), model.key(hour_name(20)),
                   model.key(next_name("A")), model.key(ngram_name("Z", "A"))]
    # session ttl, kept, max_patterns, max_successors, decay, hour decay, hour size, max_queries,
    # pattern ttl, sketch width, sketch epoch, R records, D doomed; then the record: query, tools, c, h, history
    record_args: list[Any] = [60000, 2, 100, 10, "0.9", "0.99", 10, 100, 60000, 256, 1000, 1, 0,
                              "B", "", 2, 2, "A", "Z"]
    predict_keys = [model.key(n) for n in (b"stats", b"tools", b"hist:s", b"pred:s", hour_name(20), next_name("A"),
                                           ngram_name("Z", "A"))]
    # top_k, remember, session ttl, min_confidence, w_t, w_n, w_h, current, kept, h, history
    predict_args: list[Any] = [5, 1, 60000, "0", "0.6", "0.3", "0.1", "A", 2, 2, "A", "Z"]

    def bad_record(i: int, v: Any) -> list[Any]:
        return [*record_args[:i], v, *record_args[i + 1:]]

    def bad_predict(i: int, v: Any) -> list[Any]:
        return [*predict_args[:i], v, *predict_args[i + 1:]]

    bad_calls = [
        (record, record_keys, bad_record(4, "-0.5")),  # negative decay
        (record, record_keys, bad_record(4, "nan")),
        (record, record_keys, bad_record(4, "1.5")),
        (record, record_keys, bad_record(13, "")),  # empty query
        (record, record_keys, bad_record(16, 1)),  # h = 1, two history entries given
        (record, record_keys, bad_record(16, 3)),  # h = 3 > kept = 2 (and ARGV too short)
        (record, record_keys, bad_record(15, 3)),  # c = 3 context keys, two given
        (record, record_keys, bad_record(15, "1.5")),
        (record, record_keys, bad_record(2, 0)),  # max_patterns 0
        (record, record_keys, bad_record(0, "1.5")),  # a ttl that is not whole
        (record, record_keys, bad_record(9, 0)),  # sketch width 0
        (record, record_keys, bad_record(9, 2**26 + 1)),  # a sketch BITFIELD could not address
        (record, record_keys, bad_record(9, "256.5")),
        (record, record_keys, bad_record(10, 0)),  # an epoch of no records
        (record, record_keys, bad_record(11, 0)),  # no records
        (record, record_keys, bad_record(11, 65)),  # more than a batch
        (record, record_keys, bad_record(11, 2)),  # two records, one given
        (record, record_keys, bad_record(12, 1)),  # an evicted pattern to delete, none given
        (record, record_keys[:6], record_args),  # required keys missing
        (record, record_keys[:-1], record_args),  # a context key missing
        (record, [*record_keys, model.key(b"next:X")], record_args),  # a key too many
        (record, record_keys[:10], [*record_args[:15], 0, 0]),  # no hour key (no contexts, no history)
        (predict, predict_keys, bad_predict(0, 0)),  # top_k 0
        (predict, predict_keys, bad_predict(0, 1001)),
        (predict, predict_keys, bad_predict(1, 2)),  # remember is 0 or 1
        (predict, predict_keys, bad_predict(3, "1.5")),  # min_confidence
        (predict, predict_keys, bad_predict(4, "-0.1")),  # a negative weight
        (predict, predict_keys, bad_predict(9, 1)),  # h does not match the history given
        (predict, predict_keys, bad_predict(9, 3)),  # h > kept
        (predict, predict_keys, bad_predict(7, "")),  # empty current query
        (predict, predict_keys[:5], predict_args),  # no next:<current> key
    ]
    before = model.snapshot()
    for source, keys, args in bad_calls:
        with pytest.raises(redis.ResponseError, match=r"^VRC_BADARG") as caught:
            raw.eval(source, len(keys), *keys, *args)
        assert model.snapshot() == before, f"{caught.value} after writing: {keys} {args}"

    # The vectors were bad in the one place changed: unchanged, both are accepted.
    assert raw.eval(record, len(record_keys), *record_keys, *record_args) == [[[1, -1]], []]
    assert model.zset(next_name("A")) == {b"B": 1.0}
    reply = raw.eval(predict, len(predict_keys), *predict_keys, *predict_args[:7], "B", 2, 2, "B", "A")
    assert reply[0] == 1
    assert model.snapshot() != before


# --------------------------------------------------------------------------------- 13. fail-open


def test_a_fail_open_warmer_without_redis_never_raises() -> None:
    cache = MultiLevelCache(DEAD, namespace="down", socket_timeout=0.1, connect_timeout=0.1, coherence=False)
    warmer = PredictiveCacheWarmer(cache, clock=at_hour(21))
    assert warmer.record_query("A", ["read"], session="s") is None
    assert warmer.record_query("B", session="s") is None
    prediction = warmer.predict_next_queries("A", session="s")
    assert prediction == Prediction("A", session="s")
    assert (len(prediction), prediction.total_confidence) == (0, 0)
    stats = warmer.get_statistics()
    assert stats["available"] is False
    assert stats["patterns"]["total"] is None
    assert stats["predictions"]["total"] == 0
    warmer.clear_patterns()
    assert warmer._core.counters.snapshot().get("records", 0) == 0
    cache.close()

    closed = MultiLevelCache(DEAD, namespace="down", fail_open=False, socket_timeout=0.1, connect_timeout=0.1,
                             coherence=False)
    with pytest.raises(CacheUnavailableError, match="record_query"):
        PredictiveCacheWarmer(closed).record_query("A")
    closed.close()


# ----------------------------------------------------------------------------------- 14. async parity


PARITY = [("s1", "open file", ["read"]), ("s1", "search code", ["grep"]), ("s2", "open file", None),
          ("s1", "run tests", ["pytest"]), ("s2", "search code", ["grep", "rg"]), ("s2", "run tests", None),
          ("s3", "open file", None), ("s3", "search code", None)]
PARITY_PREDICTIONS = [("search code", "s3"), ("open file", "s4"), ("run tests", "s5")]


def test_the_async_warmer_learns_and_predicts_like_the_sync_one(make_cache: Make, make_async_cache: MakeAsync,
                                                                raw: Client, namespace: str) -> None:
    settings: dict[str, Any] = {"ngram_size": 3, "max_successors": 4, "clock": at_hour(22)}
    sync_ns, async_ns = namespace + "-sync", namespace + "-async"
    warmer = PredictiveCacheWarmer(make_cache(namespace=sync_ns), **settings)
    for session, query, tools in PARITY:
        warmer.record_query(query, tools, session=session)
    sync_predictions = [everything(warmer, q, s) for q, s in PARITY_PREDICTIONS]
    warmer.record_query("open file", session="s3")  # judged against the s3 prediction
    sync_stats = warmer.get_statistics()

    async def scenario() -> tuple[list[Prediction], dict[str, Any], dict[bytes, Any], list[Prediction]]:
        async with make_async_cache(namespace=async_ns) as cache:
            awarmer = AsyncPredictiveCacheWarmer(cache, **settings)
            for session, query, tools in PARITY:
                await awarmer.record_query(query, tools, session=session)
            predictions = [await awarmer.predict_next_queries(q, top_k=1000, min_confidence=0.0, session=s)
                           for q, s in PARITY_PREDICTIONS]
            await awarmer.record_query("open file", session="s3")
            stats = await awarmer.get_statistics()
            contents = Model(raw, async_ns).contents()
            await awarmer.clear_patterns()
            cleared = [await awarmer.predict_next_queries(q, min_confidence=0.0, session=s)
                       for q, s in PARITY_PREDICTIONS]
        return predictions, stats, contents, cleared

    async_predictions, async_stats, async_contents, cleared = asyncio.run(scenario())
    assert async_predictions == sync_predictions
    assert all(len(p) for p in sync_predictions)
    assert async_stats == sync_stats
    assert async_stats["predictions"]["total"] == 1
    assert async_contents == Model(raw, sync_ns).contents()
    assert [len(p) for p in cleared] == [0, 0, 0]
    assert all(n.startswith((b"hist:", b"pred:")) or n == b"stats" for n in Model(raw, async_ns).names())


# ------------------------------------------------------------------------------------------ 15. clear


def test_clear_patterns_removes_every_model_key_but_the_sessions(make_cache: Make, raw: Client, namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), ngram_size=3, clock=at_hour(23))
    for session, queries in TRAINING.items():
        warmer.record_query(queries[0], ["t"], session=session)
        recorded(warmer, session, *queries[1:])
    other_hour = PredictiveCacheWarmer(make_cache(), ngram_size=3, clock=at_hour(0))
    recorded(other_hour, "night", "A", "B")
    assert warmer.predict_next_queries("X", session="a").queries  # leaves pred:a
    model = Model(raw, namespace)
    assert {b"hour:23", b"hour:00", b"tools", b"stats", b"patterns", b"queries"} <= set(model.names())

    warmer.clear_patterns()
    left = model.names()
    assert left
    assert all(n.startswith((b"hist:", b"pred:")) or n == b"stats" for n in left), left  # counters are kept
    assert {n for n in left if n.startswith(b"pred:")} == {b"pred:a"}
    for current, session in (("A", "a"), ("A", "fresh"), ("X", None)):
        assert len(everything(warmer, current, session)) == 0
    stats = warmer.get_statistics()
    assert (stats["patterns"]["total"], stats["patterns"]["queries"]) == (0, 0)
    assert stats["records"]["total"] > 0  # counters are the fleet's history: kept

    recorded(warmer, "a", "A", "B")  # learning starts afresh (the session's history survived)
    assert model.zset(next_name("A")) == {b"B": 1.0}
    assert model.registry() == {next_name("C"), ngram_name("B", "C"), next_name("A"), ngram_name("C", "A")}


def test_clear_patterns_also_removes_evicted_pattern_keys_pending_deletion(make_cache: Make, raw: Client,
                                                                          namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), max_patterns=5, ngram_size=3, clock=at_hour(23))
    for i in range(20):
        warmer.record_query(f"q{i:03d}", session="s")
    recorded(warmer, "x1", "X", "Y")  # next:X counted once: refused
    recorded(warmer, "x2", "X", "Y")  # twice: admitted, the least recently updated pattern evicted
    assert len(warmer._core._doomed) == 1  # evicted by the last call, to be deleted by the next
    warmer.clear_patterns()
    model = Model(raw, namespace)
    assert model.pattern_names() == set()


# ---------------------------------------------------------------------- settings the scripts refuse


@pytest.mark.parametrize("settings", [{"half_life": 0.03}, {"hour_half_life": 0.03}, {"session_ttl": 1e13}],
                         ids=["half_life", "hour_half_life", "session_ttl"])
def test_every_setting_warmer_config_accepts_is_one_the_scripts_accept(
        settings: dict[str, Any], make_cache: Make, raw: Client, namespace: str) -> None:
    try:
        warmer = PredictiveCacheWarmer(make_cache(fail_open=True), clock=at_hour(8), **settings)
    except ConfigurationError:
        return  # refused up front: fine
    recorded(warmer, "s", "A", "B")
    assert Model(raw, namespace).zset(next_name("A")) == {b"B": 1.0}


def test_a_prediction_that_only_looks_writes_nothing_and_is_never_judged(make_cache: Make, raw: Client,
                                                                       namespace: str) -> None:
    warmer = PredictiveCacheWarmer(make_cache(), clock=at_hour(6))
    for i in range(3):
        recorded(warmer, f"t{i}", "A", "B")
    warmer.record_query("A", session="u")
    model = Model(raw, namespace)
    before = model.snapshot()
    assert warmer.predict_next_queries("A", session="u", remember=False).queries == ["B"]
    assert model.snapshot() == before  # no pred:<session>, nothing else
    warmer.record_query("B", session="u")
    assert model.stats().get("predictions_total", 0) == 0
    assert warmer.get_statistics()["predictions"]["process"]["made"] == 0
