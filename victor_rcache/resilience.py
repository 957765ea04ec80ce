"""Resilience: bounded retries of transient Redis errors, and a circuit breaker.

Every batch a front end sends goes through :class:`Resilience`:

* **Circuit breaker.** After ``breaker_threshold`` consecutive failed batches, Redis is not
  contacted for ``breaker_cooldown`` seconds: calls fail at once (fail-open: an L1 answer or a
  miss, in microseconds) instead of each paying a timeout. Then a single probe decides: success
  closes the circuit, failure opens it again. Transitions are logged and counted in metrics. A batch
  gives the breaker one verdict (:meth:`Resilience.settle`), whatever its retries; an interrupted one
  (cancelled, KeyboardInterrupt) gives none (:meth:`Resilience.abandon`).
* **Retries.** Errors that can succeed a moment later and fail fast (connection refused or reset,
  LOADING, READONLY during a failover, TRYAGAIN, CLUSTERDOWN) are retried with jittered
  exponential backoff, at most ``RETRY_ATTEMPTS`` attempts in all, and only if the retry begins
  within the first ``RETRY_WINDOW`` of the call: an attempt may take up to ``socket_timeout``, so a
  call that retries still returns within ``socket_timeout + RETRY_WINDOW``. A timeout is not retried:
  it has used the deadline up. Errors that cannot succeed (WRONGTYPE, script errors, authentication,
  missing ACL permissions, an open circuit) and interruptions are never retried.

The retries run on tenacity, engaged only once a batch's first attempt has failed: a batch that succeeds
at once is one plain ``try`` (and one clock reading) around its round trip, and builds no tenacity object.
The rules are tenacity conditions defined once here (:meth:`Resilience.retry_rules`: ``stop``, ``retry``,
``wait``); :meth:`Resilience.retrying` runs them with tenacity's ``Retrying`` for the sync front end and
:meth:`Resilience.async_retrying` with ``AsyncRetrying`` for the async one, which only do the I/O inside
each attempt. The clock the window is measured on and the sleeps are injectable (unit tests use fake ones).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Literal, TypedDict, TypeVar

from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    AttemptManager,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from . import forksafe
from .config import CacheConfig

log = logging.getLogger("victor_rcache")

RETRY_ATTEMPTS = 3
RETRY_WINDOW = 0.04  # seconds from a call's start in which a retry may begin
RETRY_BACKOFF = 0.005  # seconds: retry n waits a random time up to RETRY_BACKOFF * 2 ** (n - 1) ("full jitter"),
RETRY_BACKOFF_MAX = 0.1  # and never more than this
T = TypeVar("T")
State = Literal["closed", "open", "half_open"]


class CircuitOpenError(RedisConnectionError):
    """Redis was not contacted: the circuit breaker is open after repeated failures."""


def is_transient(exc: BaseException) -> bool:
    """An error that fails fast and may succeed on a retry a few milliseconds later."""
    if isinstance(exc, (AuthenticationError, RedisTimeoutError, CircuitOpenError)):
        return False
    return isinstance(exc, (RedisConnectionError, BusyLoadingError, ReadOnlyError, TryAgainError,
                            ClusterDownError))


class CircuitBreaker:
    """Closed -> (threshold consecutive failures) -> open -> (cooldown) -> one half-open probe."""

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic,
                 name: str = "redis", namespace: str | None = None) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.name = name
        self.namespace = namespace
        self.state: State = "closed"
        self.failures = 0  # consecutive
        self.opens = 0
        self.rejected = 0
        self._opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()
        forksafe.register(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._probing = False

    def allow(self) -> bool:
        """May a call contact Redis now? (In half-open state, only the one probe may.)"""
        state = self.state  # read without the lock: a transition racing this read could as well come after it
        if state == "closed":  # the common case
            return True
        with self._lock:
            if self.state == "closed":
                return True
            if self.state == "open" and self.clock() - self._opened_at >= self.cooldown:
                self.state = "half_open"
                self._probing = False
            if self.state == "half_open" and not self._probing:
                self._probing = True
                return True
            self.rejected += 1
            return False

    def success(self) -> None:
        if self.state == "closed" and not self.failures:  # nothing to change (the common case): no lock
            return
        with self._lock:
            if self.state != "closed":
                log.warning("circuit to %s closed: Redis answered again", self.name,
                            extra=self._fields("breaker_closed", state="closed"))
            self.state, self.failures, self._probing = "closed", 0, False

    def abandon(self) -> None:
        """A call let in was interrupted before Redis answered: if it was the probe, let another probe."""
        with self._lock:
            self._probing = False

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            self._probing = False
            if self.state == "half_open" or (self.state == "closed" and self.failures >= self.threshold):
                if self.state == "closed":
                    log.warning("circuit to %s opened after %d consecutive failures; not contacting it for "
                                "%.1f s", self.name, self.failures, self.cooldown,
                                extra=self._fields("breaker_opened", state="open", failures=self.failures,
                                                   cooldown=self.cooldown))
                self.state = "open"
                self._opened_at = self.clock()
                self.opens += 1

    def _fields(self, event: str, **more: Any) -> dict[str, Any]:
        """The structured fields of a transition's log record (``extra=``)."""
        return {"event": event, "namespace": self.namespace, "redis_url": self.name, **more}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"state": self.state, "consecutive_failures": self.failures, "opens": self.opens,
                    "rejected_calls": self.rejected}


