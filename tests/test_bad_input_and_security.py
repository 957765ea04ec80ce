"""Bad input and security (docs/design.md#failure-behaviour; docs/failure.md, docs/security.md, docs/key-layout.md).

Every item of the bad-input list below must get a clear error or a counted miss: never a crash, a hang or a
half-written entry. "Nothing written" is checked against what Redis holds: a snapshot of every key of the
namespace (TYPE, DUMP, PEXPIRETIME) before and after the call. Servers with special settings (a password,
ACL users, TLS, maxmemory) are private ``LocalRedisServer`` processes, standalone only; the other tests run
on both backends of conftest.py.

bad input -> where tested (``this file`` = tests/test_bad_input_and_security.py; "found" = a library bug
this file found, now fixed, the test its regression):

non-serializable value ->
    test_codec.py::test_unsupported_values_raise_a_serialization_error_naming_the_fix (the codec alone)
    this file::test_a_value_that_does_not_encode_or_is_too_big_is_refused_and_nothing_is_written
        (put, put_many, get_or_set; nothing written, the fill lease given back at once)
value over max_value_bytes ->
    test_tiers.py::test_value_over_max_value_bytes_is_refused_and_nothing_written (put_many)
    this file::test_a_value_that_does_not_encode_or_is_too_big_is_refused_and_nothing_is_written
empty key ->
    test_keys.py::test_bad_keys_are_refused_with_a_clear_error (KeySpace alone)
    this file::test_a_bad_key_is_refused_by_every_call_before_any_io (every call, nothing reaches Redis)
very long key (> 1 KiB: hashed into the key name, still inspectable) ->
    test_keys.py::test_long_keys_and_hash_prefixed_keys_get_a_digest_id
    test_tiers.py::test_long_and_hash_prefixed_keys_are_stored_under_a_digest (original key in field ``k``)
binary and non-UTF-8 keys ->
    test_tiers.py::test_binary_and_unicode_keys (b"\\xff\\xfe\\x00bin" round-trips between processes)
    test_keys.py::test_bad_keys_are_refused_with_a_clear_error (a str that is not valid Unicode)
    this file::test_a_bad_key_is_refused_by_every_call_before_any_io (the same str, at every call)
unicode keys ->
    test_tiers.py::test_binary_and_unicode_keys
    test_keys.py::test_str_and_utf8_bytes_are_the_same_key_and_shard_by_crc32
ttl zero / negative / NaN / huge ->
    test_config.py::test_bad_ttls (check_ttl), test_config.py::test_invalid_settings_raise_configuration_error
    this file::test_a_bad_ttl_is_refused_by_every_call_before_any_io (put, put_many, get_or_set)
sizes zero or negative ->
    test_config.py::test_invalid_settings_raise_configuration_error
    test_config.py::test_size_error_names_the_fix
WRONGTYPE, a shard key (e.g. a shard's l2 sorted set) ->
    test_resilience.py::test_wrongtype_is_not_retried_a_counted_miss_or_cache_unavailable (get; not retried)
    this file::test_a_shard_key_of_the_wrong_type_is_refused_before_any_write (all seven keys, every call;
        reads are served, their bookkeeping refused whole)
    this file::test_get_or_set_with_a_broken_shard_key_computes_and_writes_nothing_it_should_not
    this file::test_invalidate_refuses_a_shard_with_a_wrong_type_key_before_any_write (found)
    this file::test_an_error_caused_by_a_wrong_type_key_outside_the_scripts_names_that_key (found: <ns>:config,
        get_metrics)
WRONGTYPE, an entry hash key ->
    this file::test_an_entry_key_of_the_wrong_type_is_simply_gone
    this file::test_get_or_set_does_not_wait_for_a_lease_key_written_by_hand (found: a lease key)
garbage bytes written into an entry ->
    test_tiers.py::test_undecodable_payload_is_a_counted_miss_and_is_removed (field ``v``, fail-closed)
    test_fills.py::test_an_undecodable_entry_is_replaced_only_if_nothing_newer_came
    this file::test_garbage_in_an_entry_field_never_raises_when_failing_open (every field; found: ``ver``, ``n``...)
    test_read_bookkeeping.py::test_an_entry_field_written_by_hand_is_a_counted_miss_and_is_removed
    this file::test_a_garbage_hit_counter_is_a_counted_miss_even_failing_closed (found)
malformed Redis URL ->
    test_config.py::test_malformed_urls_are_configuration_errors
    test_config.py::test_passwords_never_appear_in_error_messages
    this file::test_a_url_option_redis_py_cannot_take_is_a_configuration_error (found)
    this file::test_a_password_containing_an_at_sign_never_appears_in_errors (found)
wrong password ->
    this file::test_a_wrong_or_missing_password_is_a_counted_miss_or_an_error_without_it
    this file::test_the_right_password_works
ACL user lacking a command ->
    this file::test_a_user_lacking_evalsha_is_served_reads_and_its_script_calls_fail_open_or_raise
    this file::test_a_missing_permission_error_names_the_acl_fix (found)
    this file::test_a_user_lacking_publish_gets_an_error_and_nothing_is_written (found)
    this file::test_a_user_with_the_documented_acl_rules_runs_the_whole_library (the README's rule set)
    this file::test_the_documented_acl_rule_set_is_accepted_verbatim (found: README named a 7.2-only command)
    this file::test_the_documented_acl_rule_set_names_only_commands_the_cache_sends (no more than it needs)
    this file::test_the_scripts_permission_check_does_not_depend_on_what_ran_before (found: Redis 7.0)
(also) TLS ->
    this file::test_the_documented_tls_url_serves_the_cache_and_its_subscriber
(also) maxmemory reached, noeviction ->
    this file::test_at_maxmemory_writes_are_refused_whole_reads_are_served_and_removals_run
    this file::test_an_out_of_memory_error_names_the_fix (found)

The only waits are deadline polls for an invalidation to arrive.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import victor_rcache
from victor_rcache import (
    CacheUnavailableError,
    ConfigurationError,
    InvalidKeyError,
    InvalidTTLError,
    MultiLevelCache,
    PredictiveCacheWarmer,
    SerializationError,
    ValueTooLargeError,
    bookkeeping,
)
from victor_rcache.errors import CacheError
from victor_rcache.keys import KeySpace
from victor_rcache.local_redis import LocalRedisServer, free_port
from victor_rcache.scripts import Scripts, lua_dir

from .helpers import Client

Make = Callable[..., MultiLevelCache]
Snapshot = dict[bytes, tuple[Any, Any, int]]  # TYPE, DUMP, PEXPIRETIME

MISS = "<miss>"
README = Path(__file__).resolve().parents[1] / "README.md"
SHARD_KEYS = ("l2", "l3", "exp", "size", "stats", "fence", "ghost")  # every key of a shard (keys.ShardKeys)


def _redis_server_version() -> tuple[int, int]:
    """The version of the redis-server on PATH (the tests' private servers run it), (0, 0) if none."""
    binary = shutil.which("redis-server")
    if binary is None:
        return (0, 0)
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False, timeout=30).stdout
    found = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else (0, 0)


