"""PredictiveCacheWarmer and AsyncPredictiveCacheWarmer: the prediction model's two front ends.

They hold no logic of their own: the model's steps (model.py, lua/record.lua, predict.lua) and
the tiers' prewarm step run through the cache's front end, sync or async; only how a step is driven
differs. ``prewarm_predictions`` is a coroutine in both (as in the in-process design it replaces):
the sync warmer runs each prewarm in a worker thread, and ``prewarm`` runs it for sync callers.

A warmer drives a :class:`~victor_rcache.MultiLevelCache` (or its async twin), or a tool-selection
cache: then its model and prewarms are those of the cache's ``query`` namespace, and a prewarm stores
selection records under the query keys real requests use.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..aio import AsyncMultiLevelCache
from ..cache import MultiLevelCache
from ..errors import CacheError, CacheUnavailableError, ConfigurationError, InvalidArgumentError
from ..tiers import Claim, Prewarmed, Step
from . import tool_selection as _tools  # a cycle (it imports this module): its names are looked up when used
from .background import ModelSync
from .model import PREWARM_OUTCOMES, Prediction, PredictionCore, WarmerConfig

if TYPE_CHECKING:
    from .tool_selection import AsyncToolSelectionCache, ToolSelectionCache

SelectionFn = Callable[[Any], Any]  # query -> result (or an awaitable of it)
Store = Callable[[Any, float], Any]  # (value, milliseconds its selection took) -> what the cache stores
Prewarm = SelectionFn | bool | None  # a warmer's automatic prewarming: a selection function, True (recorded tools)
PREWARM_SLOTS = 2  # background prewarms a sync warmer runs at once; predictions beyond are dropped (counted)
log = logging.getLogger("victor_rcache")


@dataclass(frozen=True)
class PrewarmReport:
    """What one ``prewarm_predictions`` call did, per predicted query above the threshold."""

    completed: int = 0  # computed and stored by this call
    cached: int = 0  # already in the cache
    busy: int = 0  # another worker was computing it
    refused: int = 0  # written or deleted by someone else meanwhile: the fill was dropped
    failed: int = 0  # the selection raised or timed out, or Redis failed
    below_threshold: int = 0  # confidence under prewarm_min_confidence: not considered
    no_tools: int = 0  # no selection function, and no tools recorded for the query: nothing to store
    other_registry: int = 0  # no selection function, and its tools were recorded under another tools hash
    over_budget: int = 0  # automatic prewarming only: not computed, prewarm_budget was spent

    @property
    def skipped(self) -> int:
        return self.cached + self.busy + self.refused + self.no_tools + self.other_registry


@dataclass(frozen=True)
class PrewarmTarget:
    """Where and what one ``prewarm_predictions`` call stores."""

    key: Callable[[Any], str | bytes]  # query -> the key a real request uses
    registry: str | None  # the tools hash recorded tools must carry to be stored (None: recorded without one)
    store: Store  # a selected value -> the value stored (itself, or a tool-selection record)
    ttl: float | None  # the entries' absolute ttl


@dataclass(frozen=True)
class PrewarmPlan:
    """How a session's predictions are prewarmed, given with its records (``cached_selection``'s): the
    selection function (None: the recorded tools), where and what to store, and ``done``, told the
    report, or ``"dropped"``/``"failed"``."""

    select: SelectionFn | None
    target: PrewarmTarget
    done: Callable[[PrewarmReport | str], None]


def store_as_is(value: Any, selection_ms: float) -> Any:
    return value


def _recorded(prediction: Prediction, i: int) -> tuple[list[Any], str | None]:
    """The tools recorded for the prediction's i-th query and the tools hash recorded with them."""
    tools = prediction.tools[i] if i < len(prediction.tools) else []
    registry = prediction.tools_hashes[i] if i < len(prediction.tools_hashes) else None
    return list(tools or []), registry


def _stored_loader(store: Store, value: Any) -> Callable[[], Any]:
    """A loader storing a value known in advance (a query's recorded tools)."""
    async def run() -> Any:
        return store(value, 0.0)

    return run


