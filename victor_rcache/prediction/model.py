"""The shared prediction model: which query a session asks next, learned from the whole fleet.

::

    record_query(q, tools, session) ──▶ record.lua  next:<previous> += q, ngram:<last n-1> += q,
                                                    hour:<HH> += q, tools[q], the session's history,
                                                    the verdict on what was predicted for it
    predict_next_queries(cur, session) ▶ predict.lua w_t·P(·|cur) + w_n·P(·|last n-1) + w_h·P(·|hour),
                                                    best top_k, remembered for the verdict
    prewarm_predictions(p, select) ───▶ TierCore.prewarm per predicted query: lease, select(q), fill
                                        (once per fleet; see warmer.py)

The model lives in Redis sorted sets under ``<ns>:{<ns>.model}:`` (one hash slot: every script call
is cluster-safe), counts decay per observation, and every set is bounded (``lua/includes/model.lua``
lists the keys); once the pattern registry (or the tools' query list) is full, a new pattern set (or
query) is admitted only if a fleet-wide frequency sketch rates it above what it would evict (see
``lua/record.lua``). Queries and sessions are bounded in bytes (``max_query_bytes``), and so is this
process's cache of session histories (``history_bytes``).

Like the tiers, this module does no I/O: its operations are generator steps the cache's front end
runs (one round trip each; a second when another process advanced the session since this one last
saw it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from redis.exceptions import RedisError

from .. import forksafe
from ..config import MAX_TTL_SECONDS
from ..errors import ConfigurationError, InvalidArgumentError, InvalidKeyError
from ..keys import MAX_RAW_KEY_BYTES, key_bytes
from ..metrics import Counters
from ..scripts import ScriptCall
from ..tiers import Step, TierCore

MAX_NGRAM = 8  # longest n-gram (the scripts accept histories up to 64)
MAX_TOP_K = 1000
SESSIONS_REMEMBERED = 10_000  # session histories this process keeps locally (LRU, also bounded by history_bytes)
# The admission sketch (lua/record.lua, docs/prediction.md#admission-and-bytes): an epoch lasts SKETCH_EPOCH_PER_SLOT
# records per slot of the larger of the two bounded lists (TinyLFU's sample of 10 accesses per entry), so an estimate
# covers the last 10 to 20 records per slot: long enough to see a pattern that deserves a slot recur. A row has a
# counter per item an epoch counts (ngram_size per record), rounded up to a power of two: both epochs together put
# at most about 2 increments on a counter, and the conservative update keeps most one-offs at an estimate of 1.
SKETCH_ROWS = 4  # fixed in lua/record.lua
SKETCH_EPOCH_PER_SLOT = 10
MAX_SKETCH_WIDTH = 1 << 24  # counters per row: 32 MiB per sketch at most
TOOLS_MEMO = 1024  # tool lists whose JSON a process remembers
RECORD_BATCH = 32  # records one record.lua call carries (a longer call would hold up other clients)
HISTORY_RETRIES = 3  # a session advanced by another process meanwhile: derive the keys again, resend
# What a prewarm does with a predicted query above the threshold; the fleet counts the skipped ones together.
PREWARM_SKIPPED = ("cached", "busy", "refused", "no_tools", "other_registry")
PREWARM_OUTCOMES = ("completed", "cached", "busy", "refused", "failed", "no_tools", "other_registry", "over_budget")


@dataclass(frozen=True)
class WarmerConfig:
    """Settings of the prediction model and prewarming (every worker of a namespace should agree)."""

    max_patterns: int = 500  # pattern sets (transitions and n-gram contexts) kept; once full, frequency admits
    ngram_size: int = 3  # longest n-gram: contexts of the last 1 .. ngram_size-1 queries
    max_successors: int = 20  # queries kept per pattern set
    weights: tuple[float, float, float] = (0.6, 0.3, 0.1)  # transition, n-gram, hour of day
    half_life: float = 32.0  # observations of a pattern after which an old count weighs half
    hour_half_life: float = 1000.0  # the same for an hour's counts
    hour_size: int = 64  # queries kept per hour set
    max_queries: int = 0  # queries whose tools are kept (0 = max_patterns)
    max_query_bytes: int = 4096  # longest query (and session) accepted, in bytes (UTF-8 for str)
    history_bytes: int = 4 << 20  # bytes of session histories this process keeps locally (saves round trips)
    session_ttl: float = 1800.0  # seconds a session's history and pending prediction are kept after use
    pattern_ttl: float = 30 * 86400.0  # seconds a pattern set not updated at all survives (a safety net)
    prewarm_min_confidence: float = 0.2  # predictions below this are not prewarmed
    prewarm_concurrency: int = 4  # selection calls running at once per prewarm_predictions call
    prewarm_timeout: float = 10.0  # seconds one selection call may take; later it counts as failed
    prewarm_ttl: float | None = None  # ttl of prewarmed entries (None = the tiers' idle ttls only)
    key_fn: Callable[[str | bytes], str | bytes] | None = None  # query -> cache key (None = the query)
    clock: Callable[[], float] = time.time  # wall clock, for the hour of day (UTC)
    # Off the caller's path (background.py): records queued and sent by a thread, predictions scored from
    # this process's view of the model. False: every record_query and predict_next_queries is a round trip.
    background: bool = True
    refresh_interval: float = 0.05  # seconds: a round of records and view reads at least this often
    view_max_age: float = 1.0  # seconds: an answer uses only pattern sets read at most this long ago
    record_queue: int = 10_000  # records waiting to be sent; more are dropped (counted)
    view_size: int = 4096  # pattern sets this process keeps copies of (least recently used dropped)
    prewarm_top_k: int = 3  # predicted queries an automatic prediction considers
    prewarm_budget: float = 1.5  # automatic prewarming: most selections per useful prewarm (miss saved)

    def __post_init__(self) -> None:
        def need(ok: bool, problem: str) -> None:
            if not ok:
                raise ConfigurationError(problem)

        def whole(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
                 f"{name}={v!r} must be a whole number from {lo} to {hi}")

        whole("max_patterns", 1, 10_000_000)
        whole("ngram_size", 2, MAX_NGRAM)
        whole("max_successors", 1, 100_000)
        whole("hour_size", 1, 100_000)
        whole("max_queries", 0, 10_000_000)
        whole("max_query_bytes", 1, 1 << 20)
        whole("history_bytes", 0, 1 << 40)
        whole("prewarm_concurrency", 1, 1000)
        whole("record_queue", 1, 10_000_000)
        whole("view_size", 1, 10_000_000)
        whole("prewarm_top_k", 1, MAX_TOP_K)
        need(isinstance(self.background, bool), f"background={self.background!r} must be True or False")
        need(_finite(self.refresh_interval) and 0.001 <= self.refresh_interval <= 60,
             f"refresh_interval={self.refresh_interval!r} must be a number of seconds from 0.001 to 60")
        # (A view_max_age under twice refresh_interval leaves answers without copies between rounds.)
        need(_finite(self.view_max_age) and 0.01 <= self.view_max_age <= 3600,
             f"view_max_age={self.view_max_age!r} must be a number of seconds from 0.01 to 3600")
        need(_finite(self.prewarm_budget) and self.prewarm_budget > 0,
             f"prewarm_budget={self.prewarm_budget!r} must be a positive number (selections per useful "
             "prewarm; 1.5 = at most 1.5 selections for each prewarmed entry that is then read)")
        need(len(self.weights) == 3 and all(_finite(w) and w >= 0 for w in self.weights) and sum(self.weights) > 0,
             f"weights={self.weights!r} must be three non-negative numbers (transition, n-gram, hour), not all 0")
        for name in ("half_life", "hour_half_life"):
            v = getattr(self, name)
            need(_finite(v) and 1 <= v <= 1e9, f"{name}={v!r} must be a number of observations from 1 to 1e9")
        for name in ("session_ttl", "pattern_ttl", "prewarm_timeout"):
            v = getattr(self, name)
            need(_finite(v) and 0.001 <= v <= MAX_TTL_SECONDS,
                 f"{name}={v!r} must be a number of seconds from 0.001 to {MAX_TTL_SECONDS:.0f} (ten years)")
        need(_finite(self.prewarm_min_confidence) and 0 <= self.prewarm_min_confidence <= 1,
             f"prewarm_min_confidence={self.prewarm_min_confidence!r} must be between 0 and 1")
        need(self.prewarm_ttl is None or (_finite(self.prewarm_ttl) and self.prewarm_ttl > 0),
             f"prewarm_ttl={self.prewarm_ttl!r} must be None or a positive number of seconds")

    @property
    def normalized_weights(self) -> tuple[float, float, float]:
        total = sum(self.weights)
        return (self.weights[0] / total, self.weights[1] / total, self.weights[2] / total)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sketch_size(config: WarmerConfig) -> tuple[int, int]:
    """The admission sketch's counters per row and its epoch in records, from the settings (every worker of a
    namespace derives the same ones from the same settings). Each of its two sketches takes
    ``SKETCH_ROWS * width / 2`` bytes."""
    slots = max(config.max_patterns, config.max_queries or config.max_patterns)
    epoch = SKETCH_EPOCH_PER_SLOT * slots
    width = 1 << max(6, (epoch * config.ngram_size - 1).bit_length())
    return min(width, MAX_SKETCH_WIDTH), epoch


def decay_for(half_life: float) -> float:
    """The per-observation factor under which a count halves after ``half_life`` observations."""
    return float(0.5 ** (1.0 / half_life))


@dataclass(frozen=True)
class Prediction:
    """What the model expects after ``current_query``, best first.

    ``confidences[i]`` is the model's estimate of the probability that ``queries[i]`` comes next
    (weighted transition, n-gram and hour-of-day probabilities); ``parts[i]`` holds those three
    probabilities; ``tools[i]`` the tools the query's latest selection used, and ``tools_hashes[i]``
    the hash of the tool registry they were selected from, when ``record_query`` was given one (else
    None; a missing entry counts as None).
    """

    current_query: str | bytes
    queries: list[str | bytes] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    tools: list[list[Any]] = field(default_factory=list)
    parts: list[tuple[float, float, float]] = field(default_factory=list)
    session: str | bytes | None = None
    tools_hashes: list[str | None] = field(default_factory=list)

    @property
    def total_confidence(self) -> float:
        """The probability that the next query is one of ``queries``, by the model."""
        return sum(self.confidences)

    def __len__(self) -> int:
        return len(self.queries)


class Distribution(NamedTuple):
    """A pattern set as this process read it: each member's probability (its decayed count over the
    set's total, as predict.lua computes it), and the members, likeliest first."""

    probs: dict[bytes, float]
    ranked: tuple[bytes, ...]

    @classmethod
    def of(cls, flat: Sequence[bytes]) -> Distribution:
        """From ZRANGE ... WITHSCORES's flat reply (member, count, ...; lowest first)."""
        members, counts = flat[0::2], [float(c) for c in flat[1::2]]
        total = 0.0
        for c in counts:  # in Redis's order, one addition at a time: the float predict.lua gets
            total += c
        if total <= 0:
            return cls({}, ())
        probs = {m: c / total for m, c in zip(members, counts, strict=True)}
        return cls(probs, tuple(sorted(probs, key=probs.__getitem__, reverse=True)))


