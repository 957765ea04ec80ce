"""The prediction model off the caller's path: queries recorded in the background, predictions answered
from the process's view of the model.

::

    caller (any thread or task)               this warmer's rounds, on the process's background thread (periodic.py)
    ───────────────────────────               ──────────────────────────────────────────────────────────────
    record_query(q, tools, session)           every refresh_interval (or at once when RECORDS_WAKE wait):
      validate; queue it (bounded: dropped       one round trip: record.lua for each queued record, in
      and counted when full); the session's      order, and view.lua for the pattern sets in use
      history and the verdict on its last      the view: the sets read replace the process's copies
      prediction, here and now                 the sessions recorded since the last round: predicted
    predict_next_queries(cur, session)           from the view (skipped when the session's state has
      scored from the view (never waits); a      not changed), handed to the warmer's prewarming
      set missing or older than one window
      is read by the next round

So a request pays a queue append and a dictionary look-up; Redis runs one pipeline per window and
process instead of two scripts per request. What it costs in meaning (docs/prediction.md): the fleet
learns a query one window plus a round trip after it is recorded, an answer is from the model as it
stood at most one window (plus a round trip) before, and the first question about a pattern set this
process has not read yet is answered without it (empty, or from the other parts of the formula).
A round that fails is dropped and counted: the model misses those observations, a value is never
affected.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from redis.exceptions import RedisError

from .. import forksafe
from ..errors import CacheError
from ..periodic import Periodic
from ..scripts import ScriptCall
from ..tiers import Step
from .model import HISTORY_RETRIES, RECORD_BATCH, Distribution, Prediction, PredictionCore, score_next, stored_tools

RECORDS_WAKE = 64  # queued records that start a round at once
PREWARM_DELAY = 0.005  # seconds: the longest a record of a prewarmed session waits for its round
NO_TOOLS: tuple[list[Any], None] = ([], None)
CONTEXTS_MEMO = 4096  # sequences whose pattern-set names a process remembers
MAX_RECORDS = 256  # records one round carries; more wait for the next
MAX_SETS = 512  # pattern sets one round reads (view.lua's limit)
COUNTERS_INTERVAL = 1.0  # seconds: how often the fleet's counters get this process's verdicts, and the
# prewarm budget the fleet's prewarm counts


class Scored(NamedTuple):
    """A prediction scored from the view: the predicted queries, until when the view's copies it used are
    fresh (monotonic), and the Prediction's fields as every caller of it gets them (each a copy of them)."""

    queries: frozenset[bytes]
    fresh_until: float
    texts: tuple[str | bytes, ...]
    confidences: tuple[float, ...]
    tools: tuple[tuple[Any, ...], ...]
    parts: tuple[tuple[float, float, float], ...]
    hashes: tuple[str | None, ...]

    @classmethod
    def of(cls, rows: list[tuple[bytes, float, float, float, float]], tools: list[tuple[list[Any], str | None]],
           fresh_until: float) -> Scored:
        """From score_next's rows and their tools (as LocalView.tools gives them)."""
        if not rows:
            return cls(frozenset(), fresh_until, (), (), (), (), ())
        members, confidences, t, n, h = zip(*rows, strict=True)
        listed, hashes = zip(*tools, strict=True)
        return cls(frozenset(members), fresh_until, tuple(map(_text, members)), confidences,
                   tuple(map(tuple, listed)), tuple(zip(t, n, h, strict=True)), hashes)


class QueuedRecord(NamedTuple):
    query: bytes
    tools_json: str
    session: bytes
    hour: bytes  # the hour set of when it was recorded
    after: tuple[bytes, ...]  # the session's history with it (the state predictions after it start from)
    tries: int = 0


@dataclass
class SessionState:
    """What this process knows of one session: its history (newest first, as recorded here), the
    prediction waiting for its next query, and the history its last automatic prediction was made for."""

    history: list[bytes]
    pending: tuple[bytes, frozenset[bytes]] | None = None  # (made after, predicted queries)
    predicted_for: tuple[bytes, ...] | None = None
    plan: Any = None  # how its predictions are prewarmed, if its records said (the warmer's PrewarmPlan)
    # Bytes its history holds, and a fixed share for the rest (a pending prediction's queries are bounded
    # like any query): what the byte bound on sessions counts.
    size: int = 128