def _selection_loader(selection_fn: SelectionFn, query: Any, timeout: float, store: Store = store_as_is
                      ) -> Callable[[], Any]:
    """A loader (awaitable, run by either front end) calling ``selection_fn(query)`` within ``timeout``,
    its result stored as ``store`` makes it.

    A plain function runs in a worker thread: on timeout it is abandoned (it finishes in the
    background and its result is dropped); a coroutine function is cancelled.
    """
    async def run() -> Any:
        started = time.perf_counter()
        if inspect.iscoroutinefunction(selection_fn):
            result = await asyncio.wait_for(selection_fn(query), timeout)
        else:
            result = await asyncio.wait_for(asyncio.wrap_future(_in_daemon_thread(selection_fn, query)), timeout)
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, timeout)
        return store(result, (time.perf_counter() - started) * 1000.0)

    return run


def _in_daemon_thread(fn: SelectionFn, query: Any) -> Future[Any]:
    # Not an executor: an event loop waits for its executor's threads when it closes, and a timed-out
    # selection must not hold anyone up (nor the interpreter's exit).
    future: Future[Any] = Future()

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(query))
        except BaseException as exc:  # handed to the awaiting prewarm, which counts it
            future.set_exception(exc)

    threading.Thread(target=work, name="victor-rcache-prewarm", daemon=True).start()
    return future


