"""PredictiveCacheWarmer and AsyncPredictiveCacheWarmer: the prediction model's two front ends.

They hold no logic of their own: the model's steps (model.py, lua/record.lua, predict.lua) and
the tiers' prewarm step run through the cache's front end, sync or async; only how a step is driven
differs. ``prewarm_predictions`` is a coroutine in both (as in the in-process design it replaces):
the sync warmer runs each prewarm in a worker thread.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from ..aio import AsyncMultiLevelCache
from ..cache import MultiLevelCache
from ..errors import CacheError, ConfigurationError, InvalidArgumentError
from ..tiers import Prewarmed, Step
from .model import Prediction, PredictionCore, WarmerConfig

SelectionFn = Callable[[Any], Any]  # query -> result (or an awaitable of it)


@dataclass(frozen=True)
class PrewarmReport:
    """What one ``prewarm_predictions`` call did, per predicted query above the threshold."""

    completed: int = 0  # computed and stored by this call
    cached: int = 0  # already in the cache
    busy: int = 0  # another worker was computing it
    refused: int = 0  # written or deleted by someone else meanwhile: the fill was dropped
    failed: int = 0  # the selection raised or timed out, or Redis failed
    below_threshold: int = 0  # confidence under prewarm_min_confidence: not considered

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
                 settings: dict[str, Any]) -> None:
        try:
            base = config or WarmerConfig()
            self.config = replace(base, max_patterns=max_patterns if config is None else base.max_patterns,
                                  ngram_size=ngram_size if config is None else base.ngram_size, **settings)
        except TypeError as exc:
            raise ConfigurationError(f"{exc}; see WarmerConfig for the settings a warmer takes") from None
        self.cache = cache
        self._core = PredictionCore(cache._core, self.config)

    async def _prewarm(self, step: Step[Prewarmed], loader: Callable[[], Any]) -> Prewarmed:
        raise NotImplementedError

    async def _report(self, outcomes: dict[str, int]) -> None:
        raise NotImplementedError

    async def prewarm_predictions(self, prediction: Prediction, selection_fn: SelectionFn,
                                  min_confidence: float | None = None, ttl: float | None = None) -> PrewarmReport:
        """Compute and store the predicted queries' results before anyone asks, once per fleet.

        Each query at or above ``min_confidence`` (default ``prewarm_min_confidence``) that is not
        cached is computed with ``selection_fn(query)`` (sync or async; at most
        ``prewarm_concurrency`` at once, each within ``prewarm_timeout``) and stored under
        ``key_fn(query)``, the key a real request uses. A query another worker is computing is
        skipped. Exceptions of ``selection_fn`` are counted (``failed``), never raised.
        """
        if not isinstance(prediction, Prediction):
            raise InvalidArgumentError(f"prediction must be what predict_next_queries returned, not "
                                       f"{type(prediction).__name__}")
        if not callable(selection_fn):
            raise InvalidArgumentError("selection_fn must be a function of the query (sync or async)")
        c = self.config
        threshold = c.prewarm_min_confidence if min_confidence is None else min_confidence
        key_fn = c.key_fn or (lambda q: q)
        wanted = [q for q, conf in zip(prediction.queries, prediction.confidences, strict=True) if conf >= threshold]
        gate = asyncio.Semaphore(c.prewarm_concurrency)

        async def one(query: Any) -> Prewarmed:
            async with gate:
                # A selection may not outlive its fill lease, or another worker would compute it again.
                loader = _selection_loader(selection_fn, query, min(c.prewarm_timeout, self.cache.config.lease_ttl))
                try:
                    return await self._prewarm(self.cache._core.prewarm(key_fn(query), ttl or c.prewarm_ttl), loader)
                except CacheError:  # a bad key from key_fn, or Redis failing a fail-closed cache
                    return "failed"

        outcomes = {k: 0 for k in ("completed", "cached", "busy", "refused", "failed")}
        for outcome in await asyncio.gather(*(one(q) for q in wanted)):
            outcomes[outcome] += 1
        await self._report(outcomes)
        return PrewarmReport(**outcomes, below_threshold=len(prediction.queries) - len(wanted))


class PredictiveCacheWarmer(_WarmerBase):
    """Learns which query a session asks next from the whole fleet's traffic, and prewarms it.

    ``PredictiveCacheWarmer(cache, max_patterns=500, ngram_size=3, **settings)``; the settings are
    described in :class:`~victor_rcache.prediction.model.WarmerConfig`.
    """

    cache: MultiLevelCache

    def __init__(self, cache: MultiLevelCache, max_patterns: int = 500, ngram_size: int = 3, *,
                 config: WarmerConfig | None = None, **settings: Any) -> None:
        if not isinstance(cache, MultiLevelCache):
            raise ConfigurationError(f"cache must be a MultiLevelCache, not {type(cache).__name__}; use "
                                     "AsyncPredictiveCacheWarmer with an AsyncMultiLevelCache")
        super().__init__(cache, max_patterns, ngram_size, config, settings)

    def record_query(self, query: str | bytes, tools: Iterable[Any] | None = None,
                     session: str | bytes | None = None) -> None:
        """Learn that ``query`` (which used ``tools``) came next in ``session`` (one round trip)."""
        self.cache._drive(self._core.record(query, tools, session))

    def predict_next_queries(self, current_query: str | bytes, top_k: int = 5, min_confidence: float = 0.2,
                             session: str | bytes | None = None, remember: bool = True) -> Prediction:
        """The likeliest next queries after ``current_query`` in ``session`` (one round trip).

        The prediction is remembered for the session, so its next query counts for the accuracy;
        ``remember=False`` only looks (for tools like the CLI's ``predict``)."""
        return self.cache._drive(self._core.predict(current_query, top_k, min_confidence, session, remember))

    def get_statistics(self) -> dict[str, Any]:
        """Model size, prediction accuracy (fleet and process) and prewarming counts."""
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

    async def _prewarm(self, step: Step[Prewarmed], loader: Callable[[], Any]) -> Prewarmed:
        result: Prewarmed = await asyncio.to_thread(self.cache._drive, step, loader)
        return result

    async def _report(self, outcomes: dict[str, int]) -> None:
        await asyncio.to_thread(self.cache._drive, self._core.report_prewarm(outcomes))


class AsyncPredictiveCacheWarmer(_WarmerBase):
    """The coroutine version of :class:`PredictiveCacheWarmer`, for an :class:`AsyncMultiLevelCache`."""

    cache: AsyncMultiLevelCache

    def __init__(self, cache: AsyncMultiLevelCache, max_patterns: int = 500, ngram_size: int = 3, *,
                 config: WarmerConfig | None = None, **settings: Any) -> None:
        if not isinstance(cache, AsyncMultiLevelCache):
            raise ConfigurationError(f"cache must be an AsyncMultiLevelCache, not {type(cache).__name__}; use "
                                     "PredictiveCacheWarmer with a MultiLevelCache")
        super().__init__(cache, max_patterns, ngram_size, config, settings)

    async def record_query(self, query: str | bytes, tools: Iterable[Any] | None = None,
                           session: str | bytes | None = None) -> None:
        await self.cache._drive(self._core.record(query, tools, session))

    async def predict_next_queries(self, current_query: str | bytes, top_k: int = 5, min_confidence: float = 0.2,
                                   session: str | bytes | None = None, remember: bool = True) -> Prediction:
        result: Prediction = await self.cache._drive(self._core.predict(current_query, top_k, min_confidence,
                                                                        session, remember))
        return result

    async def get_statistics(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.cache._drive(self._core.statistics())
        return result

    async def clear_patterns(self) -> None:
        await self.cache._drive(self._core.clear())

    async def _prewarm(self, step: Step[Prewarmed], loader: Callable[[], Any]) -> Prewarmed:
        result: Prewarmed = await self.cache._drive(step, loader)
        return result

    async def _report(self, outcomes: dict[str, int]) -> None:
        await self.cache._drive(self._core.report_prewarm(outcomes))