class LocalView:
    """This process's copies of the pattern sets it asks about, each read at a known time (monotonic).

    A copy older than ``max_age`` is not used; one missing, or past half that age, is *wanted*: the next
    round reads it, so a set in steady use is always answered from. Bounded by ``size`` sets (least
    recently used dropped) and the tools of their members.
    """

    def __init__(self, size: int, max_age: float) -> None:
        self.size = size
        self.max_age = max_age
        self._sets: OrderedDict[bytes, tuple[float, Distribution]] = OrderedDict()
        self._tools: dict[bytes, tuple[list[Any], str | None]] = {}  # member -> its tools, their registry hash
        self._wanted: dict[bytes, None] = {}  # insertion-ordered set
        self._tools_wanted: dict[bytes, None] = {}  # members whose tools the view does not have
        self.generation = 0  # changes whenever a copy or a member's tools change (scores remembered till then)

    def lookup(self, key: bytes, now: float) -> Distribution | None:
        found = self._sets.get(key)
        age = self.max_age if found is None else now - found[0]
        if age >= self.max_age / 2:
            self._wanted[key] = None
        if found is None or age >= self.max_age:
            return None
        self._sets.move_to_end(key)
        return found[1]

    def has(self, key: bytes) -> bool:
        return key in self._sets

    def fresh_until(self, keys: Sequence[bytes]) -> float | None:
        """Until when every copy of ``keys`` is answered from without being wanted again (half its age), or
        None if one is missing."""
        oldest = None
        for key in keys:
            found = self._sets.get(key)
            if found is None:
                return None
            if oldest is None or found[0] < oldest:
                oldest = found[0]
        return None if oldest is None else oldest + self.max_age / 2

    def take_wanted(self, limit: int) -> list[bytes]:
        keys = list(self._wanted)[:limit]
        for key in keys:
            del self._wanted[key]
        return keys

    def take_tools_wanted(self, limit: int) -> list[bytes]:
        members = list(self._tools_wanted)[:limit]
        for member in members:
            del self._tools_wanted[member]
        return members

    def store_tools(self, tools: dict[bytes, tuple[list[Any], str | None]]) -> None:
        self._tools.update(tools)
        self.generation += 1

    def tools(self, member: bytes) -> tuple[list[Any], str | None]:
        """The tools recorded for a member, and the registry hash recorded with them."""
        return self._tools.get(member, NO_TOOLS)

    def store(self, keys: Sequence[bytes], sets: Sequence[Distribution],
              tools: dict[bytes, tuple[list[Any], str | None]] | None, read_at: float) -> None:
        """Sets read at ``read_at`` (parsed by the caller, outside the lock a caller's question takes), and
        the tools of their members (None: read again without them; members new to the view get theirs
        with the next round)."""
        self.generation += 1
        for key, found in zip(keys, sets, strict=True):
            self._sets[key] = (read_at, found)
            self._sets.move_to_end(key)
            if tools is None:
                self._tools_wanted.update(dict.fromkeys(m for m in found.probs if m not in self._tools))
        while len(self._sets) > self.size:
            self._sets.popitem(last=False)
        if tools:
            self._tools.update(tools)
        if len(self._tools) > 64 * self.size:  # members of sets long gone: start again (re-read with them)
            self._tools.clear()

    def __len__(self) -> int:
        return len(self._sets)