class _WarmerBase:
    _asynchronous = False
    tool_selection: Any  # the tool-selection cache the warmer was given, if any

    def __init__(self, cache: Any, max_patterns: int, ngram_size: int, config: WarmerConfig | None,
                 prewarm: Prewarm, settings: dict[str, Any]) -> None:
        cache = self._accept(cache)
        try:
            base = config or WarmerConfig()
            self.config = replace(base, max_patterns=max_patterns if config is None else base.max_patterns,
                                  ngram_size=ngram_size if config is None else base.ngram_size, **settings)
        except TypeError as exc:
            raise ConfigurationError(f"{exc}; see WarmerConfig for the settings a warmer takes") from None
        if not (prewarm is None or isinstance(prewarm, bool) or callable(prewarm)):
            raise ConfigurationError("prewarm= must be a selection function (query -> result, sync or async), or True "
                                     "to store the tools the fleet recorded for a predicted query")
        automatic = prewarm is not None and prewarm is not False
        if automatic and not self.config.background:
            raise ConfigurationError("prewarm= needs background=True (predictions are made after each round of "
                                     "records); with background=False call prewarm_predictions yourself")
        self.cache = cache
        self._core = PredictionCore(cache._core, self.config)
        self._select: SelectionFn | None = prewarm if callable(prewarm) else None
        self._sync: ModelSync | None = None
        if self.config.background:
            self._sync = ModelSync(self._core, cache._background_io.drive)
            self._sync.auto = automatic
            self._sync.on_predictions = self._prewarm_in_background
            cache._core.companions.append(self._sync.start())

    def _prewarm_in_background(self, predictions: list[tuple[Prediction, PrewarmPlan | None]]) -> None:
        raise NotImplementedError

    def _record_now(self, query: str | bytes, tools: Iterable[Any] | None, session: str | bytes | None,
                    tools_hash: str | None, plan: PrewarmPlan | None = None) -> bool:
        """Queue a record (background mode): True; or False, and the caller sends it in a round trip.
        ``plan``: prewarm the session's predictions so (``cached_selection``)."""
        if self._sync is None:
            return False
        self._sync.record(*self._core.record_args(query, tools, session, tools_hash), plan=plan)
        return True

    async def _prewarm_planned(self, prediction: Prediction, plan: PrewarmPlan | None) -> None:
        """One automatic prewarm (budgeted): with the session's plan, else the warmer's ``prewarm=``."""
        try:
            if plan is None:
                await self._prewarm_ranked(prediction, self._select, None, None, None, None, budgeted=True)
            else:
                plan.done(await self._prewarm_ranked(prediction, plan.select, None, None, None, None, budgeted=True,
                                                     target=plan.target))
        except Exception:  # a background prewarm must never take anything down
            self._core.counters.add(prewarm_failed=1)
            if plan is not None:
                plan.done("failed")
            log.exception("prewarming after %r failed", prediction.current_query)

    def _dropped(self, plan: PrewarmPlan | None) -> None:
        self._core.counters.add(prewarm_dropped=1)  # no slot free: this prediction is not prewarmed
        if plan is not None:
            plan.done("dropped")

    def _predict_here(self, current_query: str | bytes, top_k: int, min_confidence: float,
                      session: str | bytes | None, remember: bool) -> Prediction | None:
        """A prediction from the local view (background mode), or None: the caller asks Redis."""
        if self._sync is None:
            return None
        cur, s = self._core.predict_args(current_query, top_k, min_confidence, session)
        return self._sync.predict(cur, top_k, min_confidence, s, remember, (current_query, session))

    def _accept(self, cache: Any) -> Any:
        """The fleet cache this warmer drives: ``cache`` itself, or a tool-selection cache's ``query``
        namespace (the tool-selection cache is then kept as ``tool_selection``)."""
        sync: tuple[type[Any], type[Any]] = (MultiLevelCache, _tools.ToolSelectionCache)
        asynchronous: tuple[type[Any], type[Any]] = (AsyncMultiLevelCache, _tools.AsyncToolSelectionCache)
        plain, tools = asynchronous if self._asynchronous else sync
        self.tool_selection = None
        if isinstance(cache, tools):
            self.tool_selection = cache
            return cache.cache("query")
        if isinstance(cache, plain):
            return cache
        if self._asynchronous:
            raise ConfigurationError(f"cache must be an AsyncMultiLevelCache or an AsyncToolSelectionCache, not "
                                     f"{type(cache).__name__}; use PredictiveCacheWarmer with a MultiLevelCache or "
                                     "a ToolSelectionCache")
        raise ConfigurationError(f"cache must be a MultiLevelCache or a ToolSelectionCache, not "
                                 f"{type(cache).__name__}; use AsyncPredictiveCacheWarmer with an AsyncMultiLevelCache "
                                 "or an AsyncToolSelectionCache")

    async def _prewarm(self, step: Step[Prewarmed], loader: Callable[[], Any]) -> Prewarmed:
        raise NotImplementedError

    async def _report(self, outcomes: dict[str, int]) -> None:
        raise NotImplementedError

    async def _claim(self, keys: list[Any], ttl: float | None) -> list[Claim | Prewarmed]:
        raise NotImplementedError

    async def _fleet_tools_hash(self) -> str | None:
        raise NotImplementedError

    async def _target(self, tools_hash: str | None, key_config: Mapping[str, Any] | None,
                      ttl: float | None) -> PrewarmTarget:
        """Keys, registry, stored form and ttl of one prewarm call (the fleet's tools hash: one round trip)."""
        c = self.config
        tc = self.tool_selection
        if tc is None:
            return PrewarmTarget(c.key_fn or (lambda q: q), tools_hash, store_as_is, ttl or c.prewarm_ttl)
        # By default the registry the fleet registered, else none: that of requests made without tools.
        registry = tools_hash if tools_hash is not None else (await self._fleet_tools_hash() or _tools.tools_hash(None))
        settings = dict(key_config or {})
        entry_ttl = tc._ttl("query", ttl or c.prewarm_ttl)

        def key(query: Any) -> str | bytes:
            return _tools.query_key_of_hash(query, registry, **settings)

        def store(value: Any, selection_ms: float) -> Any:  # the record a real request stores
            return tc._record(value, _tools.selected_tools(value), "query", entry_ttl, None, selection_ms)

        return PrewarmTarget(c.key_fn or key, registry, store, entry_ttl)

    async def prewarm_predictions(self, prediction: Prediction, selection_fn: SelectionFn | None = None,
                                  min_confidence: float | None = None, ttl: float | None = None, *,
                                  tools_hash: str | None = None,
                                  key_config: Mapping[str, Any] | None = None) -> PrewarmReport:
        """Store the predicted queries' results before anyone asks, once per fleet.

        Each query at or above ``min_confidence`` (default ``prewarm_min_confidence``) that is not
        cached is stored under the key a real request uses: ``key_fn(query)`` (default: the query
        itself), or over a tool-selection cache the query key made from the registry hash and
        ``key_config`` (the selector settings real requests pass; ``{"selector": name}`` for
        ``cached_selection``'s entries), as ``query_key(query, tools, **key_config)`` makes it.

        With ``selection_fn`` (sync or async; at most ``prewarm_concurrency`` at once, each within
        ``prewarm_timeout``) the value is ``selection_fn(query)``. Without one, the value is the tools
        the fleet recorded for the query (``prediction.tools``), as a real request's selection would
        have stored them: the tool list itself, or over a tool-selection cache the selection record
        whose value is that list. Recorded tools are used only if they were recorded with the
        registry hash this call prewarms for: ``tools_hash``; by default, over a tool-selection cache
        the fleet's registered one (``stored_tools_hash()``, else ``"none"``), over any other cache
        none (only tools recorded without a hash). Queries without recorded tools are skipped as
        ``no_tools``, those recorded under another hash as ``other_registry``.

        What any tier holds, or another worker is computing, is skipped: one round trip looks every
        query up and takes the fill lease of each missing one, before anything is computed. Exceptions
        of ``selection_fn`` are counted (``failed``), never raised. Over a tool-selection cache the
        entries live for ``ttl`` (else ``prewarm_ttl``, else the ``query`` namespace's ttl). (Automatic
        prewarming, the warmer's ``prewarm=``, also keeps to ``prewarm_budget``, most confident first.)
        """
        return await self._prewarm_ranked(prediction, selection_fn, min_confidence, ttl, tools_hash, key_config,
                                          budgeted=False)

    async def _prewarm_ranked(self, prediction: Prediction, selection_fn: SelectionFn | None,
                              min_confidence: float | None, ttl: float | None, tools_hash: str | None,
                              key_config: Mapping[str, Any] | None, budgeted: bool,
                              target: PrewarmTarget | None = None) -> PrewarmReport:
        if not isinstance(prediction, Prediction):
            raise InvalidArgumentError(f"prediction must be what predict_next_queries returned, not "
                                       f"{type(prediction).__name__}")
        if selection_fn is not None and not callable(selection_fn):
            raise InvalidArgumentError("selection_fn must be a function of the query (sync or async), or None to "
                                       "store the tools recorded for it")
        if tools_hash is not None and (not isinstance(tools_hash, str) or not tools_hash):
            raise InvalidArgumentError(f"tools_hash={tools_hash!r} must be a non-empty str (tools_hash(registry))")
        if key_config is not None and self.tool_selection is None:
            raise InvalidArgumentError("key_config makes tool-selection query keys: give the warmer a tool-selection "
                                       "cache, or name the keys with key_fn")
        if key_config is not None and not isinstance(key_config, Mapping):
            raise InvalidArgumentError(f"key_config must be a mapping of selector settings (as query_key takes them), "
                                       f"not {type(key_config).__name__}")
        c = self.config
        threshold = c.prewarm_min_confidence if min_confidence is None else min_confidence
        wanted = sorted((i for i, conf in enumerate(prediction.confidences) if conf >= threshold),
                        key=lambda i: -prediction.confidences[i])  # most confident first: the budget's order
        outcomes = dict.fromkeys(PREWARM_OUTCOMES, 0)
        try:
            if target is None and wanted:
                target = await self._target(tools_hash, key_config, ttl)
        except CacheUnavailableError:  # the fleet's tools hash could not be read (a fail-closed cache)
            target, outcomes["failed"] = None, len(wanted)
        # A selection may not outlive its fill lease, or another worker would compute it again.
        timeout = min(c.prewarm_timeout, self.cache.config.lease_ttl)
        planned: list[tuple[Any, Callable[[], Any]]] = []  # (key, loader)
        for i in wanted if target is not None else ():
            assert target is not None
            query = prediction.queries[i]
            if selection_fn is None:
                tools, registry = _recorded(prediction, i)
                if not tools or registry != target.registry:
                    outcomes["no_tools" if not tools else "other_registry"] += 1
                    continue
                loader = _stored_loader(target.store, tools)
            else:
                loader = _selection_loader(selection_fn, query, timeout, target.store)
            try:
                key = target.key(query)
            except CacheError:  # a bad key from key_fn
                outcomes["failed"] += 1
                continue
            if budgeted and not self._core.budget.reserve():
                outcomes["over_budget"] += 1
                continue
            planned.append((key, loader))
        try:
            claims = await self._claim([key for key, _ in planned], target.ttl) if planned and target else []
        except CacheError:  # a bad key, or Redis failing a fail-closed cache
            claims = ["failed"] * len(planned)
        gate = asyncio.Semaphore(c.prewarm_concurrency)

        async def fill(claim: Claim, loader: Callable[[], Any]) -> str:
            async with gate:
                try:
                    return await self._prewarm(self.cache._core.fill_prewarm(claim), loader)
                except CacheError:  # Redis failing a fail-closed cache
                    return "failed"

        work = []
        for (_, loader), claim in zip(planned, claims, strict=True):
            if isinstance(claim, str):
                outcomes[claim] += 1
                if budgeted:
                    self._core.budget.refund()  # nothing computed
            else:
                work.append(fill(claim, loader))
        for outcome in await asyncio.gather(*work):
            outcomes[outcome] += 1
        await self._report(outcomes)
        return PrewarmReport(**outcomes, below_threshold=len(prediction.queries) - len(wanted))


