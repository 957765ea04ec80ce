"""Synthetic agent traffic for the prediction model: a known Markov chain, sessions walking it, an oracle.

Shared by ``benchmarks/bench_prediction.py`` and ``tests/test_prediction_accuracy.py`` (one copy of
the workload, so the test asserts on exactly what the benchmark reports).

* :class:`MarkovChain`: ``queries`` states; each has a few successors (``fanout``, picked uniformly)
  with Zipf-skewed transition probabilities (``p_k`` proportional to ``1/k**skew``). Seeded.
* :class:`SessionWalker`: agent sessions of random length, several open at once and interleaved (as
  a fleet's traffic is). A session starts at a uniformly random query and walks the chain. The
  walker's state survives a change of chain, so a drift happens in the middle of open sessions.
* :func:`replay`: feeds requests to a warmer. For every request that has a predecessor in its
  session, it first asks ``predict_next_queries(previous, top_k, min_confidence=0, session)`` and
  checks whether the request's query is in the answer (top-k membership), then records the query
  (``record_query``): prequential evaluation, the model keeps learning while it is measured. The
  oracle, which knows the true transition matrix, predicts the ``top_k`` likeliest successors of
  the same ``previous`` query, and is scored on the very same requests.
* :class:`Trace` / :class:`Score`: the per-prediction outcomes, and accuracy, oracle accuracy and
  their ratio over any range of them.

Everything is deterministic for a given seed (the warmer's hour of day is fixed by its clock).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from random import Random
from typing import Any, Protocol

QUERIES = 200
FANOUT = (3, 8)  # successors per query, inclusive range
SKEW = 1.0  # Zipf exponent of the transition probabilities
TOP_K = 5
FIXED_TIME = 1_700_000_000.0  # a clock for the warmer: every request falls into one hour of day


def query_name(i: int) -> str:
    return f"query-{i:03d}"


class Learner(Protocol):
    """What :func:`replay` needs of a warmer (``PredictiveCacheWarmer`` is one)."""

    def record_query(self, query: str, tools: Any = None, session: str | None = None) -> None: ...

    def predict_next_queries(self, current_query: str, top_k: int = ..., min_confidence: float = ...,
                             session: str | None = None) -> Any: ...  # a Prediction: .queries


@dataclass(frozen=True)
class MarkovChain:
    """``successors[q]`` (likeliest first) and their transition probabilities ``probabilities[q]``."""

    successors: tuple[tuple[int, ...], ...]
    probabilities: tuple[tuple[float, ...], ...]
    seed: int = 0
    _cumulative: tuple[tuple[float, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cumulative", tuple(tuple(itertools.accumulate(p)) for p in self.probabilities))

    @classmethod
    def random(cls, seed: int, queries: int = QUERIES, fanout: tuple[int, int] = FANOUT,
               skew: float = SKEW) -> MarkovChain:
        rng = Random(f"chain-{seed}")
        successors, probabilities = [], []
        for q in range(queries):
            k = rng.randint(*fanout)
            others = [x for x in range(queries) if x != q]
            successors.append(tuple(rng.sample(others, k)))  # random order: rank 1 is a random query
            weights = [1.0 / (rank ** skew) for rank in range(1, k + 1)]
            total = sum(weights)
            probabilities.append(tuple(w / total for w in weights))
        return cls(tuple(successors), tuple(probabilities), seed)

    @property
    def size(self) -> int:
        return len(self.successors)

    def step(self, query: int, rng: Random) -> int:
        """A successor of ``query``, drawn with the chain's probabilities."""
        cumulative = self._cumulative[query]
        i = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        return self.successors[query][min(i, len(cumulative) - 1)]

    def oracle(self, query: int, top_k: int = TOP_K) -> tuple[int, ...]:
        """The ``top_k`` likeliest successors of ``query`` (the true transition matrix's best guess)."""
        return self.successors[query][:top_k]

    def stationary(self, rounds: int = 500) -> list[float]:
        """The long-run share of requests per query, ignoring session starts (power iteration)."""
        pi = [1.0 / self.size] * self.size
        for _ in range(rounds):
            nxt = [0.0] * self.size
            for q, share in enumerate(pi):
                for s, p in zip(self.successors[q], self.probabilities[q], strict=True):
                    nxt[s] += share * p
            pi = nxt
        return pi

    def expected_oracle_accuracy(self, top_k: int = TOP_K) -> float:
        """The oracle's top-k accuracy in the long run (stationary-weighted top-k probability mass)."""
        pi = self.stationary()
        return sum(share * sum(self.probabilities[q][:top_k]) for q, share in enumerate(pi))


@dataclass(frozen=True)
class Request:
    """One request of the stream: ``session`` asks ``query``; ``previous`` is its session's last query."""

    index: int
    session: str
    query: int
    previous: int | None