REDIS_VERSION = _redis_server_version()


def snapshot(raw: Client, namespace: str) -> Snapshot:
    """Every key of the namespace: its type, DUMP (value and encoding) and absolute expiry (PEXPIRETIME)."""
    out: Snapshot = {}
    for key in raw.scan_iter(match=namespace.encode() + b":*", count=1000):
        out[key] = (raw.type(key), raw.dump(key), int(raw.execute_command("PEXPIRETIME", key)))  # type: ignore[no-untyped-call]
    return out


def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds (fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.005)


def not_refused(calls: dict[str, Callable[[], Any]], error: type[Exception], message: str) -> list[str]:
    """The calls that did not raise ``error`` with ``message`` in its text (every one of them must)."""
    out = []
    for name, call in calls.items():
        try:
            call()
        except error as exc:
            if message not in str(exc):
                out.append(f"{name}: {exc}")
        else:
            out.append(f"{name}: accepted")
    return out


def key_in_shard(space: KeySpace, shard: int, prefix: str, same: bool = True) -> str:
    """A key (``prefix<n>``) that lands in ``shard`` (or, with ``same=False``, in any other shard)."""
    return next(k for k in (f"{prefix}{i}" for i in range(10_000)) if (space.ref(k).shard == shard) == same)


# ============================================================== bad input refused before any I/O


@pytest.mark.parametrize(("key", "message"), [
    pytest.param("", "must not be empty", id="empty-str"),
    pytest.param(b"", "must not be empty", id="empty-bytes"),
    pytest.param(None, "str or bytes", id="None"),
    pytest.param(42, "str or bytes", id="int"),
    pytest.param("\ud800", "not valid Unicode", id="str-not-encodable-as-utf8"),
])
def test_a_bad_key_is_refused_by_every_call_before_any_io(make_cache: Make, raw: Client, namespace: str,
                                                          key: Any, message: str) -> None:
    cache = make_cache(fail_open=True)  # bad input is the caller's bug: it raises even when failing open
    loads: list[int] = []
    calls: dict[str, Callable[[], Any]] = {
        "get": lambda: cache.get(key),
        "get_many": lambda: cache.get_many(["fine", key]),
        "put": lambda: cache.put(key, 1),
        "put_many": lambda: cache.put_many({"fine": 1, key: 2}),
        "delete": lambda: cache.delete(key),
        "get_or_set": lambda: cache.get_or_set(key, lambda: loads.append(1)),
    }
    if key is not None:  # invalidate(None) is the documented "the whole namespace"
        calls["invalidate"] = lambda: cache.invalidate(key)
    assert not_refused(calls, InvalidKeyError, message) == []
    assert loads == [], "get_or_set ran its loader for a key it cannot store"
    assert snapshot(raw, namespace) == {}, "something reached Redis (not even <ns>:config may be written)"
    m = cache.get_metrics()
    assert (m["combined"]["gets"], m["combined"]["puts"], m["health"]["redis_errors"]) == (0, 0, 0)
    assert cache.get_many(["fine"]) == {}  # the cache is not wedged by the refused calls
    assert cache.get_or_set("fine", lambda: "computed") == "computed"


@pytest.mark.parametrize(("ttl", "message"), [
    pytest.param(0, "positive", id="zero"),
    pytest.param(-1, "positive", id="negative"),
    pytest.param(-0.0001, "positive", id="slightly-negative"),
    pytest.param(math.nan, "positive", id="NaN"),
    pytest.param(math.inf, "ten years", id="inf"),
    pytest.param(11 * 365 * 86400, "ten years", id="eleven-years"),
    pytest.param(1_700_000_000_000, "milliseconds", id="a-timestamp-in-ms"),
    pytest.param("60", "number", id="str"),
    pytest.param(True, "number", id="bool"),
])
def test_a_bad_ttl_is_refused_by_every_call_before_any_io(make_cache: Make, raw: Client, namespace: str,
                                                          ttl: Any, message: str) -> None:
    cache = make_cache(fail_open=True)
    loads: list[int] = []
    calls: dict[str, Callable[[], Any]] = {
        "put": lambda: cache.put("k", 1, ttl=ttl),
        "put_many": lambda: cache.put_many({"k": 1, "j": 2}, ttl=ttl),
        "get_or_set": lambda: cache.get_or_set("k", lambda: loads.append(1), ttl=ttl),
    }
    assert not_refused(calls, InvalidTTLError, message) == []
    assert loads == []
    assert snapshot(raw, namespace) == {}
    assert cache.get_metrics()["health"]["redis_errors"] == 0
    # The refused get_or_set left no single-flight or lease behind: the same key computes at once.
    assert cache.get_or_set("k", lambda: "computed", ttl=60) == "computed"
    assert make_cache().get("k") == "computed"


