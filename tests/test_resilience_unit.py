"""The circuit breaker's state machine, the retry classification and the retry rules (pure logic, fake clock).

The rules are run as the front ends run them: a plain first attempt, then tenacity's ``Retrying`` or
``AsyncRetrying`` (every rule is checked through both), on a fake clock with fake sleeps that advance it; an
attempt "takes" time by advancing the clock. No Redis: the attempts are scripted errors.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import pytest
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    NoPermissionError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from victor_rcache import resilience
from victor_rcache.config import CacheConfig
from victor_rcache.connection import IO_ERRORS
from victor_rcache.resilience import (
    RETRY_ATTEMPTS,
    RETRY_BACKOFF,
    RETRY_BACKOFF_MAX,
    RETRY_WINDOW,
    CircuitBreaker,
    CircuitOpenError,
    Resilience,
    is_transient,
    raise_transient,
)

from .helpers import FakeClock


def test_the_circuit_opens_after_threshold_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=1.0, clock=FakeClock())
    for _ in range(2):
        breaker.failure()
    breaker.success()  # resets the count: failures must be consecutive
    for _ in range(2):
        breaker.failure()
        assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert breaker.snapshot()["rejected_calls"] == 1


def test_after_the_cooldown_one_probe_decides() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=2.0, clock=clock)
    breaker.failure()
    clock.advance(1.999)
    assert not breaker.allow()
    clock.advance(0.001)
    assert breaker.allow()  # the probe
    assert breaker.state == "half_open"
    assert not breaker.allow()  # only one probe at a time
    breaker.failure()  # the probe failed: open again, for a full cooldown
    assert breaker.state == "open"
    assert breaker.snapshot()["opens"] == 2
    clock.advance(2.0)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(5))


@pytest.mark.parametrize(("error", "transient"), [
    (RedisConnectionError("connection reset"), True),
    (BusyLoadingError("LOADING"), True),
    (ReadOnlyError("READONLY"), True),
    (TryAgainError("TRYAGAIN"), True),
    (ClusterDownError("CLUSTERDOWN"), True),
    (RedisTimeoutError("timed out"), False),  # the deadline is spent already
    (AuthenticationError("WRONGPASS"), False),
    (NoPermissionError("NOPERM"), False),
    (ResponseError("WRONGTYPE"), False),
    (NoScriptError("NOSCRIPT"), False),  # handled by reloading, not by retrying
    (CircuitOpenError("open"), False),
])
def test_only_fast_errors_that_may_succeed_are_retried(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


def test_a_transient_reply_in_a_pipeline_makes_the_batch_retry() -> None:
    replies = [1, ResponseError("WRONGTYPE"), 3]
    assert raise_transient(replies) is replies  # a permanent error stays in place for the core
    with pytest.raises(TryAgainError):
        raise_transient([1, TryAgainError("TRYAGAIN")])


# ------------------------------------------------------------------ the retry rules, run by tenacity

# One attempt of a scripted batch: the seconds it takes on the fake clock, then its error (None: it succeeds).
Attempt = tuple[float, BaseException | None]


def reset() -> RedisConnectionError:
    return RedisConnectionError("connection reset")  # transient


@dataclass
class Run:
    """What sending one scripted batch did."""

    outcome: object  # "replies", or the exception the batch ended with
    attempts: int  # how many attempts were made (reached "Redis")
    pauses: list[float]  # the waits tenacity slept, in order
    retries: int  # as counted by Resilience


def send(script: list[Attempt], asynchronous: bool, **settings: Any) -> Run:
    """Send a batch whose attempts go as ``script`` says, the way the front ends' ``_send`` does (a plain first
    attempt, tenacity's ``Retrying``/``AsyncRetrying`` once it has failed), on a fake clock and fake sleeps."""
    clock, pauses, made = FakeClock(), [], 0

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        clock.advance(seconds)

    async def async_sleep(seconds: float) -> None:
        sleep(seconds)

    policy = Resilience(CacheConfig(redis_url="redis://127.0.0.1:1/0", **settings), name="test", clock=clock,
                        sleep=sleep, async_sleep=async_sleep)

    def attempt() -> str:
        nonlocal made
        seconds, error = script[made]
        made += 1
        clock.advance(seconds)
        if error is not None:
            raise error
        return "replies"

    def sync_send() -> str:
        started = policy.clock()
        try:
            return attempt()
        except IO_ERRORS as first:
            for retry in policy.retrying(first, started):
                with retry:
                    replies = attempt()
            return replies

    async def async_send() -> str:
        started = policy.clock()
        try:
            return attempt()
        except IO_ERRORS as first:
            async for retry in policy.async_retrying(first, started):
                with retry:
                    await asyncio.sleep(0)  # a real suspension inside the attempt, as the I/O has
                    replies = attempt()
            return replies

    try:
        outcome: object = asyncio.run(async_send()) if asynchronous else sync_send()
    except BaseException as exc:  # what the batch ended with, interruptions included, is the result under test
        outcome = exc
    return Run(outcome, made, pauses, policy.retries)


front_ends = pytest.mark.parametrize("asynchronous", [False, True], ids=["Retrying", "AsyncRetrying"])


@pytest.fixture
def top_of_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every jittered wait is the top of its range (tenacity draws it with ``random.uniform``)."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