class StopOutsideWindow(stop_base):
    """tenacity stop condition: the next attempt would begin ``window`` seconds or more after ``started``.

    tenacity's own ``stop_before_delay`` counts from the first attempt *it* runs, on ``time.monotonic``; the
    retries start only after a batch's first attempt has failed, which may have taken a while, so this one
    counts from the call's start, on an injectable clock. It adds the wait tenacity has just drawn
    (``upcoming_sleep``: tenacity 8.3 and later draw the wait before they ask ``stop``; before, it was 0).
    """

    def __init__(self, started: float, window: float, clock: Callable[[], float]) -> None:
        self.started = started
        self.window = window
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.clock() - self.started + retry_state.upcoming_sleep >= self.window


class RetryRules(TypedDict):
    """Keyword arguments of tenacity's ``Retrying`` and ``AsyncRetrying`` alike."""

    stop: stop_base
    retry: retry_base
    wait: wait_base
    before_sleep: Callable[[RetryCallState], None]
    reraise: bool


class Resilience:
    """The breaker and the retry policy for one cache's Redis calls.

    ``clock`` (seconds) measures the retry window and the breaker's cool-down; ``sleep`` and ``async_sleep``
    wait between attempts of the sync and the async front end. Tests pass fake ones.
    """

    def __init__(self, config: CacheConfig, name: str, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown, clock=clock, name=name,
                                      namespace=config.namespace)
        self.deadline = config.socket_timeout
        self.clock = clock
        self.sleep = sleep
        self.async_sleep = async_sleep
        self.retries = 0

    def retry_rules(self, started: float) -> RetryRules:
        """tenacity's conditions for the retries of a batch whose first attempt began at ``started`` (read on
        :attr:`clock`): the one definition both front ends run.

        * ``retry``: only an error :func:`is_transient` accepts (not a timeout, nor an interruption);
        * ``stop``: after ``RETRY_ATTEMPTS`` attempts in all, or if the next attempt would begin ``RETRY_WINDOW``
          (or ``socket_timeout``, if shorter) or more after ``started``;
        * ``wait``: before retry n, a time drawn uniformly from [0, min(RETRY_BACKOFF * 2 ** (n - 1),
          RETRY_BACKOFF_MAX)] ("full jitter");

        each retry is counted, and when the rules give up the last error is raised as it is (not wrapped in
        tenacity's ``RetryError``).
        """
        window = min(self.deadline, RETRY_WINDOW)  # read per call: tests widen RETRY_WINDOW
        return {
            "stop": stop_after_attempt(RETRY_ATTEMPTS) | StopOutsideWindow(started, window, self.clock),
            "retry": retry_if_exception(is_transient),
            "wait": wait_random_exponential(multiplier=RETRY_BACKOFF, max=RETRY_BACKOFF_MAX),
            "before_sleep": self._count_retry,
            "reraise": True,
        }

    def _count_retry(self, _state: RetryCallState) -> None:
        self.retries += 1

    def retrying(self, first: BaseException, started: float) -> Iterator[AttemptManager]:
        """The retries of a batch whose first attempt, begun at ``started`` (on :attr:`clock`), raised ``first``;
        the sync front end does each one's I/O in ``with attempt:``. tenacity's ``Retrying`` sleeps between
        them with :attr:`sleep`; the loop ends after an attempt succeeds, or raises the last error.
        """
        attempts = iter(Retrying(sleep=self.sleep, **self.retry_rules(started)))
        # tenacity's attempt 1 is the one made already: the rules judge its error first, and count it.
        with next(attempts):
            raise first
        return attempts

    async def async_retrying(self, first: BaseException, started: float) -> AsyncIterator[AttemptManager]:
        """:meth:`retrying` for the async front end, with tenacity's ``AsyncRetrying`` and :attr:`async_sleep`."""
        attempts = aiter(AsyncRetrying(sleep=self.async_sleep, **self.retry_rules(started)))
        with await anext(attempts):  # attempt 1, made already (as in retrying)
            raise first
        while True:  # not ``async for``: that would begin tenacity's loop afresh, forgetting attempt 1
            try:
                attempt = await anext(attempts)
            except StopAsyncIteration:
                return
            yield attempt

    def refused(self) -> RedisError | None:
        """The error to answer with at once if the breaker keeps Redis off limits, else None."""
        if self.breaker.allow():
            return None
        return CircuitOpenError(f"circuit breaker open after {self.breaker.threshold} consecutive failures; "
                                f"Redis is tried again {self.breaker.cooldown:g} s after it opened")

    def settle(self, outcome: T) -> T:
        """Record a batch's outcome with the breaker and hand it on."""
        if isinstance(outcome, RedisError):
            self.breaker.failure()
        else:
            self.breaker.success()
        return outcome

    def abandon(self) -> None:
        """Record a batch that was interrupted (no verdict on Redis's health)."""
        self.breaker.abandon()

    def snapshot(self) -> dict[str, Any]:
        return {**self.breaker.snapshot(), "retries": self.retries}


def raise_transient(replies: list[Any]) -> list[Any]:
    """Raise the first transient error among a pipeline's replies (so the batch is retried)."""
    for reply in replies:
        if isinstance(reply, Exception) and is_transient(reply):
            raise reply
    return replies