@pytest.mark.parametrize(("value", "error", "message"), [
    pytest.param({1, 2}, SerializationError, "codec=", id="set"),
    pytest.param(object(), SerializationError, "codec=", id="object"),
    pytest.param(2**64, SerializationError, "codec=", id="int-over-64-bits"),
    pytest.param("x" * 200, ValueTooLargeError, "max_value_bytes=100", id="over-max_value_bytes"),
])
def test_a_value_that_does_not_encode_or_is_too_big_is_refused_and_nothing_is_written(
        make_cache: Make, raw: Client, namespace: str, value: Any, error: type[Exception], message: str) -> None:
    cache = make_cache(fail_open=True, max_value_bytes=100)
    calls: dict[str, Callable[[], Any]] = {"put": lambda: cache.put("bad", value),
                                           "put_many": lambda: cache.put_many({"fine": 1, "bad": value})}
    assert not_refused(calls, error, message) == []
    assert snapshot(raw, namespace) == {}, "something was written before the value was refused"
    assert cache.get("fine", MISS) == MISS  # not even the good value of the refused put_many

    # get_or_set: the loader ran (the miss and the lease are real), its value cannot be stored: failing open,
    # the caller gets it uncached; failing closed, the error.
    assert cache.get_or_set("computed", lambda: value) is value
    with pytest.raises(error, match=message):
        make_cache(fail_open=False, max_value_bytes=100).get_or_set("computed", lambda: value)
    left = [k for k in raw.scan_iter(match=namespace.encode() + b":*") if b":e:" in k or b":lease:" in k]
    assert left == [], f"an entry or the fill lease was left behind: {left}"
    other = make_cache(max_value_bytes=100)  # the lease was given back at once: no one waits for it
    assert other.get_or_set("computed", lambda: "fine") == "fine"
    assert other.get_metrics()["stampede"]["lease_waits"] == 0
    assert cache.get_metrics()["health"]["redis_errors"] == 0


