"""The circuit breaker's state machine, the retry classification and the retry policy (pure logic)."""

from __future__ import annotations

import time

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

from victor_rcache.config import CacheConfig
from victor_rcache.resilience import (
    RETRY_ATTEMPTS,
    RETRY_BACKOFF,
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


def _resilience(**settings: float) -> Resilience:
    return Resilience(CacheConfig(redis_url="redis://127.0.0.1:1/0", **settings), name="test")


def test_a_transient_error_is_retried_after_a_jittered_exponential_pause() -> None:
    policy = _resilience()
    for attempt in range(1, RETRY_ATTEMPTS):
        pauses = [policy.retry_pause(RedisConnectionError("reset"), attempt, time.monotonic()) for _ in range(200)]
        assert all(p is not None and 0 <= p <= RETRY_BACKOFF * 2 ** (attempt - 1) for p in pauses), pauses
        assert len(set(pauses)) > 1, "the pause is drawn at random (full jitter)"
    assert policy.retries == 200 * (RETRY_ATTEMPTS - 1), "every retry is counted"


@pytest.mark.parametrize("error", [ResponseError("WRONGTYPE"), NoScriptError("NOSCRIPT"),
                                   RedisTimeoutError("timed out"), KeyboardInterrupt()])
def test_what_is_not_transient_is_never_retried(error: BaseException) -> None:
    policy = _resilience()
    assert policy.retry_pause(error, 1, time.monotonic()) is None
    assert policy.retries == 0


def test_no_attempt_after_the_last_one_nor_after_the_window() -> None:
    policy = _resilience()
    reset = RedisConnectionError("reset")
    assert policy.retry_pause(reset, RETRY_ATTEMPTS, time.monotonic()) is None
    # The next attempt would begin after RETRY_WINDOW from the call's start (whatever the pause).
    assert policy.retry_pause(reset, 1, time.monotonic() - RETRY_WINDOW) is None
    # A socket_timeout shorter than RETRY_WINDOW is the window then.
    short = _resilience(socket_timeout=RETRY_WINDOW / 4)
    assert short.retry_pause(reset, 1, time.monotonic() - RETRY_WINDOW / 4) is None
    assert policy.retries == short.retries == 0
