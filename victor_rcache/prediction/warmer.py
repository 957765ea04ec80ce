"""PredictiveCacheWarmer and AsyncPredictiveCacheWarmer: the prediction model's two front ends.

They hold no logic of their own: the model's steps (model.py, lua/record.lua, predict.lua) and
the tiers' prewarm step run through the cache's front end, sync or async; only how a step is driven
differs. ``prewarm_predictions`` is a coroutine in both (as in the in-process design it replaces):
the sync warmer runs each prewarm in a worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from ..aio import AsyncMultiLevelCache
from ..cache import MultiLevelCache
from ..errors import CacheError, ConfigurationError, InvalidArgumentError
from ..tiers import Claim, Prewarmed, Step
from .background import ModelSync
from .model import Prediction, PredictionCore, WarmerConfig

SelectionFn = Callable[[Any], Any]  # query -> result (or an awaitable of it)
PREWARM_SLOTS = 2  # background prewarms a sync warmer runs at once; predictions beyond are dropped (counted)
log = logging.getLogger("victor_rcache.prediction")


@dataclass(frozen=True)
class PrewarmReport:
    """What one ``prewarm_predictions`` call did, per predicted query above the threshold."""

    completed: int = 0  # computed and stored by this call
    cached: int = 0  # already in the cache
    busy: int = 0  # another worker was computing it
    refused: int = 0  # written or deleted by someone else meanwhile: the fill was dropped
    failed: int = 0  # the selection raised or timed out, or Redis failed
    below_threshold: int = 0  # confidence under prewarm_min_confidence: not considered
    over_budget: int = 0  # not computed: prewarm_budget was spent (see WarmerConfig.prewarm_budget)

    @property
    def skipped(self) -> int:
        return self.cached + self.busy + self.refused


def _selection_loader(selection_fn: SelectionFn, query: Any, timeout: float) -> Callable[[], Any]:
    """A loader (awaitable, run by either front end) calling ``selection_fn(query)`` within ``timeout``.

    A plain function runs in a worker thread: on timeout it is abandoned (it finishes in the
    background and its result is dropped); a coroutine function is cancelled.
    """
    async def run() -> Any:
        if inspect.iscoroutinefunction(selection_fn):
            result = await asyncio.wait_for(selection_fn(query), timeout)
        else:
            result = await asyncio.wait_for(asyncio.wrap_future(_in_daemon_thread(selection_fn, query)), timeout)
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, timeout)
        return result

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
    def __init__(self, cache: Any, max_patterns: int, ngram_size: int, config: WarmerConfig | None,
                 prewarm: SelectionFn | None, settings: dict[str, Any]) -> None:
        try:
            base = config or WarmerConfig()
            self.config = replace(base, max_patterns=max_patterns if config is None else base.max_patterns,
                                  ngram_size=ngram_size if config is None else base.ngram_size, **settings)
        except TypeError as exc:
            raise ConfigurationError(f"{exc}; see WarmerConfig for the settings a warmer takes") from None
        if prewarm is not None and not callable(prewarm):
            raise ConfigurationError("prewarm= must be the selection function (query -> result, sync or async) "
                                     "that computes a predicted query's result")
        if prewarm is not None and not self.config.background:
            raise ConfigurationError("prewarm= needs background=True (predictions are made after each round of "
                                     "records); with background=False call prewarm_predictions yourself")
        self.cache = cache
        self._core = PredictionCore(cache._core, self.config)
        self._select = prewarm
        self._sync: ModelSync | None = None
        if self.config.background:
            self._sync = ModelSync(self._core, cache._background_io.drive)
            if prewarm is not None:
                self._sync.on_predictions = self._prewarm_in_background
            cache._core.companions.append(self._sync.start())

    def _prewarm_in_background(self, predictions: list[Prediction]) -> None:
        raise NotImplementedError

    def _record_now(self, query: str | bytes, tools: Iterable[Any] | None, session: str | bytes | None) -> bool:
        """Queue a record (background mode): True; or False, and the caller sends it in a round trip."""
        if self._sync is None:
            return False
        self._sync.record(*self._core.record_args(query, tools, session))
        return True

    def _predict_here(self, current_query: str | bytes, top_k: int, min_confidence: float,
                      session: str | bytes | None, remember: bool) -> Prediction | None:
        """A prediction from the local view (background mode), or None: the caller asks Redis."""
        if self._sync is None:
            return None
        cur, s = self._core.predict_args(current_query, top_k, min_confidence, session)
        found = self._sync.predict(cur, top_k, min_confidence, s, remember)
        return dataclasses.replace(found, current_query=current_query, session=session)

    async def _prewarm(self, step: Step[Prewarmed], loader: Callable[[], Any]) -> Prewarmed:
        raise NotImplementedError

    async def _report(self, outcomes: dict[str, int]) -> None:
        raise NotImplementedError

    async def _claim(self, keys: list[Any], ttl: float | None) -> list[Claim | Prewarmed]:
        raise NotImplementedError

    async def prewarm_predictions(self, prediction: Prediction, selection_fn: SelectionFn,
                                  min_confidence: float | None = None, ttl: float | None = None) -> PrewarmReport:
        """Compute and store the predicted queries' results before anyone asks, once per fleet.

        Each query at or above ``min_confidence`` (default ``prewarm_min_confidence``) is looked up first,
        all in one round trip that also takes the fill lease of what is missing: what any tier holds, or
        another worker is computing, is skipped. What is left is computed with ``selection_fn(query)``
        (sync or async; at most ``prewarm_concurrency`` at once, each within ``prewarm_timeout``) and stored
        under ``key_fn(query)``, the key a real request uses. Exceptions of ``selection_fn`` are counted
        (``failed``), never raised. (Automatic prewarming, ``prewarm=``, also keeps to ``prewarm_budget``.)
        """
        return await self._prewarm_ranked(prediction, selection_fn, min_confidence, ttl, budgeted=False)

    async def _prewarm_ranked(self, prediction: Prediction, selection_fn: SelectionFn, min_confidence: float | None,
                              ttl: float | None, budgeted: bool) -> PrewarmReport:
        if not isinstance(prediction, Prediction):
            raise InvalidArgumentError(f"prediction must be what predict_next_queries returned, not "
                                       f"{type(prediction).__name__}")
        if not callable(selection_fn):
            raise InvalidArgumentError("selection_fn must be a function of the query (sync or async)")
        c = self.config
        threshold = c.prewarm_min_confidence if min_confidence is None else min_confidence
        key_fn = c.key_fn or (lambda q: q)
        ranked = sorted((pair for pair in zip(prediction.queries, prediction.confidences, strict=True)
                         if pair[1] >= threshold), key=lambda pair: -pair[1])
        outcomes = {k: 0 for k in ("completed", "cached", "busy", "refused", "failed", "over_budget")}
        planned: list[tuple[Any, Any]] = []
        for query, _ in ranked:
            try:
                key = key_fn(query)
            except CacheError:
                outcomes["failed"] += 1
                continue
            if not budgeted or self._core.budget.reserve():
                planned.append((query, key))
            else:
                outcomes["over_budget"] += 1
        try:
            claims = await self._claim([key for _, key in planned], ttl or c.prewarm_ttl) if planned else []
        except CacheError:  # a bad key from key_fn, or Redis failing a fail-closed cache
            claims = ["failed"] * len(planned)
        gate = asyncio.Semaphore(c.prewarm_concurrency)

        async def one(query: Any, claim: Claim) -> Prewarmed:
            async with gate:
                # A selection may not outlive its fill lease, or another worker would compute it again.
                loader = _selection_loader(selection_fn, query, min(c.prewarm_timeout, self.cache.config.lease_ttl))
                try:
                    return await self._prewarm(self.cache._core.fill_prewarm(claim), loader)
                except CacheError:  # Redis failing a fail-closed cache
                    return "failed"

        work = []
        for (query, _), claim in zip(planned, claims, strict=True):
            if isinstance(claim, str):
                if budgeted:
                    self._core.budget.refund()  # nothing computed
                outcomes[claim] += 1
            else:
                work.append(one(query, claim))
        for outcome in await asyncio.gather(*work):
            outcomes[outcome] += 1
        await self._report(outcomes)
        return PrewarmReport(**outcomes, below_threshold=len(prediction.queries) - len(ranked))


class PredictiveCacheWarmer(_WarmerBase):
    """Learns which query a session asks next from the whole fleet's traffic, and prewarms it.

    ``PredictiveCacheWarmer(cache, max_patterns=500, ngram_size=3, prewarm=None, **settings)``; the
    settings are described in :class:`~victor_rcache.prediction.model.WarmerConfig`. With
    ``prewarm=selection_fn``, every recorded query's session is predicted after the next background
    round and what is predicted and missing is computed in a background thread (at most
    ``PREWARM_SLOTS`` at once): a caller only records.
    """

    cache: MultiLevelCache

    def __init__(self, cache: MultiLevelCache, max_patterns: int = 500, ngram_size: int = 3, *,
                 config: WarmerConfig | None = None, prewarm: SelectionFn | None = None, **settings: Any) -> None:
        if not isinstance(cache, MultiLevelCache):
            raise ConfigurationError(f"cache must be a MultiLevelCache, not {type(cache).__name__}; use "
                                     "AsyncPredictiveCacheWarmer with an AsyncMultiLevelCache")
        self._slots = threading.BoundedSemaphore(PREWARM_SLOTS)
        super().__init__(cache, max_patterns, ngram_size, config, prewarm, settings)

    def record_query(self, query: str | bytes, tools: Iterable[Any] | None = None,
                     session: str | bytes | None = None) -> None:
        """Learn that ``query`` (which used ``tools``) came next in ``session``: queued and sent by the
        model thread (``background=False``: one round trip, here)."""
        if not self._record_now(query, tools, session):
            self.cache._drive(self._core.record(query, tools, session))

    def predict_next_queries(self, current_query: str | bytes, top_k: int = 5, min_confidence: float = 0.2,
                             session: str | bytes | None = None, remember: bool = True) -> Prediction:
        """The likeliest next queries after ``current_query`` in ``session``: scored from this process's
        view of the model, never waiting (``background=False``: one round trip, to the model as it is).

        The prediction is remembered for the session, so its next query counts for the accuracy;
        ``remember=False`` only looks (for tools like the CLI's ``predict``)."""
        found = self._predict_here(current_query, top_k, min_confidence, session, remember)
        if found is not None:
            return found
        return self.cache._drive(self._core.predict(current_query, top_k, min_confidence, session, remember))

    def flush(self) -> None:
        """Send the queued records and read the sets the view wants, now (background mode; tests, tools)."""
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

    def prewarm(self, prediction: Prediction, selection_fn: SelectionFn, min_confidence: float | None = None,
                ttl: float | None = None) -> PrewarmReport:
        """:meth:`prewarm_predictions` for sync code: runs it to the end and returns its report. (It runs an
        event loop of its own; inside a running event loop, await ``prewarm_predictions`` instead.)"""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.prewarm_predictions(prediction, selection_fn, min_confidence, ttl))
        raise InvalidArgumentError("PredictiveCacheWarmer.prewarm() blocks until done: inside a running event loop, "
                                   "await warmer.prewarm_predictions(...) instead")

    def _prewarm_in_background(self, predictions: list[Prediction]) -> None:
        select = self._select
        assert select is not None
        for prediction in predictions:
            if not self._slots.acquire(blocking=False):
                self._core.counters.add(prewarm_dropped=1)  # every slot busy: this prediction is not prewarmed
                continue
            threading.Thread(target=self._prewarm_one, args=(prediction, select), daemon=True,
                             name="victor-rcache-prewarm").start()

    def _prewarm_one(self, prediction: Prediction, select: SelectionFn) -> None:
        try:
            asyncio.run(self._prewarm_ranked(prediction, select, None, None, budgeted=True))
        except Exception:  # a background prewarm must never take anything down
            self._core.counters.add(prewarm_failed=1)
            log.exception("prewarming after %r failed", prediction.current_query)
        finally:
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