EMPTY = Distribution({}, ())


def score_next(transition: Distribution | None, ngrams: Sequence[Distribution | None], hour: Distribution | None,
               weights: tuple[float, float, float], top_k: int,
               min_confidence: float) -> list[tuple[bytes, float, float, float, float]]:
    """predict.lua's scoring, in the process (lua/predict.lua states the formula): rows of (query,
    confidence, p_transition, p_ngram, p_hour), best first, ties by query. ``ngrams`` longest last; the
    longest with any observation is used, else the transition.

    The same numbers as the script's, in less work: a query seen only in the hour set scores
    ``w_h * p_hour``, so of those only the likeliest (``top_k`` of them, with their ties) can be among
    the best."""
    t = transition or EMPTY
    n = t
    for d in reversed(ngrams):
        if d is not None and d.probs:
            n = d
            break
    h = hour or EMPTY
    w_t, w_n, w_h = weights
    tp, np_, hp = t.probs, n.probs, h.probs
    tg, ng, hg = tp.get, np_.get, hp.get
    # (conf, query) for every query seen after the current one; the same operations, in the same order,
    # as the script's, so the same floats.
    scored = [(w_t * tg(q, 0.0) + w_n * ng(q, 0.0) + w_h * hg(q, 0.0), q) for q in tp.keys() | np_.keys()]
    taken, last = 0, -1.0
    for q in h.ranked:
        ph = hp[q]
        if w_h * ph < min_confidence:  # the hour part alone can reach no further
            break
        if q in tp or q in np_:
            continue
        if taken >= top_k and ph < last:
            break
        scored.append((w_t * 0.0 + w_n * 0.0 + w_h * ph, q))
        taken, last = taken + 1, ph
    best = sorted([(-conf, q) for conf, q in scored if conf >= min_confidence and conf > 0])[:top_k]
    return [(q, -neg, tg(q, 0.0), ng(q, 0.0), hg(q, 0.0)) for neg, q in best]