# ========================================================================= WRONGTYPE keys


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
@pytest.mark.parametrize("which", SHARD_KEYS)
def test_a_shard_key_of_the_wrong_type_is_refused_before_any_write(make_cache: Make, raw: Client, namespace: str,
                                                                   which: str, fail_open: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/failure.md: a shard's own key of the wrong type makes every script call of that shard refuse before
    any write (VRC_WRONGTYPE naming the key to delete); other shards keep working. A read is a plain HMGET
    of the entry and needs no shard key: gets are served, and their bookkeeping (touch.lua) is refused
    whole, like every put and delete. The broken key is never written."""
    # The reads' bookkeeping waits for flush_bookkeeping() (no window passes): it is sent once, at the
    # point where its effect on Redis is checked.
    monkeypatch.setattr(bookkeeping, "WINDOW", 3600.0)
    space = KeySpace(namespace, 16)
    shard = space.ref("k").shard
    new, fresh = key_in_shard(space, shard, "new"), key_in_shard(space, shard, "fresh")  # not stored yet
    elsewhere = key_in_shard(space, shard, "o", same=False)
    make_cache().put_many({"k": "v", elsewhere: "fine"})
    broken = getattr(space.shard_keys[shard], which)
    raw.delete(broken)
    raw.set(broken, "written by hand")  # a string where the cache keeps a sorted set or a hash
    original = snapshot(raw, namespace)[broken]

    cache = make_cache(fail_open=fail_open)
    refused = 0

    def attempt(name: str, call: Callable[[], Any], served: Any, refused_value: Any, may_serve: bool) -> None:
        """Run ``call``: served (``served``) only if ``may_serve``, else refused, with nothing written."""
        nonlocal refused
        before = snapshot(raw, namespace)
        error: CacheUnavailableError | None = None
        try:
            got = call()
        except CacheUnavailableError as err:
            error, got = err, refused_value
        if error is not None:
            text = str(error)
            assert not fail_open, f"{name}: a fail-open cache raised {text}"
            assert "VRC_WRONGTYPE" in text, f"{name}: {text}"
            assert broken.decode() in text, f"{name}: the error does not name the key: {text}"
            assert "delete that key" in text, f"{name}: the error does not name the fix: {text}"
        cache._core.l1.clear()  # no L1 copy may answer a later read
        if got == refused_value and got != served:
            refused += 1
            assert snapshot(raw, namespace) == before, f"{name} wrote to Redis although it was refused"
        else:
            assert may_serve, f"{name} was served although {which} is broken"
            assert got == served, name
        assert snapshot(raw, namespace)[broken] == original, f"{name} wrote to the broken key"

    unread = snapshot(raw, namespace)
    attempt("get", lambda: cache.get("k", MISS), "v", MISS, True)
    attempt("get_many", lambda: cache.get_many(["k", new]), {"k": "v"}, {}, True)
    cache.flush_bookkeeping()  # the reads' hits and miss, one touch.lua call on the broken shard: refused
    assert snapshot(raw, namespace) == unread, "the reads' bookkeeping wrote to the broken shard"
    for name, call in [("put, replacing", lambda: cache.put("k", "new value")),
                       ("put, a new key", lambda: cache.put(fresh, 1))]:
        attempt(name, call, "written", None, False)  # fail-open: None, as if written (L1 keeps it)
    attempt("delete", lambda: cache.delete("k"), "deleted", False, False)  # fail-open: False, L1 was cleared

    assert cache.get(elsewhere) == "fine", "another shard is still served from Redis"
    raw.delete(broken)  # get_metrics reads every shard's index and counters: give it readable ones
    m = cache.get_metrics()
    assert m["health"]["redis_errors"] == refused  # one per refused call: each sent one script call
    assert m["health"]["bookkeeping"]["dropped_batches"] == 1, "the reads' bookkeeping was not refused"
    assert m["health"]["breaker"]["retries"] == 0, "WRONGTYPE cannot succeed on a retry"
    assert m["health"]["breaker"]["state"] == "closed", "a broken key is not an outage"


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
@pytest.mark.parametrize("which", SHARD_KEYS)
def test_get_or_set_with_a_broken_shard_key_computes_and_writes_nothing_it_should_not(
        make_cache: Make, raw: Client, namespace: str, which: str, fail_open: bool) -> None:
    """get_or_set's plain read needs no shard key, but the step after its miss (lease.lua) and the fill
    (put.lua) need every shard key: refused, the value is computed by this worker (fail-open) or the
    call raises, and the broken key is untouched."""
    space = KeySpace(namespace, 16)
    new = key_in_shard(space, space.ref("k").shard, "new")
    make_cache().put("k", "v")
    broken = getattr(space.shard_keys[space.ref("k").shard], which)
    raw.delete(broken)
    raw.set(broken, "written by hand")
    cache = make_cache(fail_open=fail_open)
    if fail_open:
        assert cache.get_or_set(new, lambda: "loaded") == "loaded"
    else:
        with pytest.raises(CacheUnavailableError, match="VRC_WRONGTYPE"):
            cache.get_or_set(new, lambda: "loaded")
    assert raw.get(broken) == b"written by hand"
    assert raw.exists(space.entry_key(space.ref(new))) == 0, "the fill was written although put.lua refused"


@pytest.mark.parametrize("op", ["get", "get_many", "get_or_set", "put", "delete"])
def test_an_entry_key_of_the_wrong_type_is_simply_gone(make_cache: Make, raw: Client, namespace: str,
                                                       op: str) -> None:
    """docs/failure.md: an entry key of the wrong type is simply gone: a read gets a plain miss (a decode error)
    and its report deletes the key (touch.lua); a write replaces it. Not an error at all, so even a
    fail-closed cache gets a plain miss."""
    space = KeySpace(namespace, 16)
    ref = space.ref("k")
    entry, l2 = space.entry_key(ref), space.shard_keys[ref.shard].l2
    neighbour = key_in_shard(space, ref.shard, "n")
    make_cache().put_many({"k": "v", neighbour: "n"})
    raw.delete(entry)
    raw.rpush(entry, "not", "a", "hash")  # by hand: a list where the entry's hash was

    cache = make_cache()  # fail-closed
    if op == "get":
        assert cache.get("k", MISS) == MISS
    elif op == "get_many":
        assert cache.get_many(["k", neighbour]) == {neighbour: "n"}
    elif op == "get_or_set":
        assert cache.get_or_set("k", lambda: "loaded") == "loaded"
    elif op == "put":
        cache.put("k", "new value")
    else:
        assert cache.delete("k") is True  # the index still listed it
    cache.flush_bookkeeping()  # a read's report of what it found

    if op in ("get_or_set", "put"):  # written again, as a proper entry
        assert raw.type(entry) == b"hash"
        assert make_cache().get("k") == ("loaded" if op == "get_or_set" else "new value")
    else:  # the hand-written key is deleted and the id left the index
        assert raw.type(entry) == b"none"
        assert raw.zscore(l2, ref.id) is None
        assert make_cache().get("k", MISS) == MISS
    assert make_cache().get(neighbour) == "n", "the rest of the shard is untouched"
    m = cache.get_metrics()
    assert m["health"]["redis_errors"] == 0
    if op in ("get", "get_many", "get_or_set"):
        assert m["combined"]["total_misses"] == 1


@pytest.mark.parametrize("which", SHARD_KEYS)
def test_invalidate_refuses_a_shard_with_a_wrong_type_key_before_any_write(make_cache: Make, raw: Client,
                                                                           namespace: str, which: str) -> None:
    space = KeySpace(namespace, 16)
    shard_keys = space.shard_keys[space.ref("k").shard]
    make_cache().put("k", "v", ttl=3600)  # in the shard's L2 and exp indexes
    broken = getattr(shard_keys, which)
    raw.delete(broken)
    raw.set(broken, "written by hand")
    base = shard_keys.l2[:-2]  # b"<ns>:{<tag>}:"

    def shard_state() -> Snapshot:
        return {k: v for k, v in snapshot(raw, namespace).items() if k.startswith(base)}

    before = shard_state()
    with pytest.raises(CacheUnavailableError) as err:
        make_cache().invalidate()
    assert shard_state() == before, "invalidate() changed the broken shard before failing"
    assert "VRC_WRONGTYPE" in str(err.value), str(err.value)
    assert broken.decode() in str(err.value), str(err.value)


@pytest.mark.parametrize("where", ["config-key", "shard-index-read-by-get_metrics"])
def test_an_error_caused_by_a_wrong_type_key_outside_the_scripts_names_that_key(
        make_cache: Make, raw: Client, namespace: str, where: str) -> None:
    space = KeySpace(namespace, 16)
    make_cache().put("k", "v")
    broken = space.config if where == "config-key" else space.shard_keys[space.ref("k").shard].l2
    raw.delete(broken)
    raw.set(broken, "written by hand")
    before = snapshot(raw, namespace)
    cache = make_cache()
    call: Callable[[], Any] = (lambda: cache.get("k")) if where == "config-key" else cache.get_metrics
    with pytest.raises(CacheUnavailableError) as err:
        call()
    assert snapshot(raw, namespace) == before  # holds today
    assert broken.decode() in str(err.value), str(err.value)


@pytest.mark.standalone_only(reason="the lease wait is front-end logic, the same on a cluster; "
                                    "each failing run waits ~3 s")
def test_get_or_set_does_not_wait_for_a_lease_key_written_by_hand(make_cache: Make, raw: Client,
                                                                  namespace: str) -> None:
    space = KeySpace(namespace, 16)
    lease = space.lease_key(space.ref("k"))
    raw.hset(lease, "written", "by hand")  # the wrong type, and no expiry: no worker will ever release it
    cache = make_cache(lease_ttl=0.05)
    assert cache.get_or_set("k", lambda: "loaded") == "loaded"
    assert cache.get_metrics()["stampede"]["lease_waits"] == 0, "waited for a key that is not a lease"


# ===================================================================== garbage in an entry


@pytest.mark.parametrize(("field", "garbage"), [
    pytest.param("v", b"\x00garbage", id="v-payload"),
    pytest.param("ver", b"v2", id="ver-version"),
    pytest.param("t", b"\xff", id="t-tier"),
    pytest.param("n", b"many", id="n-hit-count"),
    pytest.param("x", b"soon", id="x-expiry"),
    pytest.param("k", b"\xff\xfe", id="k-original-key"),
    pytest.param("d", b"slow", id="d-cost"),
    pytest.param("w", b"\xff", id="w-prewarm-mark"),
])
def test_garbage_in_an_entry_field_never_raises_when_failing_open(make_cache: Make, raw: Client, namespace: str,
                                                                  field: str, garbage: bytes) -> None:
    """Bytes written by hand into any field of an entry hash (docs/key-layout.md: v, ver, t, n, x, k, d, w):
    a fail-open get returns the stored value (the payload is intact) or a counted miss, never raises, and
    its bookkeeping (touch.lua) is applied, not dropped."""
    space = KeySpace(namespace, 16)
    make_cache().put("k", "good")
    raw.hset(space.entry_key(space.ref("k")), field, garbage)
    reader = make_cache(fail_open=True)
    got = reader.get("k", MISS)
    assert got in ("good", MISS)
    m = reader.get_metrics()
    assert (m["combined"]["gets"], m["combined"]["total_hits"] + m["combined"]["total_misses"]) == (1, 1)
    if got == MISS:  # counted as a decode error or as a Redis error, never silently
        assert m["health"]["decode_errors"] + m["health"]["redis_errors"] == 1, m["health"]
    assert make_cache(fail_open=True).get_many(["k"]) in ({"k": "good"}, {})
    reader.flush_bookkeeping()
    assert reader.get_metrics()["health"]["bookkeeping"]["dropped_batches"] == 0


def test_a_garbage_hit_counter_is_a_counted_miss_even_failing_closed(make_cache: Make, raw: Client,
                                                                    namespace: str) -> None:
    space = KeySpace(namespace, 16)
    make_cache().put("k", "good")
    raw.hset(space.entry_key(space.ref("k")), "n", b"many")
    reader = make_cache()  # fail-closed, like the undecodable-payload test in test_tiers.py
    assert reader.get("k", MISS) == MISS
    assert reader.get_metrics()["combined"]["total_misses"] == 1


# ========================================================================= malformed URLs


@pytest.mark.parametrize(("query", "option"), [
    pytest.param("ssl_ca_certs=/etc/ssl/ca.pem", "ssl_ca_certs", id="tls-option-on-redis-scheme"),
    pytest.param("sokcet_timeout=1", "sokcet_timeout", id="misspelt-option"),
])
def test_a_url_option_redis_py_cannot_take_is_a_configuration_error(namespace: str, query: str,
                                                                    option: str) -> None:
    def build_and_use() -> None:
        cache = MultiLevelCache(f"redis://127.0.0.1:1/0?{query}", namespace=namespace, fail_open=True,
                                coherence=False)
        cache.get("k", MISS)  # today: a TypeError from here, although the cache fails open

    with pytest.raises(ConfigurationError, match=option):
        build_and_use()


def test_a_password_containing_an_at_sign_never_appears_in_errors(namespace: str) -> None:
    cache = MultiLevelCache("redis://user:hunter2@rest-of-the-secret@127.0.0.1:1/0", namespace=namespace,
                            fail_open=False, coherence=False)  # port 1: nothing listens, connection refused
    try:
        with pytest.raises(CacheUnavailableError) as err:
            cache.get("k")
    finally:
        cache.close()
    assert "hunter2" not in str(err.value)
    assert "rest-of-the-secret" not in str(err.value), str(err.value)


# ======================================================================== passwords


PASSWORD = "correct-horse-battery-staple"
WRONG = "not-the-password"


@pytest.fixture
def password_server() -> Iterator[LocalRedisServer]:
    """A private Redis whose default user needs PASSWORD (set after start: LocalRedisServer's readiness
    check connects without one)."""
    with LocalRedisServer() as server:
        with redis.Redis(port=server.port) as admin:
            admin.config_set("requirepass", PASSWORD)
        yield server


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
@pytest.mark.parametrize("credentials", [f":{WRONG}@", f"default:{WRONG}@", f"intruder:{WRONG}@", ""],
                         ids=["wrong-password", "default-user-wrong-password", "unknown-user", "no-password"])
def test_a_wrong_or_missing_password_is_a_counted_miss_or_an_error_without_it(
        password_server: LocalRedisServer, namespace: str, credentials: str, fail_open: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://{credentials}127.0.0.1:{password_server.port}/0"
    with MultiLevelCache(url, namespace=namespace, fail_open=fail_open) as cache:
        if fail_open:
            assert cache.get("k", MISS) == MISS
            cache.put("k", 1)  # kept in this process's L1 only
            assert cache.get_or_set("g", lambda: "loaded") == "loaded"
            m = cache.get_metrics()
            assert m["health"]["redis_available"] is False
            assert m["health"]["redis_errors"] == 4  # get, put, get_or_set, get_metrics
            assert m["health"]["breaker"]["retries"] == 0, "an authentication error cannot succeed on a retry"
            text = caplog.text
            assert "password in the URL" in text, "the failure warning names the fix"
        else:
            with pytest.raises(CacheUnavailableError, match="password in the URL") as err:
                cache.get("k")
            assert isinstance(err.value.__cause__, redis.AuthenticationError)
            text = str(err.value)
    assert PASSWORD not in text
    assert WRONG not in text
    with redis.Redis(port=password_server.port, password=PASSWORD) as admin:
        assert admin.dbsize() == 0, "nothing may be written without the password"


def test_the_right_password_works(password_server: LocalRedisServer, namespace: str) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{password_server.port}/0"
    with MultiLevelCache(url, namespace=namespace, fail_open=False) as writer, \
            MultiLevelCache(url, namespace=namespace, fail_open=False) as reader:
        writer.put("k", {"v": 1})
        assert reader.get("k") == {"v": 1}
        m = reader.get_metrics()
        assert (m["l2"]["hits"], m["health"]["redis_errors"]) == (1, 0)
        assert m["coherence"]["channel"] == "up", "the invalidation subscriber authenticates too"


# ============================================================================ ACL users


ACL_NAMESPACE = "tools"  # the README's rule set is written for namespace `tools`


def documented_acl_setuser() -> list[str]:
    """The arguments of the README's ``ACL SETUSER`` command (Security section), exactly as written."""
    found = re.search(r"ACL SETUSER (.+?)```", README.read_text("utf-8"), re.DOTALL)
    assert found, "README's Security section shows no ACL SETUSER command"
    return found[1].split()


def server_version(admin: redis.Redis) -> tuple[int, int]:
    major, minor = str(admin.info("server")["redis_version"]).split(".")[:2]
    return int(major), int(minor)


def set_documented_user(admin: redis.Redis, *changes: str) -> str:
    """Create the README's ACL user (plus ``changes``); return its URL credentials ``user:password@``.

    ``+client|setinfo`` is left out on Redis < 7.2, which has no CLIENT SETINFO and refuses the whole
    command because of it (see test_the_documented_acl_rule_set_is_accepted_verbatim)."""
    user, *rules = documented_acl_setuser()
    if server_version(admin) < (7, 2):
        rules = [r for r in rules if r.lower() != "+client|setinfo"]
    admin.execute_command("ACL", "SETUSER", user, "reset", *rules, *changes)  # type: ignore[no-untyped-call]
    (password,) = [r[1:] for r in rules if r.startswith(">")]
    return f"{user}:{password}@"


@pytest.fixture
def acl_server() -> Iterator[tuple[LocalRedisServer, redis.Redis]]:
    """A private Redis and an admin connection (the default user) to create ACL users on it."""
    with LocalRedisServer() as server, redis.Redis(port=server.port) as admin:
        yield server, admin


def test_the_documented_acl_rule_set_is_accepted_verbatim(acl_server: tuple[LocalRedisServer, redis.Redis]) -> None:
    _, admin = acl_server
    args = documented_acl_setuser()
    admin.execute_command("ACL", "SETUSER", *args)  # type: ignore[no-untyped-call]
    assert admin.acl_getuser(args[0]) is not None


def test_the_documented_acl_rule_set_names_only_commands_the_cache_sends() -> None:
    """The rule set grants no command the cache does not use (the test below shows it lacks none): each is
    one a script runs or checks up front (every redis.call, includes/shard.lua's SHARD_COMMANDS, includes/
    model.lua's MODEL_COMMANDS, sizing.lua's list), or one the package sends itself (a command tuple in
    its source: the plain reads, the handshake, the subscriber, EVALSHA/EVAL). The CLI's extra commands
    are documented apart (docs/security.md)."""
    _, *rules = documented_acl_setuser()
    granted = {rule[1:].lower() for rule in rules if rule.startswith("+")}
    package = Path(victor_rcache.__file__).resolve().parent
    lua = "\n".join(path.read_text("utf-8") for path in sorted(lua_dir().rglob("*.lua")))
    used = {name.lower() for name in re.findall(r"redis\.p?call\('(\w+)'", lua)}
    for block in re.findall(r"(?:_COMMANDS = |check_commands\()\{([^}]*)\}", lua):
        used |= set(re.findall(r"'(\w+)'", block))
    for path in package.rglob("*.py"):
        if "cli" in path.relative_to(package).parts:  # the CLI's own commands are not in the rule set
            continue
        used |= {name.lower() for name in re.findall(r'\(\s*"([A-Z]{3,})"\s*[,)]', path.read_text("utf-8"))}
    assert granted <= used, f"the rule set grants commands the cache never sends: {sorted(granted - used)}"


def test_a_user_with_the_documented_acl_rules_runs_the_whole_library(
        acl_server: tuple[LocalRedisServer, redis.Redis]) -> None:
    server, admin = acl_server
    url = f"redis://{set_documented_user(admin)}127.0.0.1:{server.port}/0"
    admin.acl_log_reset()
    settings: dict[str, Any] = {"namespace": ACL_NAMESPACE, "fail_open": False, "promote_after": 1}
    with MultiLevelCache(url, **settings) as writer, MultiLevelCache(url, **settings) as reader:
        writer.put("a", 1)
        writer.put_many({"b": 2, "c": 3}, ttl=60)
        assert reader.get("a") == 1  # an L2 hit, hot: copied into the reader's L1
        assert reader.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": 2, "c": 3}
        writer.put("a", 10)  # replaces: publishes an invalidation the reader's subscriber applies
        until(lambda: reader.get("a") == 10, "the reader dropping its L1 copy of 'a'")
        assert reader.get_or_set("d", lambda: 4, ttl=60) == 4  # miss, fill lease, conditional fill, release
        assert writer.get_or_set("d", lambda: -1) == 4
        assert writer.delete("b") is True
        until(lambda: reader.get("b", MISS) == MISS, "the reader dropping its L1 copy of 'b'")
        writer.invalidate()
        until(lambda: reader.get("c", MISS) == MISS, "the reader dropping its L1 copy of 'c' (flush)")
        warmer = PredictiveCacheWarmer(writer)  # the prediction model and prewarming, too
        for query in ("q1", "q2", "q1", "q2", "q1"):
            warmer.record_query(query, ["tool"], session="s")
        warmer.flush()  # the records, and the view's reads of what follows q1 (view.lua)
        prediction = warmer.predict_next_queries("q1", session="s")
        assert prediction.queries == ["q2"]
        assert asyncio.run(warmer.prewarm_predictions(prediction, str.upper)).completed == 1
        assert reader.get("q2") == "Q2"
        warmer.record_query("q2", session="s")
        assert warmer.get_statistics()["predictions"]["correct"] == 1
        warmer.clear_patterns()
        for cache in (reader, writer):  # the reads' bookkeeping (touch.lua) runs with the same permissions
            cache.flush_bookkeeping()
            assert cache.get_metrics()["health"]["bookkeeping"]["dropped_batches"] == 0
        fleet, local = reader.get_metrics("fleet"), writer.get_metrics()
        assert fleet["health"]["redis_available"]
        assert local["health"]["redis_available"]
        assert (fleet["health"]["redis_errors"], local["health"]["redis_errors"]) == (0, 0)
        assert fleet["combined"]["puts"] >= 4
        assert fleet["l2"]["hits"] >= 1, "the reads' bookkeeping did not arrive"
        assert reader.get_metrics()["coherence"]["channel"] == "up"
        assert reader.get_metrics()["coherence"]["invalidations"] >= 3
    assert admin.acl_log() == [], "a command of the library was denied (even one whose error it ignores)"


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_a_user_lacking_evalsha_is_served_reads_and_its_script_calls_fail_open_or_raise(
        acl_server: tuple[LocalRedisServer, redis.Redis], fail_open: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without EVALSHA a cache still reads (a plain HMGET). Every script call is refused by Redis before it
    runs, once (no retry, no EVAL fallback): put, delete and get_or_set's step after its miss fail open
    or raise naming the command; the reads' bookkeeping (touch.lua) is dropped. Nothing is written."""
    # The reads' bookkeeping waits for flush_bookkeeping() (no window passes): one touch.lua call per
    # shard read, so Redis's count of denied calls is exact.
    monkeypatch.setattr(bookkeeping, "WINDOW", 3600.0)
    server, admin = acl_server
    url = f"redis://{set_documented_user(admin)}127.0.0.1:{server.port}/0"
    with MultiLevelCache(url, namespace=ACL_NAMESPACE, fail_open=False) as setup:
        setup.put("existing", "v")  # the namespace exists and its config is agreed
    set_documented_user(admin, "-evalsha")
    admin.acl_log_reset()
    before = snapshot(admin, ACL_NAMESPACE)
    calls: list[tuple[str, Callable[[MultiLevelCache], Any], Any]] = [
        ("put", lambda c: c.put("new", 1), None),
        ("delete", lambda c: c.delete("existing"), False),
        ("get_or_set", lambda c: c.get_or_set("computed", lambda: "loaded"), "loaded"),
    ]
    space = KeySpace(ACL_NAMESPACE, 16)
    read_shards = {space.ref(key).shard for key in ("existing", "computed")}  # a hit, get_or_set's miss
    with MultiLevelCache(url, namespace=ACL_NAMESPACE, fail_open=fail_open) as cache:
        assert cache.get("existing") == "v"
        for name, call, fail_open_result in calls:
            if fail_open:
                assert call(cache) == fail_open_result, name
            else:
                with pytest.raises(CacheUnavailableError, match="no permissions to run the 'evalsha' command"):
                    call(cache)
            assert snapshot(admin, ACL_NAMESPACE) == before, f"{name} wrote something"
        cache.flush_bookkeeping()
        assert snapshot(admin, ACL_NAMESPACE) == before, "the reads' bookkeeping wrote something"
        m = cache.get_metrics()
    assert m["health"]["redis_errors"] == len(calls)
    assert m["health"]["breaker"]["retries"] == 0
    assert m["health"]["bookkeeping"]["dropped_batches"] == len(read_shards)
    # Redis's own record: one denied EVALSHA per call and per bookkeeping batch, no retry storm and no EVAL
    # fallback.
    denied = [(str(e["object"]), int(str(e["count"]))) for e in admin.acl_log()]
    assert denied == [("evalsha", len(calls) + len(read_shards))], denied


def test_the_usual_miss_takes_its_lease_without_the_removal_permissions_and_a_removal_checks_them_first(
        acl_server: tuple[LocalRedisServer, redis.Redis]) -> None:
    """lease.lua's usual miss (nothing indexed, no data) writes only its lease, so it needs none of the
    permissions the shard's other writes need; a miss that must first remove an index member whose data
    Redis dropped checks them all before that first write, and is refused whole."""
    server, admin = acl_server
    url = f"redis://{set_documented_user(admin, '-zrem')}127.0.0.1:{server.port}/0"
    space = KeySpace(ACL_NAMESPACE, 1)
    shard = space.shard_keys[0]
    admin.zadd(shard.l2, {b"gone": 1})  # indexed, its data dropped by Redis
    admin.hset(shard.size, b"gone", 1)
    lease = Scripts().lease
    head = (0, 10, 10, 0, 0, 3, 30_000)
    with redis.Redis.from_url(url) as user:
        taken = user.eval(lease.source, 1, shard.l2, *head, b"absent", b"token", 10_000)  # type: ignore[no-untyped-call]
        assert taken[:2] == [0, 1]
        assert admin.get(space.lease_key(space.ref("absent"))) == b"token"
        before = snapshot(admin, ACL_NAMESPACE)
        with pytest.raises(redis.ResponseError, match="VRC_NOPERM the Redis user may not run ZREM"):
            user.eval(lease.source, 1, shard.l2, *head, b"gone", b"token", 10_000)  # type: ignore[no-untyped-call]
        assert snapshot(admin, ACL_NAMESPACE) == before, "lease.lua wrote something before it was refused"


def test_a_missing_permission_error_names_the_acl_fix(acl_server: tuple[LocalRedisServer, redis.Redis]) -> None:
    server, admin = acl_server
    url = f"redis://{set_documented_user(admin, '-evalsha')}127.0.0.1:{server.port}/0"
    with MultiLevelCache(url, namespace=ACL_NAMESPACE, fail_open=False) as cache, \
            pytest.raises(CacheUnavailableError) as err:
        cache.put("k", 1)
    message = str(err.value)
    assert "ACL" in message, message
    section = re.search(r"README section '([^']+)'", message)
    headings = {line.lstrip("#").strip() for line in README.read_text("utf-8").splitlines() if line.startswith("#")}
    assert section is not None, message
    assert section[1] in headings, message


def test_a_user_lacking_publish_gets_an_error_and_nothing_is_written(
        acl_server: tuple[LocalRedisServer, redis.Redis]) -> None:
    server, admin = acl_server
    url = f"redis://{set_documented_user(admin)}127.0.0.1:{server.port}/0"
    with MultiLevelCache(url, namespace=ACL_NAMESPACE, fail_open=False) as writer:
        writer.put("k", "old")
        set_documented_user(admin, "-spublish")
        before = snapshot(admin, ACL_NAMESPACE)
        with pytest.raises(CacheUnavailableError):
            writer.put("k", "new")  # a replacement must publish an invalidation: refused
        assert snapshot(admin, ACL_NAMESPACE) == before, "the value was replaced although the call failed"


# =================================================================================== TLS


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRedisServer, int, Path]]:
    """A private Redis with a TLS port (certificate signed by a throwaway CA); its plain port is only for
    LocalRedisServer's readiness check and the test's admin connection. Yields (server, tls port, CA file)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH: cannot make a test certificate authority")
    folder = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=vrc test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.cnf")
    tls_port = free_port()
    server = LocalRedisServer(extra_args=(
        "--tls-port", str(tls_port), "--tls-cert-file", str(folder / "server.pem"),
        "--tls-key-file", str(folder / "server.key"), "--tls-ca-cert-file", str(folder / "ca.pem"),
        "--tls-auth-clients", "no"))
    try:
        server.start()
    except CacheError as exc:
        pytest.skip(f"this redis-server cannot serve TLS (built without it?): {exc}")
    try:
        yield server, tls_port, folder / "ca.pem"
    finally:
        server.stop()


def test_the_documented_tls_url_serves_the_cache_and_its_subscriber(
        tls_server: tuple[LocalRedisServer, int, Path], namespace: str) -> None:
    server, tls_port, ca = tls_server
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}"  # docs/security.md: redis-py's TLS options in the query
    settings: dict[str, Any] = {"namespace": namespace, "fail_open": False, "promote_after": 1}
    with MultiLevelCache(url, **settings) as writer, MultiLevelCache(url, **settings) as reader, \
            redis.Redis(port=server.port) as admin:
        writer.put("k", {"v": 1})
        assert reader.get("k") == {"v": 1}
        assert reader.get_metrics()["l2"]["hits"] == 1  # it came from Redis, through TLS
        writer.put("k", {"v": 2})
        until(lambda: reader.get("k") == {"v": 2}, "the invalidation reaching the reader's subscriber over TLS")
        assert reader.get_metrics()["coherence"]["invalidations"] >= 1
        own = admin.client_id()
        clients = [c for c in admin.client_list() if int(str(c["id"])) != own]
        assert {int(str(c["laddr"]).rsplit(":", 1)[1]) for c in clients} == {tls_port}, "a connection bypassed TLS"
        assert sum(int(c["ssub"]) > 0 for c in clients) == 1, "the subscriber (both caches') is on the TLS port"

    # Certificates are verified: without the CA the connection is refused, with a clear error or a miss.
    untrusted = f"rediss://127.0.0.1:{tls_port}/0"
    with MultiLevelCache(untrusted, namespace=namespace, fail_open=False, coherence=False) as cache, \
            pytest.raises(CacheUnavailableError, match="certificate verify failed"):
        cache.get("k")
    with MultiLevelCache(untrusted, namespace=namespace, fail_open=True, coherence=False) as cache:
        assert cache.get("k", MISS) == MISS
        assert cache.get_metrics()["health"]["redis_errors"] == 2  # the get, and get_metrics itself


# ====================================================================== maxmemory, noeviction


@pytest.fixture
def full_server(namespace: str) -> Iterator[tuple[LocalRedisServer, redis.Redis]]:
    """A private Redis with ``maxmemory`` reached under ``noeviction``; the namespace holds ``existing``."""
    with LocalRedisServer(extra_args=("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")) as server, \
            redis.Redis(port=server.port) as admin:
        with MultiLevelCache(server.url, namespace=namespace, fail_open=False) as setup:
            setup.put("existing", "v")
        filler = b"x" * 256 * 1024
        for n in range(1000):
            try:
                admin.set(f"filler:{n}", filler)  # outside the namespace
            except redis.exceptions.OutOfMemoryError:
                break
        else:
            pytest.fail("Redis never reported OOM")
        # Redis frees a refused command's query buffer, which can bring used memory back under the limit by
        # a few hundred KB; a maxmemory below what is used keeps Redis full whatever buffers come and go.
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) // 2)
        yield server, admin


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_at_maxmemory_writes_are_refused_whole_reads_are_served_and_removals_run(
        full_server: tuple[LocalRedisServer, redis.Redis], namespace: str, fail_open: bool) -> None:
    """docs/failure.md: with maxmemory reached and a no-eviction policy Redis refuses a script that may write
    before it runs (the #!lua shebang): nothing is half-written. A put fails open (its value kept aside,
    served only while Redis cannot be asked: here it answers) or raises; a read is a plain HMGET and is
    served, its bookkeeping (touch.lua, a write) dropped; delete.lua and flush.lua run (allow-oom):
    removing is how a full Redis gets memory back."""
    server, admin = full_server
    with MultiLevelCache(server.url, namespace=namespace, fail_open=fail_open) as cache, \
            MultiLevelCache(server.url, namespace=namespace, fail_open=fail_open) as reader:
        before = snapshot(admin, namespace)
        if fail_open:
            cache.put("new", "value")
            assert cache.get("new", MISS) == MISS  # Redis answers for the key: the refused write is not served
        else:
            with pytest.raises(CacheUnavailableError, match="maxmemory"):
                cache.put("new", "value")
        assert reader.get("existing") == "v"  # a plain read needs no memory
        reader.flush_bookkeeping()  # its hit's touch.lua: refused before it runs, the batch dropped
        assert snapshot(admin, namespace) == before, "something was written while Redis was out of memory"
        health = cache.get_metrics()["health"]
        assert (health["redis_errors"], health["breaker"]["retries"]) == (1, 0), health  # the put
        health = reader.get_metrics()["health"]
        assert (health["redis_errors"], health["bookkeeping"]["dropped_batches"]) == (0, 1), health

        assert cache.delete("existing") is True  # delete.lua runs on a full Redis
        assert reader.get("existing", MISS) == MISS
        reader.flush_bookkeeping()  # dropped too: Redis is still full
        cache.invalidate()  # flush.lua too
        assert [k for k in admin.scan_iter(match=f"{namespace}:*") if b":e:" in k] == []

        admin.config_set("maxmemory", 0)  # memory again: the same caches write and read, nothing to restart
        cache.put("new", "value")
        assert reader.get("new") == "value"
        reader.flush_bookkeeping()
        assert reader.get_metrics()["health"]["bookkeeping"]["dropped_batches"] == 2, "a later batch was dropped"


def test_an_out_of_memory_error_names_the_fix(full_server: tuple[LocalRedisServer, redis.Redis],
                                              namespace: str) -> None:
    server, _ = full_server
    with MultiLevelCache(server.url, namespace=namespace, fail_open=False) as cache, \
            pytest.raises(CacheUnavailableError) as err:
        cache.put("new", "value")
    assert "raise maxmemory or free memory" in str(err.value), str(err.value)


def test_the_scripts_permission_check_does_not_depend_on_what_ran_before(
        acl_server: tuple[LocalRedisServer, redis.Redis]) -> None:
    """redis.acl_check_cmd with a command's arguments missing reads stale ones on Redis 7.0: a script
    that touched a key outside the namespace just before made the permission check refuse SET."""
    server, admin = acl_server
    url = f"redis://{set_documented_user(admin)}127.0.0.1:{server.port}/0"
    with MultiLevelCache(url, namespace=ACL_NAMESPACE, fail_open=False) as cache:
        warmer = PredictiveCacheWarmer(cache, background=False)
        for query in ("q1", "q2", "q1", "q2", "q1"):
            warmer.record_query(query, session="s")
        prediction = warmer.predict_next_queries("q1", session="s")
        for _ in range(3):
            admin.eval("return redis.call('SET', KEYS[1], ARGV[1], 'PX', 60000)", 1, "elsewhere:key", "x")
            admin.eval("return redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1])", 1, "elsewhere:zset")
            cache.put("k", 1)
            assert asyncio.run(warmer.prewarm_predictions(prediction, str.upper)).failed == 0
            cache.delete("q2")