class SessionWalker:
    """``concurrent`` sessions open at a time, interleaved at random; each lasts ``length`` requests."""

    def __init__(self, seed: int, queries: int = QUERIES, concurrent: int = 8, length: tuple[int, int] = (4, 40),
                 prefix: str = "agent") -> None:
        self.rng = Random(f"walk-{seed}")
        self.queries = queries
        self.length = length
        self.prefix = prefix
        self.slots: list[tuple[str, int, int] | None] = [None] * concurrent  # (session, current, left)
        self.sessions = 0
        self.requests = 0

    def walk(self, chain: MarkovChain, count: int) -> Iterator[Request]:
        """The next ``count`` requests, open sessions following ``chain`` from here on."""
        rng = self.rng
        for _ in range(count):
            slot = rng.randrange(len(self.slots))
            open_session = self.slots[slot]
            if open_session is None or open_session[2] == 0:
                self.sessions += 1
                session, previous = f"{self.prefix}-{self.sessions}", None
                query, left = rng.randrange(self.queries), rng.randint(*self.length) - 1
            else:
                session, previous, left = open_session
                query, left = chain.step(previous, rng), left - 1
            self.slots[slot] = (session, query, left)
            yield Request(self.requests, session, query, previous)
            self.requests += 1

    def walk_observations(self, chain: MarkovChain, count: int) -> Iterator[Request]:
        """Requests until ``count`` of them are transitions (have a predecessor in their session)."""
        seen = 0
        while seen < count:
            for request in self.walk(chain, 1):
                seen += request.previous is not None
                yield request


@dataclass(frozen=True)
class Score:
    """Top-k hits of the model and of the oracle over the same ``checked`` predictions."""

    checked: int
    model_hits: int
    oracle_hits: int

    @property
    def model(self) -> float:
        return self.model_hits / self.checked if self.checked else 0.0

    @property
    def oracle(self) -> float:
        return self.oracle_hits / self.checked if self.checked else 0.0

    @property
    def ratio(self) -> float:
        return self.model_hits / self.oracle_hits if self.oracle_hits else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"checked": self.checked, "model_accuracy": round(self.model, 4),
                "oracle_accuracy": round(self.oracle, 4), "ratio": round(self.ratio, 4)}


@dataclass
class Trace:
    """One entry per checked prediction: did the model / the oracle have the actual next query in its top-k,
    and the index of that request in the stream (requests include session starts, which are not checked)."""

    model: list[bool] = field(default_factory=list)
    oracle: list[bool] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    recorded: int = 0  # requests recorded (checked or not)
    transitions: int = 0  # of them, those with a predecessor in their session: observations of a transition

    def __len__(self) -> int:
        return len(self.model)

    def score(self, start: int = 0, end: int | None = None) -> Score:
        """Over checked predictions ``start`` .. ``end`` (exclusive)."""
        m, o = self.model[start:end], self.oracle[start:end]
        return Score(len(m), sum(m), sum(o))

    def windows(self, size: int) -> list[Score]:
        return [self.score(i, i + size) for i in range(0, len(self) - size + 1, size)]

    def first_window_at(self, size: int, ratio: float) -> int | None:
        """How many checked predictions until a window of ``size`` of them first scores ``ratio`` of the
        oracle or better (the end of that window: a bound, not an estimate), or None if none does."""
        for i in range(0, len(self) - size + 1, size):
            if self.score(i, i + size).ratio >= ratio:
                return i + size
        return None


def pooled_windows(traces: Sequence[Trace], size: int) -> list[Score]:
    """Window ``i`` of every trace summed: several processes' learning curves, averaged."""
    per = [t.windows(size) for t in traces]
    return [Score(sum(w.checked for w in ws), sum(w.model_hits for w in ws), sum(w.oracle_hits for w in ws))
            for ws in zip(*per, strict=False)]


def crossing(windows: Sequence[Score], size: int, target: float) -> float | None:
    """Observations (per process) at which a learning curve first reaches ``target`` of the oracle: each
    window's ratio is placed at the window's middle and the crossing interpolated linearly between two
    windows (a window's end lags the model it measures by half a window, which would inflate small
    counts, such as a fleet's, the most)."""
    before: tuple[float, float] | None = None
    for i, w in enumerate(windows):
        x = (i + 0.5) * size
        if w.ratio >= target:
            if before is None:
                return x
            bx, br = before
            return bx + (x - bx) * (target - br) / (w.ratio - br)
        before = (x, w.ratio)
    return None


def replay(learner: Learner, chain: MarkovChain, requests: Iterable[Request], *, check: bool = True,
           top_k: int = TOP_K) -> Trace:
    """Record every request; first (when ``check``) predict it from its session's previous query."""
    trace = Trace()
    names = [query_name(i) for i in range(chain.size)]
    # A background warmer's answers lag its records by a round: replaying one request after another,
    # each waits for its record's round, so the model is measured, not the lag.
    flush = getattr(learner, "flush", None)
    for r in requests:
        if check and r.previous is not None:
            predicted = learner.predict_next_queries(names[r.previous], top_k=top_k, min_confidence=0.0,
                                                     session=r.session)
            trace.model.append(names[r.query] in predicted.queries)
            trace.oracle.append(r.query in chain.oracle(r.previous, top_k))
            trace.requests.append(r.index)
        learner.record_query(names[r.query], session=r.session)
        if flush is not None:
            flush()
        trace.recorded += 1
        trace.transitions += r.previous is not None
    return trace