class PredictiveCacheWarmer(_WarmerBase):
    """Learns which query a session asks next from the whole fleet's traffic, and prewarms it.

    ``PredictiveCacheWarmer(cache, max_patterns=500, ngram_size=3, prewarm=None, **settings)``; the
    settings are described in :class:`~victor_rcache.prediction.model.WarmerConfig`. ``cache`` is a
    :class:`~victor_rcache.MultiLevelCache`, or a :class:`~victor_rcache.ToolSelectionCache` (the
    warmer then learns and prewarms its ``query`` namespace; ``cache`` is that namespace's cache and
    ``tool_selection`` the tool-selection cache).

    Records go to Redis from a background thread, and predictions are scored from this process's view
    of the model (``background=True``, the default: a caller never waits for the model). With
    ``prewarm=selection_fn`` (or ``prewarm=True``: the tools the fleet recorded), each recorded session
    is predicted after the next round and what is predicted and missing is computed in a background
    thread (at most ``PREWARM_SLOTS`` at once), within ``prewarm_budget``.
    """

    cache: MultiLevelCache
    tool_selection: ToolSelectionCache | None

    def __init__(self, cache: MultiLevelCache | ToolSelectionCache, max_patterns: int = 500, ngram_size: int = 3, *,
                 config: WarmerConfig | None = None, prewarm: Prewarm = None, **settings: Any) -> None:
        self._slots = threading.BoundedSemaphore(PREWARM_SLOTS)
        self._threads: set[threading.Thread] = set()
        super().__init__(cache, max_patterns, ngram_size, config, prewarm, settings)

    def record_query(self, query: str | bytes, tools: Iterable[Any] | None = None,
                     session: str | bytes | None = None, *, tools_hash: str | None = None) -> None:
        """Learn that ``query`` (which used ``tools``) came next in ``session``: queued, and sent by the
        model thread within ``refresh_interval`` (``background=False``: one round trip, here).

        ``tools_hash`` (``tools_hash(registry)``) names the tool registry ``tools`` were selected from:
        a prewarm without a selection function uses them only for that registry."""
        if not self._record_now(query, tools, session, tools_hash):
            self.cache._drive(self._core.record(query, tools, session, tools_hash))

    def predict_next_queries(self, current_query: str | bytes, top_k: int = 5, min_confidence: float = 0.2,
                             session: str | bytes | None = None, remember: bool = True) -> Prediction:
        """The likeliest next queries after ``current_query`` in ``session``, scored from this process's
        view of the model: no round trip, pattern sets at most ``view_max_age`` old (one not read yet is
        read by the next round; ``background=False``: one round trip, to the model as it is now).

        The prediction is remembered for the session, so its next query counts for the accuracy;
        ``remember=False`` only looks (for tools like the CLI's ``predict``)."""
        found = self._predict_here(current_query, top_k, min_confidence, session, remember)
        if found is not None:
            return found
        return self.cache._drive(self._core.predict(current_query, top_k, min_confidence, session, remember))

    def flush(self) -> None:
        """Send the queued records, and read the pattern sets the view wants, now (background mode)."""
        if self._sync is not None:
            self._sync.flush()

    def get_statistics(self) -> dict[str, Any]:
        """Model size, prediction accuracy (fleet and process) and prewarming counts (this process's queued
        records and verdicts are sent first)."""
        self.flush()
        return self.cache._drive(self._core.statistics())

    def clear_patterns(self) -> None:
        """Forget the fleet's model (every worker of the namespace starts learning afresh)."""
        self.cache._drive(self._core.clear())

    def prewarm(self, prediction: Prediction, selection_fn: SelectionFn | None = None,
                min_confidence: float | None = None, ttl: float | None = None, *, tools_hash: str | None = None,
                key_config: Mapping[str, Any] | None = None) -> PrewarmReport:
        """:meth:`prewarm_predictions` for sync code: runs it to the end and returns its report. (It runs an
        event loop of its own; inside a running event loop, await ``prewarm_predictions`` instead.)"""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.prewarm_predictions(prediction, selection_fn, min_confidence, ttl,
                                                        tools_hash=tools_hash, key_config=key_config))
        raise InvalidArgumentError("PredictiveCacheWarmer.prewarm() blocks until done: inside a running event loop, "
                                   "await warmer.prewarm_predictions(...) instead")

    def wait_for_prewarms(self, timeout: float | None = None) -> bool:
        """Send the queued records (their sessions' automatic prewarms start), then wait for the background
        prewarms; False if some still run at ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.flush()
        for thread in list(self._threads):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _prewarm_in_background(self, predictions: list[tuple[Prediction, PrewarmPlan | None]]) -> None:
        for prediction, plan in predictions:
            if not self._slots.acquire(blocking=False):
                self._dropped(plan)
                continue
            thread = threading.Thread(target=self._prewarm_one, args=(prediction, plan), daemon=True,
                                      name="victor-rcache-prewarm")
            self._threads.add(thread)
            thread.start()

    def _prewarm_one(self, prediction: Prediction, plan: PrewarmPlan | None) -> None:
        try:
            asyncio.run(self._prewarm_planned(prediction, plan))
        finally:
            self._threads.discard(threading.current_thread())
            self._slots.release()

    async def _claim(self, keys: list[Any], ttl: float | None) -> list[Claim | Prewarmed]:
        result: list[Claim | Prewarmed] = await asyncio.to_thread(self.cache._drive,
                                                                  self.cache._core.claim_prewarms(keys, ttl))
        return result

    async def _prewarm(self, step: Step[Prewarmed], loader: Callable[[], Any]) -> Prewarmed:
        result: Prewarmed = await asyncio.to_thread(self.cache._drive, step, loader)
        return result

    async def _report(self, outcomes: dict[str, int]) -> None:
        await asyncio.to_thread(self.cache._drive, self._core.report_prewarm(outcomes))

    async def _fleet_tools_hash(self) -> str | None:
        assert self.tool_selection is not None
        return await asyncio.to_thread(self.tool_selection.stored_tools_hash)


class AsyncPredictiveCacheWarmer(_WarmerBase):
    """The coroutine version of :class:`PredictiveCacheWarmer`, for an :class:`AsyncMultiLevelCache` or an
    :class:`~victor_rcache.AsyncToolSelectionCache`. With ``prewarm=``, the background prewarms run as
    tasks on the event loop that last recorded a query (at most ``prewarm_concurrency`` at once)."""

    _asynchronous = True
    cache: AsyncMultiLevelCache
    tool_selection: AsyncToolSelectionCache | None

    def __init__(self, cache: AsyncMultiLevelCache | AsyncToolSelectionCache, max_patterns: int = 500,
                 ngram_size: int = 3, *, config: WarmerConfig | None = None, prewarm: Prewarm = None,
                 **settings: Any) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: set[Future[None]] = set()  # background prewarms on self._loop
        super().__init__(cache, max_patterns, ngram_size, config, prewarm, settings)

    async def record_query(self, query: str | bytes, tools: Iterable[Any] | None = None,
                           session: str | bytes | None = None, *, tools_hash: str | None = None) -> None:
        if self._record_now(query, tools, session, tools_hash):
            self._loop = asyncio.get_running_loop()  # where background prewarms run
            return
        await self.cache._drive(self._core.record(query, tools, session, tools_hash))

    async def predict_next_queries(self, current_query: str | bytes, top_k: int = 5, min_confidence: float = 0.2,
                                   session: str | bytes | None = None, remember: bool = True) -> Prediction:
        found = self._predict_here(current_query, top_k, min_confidence, session, remember)
        if found is not None:
            return found
        result: Prediction = await self.cache._drive(self._core.predict(current_query, top_k, min_confidence,
                                                                        session, remember))
        return result

    async def flush(self) -> None:
        """:meth:`PredictiveCacheWarmer.flush` (in a thread)."""
        if self._sync is not None:
            await asyncio.to_thread(self._sync.flush)

    async def get_statistics(self) -> dict[str, Any]:
        await self.flush()
        result: dict[str, Any] = await self.cache._drive(self._core.statistics())
        return result

    async def clear_patterns(self) -> None:
        await self.cache._drive(self._core.clear())

    async def wait_for_prewarms(self, timeout: float | None = None) -> bool:
        """:meth:`PredictiveCacheWarmer.wait_for_prewarms`, for prewarms running on this event loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        await self.flush()
        running = [asyncio.wrap_future(f) for f in list(self._running)]
        if running:
            await asyncio.wait(running, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(not f.done() for f in self._running)

    def cancel_prewarms(self) -> None:
        """Cancel the background prewarms still running (a closing tool-selection cache's last step)."""
        for future in list(self._running):
            future.cancel()

    def _prewarm_in_background(self, predictions: list[tuple[Prediction, PrewarmPlan | None]]) -> None:
        loop = self._loop
        for prediction, plan in predictions:
            if len(self._running) >= self.config.prewarm_concurrency or loop is None:
                self._dropped(plan)
                continue
            try:
                future = asyncio.run_coroutine_threadsafe(self._prewarm_planned(prediction, plan), loop)
            except RuntimeError:  # the loop is closed
                self._dropped(plan)
                continue
            self._running.add(future)
            future.add_done_callback(self._running.discard)

    async def _claim(self, keys: list[Any], ttl: float | None) -> list[Claim | Prewarmed]:
        result: list[Claim | Prewarmed] = await self.cache._drive(self.cache._core.claim_prewarms(keys, ttl))
        return result

    async def _prewarm(self, step: Step[Prewarmed], loader: Callable[[], Any]) -> Prewarmed:
        result: Prewarmed = await self.cache._drive(step, loader)
        return result

    async def _report(self, outcomes: dict[str, int]) -> None:
        await self.cache._drive(self._core.report_prewarm(outcomes))

    async def _fleet_tools_hash(self) -> str | None:
        assert self.tool_selection is not None
        return await self.tool_selection.stored_tools_hash()
