"""A batch of one command goes without a pipeline (connection.send_alone): it must behave as the pipeline did.

Against the real servers of both backends (on a cluster the call goes straight to the node serving its
slot, and back through the cluster client for what redis-py's cluster pipeline would hand it):

* an error Redis answers stands in place of the reply, as ``execute(raise_on_error=False)`` puts it,
  with the same type and text as in a pipeline, and is neither retried nor an outage for the breaker;
* NOSCRIPT after ``SCRIPT FLUSH`` is reloaded through the one-command path (no pipeline is built);
* a transient error (a script answers with READONLY, CLUSTERDOWN, TRYAGAIN or LOADING, the way a
  server does during a failover) is retried and the call succeeds; one that persists ends the batch
  after ``RETRY_ATTEMPTS`` attempts as one failure.

Sync and async front ends alike. Transient errors come from a real script whose first call answers
with the error (a counter key says how many attempts reached Redis). The retry window is widened to
``socket_timeout`` so that a slow machine cannot turn a retry into a give-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError

from victor_rcache import AsyncMultiLevelCache, MultiLevelCache, resilience
from victor_rcache.connection import goes_alone
from victor_rcache.scripts import needs_reload

from .helpers import Backend, Client, flush_scripts

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]

# Fails with the error named by ARGV[1] on its first call for KEYS[1], then answers the attempt count.
ONCE = """
if redis.call('INCR', KEYS[1]) == 1 then return redis.error_reply(ARGV[1] .. ' answered by a test script') end
return redis.call('GET', KEYS[1])
"""
ALWAYS = "redis.call('INCR', KEYS[1]); return redis.error_reply('READONLY answered by a test script')"
TRANSIENT = ["READONLY", "CLUSTERDOWN", "TRYAGAIN", "LOADING"]
# On a cluster, redis-py's cluster client itself sends these again (its pipeline hands them to it too).
RESENT_BY_THE_CLUSTER_CLIENT = {"TRYAGAIN", "LOADING"}


@pytest.fixture
def wide_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resilience, "RETRY_WINDOW", 10.0)  # the window is then socket_timeout (0.5 s)


def key_in(namespace: str, name: str) -> bytes:
    return f"{namespace}:{{lone}}:{name}".encode()


def health(cache: MultiLevelCache) -> dict[str, Any]:
    return cache._resilience.snapshot()


def test_an_error_reply_stands_in_place_as_in_a_pipeline(make_cache: Make, raw: Client, namespace: str) -> None:
    cache = make_cache()
    a_list = key_in(namespace, "a list")
    raw.rpush(a_list, b"x")
    wrong_type = ("EVAL", "return redis.call('INCR', KEYS[1])", 1, a_list)
    no_script = ("EVALSHA", "0" * 40, 1, a_list)
    before = health(cache)
    for command, kind in ((wrong_type, ResponseError), (no_script, NoScriptError)):
        assert goes_alone(cache.client, [command])
        assert not goes_alone(cache.client, [command, command])
        alone = cache._send([command])
        piped = cache._send([command, command])
        assert isinstance(alone, list), f"an answered error must not fail the batch: {alone!r}"
        assert isinstance(piped, list)
        [reply] = alone
        assert type(reply) is type(piped[0]) is type(piped[1]), (reply, piped)
        assert isinstance(reply, kind)
        assert str(reply) == str(piped[0])
    assert needs_reload(cache._send([no_script])[0])
    after = health(cache)
    assert after["retries"] == before["retries"], "an error Redis answered is not retried"
    assert after["consecutive_failures"] == 0, "an error Redis answered is not an outage"
    assert after["state"] == "closed"


def test_noscript_is_reloaded_through_the_one_command_path(make_cache: Make, raw: Client,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    writer = make_cache()  # it never reads: its bookkeeping thread sends nothing on the spied client
    writer.put("k", "v")  # the namespace's settings are checked, put.lua is cached
    reloads = writer.get_metrics()["health"]["script_reloads"]
    pipelines: list[Any] = []
    real = writer.client.pipeline
    monkeypatch.setattr(writer.client, "pipeline", lambda *a, **kw: pipelines.append(a) or real(*a, **kw))
    flush_scripts(raw)
    writer.put("k", "v2")  # put.lua: NOSCRIPT, then EVAL
    assert pipelines == [], "one script call on one shard must go without a pipeline"
    monkeypatch.undo()
    assert writer.get_metrics()["health"]["script_reloads"] == reloads + 1
    assert make_cache().get("k") == "v2"


@pytest.mark.usefixtures("wide_window")
@pytest.mark.parametrize("error", TRANSIENT)
def test_a_transient_error_is_retried_and_the_call_succeeds(make_cache: Make, raw: Client, namespace: str,
                                                             backend: Backend, error: str) -> None:
    cache = make_cache()
    counter = key_in(namespace, f"attempts {error}")
    before = health(cache)
    assert cache._send([("EVAL", ONCE, 1, counter, error)]) == [b"2"]
    after = health(cache)
    assert raw.get(counter) == b"2", "exactly two attempts reach Redis"
    ours = 0 if backend.cluster and error in RESENT_BY_THE_CLUSTER_CLIENT else 1
    assert after["retries"] - before["retries"] == ours
    assert after["consecutive_failures"] == 0
    assert after["state"] == "closed"


@pytest.mark.usefixtures("wide_window")
def test_a_transient_error_that_persists_is_one_failure_after_the_attempts(make_cache: Make, raw: Client,
                                                                            namespace: str) -> None:
    cache = make_cache()
    counter = key_in(namespace, "attempts")
    before = health(cache)
    outcome = cache._send([("EVAL", ALWAYS, 1, counter)])
    after = health(cache)
    assert isinstance(outcome, ReadOnlyError), outcome
    assert raw.get(counter) == str(resilience.RETRY_ATTEMPTS).encode()
    assert after["retries"] - before["retries"] == resilience.RETRY_ATTEMPTS - 1
    assert after["consecutive_failures"] == before["consecutive_failures"] + 1, "the batch failed once"


def test_a_non_transient_error_is_not_retried(make_cache: Make, raw: Client, namespace: str) -> None:
    cache = make_cache()
    counter = key_in(namespace, "attempts")
    refused = "redis.call('INCR', KEYS[1]); return redis.error_reply('WRONGTYPE answered by a test script')"
    before = health(cache)
    [reply] = cache._send([("EVAL", refused, 1, counter)])
    assert isinstance(reply, ResponseError)
    assert raw.get(counter) == b"1"
    assert health(cache)["retries"] == before["retries"]


@pytest.mark.usefixtures("wide_window")
def test_the_async_front_end_does_the_same(make_async_cache: MakeAsync, raw: Client, namespace: str,
                                           backend: Backend) -> None:
    a_list, once, always, tryagain = (key_in(namespace, name) for name in ("a list", "once", "always", "tryagain"))
    raw.rpush(a_list, b"x")

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with make_async_cache() as writer, make_async_cache(promote_after=10**9) as reader:
            await writer.put("k", "v")
            out["first"] = await reader.get("k")
            # Its hit's bookkeeping (touch.lua, from the cache's own thread) goes now, not after the flush
            # below, where its reload would be counted too.
            await reader.flush_bookkeeping()
            reloads = (await reader.get_metrics())["health"]["script_reloads"]
            command = ("EVALSHA", "0" * 40, 1, a_list)
            assert goes_alone(reader.client, [command])
            out["in place"] = await reader._send([command])
            out["piped"] = await reader._send([command, command])
            retries = reader._resilience.retries
            out["once"] = await reader._send([("EVAL", ONCE, 1, once, "READONLY")])
            out["tryagain"] = await reader._send([("EVAL", ONCE, 1, tryagain, "TRYAGAIN")])
            out["retried"] = reader._resilience.retries - retries
            out["always"] = await reader._send([("EVAL", ALWAYS, 1, always)])
            out["retries"] = reader._resilience.retries - retries
            out["breaker"] = reader._resilience.snapshot()
            flush_scripts(raw)
            pipelines: list[Any] = []
            real = reader.client.pipeline

            def spy(*args: Any, **kwargs: Any) -> Any:
                pipelines.append(args)
                return real(*args, **kwargs)

            reader.client.pipeline = spy  # type: ignore[method-assign]
            await reader.put("k", "v2")  # put.lua: NOSCRIPT, then EVAL
            out["pipelines"] = pipelines
            reader.client.pipeline = real  # type: ignore[method-assign]
            out["reloads"] = (await reader.get_metrics())["health"]["script_reloads"] - reloads
            out["after flush"] = await reader.get("k")
        return out

    out = asyncio.run(scenario())
    assert (out["first"], out["after flush"]) == ("v", "v2")
    [reply] = out["in place"]
    assert isinstance(reply, NoScriptError)
    assert type(out["piped"][0]) is NoScriptError
    assert str(out["piped"][0]) == str(reply)
    assert out["once"] == [b"2"]
    assert raw.get(once) == b"2"
    assert out["tryagain"] == [b"2"]
    assert raw.get(tryagain) == b"2"
    tryagain_by_us = 0 if backend.cluster else 1  # redis-py's asyncio cluster client retries TRYAGAIN itself
    assert out["retried"] == 1 + tryagain_by_us
    assert isinstance(out["always"], RedisError)
    assert raw.get(always) == str(resilience.RETRY_ATTEMPTS).encode()
    assert out["retries"] == 1 + tryagain_by_us + resilience.RETRY_ATTEMPTS - 1
    assert out["pipelines"] == [], "one script call on one shard must go without a pipeline"
    assert out["reloads"] == 1
    assert out["breaker"]["consecutive_failures"] == 1, "the persisting error failed its batch, once"