def _name(query: bytes) -> bytes:
    """A query as it appears in key names: itself, or '#' + SHA-256 hex when long or '#'-prefixed."""
    if len(query) > MAX_RAW_KEY_BYTES or query.startswith(b"#"):
        return b"#" + hashlib.sha256(query).hexdigest().encode()
    return query


class ModelKeys:
    """Names every Redis key of one namespace's prediction model (see lua/includes/model.lua)."""

    def __init__(self, namespace: str) -> None:
        self.prefix = f"{namespace}:{{{namespace}.model}}:".encode()
        self.stats = self.prefix + b"stats"
        self.patterns = self.prefix + b"patterns"
        self.evicted = self.prefix + b"evicted"
        self.queries = self.prefix + b"queries"
        self.tools = self.prefix + b"tools"
        self._hours = [self.hour(h) for h in range(24)]
        self.sketches = (self.prefix + b"sketch:0", self.prefix + b"sketch:1")  # even and odd epochs
        self.obs = self.prefix + b"obs"  # observations of each set: its forward decay's scale

    def next(self, query: bytes) -> bytes:
        return self.prefix + b"next:" + _name(query)

    def ngram(self, oldest_first: Sequence[bytes]) -> bytes:
        return self.prefix + b"ngram:" + b"|".join(b"%d:%s" % (len(n), n) for n in map(_name, oldest_first))

    def hour(self, hour: int) -> bytes:
        return self.prefix + b"hour:%02d" % hour

    def hour_at(self, wall_clock: float) -> bytes:
        """The hour set of a moment (seconds since the epoch): its UTC hour's."""
        return self._hours[int(wall_clock // 3600) % 24]

    def hist(self, session: bytes) -> bytes:
        return self.prefix + b"hist:" + _name(session)

    def pred(self, session: bytes) -> bytes:
        return self.prefix + b"pred:" + _name(session)

    def contexts(self, newest_first: Sequence[bytes], ngram_size: int) -> list[bytes]:
        """The pattern keys a sequence of queries is the context of: the transition from the newest,
        then the n-grams of the last 2, 3, ... up to ngram_size-1 queries."""
        if not newest_first:
            return []
        out = [self.next(newest_first[0])]
        for k in range(2, ngram_size):
            if len(newest_first) >= k:
                out.append(self.ngram(list(reversed(newest_first[:k]))))
        return out


def _query_bytes(query: str | bytes, what: str = "query") -> bytes:
    try:
        return key_bytes(query)
    except InvalidKeyError as exc:
        raise InvalidArgumentError(str(exc).replace("key", what, 1)) from None


def _bounded(raw: bytes, limit: int, what: str) -> bytes:
    if len(raw) > limit:
        raise InvalidArgumentError(
            f"{what} is {len(raw)} bytes, over max_query_bytes={limit}: the model keeps queries in several keys "
            f"and every worker's memory, so pass a shorter {what} (e.g. a summary, or a digest of a long one), "
            f"or raise WarmerConfig(max_query_bytes=...)")
    return raw


def _history_cost(session: bytes, hist: list[bytes]) -> int:
    """What a remembered history holds in memory: the session name and queries, as Python objects."""
    return sys.getsizeof(session) + sys.getsizeof(hist) + sum(sys.getsizeof(q) for q in hist)


def _text(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _tools_json(tools: Iterable[Any] | None, tools_hash: str | None = None) -> str:
    """What record.lua stores for a query's tools: their JSON list, or with a registry hash the object
    ``{"tools": [...], "tools_hash": "..."}`` ('' = keep what is stored)."""
    if tools_hash is not None and (not isinstance(tools_hash, str) or not tools_hash):
        raise InvalidArgumentError(f"tools_hash={tools_hash!r} must be a non-empty str (tools_hash(registry))")
    if tools is None:
        if tools_hash is not None:
            raise InvalidArgumentError("tools_hash names the registry the tools came from: pass the tools too")
        return ""
    if isinstance(tools, (str, bytes)):
        raise InvalidArgumentError(f"tools must be a list of tool names, not a single {type(tools).__name__}: "
                                   "pass [name]")
    try:
        listed = list(tools)
        stored: Any = listed if tools_hash is None else {"tools": listed, "tools_hash": tools_hash}
        return json.dumps(stored, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"tools must be JSON-serializable (names or small dicts): {exc}") from None


class PrewarmBudget:
    """What automatic prewarming may spend: a selection is allowed while the fleet's prewarms stay within
    ``ratio`` selections per useful prewarm (one whose entry was then read: a miss saved), after a first
    ``allowance`` to learn from. The fleet's counts come from the shards' stats (read by the model
    thread every few seconds); prewarms reserved since the last read count too. Predictions are ranked by
    the model's confidence, so what the budget allows is what the model is surest of."""

    def __init__(self, ratio: float, allowance: int = 20) -> None:
        self.ratio = ratio
        self.allowance = allowance
        self.completed = 0  # the fleet's prewarms computed, as last read
        self.useful = 0  # the fleet's prewarms read at least once, as last read
        self.reserved = 0  # this process's prewarms reserved since that read
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        with self._lock:
            if self.completed + self.reserved + 1 > self.ratio * self.useful + self.allowance:
                return False
            self.reserved += 1
            return True

    def refund(self) -> None:
        """A reserved prewarm that computed nothing (the value was there, or another worker had it)."""
        with self._lock:
            self.reserved = max(0, self.reserved - 1)

    def update(self, completed: int, useful: int) -> None:
        with self._lock:
            self.completed, self.useful, self.reserved = completed, useful, 0


def stored_tools(raw: Any) -> tuple[list[Any], str | None]:
    """A query's stored tools and the registry hash recorded with them (see :func:`_tools_json`)."""
    if not raw:
        return [], None
    stored = json.loads(raw)
    if isinstance(stored, dict):
        return list(stored.get("tools") or []), stored.get("tools_hash")
    return stored, None


class PredictionCore:
    """The model's operations as I/O-free steps, on the tiers' script runner and failure policy."""

    def __init__(self, tiers: TierCore, config: WarmerConfig) -> None:
        self.tiers = tiers
        self.config = config
        self.keys = ModelKeys(tiers.config.namespace)
        self.counters = Counters()
        self._decay = repr(decay_for(config.half_life))
        self._hour_decay = repr(decay_for(config.hour_half_life))
        self._max_queries = config.max_queries or config.max_patterns
        self.budget = PrewarmBudget(config.prewarm_budget)
        self._tools_memo: dict[tuple[tuple[str, ...], str | None], str] = {}
        self._sketch_width, self._sketch_epoch = sketch_size(config)
        self._init_state()
        forksafe.register(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._histories: OrderedDict[bytes, tuple[list[bytes], int]] = OrderedDict()  # -> (history, its cost)
        self._history_size = 0  # the costs' sum (bounded by history_bytes)
        self._doomed: list[bytes] = []  # evicted pattern keys still to delete
        self._pid = os.getpid()
        self._own_session = f"process:{os.getpid()}:{uuid.uuid4().hex[:12]}".encode()

    def _after_fork(self) -> None:
        self._init_state()  # a child is a new process: its own default session, nothing pending

    # ------------------------------------------------------------------ record

    def record_args(self, query: str | bytes, tools: Iterable[Any] | None, session: str | bytes | None,
                    tools_hash: str | None = None) -> tuple[bytes, str, bytes, bytes]:
        """A record's checked arguments (raises InvalidArgumentError): query, tools JSON (with the registry
        hash ``tools_hash`` if given), session, hour set."""
        q = _bounded(_query_bytes(query), self.config.max_query_bytes, "query")
        s = self._session(session)
        return q, self._tools_json(tools, tools_hash), s, self.keys.hour_at(self.config.clock())

    def _tools_json(self, tools: Iterable[Any] | None, tools_hash: str | None) -> str:
        """_tools_json, remembered for tool lists of names (an agent's few tool sets recur on every record)."""
        if not isinstance(tools, (list, tuple)) or not all(isinstance(t, str) for t in tools):
            return _tools_json(tools, tools_hash)
        memo = (tuple(tools), tools_hash)
        found = self._tools_memo.get(memo)
        if found is None:
            found = _tools_json(tools, tools_hash)
            if len(self._tools_memo) >= TOOLS_MEMO:
                self._tools_memo.clear()
            self._tools_memo[memo] = found
        return found

    def record_call(self, records: Sequence[tuple[bytes, str, bytes, bytes, list[bytes]]],
                    doomed: list[bytes]) -> ScriptCall:
        """One record.lua call for ``records`` (at most RECORD_BATCH), in order: each (query, tools JSON,
        session, hour set, the session's history as Redis holds it before that record)."""
        c = self.config
        keys: list[bytes] = [self.keys.stats, self.keys.patterns, self.keys.queries, self.keys.tools,
                             self.keys.evicted, *self.keys.sketches, self.keys.obs]
        args: list[bytes | int | str] = [
            _ms(c.session_ttl), c.ngram_size - 1, c.max_patterns, c.max_successors, self._decay, self._hour_decay,
            c.hour_size, self._max_queries, _ms(c.pattern_ttl), self._sketch_width, self._sketch_epoch,
            len(records), len(doomed)]
        for q, tools_json, s, hour, hist in records:
            contexts = self.keys.contexts(hist, c.ngram_size)
            keys += [self.keys.hist(s), self.keys.pred(s), hour, *contexts]
            args += [q, tools_json, len(contexts), len(hist), *hist]
        return ScriptCall(self.tiers.scripts.record, (*keys, *doomed), tuple(args))

    def record(self, query: str | bytes, tools: Iterable[Any] | None, session: str | bytes | None,
               tools_hash: str | None = None) -> Step[int]:
        """Learn that ``query`` came next in ``session`` (its ``tools``, from the registry whose hash is
        ``tools_hash`` if given), in one round trip. Returns the verdict on the prediction made for it:
        1 predicted, 0 not, -1 none was pending (or Redis failed)."""
        q, tools_json, s, hour = self.record_args(query, tools, session, tools_hash)
        keep = self.config.ngram_size - 1
        for _ in range(HISTORY_RETRIES):
            hist = self._history(s)
            doomed = self._take_doomed()
            call = self.record_call([(q, tools_json, s, hour, hist)], doomed)
            try:
                replies, pending = (yield from self.tiers.run_scripts([call]))[0]
            except RedisError as exc:
                self._give_back_doomed(doomed)
                self.tiers.redis_failed("record_query", exc)
                return -1
            self._set_doomed(pending)
            reply = replies[0]
            if reply[0] == 0:
                self._remember(s, list(reply[1]))
                self.counters.add(history_resyncs=1)
                continue
            verdict = int(reply[1])
            self._remember(s, ([q, *hist])[:keep])
            self.counters.add(records=1, **({"verdicts": 1, "correct": int(verdict == 1)} if verdict >= 0 else {}))
            return verdict
        self.counters.add(record_conflicts=1)  # the session is being advanced elsewhere right now
        return -1

    # ----------------------------------------------------------------- predict

    def predict_args(self, current_query: str | bytes, top_k: int, min_confidence: float,
                     session: str | bytes | None) -> tuple[bytes, bytes]:
        """A prediction's checked arguments (raises InvalidArgumentError): the current query, the session."""
        cur = _bounded(_query_bytes(current_query, "current_query"), self.config.max_query_bytes, "current_query")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
            raise InvalidArgumentError(f"top_k={top_k!r} must be a whole number from 1 to {MAX_TOP_K}")
        if not _finite(min_confidence) or not 0 <= min_confidence <= 1:
            raise InvalidArgumentError(f"min_confidence={min_confidence!r} must be a number from 0 to 1")
        return cur, self._session(session)

    def predict(self, current_query: str | bytes, top_k: int, min_confidence: float,
                session: str | bytes | None, remember: bool = True) -> Step[Prediction]:
        """The ``top_k`` likeliest next queries with confidence >= ``min_confidence``, best first.

        ``remember=False`` only looks (an operator's question): nothing is written, nothing judged."""
        cur, s = self.predict_args(current_query, top_k, min_confidence, session)
        c = self.config
        hour = self.keys.hour_at(c.clock())
        empty = Prediction(current_query, session=session)
        for _ in range(HISTORY_RETRIES):
            hist = self._history(s)
            seq = hist if hist and hist[0] == cur else [cur, *hist][: c.ngram_size - 1]
            keys = (self.keys.stats, self.keys.tools, self.keys.hist(s), self.keys.pred(s), hour,
                    *self.keys.contexts(seq, c.ngram_size))
            args: tuple[bytes | int | str, ...] = (
                top_k, int(remember), _ms(c.session_ttl), repr(float(min_confidence)), *map(repr, c.normalized_weights),
                cur, c.ngram_size - 1, len(hist), *hist)
            try:
                reply = (yield from self.tiers.run_scripts([ScriptCall(self.tiers.scripts.predict, keys, args)]))[0]
            except RedisError as exc:
                self.tiers.redis_failed("predict_next_queries", exc)
                return empty
            if reply[0] == 0:
                self._remember(s, list(reply[1]))
                self.counters.add(history_resyncs=1)
                continue
            rows = reply[1:]
            if remember:
                self.counters.add(predictions=1)
            stored = [stored_tools(r[5]) for r in rows]
            return Prediction(
                current_query,
                queries=[_text(r[0]) for r in rows],
                confidences=[float(r[1]) for r in rows],
                tools=[tools for tools, _ in stored],
                parts=[(float(r[2]), float(r[3]), float(r[4])) for r in rows],
                session=session,
                tools_hashes=[h for _, h in stored],
            )
        return empty

    # -------------------------------------------------------- statistics, clear

    def statistics(self) -> Step[dict[str, Any]]:
        """Model size, fleet-wide and per-process prediction accuracy, and prewarming counts."""
        shard_stats = [sk.stats for sk in self.tiers.space.shard_keys]
        batch: list[tuple[Any, ...]] = [("ZCARD", self.keys.patterns), ("ZCARD", self.keys.queries),
                                        ("HGETALL", self.keys.stats)]
        batch += [("HMGET", key, "prewarmed", "prewarm_useful") for key in shard_stats]
        fleet: dict[str, int] | None = None
        patterns = queries = None
        try:
            replies = yield batch
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            patterns, queries = int(replies[0]), int(replies[1])
            fleet = {(k.decode() if isinstance(k, bytes) else str(k)): int(float(v))
                     for k, v in _pairs(replies[2])}
            fleet["prewarm_completed"] = sum(int(r[0] or 0) for r in replies[3:])
            fleet["prewarm_useful"] = sum(int(r[1] or 0) for r in replies[3:])
        except RedisError as exc:
            self.tiers.redis_failed("get_statistics", exc)
        return self._statistics(fleet, patterns, queries)

    def local_statistics(self) -> dict[str, Any]:
        """:meth:`statistics` from this process's memory alone (no Redis round trip): the fleet's
        numbers are zero, the model's size None, ``available`` False."""
        return self._statistics(None, None, None)

    def _statistics(self, fleet: dict[str, int] | None, patterns: int | None, queries: int | None) -> dict[str, Any]:
        local = self.counters.snapshot()
        f = fleet or {}
        total, correct = f.get("predictions_total", 0), f.get("predictions_correct", 0)
        return {
            "patterns": {"total": patterns, "max_patterns": self.config.max_patterns, "queries": queries,
                         "max_queries": self._max_queries, "max_successors": self.config.max_successors,
                         "ngram_size": self.config.ngram_size, "rejected": f.get("patterns_rejected", 0),
                         "queries_rejected": f.get("queries_rejected", 0)},
            "records": {"total": f.get("records", 0), "process": local.get("records", 0)},
            "predictions": {
                "total": total, "correct": correct, "accuracy": correct / total if total else 0.0,
                "process": {"made": local.get("predictions", 0), "checked": local.get("verdicts", 0),
                            "correct": local.get("correct", 0),
                            "accuracy": local.get("correct", 0) / local["verdicts"] if local.get("verdicts") else 0.0},
            },
            "prewarming": {
                "completed": f.get("prewarm_completed", 0), "useful": f.get("prewarm_useful", 0),
                "skipped": f.get("prewarm_skipped", 0), "failed": f.get("prewarm_failed", 0),
                "process": {k: local.get(f"prewarm_{k}", 0) for k in PREWARM_OUTCOMES},
            },
            "available": fleet is not None,
        }

    def report_prewarm(self, outcomes: dict[str, int]) -> Step[None]:
        """Count a prewarm round's outcomes in this process and fleet-wide (skipped = cached, busy, refused,
        or no usable recorded tools)."""
        self.counters.add(**{f"prewarm_{k}": n for k, n in outcomes.items() if n})
        skipped = sum(outcomes.get(k, 0) for k in PREWARM_SKIPPED)
        batch = [("HINCRBY", self.keys.stats, name, n)
                 for name, n in (("prewarm_skipped", skipped), ("prewarm_failed", outcomes.get("failed", 0))) if n]
        if not batch:
            return
        try:
            for reply in (yield batch):
                if isinstance(reply, Exception):
                    raise reply
        except RedisError as exc:
            self.tiers.redis_failed("prewarm_predictions", exc)

    def clear(self) -> Step[None]:
        """Forget what the fleet learned: pattern sets, hour sets, tools, the admission sketches. Counters are
        kept (like the cache's metrics, they are the fleet's history); session histories expire by themselves."""
        with self._lock:
            self._histories.clear()
            self._history_size = 0
            self._doomed.clear()
        try:
            names = yield [("ZRANGE", self.keys.patterns, 0, -1), ("ZRANGE", self.keys.evicted, 0, -1)]
            for reply in names:
                if isinstance(reply, Exception):
                    raise reply
            keys = [self.keys.prefix + n for n in names[0] + names[1]]
            keys += [self.keys.hour(h) for h in range(24)]
            keys += [self.keys.tools, self.keys.queries, self.keys.patterns, self.keys.evicted, *self.keys.sketches,
                     self.keys.obs]
            for i in range(0, len(keys), 500):  # one hash slot: multi-key DEL is cluster-safe
                for reply in (yield [("DEL", *keys[i:i + 500])]):
                    if isinstance(reply, Exception):
                        raise reply
        except RedisError as exc:
            self.tiers.redis_failed("clear_patterns", exc)

    # ----------------------------------------------------------- local state

    def _session(self, session: str | bytes | None) -> bytes:
        if session is None:
            return self._own_session  # a process without sessions: its own sequence is one session
        return _bounded(_query_bytes(session, "session"), self.config.max_query_bytes, "session")

    def _history(self, session: bytes) -> list[bytes]:
        with self._lock:
            kept = self._histories.get(session)
            if kept is None:
                return []
            self._histories.move_to_end(session)
            return list(kept[0])

    def _remember(self, session: bytes, hist: list[bytes]) -> None:
        """Keep ``hist`` as the session's history; drop the least recently used others while over
        SESSIONS_REMEMBERED or ``history_bytes``. The newest is always kept: a resync's retry needs it."""
        cost = _history_cost(session, hist)
        limit = self.config.history_bytes
        with self._lock:
            old = self._histories.pop(session, None)
            if old is not None:
                self._history_size -= old[1]
            self._histories[session] = (hist, cost)
            self._history_size += cost
            while len(self._histories) > 1 and (len(self._histories) > SESSIONS_REMEMBERED
                                                or self._history_size > limit):
                self._history_size -= self._histories.popitem(last=False)[1][1]

    def _take_doomed(self) -> list[bytes]:
        with self._lock:
            doomed, self._doomed = self._doomed, []
            return doomed

    def _set_doomed(self, pending: Sequence[bytes]) -> None:
        """The fleet's evicted patterns record.lua named: this process deletes them with its next record."""
        with self._lock:
            self._doomed = [self.keys.prefix + name for name in pending]

    def _give_back_doomed(self, doomed: list[bytes]) -> None:
        with self._lock:
            if not self._doomed:
                self._doomed = doomed


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _pairs(reply: Any) -> Iterable[tuple[Any, Any]]:
    if isinstance(reply, dict):
        return reply.items()
    return zip(reply[0::2], reply[1::2], strict=True)
