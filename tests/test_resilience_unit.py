"""The circuit breaker's state machine and the retry classification (pure logic, fake clock)."""

from __future__ import annotations

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

from victor_rcache.resilience import CircuitBreaker, CircuitOpenError, is_transient, raise_transient

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