class AsyncPredictiveCacheWarmer(_WarmerBase):
    """The coroutine version of :class:`PredictiveCacheWarmer`, for an :class:`AsyncMultiLevelCache`.

    With ``prewarm=selection_fn``, the background prewarms run as tasks on the event loop that last
    recorded a query (at most ``prewarm_concurrency`` at once)."""

    cache: AsyncMultiLevelCache

    def __init__(self, cache: AsyncMultiLevelCache, max_patterns: int = 500, ngram_size: int = 3, *,
                 config: WarmerConfig | None = None, prewarm: SelectionFn | None = None, **settings: Any) -> None:
        if not isinstance(cache, AsyncMultiLevelCache):
            raise ConfigurationError(f"cache must be an AsyncMultiLevelCache, not {type(cache).__name__}; use "
                                     "PredictiveCacheWarmer with a MultiLevelCache")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = 0
        self._running_lock = threading.Lock()
        super().__init__(cache, max_patterns, ngram_size, config, prewarm, settings)

    async def record_query(self, query: str | bytes, tools: Iterable[Any] | None = None,
                           session: str | bytes | None = None) -> None:
        if self._record_now(query, tools, session):
            self._loop = asyncio.get_running_loop()  # where background prewarms run
            return
        await self.cache._drive(self._core.record(query, tools, session))

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

    def _prewarm_in_background(self, predictions: list[Prediction]) -> None:
        loop = self._loop
        for prediction in predictions:
            with self._running_lock:
                full = self._running >= self.config.prewarm_concurrency
                if not full:
                    self._running += 1
            if full or loop is None or loop.is_closed():
                self._core.counters.add(prewarm_dropped=1)
                if not full:
                    self._done_one()
                continue
            try:
                asyncio.run_coroutine_threadsafe(self._prewarm_one(prediction), loop)
            except RuntimeError:  # the loop closed meanwhile
                self._core.counters.add(prewarm_dropped=1)
                self._done_one()

    def _done_one(self) -> None:
        with self._running_lock:
            self._running -= 1

    async def _prewarm_one(self, prediction: Prediction) -> None:
        select = self._select
        assert select is not None
        try:
            await self._prewarm_ranked(prediction, select, None, None, budgeted=True)
        except Exception:  # a background prewarm must never take anything down
            self._core.counters.add(prewarm_failed=1)
            log.exception("prewarming after %r failed", prediction.current_query)
        finally:
            self._done_one()

    async def _claim(self, keys: list[Any], ttl: float | None) -> list[Claim | Prewarmed]:
        result: list[Claim | Prewarmed] = await self.cache._drive(self.cache._core.claim_prewarms(keys, ttl))
        return result

    async def _prewarm(self, step: Step[Prewarmed], loader: Callable[[], Any]) -> Prewarmed:
        result: Prewarmed = await self.cache._drive(step, loader)
        return result

    async def _report(self, outcomes: dict[str, int]) -> None:
        await self.cache._drive(self._core.report_prewarm(outcomes))
