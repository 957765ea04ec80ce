"""Resilience: bounded retries of transient Redis errors, and a circuit breaker.

Every batch a front end sends goes through :class:`Resilience`:

* **Circuit breaker.** After ``breaker_threshold`` consecutive failed batches, Redis is not
  contacted for ``breaker_cooldown`` seconds: calls fail at once (fail-open: an L1 answer or a
  miss, in microseconds) instead of each paying a timeout. Then a single probe decides: success
  closes the circuit, failure opens it again. Transitions are logged and counted in metrics.
* **Retries.** Errors that can succeed a moment later and fail fast (connection refused or reset,
  LOADING, READONLY during a failover, TRYAGAIN, CLUSTERDOWN) are retried with jittered
  exponential backoff, at most ``RETRY_ATTEMPTS`` times, and only within the first
  ``RETRY_WINDOW`` of the call: an attempt may take up to ``socket_timeout``, so a call that
  retries still returns within ``socket_timeout + RETRY_WINDOW``. A timeout is not retried: it
  has used the deadline up. Errors that cannot succeed (WRONGTYPE, script errors, authentication,
  missing ACL permissions) are never retried.

The decisions are made here (:meth:`Resilience.retry_pause`, :meth:`Resilience.settle`); the sync and
async front ends only do the I/O and the waiting, in a plain loop (a batch that succeeds at once costs
one clock reading on top of its round trip).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

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


class Resilience:
    """The breaker and the retry policy for one cache's Redis calls."""

    def __init__(self, config: CacheConfig, name: str) -> None:
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown, name=name,
                                      namespace=config.namespace)
        self.deadline = config.socket_timeout
        self.retries = 0

    def retry_pause(self, exc: BaseException, attempt: int, started: float) -> float | None:
        """After attempt number ``attempt`` (from 1) of a batch raised ``exc``: the seconds to wait before
        the next attempt, or None if there is none (the front end then raises ``exc`` again).

        ``started`` is ``time.monotonic()`` when the batch's first attempt began. Only a transient error
        is retried, at most ``RETRY_ATTEMPTS`` attempts in all, and only if the next attempt begins
        within ``RETRY_WINDOW`` (or ``socket_timeout``, if shorter) of ``started``. The wait before
        retry n is drawn uniformly from [0, min(RETRY_BACKOFF * 2 ** (n - 1), RETRY_BACKOFF_MAX)].
        """
        if attempt >= RETRY_ATTEMPTS or not is_transient(exc):
            return None
        pause = random.uniform(0, min(RETRY_BACKOFF * 2 ** (attempt - 1), RETRY_BACKOFF_MAX))
        if time.monotonic() - started + pause >= min(self.deadline, RETRY_WINDOW):
            return None
        self.retries += 1
        return pause

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