class ModelSync:
    """One warmer's background side: the record queue, the sessions, the view, and its rounds (run by the
    process's one background thread, with every cache's bookkeeping).

    ``drive`` runs a step through a sync client (the cache's bookkeeping I/O: the thread cannot use an
    asyncio client); ``on_predictions`` receives the automatic predictions of a round, each with its
    session's plan (the warmer's prewarming), from the thread; it must not block for long. A session is
    predicted after a round that recorded it when ``auto`` is set, or when its records carried a plan.
    """

    def __init__(self, core: PredictionCore, drive: Callable[[Step[Any]], Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.core = core
        self.config = core.config
        self._drive_step = drive
        self.clock = clock
        self.on_predictions: Callable[[list[tuple[Prediction, Any]]], None] | None = None
        self.auto = False
        self._init_state()
        forksafe.register(self)
        self.thread = Periodic("victor-rcache-model", self._round, lambda: self.config.refresh_interval,
                               self._count_error)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[QueuedRecord] = deque()
        self._sending = 0  # records taken by the round in progress (rounds take turns)
        self._sessions: OrderedDict[bytes, SessionState] = OrderedDict()
        self._contexts: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
        self._scores: dict[tuple[Any, ...], Scored] = {}  # answers from the view as it is (see predict)
        self._scores_of = -1  # the view's generation they were scored from
        self._session_bytes = 0
        self._recorded: dict[bytes, None] = {}  # sessions recorded since the last round
        self.view = LocalView(self.config.view_size, self.config.view_max_age)
        self._verdicts = [0, 0]  # predictions judged, correct: not yet in the fleet's counters
        self._counted_at = self.clock()
        self._planned = False  # some record brought a prewarm plan: the budget needs the fleet's counts

    def _after_fork(self) -> None:
        self._init_state()  # the parent's queue is the parent's to send

    def start(self) -> ModelSync:
        self.thread.start()
        return self

    def flush(self) -> None:
        """Send every queued record and read every wanted set, now, from this thread; when it returns, no
        record queued before the call is waiting or on its way (a round of the thread's own included)."""
        self.thread.flush()
        while self._queue or self._sending:  # more than a round's worth, or the thread's round in flight
            self.thread.flush()  # (rounds take turns: this one starts once that one is done)

    def close(self) -> None:
        self.thread.close()

    # ------------------------------------------------------------------- the caller's side

    def record(self, query: bytes, tools_json: str, session: bytes, hour: bytes, plan: Any = None) -> None:
        """Queue one record; advance the session here and judge its pending prediction. ``plan``: how the
        session's next predictions are prewarmed (kept until another record brings another)."""
        keep = self.config.ngram_size - 1
        counters = self.core.counters
        with self._lock:
            state = self._session(session)
            after = [query, *state.history][:keep]
            if len(self._queue) >= self.config.record_queue:
                counters.add(records_dropped=1)  # Redis is slow or gone: the model misses it, nobody waits
            else:
                self._queue.append(QueuedRecord(query, tools_json, session, hour, tuple(after)))
            if plan is not None:
                state.plan = plan
                self._planned = True
            if state.pending is not None:
                made_after, predicted = state.pending
                # As record.lua: a prediction made after this very query, before it was recorded, waits.
                if made_after != query or (state.history and made_after == state.history[0]):
                    correct = int(query in predicted)
                    self._verdicts[0] += 1
                    self._verdicts[1] += correct
                    counters.add(verdicts=1, correct=correct)
                    state.pending = None
            self._resize(session, state, after)
            self._recorded[session] = None
            # A session prewarmed automatically is predicted right after its record's round: that round
            # starts within PREWARM_DELAY, so the prewarm can land before the session's next request (an
            # agent's think time), while the records of the process's other sessions meanwhile share it.
            now = len(self._queue) >= RECORDS_WAKE
            soon = self.auto or state.plan is not None
        if now:
            self.thread.wake()
        elif soon:
            self.thread.wake_within(PREWARM_DELAY)

    def predict(self, current: bytes, top_k: int, min_confidence: float, session: bytes, remember: bool,
                shown: tuple[Any, Any] | None = None) -> Prediction:
        """Score the next queries from the view (no I/O); see PredictionCore.predict for the arguments.
        ``shown``: the current query and session as the caller gave them (default: decoded from bytes)."""
        c = self.config
        now = self.clock()
        with self._lock:
            state = self._sessions.get(session)
            history = state.history if state is not None else ()
            contexts = self._contexts_after(current, history)
            view = self.view
            hour_key = self.core.keys.hour_at(c.clock())
            # The view changes only when a round stores what it read: until then (and while no copy used is
            # old enough to be wanted again) the same question has the same answer, remembered here. A
            # request's prediction is then a look-up, not a scoring.
            if self._scores_of != view.generation or len(self._scores) >= CONTEXTS_MEMO:
                self._scores.clear()
                self._scores_of = view.generation
            memo = (contexts, hour_key, top_k, min_confidence)
            scored = self._scores.get(memo)
            if scored is None or now >= scored.fresh_until:
                found = [view.lookup(k, now) for k in contexts]
                hour = view.lookup(hour_key, now)
                rows = score_next(found[0], found[1:], hour, c.normalized_weights, top_k, min_confidence)
                scored = Scored.of(rows, [view.tools(r[0]) for r in rows],
                                   view.fresh_until([*contexts, hour_key]) or now)
                if scored.fresh_until > now:
                    self._scores[memo] = scored
            if remember:
                if state is None:
                    state = self._session(session)
                state.pending = (current, scored.queries) if scored.texts else None
            wake = len(view._wanted) >= RECORDS_WAKE
        if remember:
            self.core.counters.add(predictions=1)
        if wake:
            self.thread.wake()
        query, named = shown if shown is not None else (_text(current), _text(session))
        # (lists of their own: a caller may change what it got, never what the next caller gets)
        return Prediction(query, list(scored.texts), list(scored.confidences), [list(t) for t in scored.tools],
                          list(scored.parts), named, list(scored.hashes))

    def _contexts_after(self, current: bytes, history: Sequence[bytes]) -> tuple[bytes, ...]:
        """The pattern sets a prediction after ``current`` reads, in a session with ``history`` (newest
        first), remembered: the same few sequences recur on every request."""
        keep = self.config.ngram_size - 1
        sequence = tuple(history) if history and history[0] == current else (current, *history[: keep - 1])
        found = self._contexts.get(sequence)
        if found is None:
            if len(self._contexts) >= CONTEXTS_MEMO:
                self._contexts.clear()
            found = self._contexts[sequence] = tuple(self.core.keys.contexts(sequence, self.config.ngram_size))
        return found

    def pending(self) -> int:
        """Records queued and not yet sent (for tests and metrics)."""
        return len(self._queue)

    def _session(self, session: bytes) -> SessionState:
        state = self._sessions.get(session)
        if state is None:
            state = self._sessions[session] = SessionState([])
            self._session_bytes += state.size + len(session)
        self._sessions.move_to_end(session)
        return state

    def _resize(self, session: bytes, state: SessionState, history: list[bytes]) -> None:
        """Set a session's history, keeping every session this process remembers within history_bytes."""
        size = sum(map(len, history)) + 128
        self._session_bytes += size - state.size
        state.history, state.size = history, size
        while self._session_bytes > self.config.history_bytes and len(self._sessions) > 1:
            name, gone = self._sessions.popitem(last=False)
            self._session_bytes -= gone.size + len(name)
            self._recorded.pop(name, None)

    # ------------------------------------------------------------------- the thread's side

    def _count_error(self, exc: BaseException) -> None:
        self.core.counters.add(model_rounds_failed=1)

    def _round(self, force: bool) -> None:
        with self._lock:
            records = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_RECORDS))]
            recorded = list(self._recorded)
            self._recorded.clear()
            self._sending = len(records) + len(recorded)
            # A prediction after a query just recorded starts from the session's state with it: read the
            # sets of each such state in this round (when missing or half their age), so they are there.
            now = self.clock()
            for rec in records:
                for key in self.core.keys.contexts(rec.after, self.config.ngram_size):
                    self.view.lookup(key, now)
            if records:
                self.view.lookup(self.core.keys.hour_at(self.config.clock()), now)
            wanted = self.view.take_wanted(MAX_SETS)
            verdicts, budget = None, False
            if force or self.clock() - self._counted_at >= COUNTERS_INTERVAL:
                self._counted_at = self.clock()
                if any(self._verdicts):
                    verdicts, self._verdicts = self._verdicts, [0, 0]
                budget = self.auto or self._planned
        try:
            if records or wanted or verdicts or budget:
                try:
                    self._drive_step(self._send(records, wanted, verdicts, budget))
                except Exception as exc:  # the records are dropped (the model misses them), never retried
                    self.core.counters.add(model_rounds_failed=1, records_failed=len(records))
                    if isinstance(exc, RedisError):
                        with contextlib.suppress(CacheError):  # a fail-closed cache raises: the thread counts
                            self.core.tiers.redis_failed("record_query", exc)
            if recorded and self.on_predictions is not None:
                self._predict_for(recorded)
        finally:
            self._sending = 0  # (after the predictions: a flush returns once their prewarms have started)

    def _send(self, records: list[QueuedRecord], wanted: list[bytes], verdicts: list[int] | None,
              budget: bool) -> Step[None]:
        """One round trip: the records (record.lua each, in order) and the view's sets (view.lua); once
        every COUNTERS_INTERVAL a second: the verdicts, and the fleet's prewarm counts for the budget."""
        core = self.core
        scripts = core.tiers.scripts
        calls: list[ScriptCall] = []
        histories: dict[bytes, list[bytes]] = {}  # each session's history as this round leaves it
        changed: dict[bytes, None] = {}  # pattern sets the records update
        recs: list[tuple[bytes, str, bytes, bytes, list[bytes]]] = []
        for rec in records:
            history = histories.get(rec.session)
            if history is None:
                history = core._history(rec.session)
            recs.append((rec.query, rec.tools_json, rec.session, rec.hour, history))
            histories[rec.session] = [rec.query, *history][: self.config.ngram_size - 1]
            changed.update(dict.fromkeys(core.keys.contexts(history, self.config.ngram_size)))
        for start in range(0, len(recs), RECORD_BATCH):
            calls.append(core.record_call(recs[start:start + RECORD_BATCH], core._take_doomed() if start == 0 else []))
        record_calls = len(calls)
        # This process's copies of the sets its records change are read again after them, in the same
        # round trip: what a process recorded, its next answers know. Sets read for the first time come
        # with their members' tools; sets read again without (a member new to the view gets its tools
        # with the round's counters, below).
        with self._lock:
            first = [key for key in wanted if not self.view.has(key)]
            again = [key for key in dict.fromkeys([*wanted, *changed]) if self.view.has(key)]
            again = again[: MAX_SETS - len(first)]
            tools_wanted = self.view.take_tools_wanted(MAX_SETS)
        for keys, with_tools in ((first, 1), (again, 0)):
            if keys:
                calls.append(ScriptCall(scripts.view, (core.keys.tools, *keys), (with_tools,)))
        read_at = self.clock()
        if calls:
            replies = yield from core.tiers.run_scripts(calls)
            self._apply(records, replies[:record_calls])
            views = iter(replies[record_calls:])
            parsed = []  # parsed here: a caller's question waits for the lock, not for this
            for keys, with_tools in ((first, True), (again, False)):
                if keys:
                    sets, tools = next(views)
                    decoded = {tools[i]: stored_tools(tools[i + 1]) for i in range(0, len(tools), 2)}
                    parsed.append((keys, [Distribution.of(flat) for flat in sets], decoded if with_tools else None))
            with self._lock:
                for keys, distributions, known in parsed:
                    self.view.store(keys, distributions, known, read_at)
        batch: list[tuple[Any, ...]] = []
        if tools_wanted:
            batch.append(("HMGET", core.keys.tools, *tools_wanted))
        if verdicts:
            batch += [("HINCRBY", core.keys.stats, "predictions_total", verdicts[0]),
                      ("HINCRBY", core.keys.stats, "predictions_correct", verdicts[1])]
        counts_from = len(batch)
        if budget:
            batch += [("HMGET", shard.stats, "prewarmed", "prewarm_useful") for shard in core.tiers.space.shard_keys]
        if batch:
            replies = yield batch
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            if tools_wanted:
                decoded = {m: stored_tools(raw) for m, raw in zip(tools_wanted, replies[0], strict=True)}
                with self._lock:
                    self.view.store_tools(decoded)
            if budget:
                counts = replies[counts_from:]
                core.budget.update(sum(int(r[0] or 0) for r in counts), sum(int(r[1] or 0) for r in counts))

    def _apply(self, records: list[QueuedRecord], replies: list[Any]) -> None:
        core = self.core
        again: list[QueuedRecord] = []
        done = 0
        per_record = [reply for batch, _ in replies for reply in batch]
        if replies:
            core._set_doomed(replies[-1][1])
        for rec, reply in zip(records, per_record, strict=True):
            if reply[0] == 0:  # the session was advanced by another process: resend on its history
                core._remember(rec.session, list(reply[1]))
                if rec.tries + 1 < HISTORY_RETRIES:
                    again.append(rec._replace(tries=rec.tries + 1))
                else:
                    core.counters.add(record_conflicts=1)
                continue
            history = core._history(rec.session)
            core._remember(rec.session, [rec.query, *history][: self.config.ngram_size - 1])
            done += 1
        core.counters.add(records=done, **({"history_resyncs": len(again)} if again else {}))
        if again:
            with self._lock:
                self._queue.extendleft(reversed(again))

    def _predict_for(self, sessions: list[bytes]) -> None:
        """The round's automatic predictions: one per session whose state changed since its last."""
        c = self.config
        out = []
        for session in sessions:
            with self._lock:
                state = self._sessions.get(session)
                if state is None or not state.history or not (self.auto or state.plan is not None):
                    continue
                if state.predicted_for == tuple(state.history):  # nothing new since its last prediction
                    self.core.counters.add(predictions_skipped=1)
                    continue
                state.predicted_for = tuple(state.history)
                current, plan = state.history[0], state.plan
            prediction = self.predict(current, c.prewarm_top_k, c.prewarm_min_confidence, session, True)
            if prediction.queries:
                out.append((prediction, plan))
        if out and self.on_predictions is not None:
            self.on_predictions(out)


def _text(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