@front_ends
def test_a_transient_error_is_retried_until_an_attempt_succeeds(asynchronous: bool) -> None:
    run = send([(0.0, reset()), (0.0, TryAgainError("TRYAGAIN")), (0.0, None)], asynchronous)
    assert run.outcome == "replies"
    assert run.attempts == 3
    assert len(run.pauses) == run.retries == 2, "every retry is counted, after one wait"


@front_ends
def test_at_most_retry_attempts_attempts_in_all(asynchronous: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resilience, "RETRY_WINDOW", 10.0)  # the window (socket_timeout then) is not what stops
    errors = [RedisConnectionError(f"reset {n}") for n in range(RETRY_ATTEMPTS + 1)]
    run = send([(0.0, error) for error in errors], asynchronous)
    assert run.attempts == RETRY_ATTEMPTS
    assert run.outcome is errors[RETRY_ATTEMPTS - 1], "the last error is raised as it is (no RetryError)"
    assert run.retries == len(run.pauses) == RETRY_ATTEMPTS - 1


@front_ends
@pytest.mark.usefixtures("top_of_the_range")
def test_no_retry_begins_after_the_window_counted_from_the_calls_start(asynchronous: bool) -> None:
    # The first attempt took so long that the retry would begin after RETRY_WINDOW from the call's start,
    # although tenacity's loop (begun after that attempt) is only starting.
    first = reset()
    late = send([(RETRY_WINDOW - RETRY_BACKOFF / 2, first), (0.0, None)], asynchronous)
    assert (late.outcome, late.attempts, late.pauses, late.retries) == (first, 1, [], 0)
    # Early enough, with the same wait: retried.
    early = send([(RETRY_WINDOW - 2 * RETRY_BACKOFF, reset()), (0.0, None)], asynchronous)
    assert (early.outcome, early.attempts, early.pauses) == ("replies", 2, [RETRY_BACKOFF])
    # A slow retry: the next would begin after the window.
    slow = send([(0.0, reset()), (RETRY_WINDOW, TryAgainError("TRYAGAIN")), (0.0, None)], asynchronous)
    assert (type(slow.outcome), slow.attempts, slow.retries) == (TryAgainError, 2, 1)
    # A socket_timeout shorter than RETRY_WINDOW is the window then (RETRY_WINDOW would let this retry begin).
    short = RETRY_WINDOW / 4
    assert RETRY_BACKOFF < short < RETRY_WINDOW - 2 * RETRY_BACKOFF
    first = reset()
    cut = send([(short - RETRY_BACKOFF / 2, first), (0.0, None)], asynchronous, socket_timeout=short)
    assert (cut.outcome, cut.attempts, cut.retries) == (first, 1, 0)


NEVER_RETRIED = [RedisTimeoutError("timed out"), ResponseError("WRONGTYPE"), NoScriptError("NOSCRIPT"),
                 AuthenticationError("WRONGPASS"), NoPermissionError("NOPERM"), CircuitOpenError("open")]


@front_ends
@pytest.mark.parametrize("error", NEVER_RETRIED, ids=lambda error: type(error).__name__)
def test_what_is_not_transient_is_never_retried(asynchronous: bool, error: Exception) -> None:
    first = send([(0.0, error), (0.0, None)], asynchronous)
    assert (first.outcome, first.attempts, first.pauses, first.retries) == (error, 1, [], 0)
    # Nor when a retry fails with it.
    later = send([(0.0, reset()), (0.0, error), (0.0, None)], asynchronous)
    assert (later.outcome, later.attempts, later.retries) == (error, 2, 1)


@front_ends
def test_an_interruption_in_a_retry_is_not_retried(asynchronous: bool) -> None:
    interruption = asyncio.CancelledError() if asynchronous else KeyboardInterrupt()
    run = send([(0.0, reset()), (0.0, interruption), (0.0, None)], asynchronous)
    assert isinstance(run.outcome, type(interruption))
    assert (run.attempts, run.retries) == (2, 1)


@front_ends
def test_the_jittered_wait_is_within_its_exponential_bound(asynchronous: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = 8  # enough retries to reach RETRY_BACKOFF_MAX
    assert RETRY_BACKOFF * 2 ** (attempts - 2) > RETRY_BACKOFF_MAX
    monkeypatch.setattr(resilience, "RETRY_ATTEMPTS", attempts)
    monkeypatch.setattr(resilience, "RETRY_WINDOW", 1000.0)
    seeded, draws = random.Random(20240611), []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return seeded.uniform(low, high)

    monkeypatch.setattr(random, "uniform", uniform)
    pauses: list[list[float]] = []
    for _ in range(50):
        draws.clear()
        run = send([(0.0, reset()) for _ in range(attempts - 1)] + [(0.0, None)], asynchronous,
                   socket_timeout=1000.0)
        assert run.outcome == "replies"
        bounds = [min(RETRY_BACKOFF * 2 ** (n - 1), RETRY_BACKOFF_MAX) for n in range(1, attempts)]
        assert draws == [(0, bound) for bound in bounds], "retry n waits up to RETRY_BACKOFF * 2 ** (n - 1), capped"
        assert all(0 <= pause <= bound for pause, bound in zip(run.pauses, bounds, strict=True)), run.pauses
        pauses.append(run.pauses)
    assert len({pause for run_pauses in pauses for pause in run_pauses}) > 100, "the wait is drawn (full jitter)"
