"""The Lua scripts themselves, against a real Redis (docs/design.md#invariants 6 and 7; script reload).

* every script documents its KEYS, ARGV and Reply, opens with the shebang Redis needs (``#!lua``;
  ``#!lua flags=allow-oom`` for delete.lua and flush.lua, which must run when Redis is full), and the
  registry expands its includes;
* invariant 7: a script refuses bad ARGV before its first write, even with sweep work due (every shard
  script: touch, put, delete, flush, lease); numbers only Lua accepts are refused too; every command a
  script runs is ACL-checked before its first write;
* byte totals stay exact (the shard's ``size`` records) when entries expire, and when Redis drops an
  entry's data behind the scripts' back, whose index member the first script meeting it removes;
* invariant 6: every script call the front end sends touches keys of one hash slot (a slot guard
  wraps the sync front end's I/O, the bookkeeping thread's touch.lua calls included, and checks every
  EVALSHA/EVAL, including the entry keys the script derives from KEYS[1]);
* shard tags split the slot space evenly, and keys with braces stay in their shard's slot;
* after SCRIPT FLUSH a call still succeeds and the script is cached again.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import NoScriptError, ResponseError

from victor_rcache import MultiLevelCache
from victor_rcache.keys import KeySpace, ShardKeys
from victor_rcache.local_redis import LocalRedisServer, free_port
from victor_rcache.scripts import Script, ScriptCall, Scripts, lua_dir
from victor_rcache.tiers import default_scripts

from .helpers import Client, FakeClock, check_invariants, flush_scripts, read_namespace, server_of, servers

Make = Callable[..., MultiLevelCache]
Arg = bytes | int | str
MISS = "<miss>"

SCRIPT_NAMES = ("touch", "put", "delete", "flush", "untag", "release", "lease", "sizing", "record", "predict",
                "view")
SHARD_SCRIPTS = ("touch", "put", "delete", "flush", "untag", "lease")  # the scripts that include includes/shard.lua
ALLOW_OOM = ("delete", "flush", "untag")  # they only remove: they must run when Redis is out of memory
NO_WRITES = ("view",)  # read only: they run whatever the memory, and stopping midway leaves nothing half-done


def script_named(name: str) -> Script:
    script: Script = getattr(default_scripts(), name)
    return script


def run_script(raw: Client, script: Script, keys: Sequence[bytes], argv: Sequence[Arg]) -> Any:
    """Call a script directly, as the library does: EVALSHA, then EVAL when Redis forgot it."""
    try:
        return raw.evalsha(script.sha, len(keys), *keys, *argv)
    except NoScriptError:
        return raw.eval(script.source, len(keys), *keys, *argv)  # type: ignore[arg-type]


def snapshot(raw: Client, namespace: str) -> dict[bytes, tuple[bytes | None, int]]:
    """Every key of the namespace: its DUMP (type, value, encoding) and absolute expiry (PEXPIRETIME)."""
    out: dict[bytes, tuple[bytes | None, int]] = {}
    for key in raw.scan_iter(match=namespace.encode() + b":*", count=1000):
        out[key] = (raw.dump(key), int(raw.execute_command("PEXPIRETIME", key)))
    return out


# ------------------------------------------------------------------------------------------ headers


def test_every_script_opens_with_a_header_documenting_keys_argv_and_reply() -> None:
    paths = sorted(lua_dir().glob("*.lua"))
    assert {p.stem for p in paths} == set(SCRIPT_NAMES)
    for path in paths:
        text = path.read_text("utf-8")
        # Redis refuses a script that may write before it runs when it is out of memory, unless it says
        # allow-oom: only the scripts that remove (and so free memory) may say so.
        shebang = ("#!lua flags=allow-oom" if path.stem in ALLOW_OOM else "#!lua flags=no-writes"
                   if path.stem in NO_WRITES else "#!lua")
        assert text.startswith(shebang + "\n--[["), f"{path.name} does not open with {shebang} and a --[[ ... ]] header"
        header = text[: text.index("]]")]
        for needle in ("KEYS[", "ARGV[", "Reply"):
            assert needle in header, f"{path.name}'s header does not mention {needle!r}"


def test_scripts_registry_loads_every_script_with_includes_expanded(raw: Client) -> None:
    scripts = Scripts()
    assert tuple(s.name for s in scripts.all()) == SCRIPT_NAMES
    def expanded(path: Path) -> bytes:  # a file with its includes (and theirs) pasted in
        return re.sub(rb'(?m)^[ \t]*-- @include "(includes/[\w.]+)"[ \t]*$',
                      lambda m: expanded(lua_dir() / m.group(1).decode()), path.read_bytes())

    prelude = expanded(lua_dir() / "includes" / "shard.lua")
    model = expanded(lua_dir() / "includes" / "model.lua")
    acl = (lua_dir() / "includes" / "acl.lua").read_bytes()
    for script in scripts.all():
        on_disk = (lua_dir() / f"{script.name}.lua").read_bytes()
        assert b"@include" not in script.source, f"{script.name}: an @include was left unexpanded"
        assert script.sha == hashlib.sha1(script.source).hexdigest()
        for include in re.findall(rb'@include "(includes/[\w.]+)"', on_disk):
            pasted = expanded(lua_dir() / include.decode())
            assert pasted in script.source, f"{script.name}: {include.decode()} was not pasted in"
        # (A script that writes checks first what it may run; release and the read-only ones need not.)
        assert acl in script.source or script.name in ("release", *NO_WRITES), \
            f"{script.name} does not check ACL permissions"
        # Redis compiles the expanded source and agrees on its SHA1 (what EVALSHA is sent with).
        assert raw.script_load(script.source) == script.sha  # type: ignore[arg-type]
    assert {s.name for s in scripts.all() if prelude in s.source} == set(SHARD_SCRIPTS)
    assert {s.name for s in scripts.all() if model in s.source} == {"record", "predict"}


# --------------------------------------------------- invariant 7: validate before the first write

DUE_SETTINGS: dict[str, Any] = {"shards": 1, "l2_size": 3, "l3_size": 4, "l2_ttl": 60, "l3_ttl": 600,
                                "promote_after": 3}
HEAD_FIELDS = ("now", "cap2", "cap3", "idle2", "idle3", "promote_after", "memory")
GOOD_HEAD_AFTER_NOW: tuple[Arg, ...] = (3, 4, 60_000, 600_000, 3, 300_000)  # matches DUE_SETTINGS
# touch.lua's ARGV[8]: six counts (l1_hits l1_evictions l1_fills l2_hits l3_hits misses), then the evidence flag
# and the checks flag (on here, so every refusal below is the checked one)
COUNTS = "0 0 0 0 0 0 0 1"


def records(*pairs: tuple[bytes, Arg]) -> list[tuple[bytes, Arg]]:
    """Items of one kind for touch.lua: (id, number) pairs."""
    return list(pairs)


def touch_body(counts: str = COUNTS, **by_kind: list[tuple[bytes, Arg]]) -> tuple[Arg, ...]:
    """touch.lua's ARGV after the header: the counts, then a triple (kind, id, number) per item (``k2``,
    ``k3`` for the tiers' hits, else the kind's letter)."""
    out: list[Arg] = [counts]
    for name, pairs in by_kind.items():
        kind = name[1:] if name.startswith("k") else name
        for entry_id, number in pairs:
            out += [kind, entry_id, number]
    return tuple(out)


def touch_ids(argv: Sequence[Any]) -> list[bytes]:
    """The entry ids of touch.lua's triples (its ARGV after the header and the counts)."""
    return [as_bytes(argv[i]) for i in range(9, len(argv), 3)]


GOOD_BODY: dict[str, tuple[Arg, ...]] = {
    # a hit on e (found in L2; its count raised), a miss on an id never stored
    "touch": touch_body("0 0 0 1 0 1 1 1", k2=records((b"e", 1)), n=records((b"e", 1)), m=records((b"absent", 1))),
    "put": (b"new", b"payload", 0, b"", 0, 0, 0, 0, 0, b""),
    "delete": (b"e", b""),
    "flush": (1, 0, 0),
    "untag": (500, b"t1"),  # the due state's tagged entry goes
    "lease": (b"absent", b"token", 1000),  # a miss: the lease is taken
}
HEADED = ("touch", "put", "delete", "untag", "lease")  # the shard scripts that take the common header (not flush.lua)


@dataclass(frozen=True)
class DueState:
    shard: ShardKeys  # the one shard the state is in
    now_ms: int  # a clock value at which every kind of sweep work is due


def build_due_state(make_cache: Make, raw: Client, namespace: str, clock: FakeClock) -> DueState:
    """One shard holding L2 and L3 entries, one with an absolute ttl, then a clock jump making all of it
    due: absolute expiry passed, L2 idle past l2_ttl, L3 idle past l3_ttl. A script that wrote anything
    (even just its sweep) before validating would change what Redis holds. (With a test clock Redis
    expires the entry keys in real time, after the same durations: none of them within the test.)"""
    cache = make_cache(clock=clock, **DUE_SETTINGS)
    for key in ("a", "b", "c", "d", "e"):
        cache.put(key, key * 10)
        clock.advance(1)
    cache.put("short", "absolute ttl", ttl=1000)
    clock.advance(1)
    cache.put("tagged", "tagged t1", tags=["t1"])
    clock.advance(1)
    cache.put("x" * 2000, "hashed id")
    clock.advance(2000)
    now_ms = clock.ms
    state = read_namespace(raw, namespace, 1).shards[0]
    for index in ("l2", "l3", "exp", "size", "entries"):
        assert getattr(state, index), f"the setup left {index} empty"
    assert max(state.l2.values()) <= now_ms - 60_000, "no L2 entry is idle past l2_ttl"
    assert max(state.l3.values()) <= now_ms - 600_000, "no L3 entry is idle past l3_ttl"
    assert max(state.exp.values()) <= now_ms, "no absolute ttl has passed"
    return DueState(KeySpace(namespace, 1).shard_keys[0], now_ms)


@dataclass(frozen=True)
class Call:
    """One script call: KEYS (the shard's l2 key, or a bad choice), the common header (with overrides)
    and a script-specific body."""

    script: str
    label: str
    head: dict[str, Arg] = field(default_factory=dict)
    body: tuple[Arg, ...] | None = None  # None = the script's good body
    head_fields: int = len(HEAD_FIELDS)  # fewer = the header is cut short
    keys: str = "l2"  # see keys_for()

    def keys_for(self, shard: ShardKeys) -> list[bytes]:
        return {
            "l2": [shard.l2],
            "l3": [shard.l3],  # a key of the shard, but not the one its keys derive from
            "l2 and l3": [shard.l2, shard.l3],
            "none": [],
            "untagged": [shard.l2[: shard.l2.index(b"{")] + b"untagged}:l2"],  # no hash tag: keys in any slot
        }[self.keys]

    def argv(self, now_ms: int) -> list[Arg]:
        body = list(GOOD_BODY[self.script] if self.body is None else self.body)
        if self.script == "flush":  # flush.lua takes no common header
            return body
        values = dict(zip(HEAD_FIELDS, (now_ms, *GOOD_HEAD_AFTER_NOW), strict=True))
        values.update(self.head)
        return list(values.values())[: self.head_fields] + body


BAD_HEADS: list[tuple[str, Arg]] = [
    ("now", "abc"), ("now", "1.5"), ("now", "-1"), ("now", ""), ("now", " 1"), ("now", "1 3"),
    ("cap2", 0), ("cap3", 0), ("cap2", -3), ("cap3", "2.5"),
    ("idle2", -1), ("idle3", -60_000), ("idle2", "soon"),
    ("promote_after", 0), ("promote_after", -1),
    ("memory", 0), ("memory", -1), ("memory", "1e3"),
]
BAD_KEYS = ("l3", "l2 and l3", "none", "untagged")


def _hits(n: int) -> list[tuple[bytes, Arg]]:
    """touch.lua's items of one L2 hit on each of n distinct ids."""
    return records(*((f"id{i}".encode(), 1) for i in range(n)))


BAD_CALLS: list[Call] = [
    *(Call(s, f"{f}={v!r}", head={f: v}) for s in HEADED for f, v in BAD_HEADS),
    *(Call(s, "header cut short", head_fields=len(HEAD_FIELDS) - 1, body=()) for s in HEADED),
    *(Call(s, f"KEYS: {k}", keys=k) for s in SHARD_SCRIPTS for k in BAD_KEYS),
    # touch.lua: six non-negative integer counts and the evidence flag, then triples (kind, id, number)
    Call("touch", "no counts", body=()),
    Call("touch", "empty counts", body=touch_body("")),
    Call("touch", "five counts and the flags", body=touch_body("0 0 0 0 0 0 1")),
    Call("touch", "seven counts and the flags", body=touch_body("0 0 0 0 0 0 0 0 1")),
    Call("touch", "no checks flag", body=touch_body("0 0 0 0 0 0 0")),
    Call("touch", "evidence flag 2", body=touch_body("0 0 0 0 0 0 2 1")),
    Call("touch", "checks flag 2", body=touch_body("0 0 0 0 0 0 0 2")),
    Call("touch", "counts separated by commas", body=touch_body("0,0,0,0,0,0,0,1")),
    Call("touch", "a negative count", body=touch_body("0 0 0 -1 0 0 0 1")),
    Call("touch", "a count 1.5", body=touch_body("0 0 0 0 1.5 0 0 1")),
    Call("touch", "a count x", body=touch_body("0 0 x 0 0 0 0 1")),
    Call("touch", "a triple cut short", body=(*touch_body(k2=records((b"e", 1))), "m", b"absent")),
    Call("touch", "an unknown kind", body=touch_body(x=records((b"e", 1)))),
    Call("touch", "an empty id", body=touch_body(k2=records((b"", 1)))),
    Call("touch", "L2 hits 0", body=touch_body(k2=records((b"e", 0)))),
    Call("touch", "L3 hits -1", body=touch_body(k3=records((b"e", -1)))),
    Call("touch", "hits 1.5", body=touch_body(k2=records((b"e", "1.5")))),
    Call("touch", "hits empty", body=touch_body(k3=records((b"e", b"")))),
    Call("touch", "count 0", body=touch_body(n=records((b"e", 0)))),
    Call("touch", "counted L2 hits 0", body=touch_body(k2n=records((b"e", 0)))),
    Call("touch", "counted L3 hits x", body=touch_body(k3n=records((b"e", "x")))),
    Call("touch", "kind 4n", body=touch_body(k4n=records((b"e", 1)))),
    Call("touch", "expiry of tier 1", body=touch_body(e=records((b"e", 1)))),
    Call("touch", "expiry of tier 4", body=touch_body(e=records((b"e", 4)))),
    Call("touch", "prewarm mark 1", body=touch_body(w=records((b"e", 1)))),
    Call("touch", "misses 0", body=touch_body(m=records((b"absent", 0)))),
    Call("touch", "misses x", body=touch_body(m=records((b"absent", "x")))),
    Call("touch", "bad item after a good one", body=touch_body(m=records((b"absent", 1), (b"other", 0)))),
    Call("touch", "a good kind after a bad one", body=touch_body(k2=records((b"e", 0)), m=records((b"absent", 1)))),
    Call("touch", "1001 hits", body=touch_body(k2=_hits(1001))),
    # lease.lua: id, token, lease ttl
    Call("lease", "no arguments", body=()),
    Call("lease", "no lease ttl", body=(b"absent", b"token")),
    Call("lease", "two extra arguments", body=(b"absent", b"token", 1000, b"ver", b"more")),
    Call("lease", "empty id", body=(b"", b"token", 1000)),
    Call("lease", "empty token", body=(b"absent", b"", 1000)),
    Call("lease", "lease ttl 0", body=(b"absent", b"token", 0)),
    Call("lease", "lease ttl -1", body=(b"absent", b"token", -1)),
    Call("lease", "lease ttl 1.5", body=(b"absent", b"token", "1.5")),
    Call("lease", "lease ttl soon", body=(b"absent", b"token", "soon")),
    Call("lease", "lease ttl empty", body=(b"absent", b"token", b"")),
    # put.lua: groups of ten
    Call("put", "no groups", body=()),
    Call("put", "4 items (an old group)", body=(b"new", b"payload", 0, b"")),
    Call("put", "7 items (the group before prewarm)", body=(b"new", b"payload", 0, b"", 0, 0, 0)),
    Call("put", "8 items (the group before grace and tags)", body=(b"new", b"payload", 0, b"", 0, 0, 0, 0)),
    Call("put", "11 items", body=(b"new", b"payload", 0, b"", 0, 0, 0, 0, 0, b"", b"more")),
    Call("put", "empty id", body=(b"", b"payload", 0, b"", 0, 0, 0, 0, 0, b"")),
    Call("put", "empty payload", body=(b"new", b"", 0, b"", 0, 0, 0, 0, 0, b"")),
    Call("put", "ttl_ms 1.5", body=(b"new", b"payload", "1.5", b"", 0, 0, 0, 0, 0, b"")),
    Call("put", "ttl_ms -1", body=(b"new", b"payload", -1, b"", 0, 0, 0, 0, 0, b"")),
    Call("put", "ttl_ms abc", body=(b"new", b"payload", "abc", b"", 0, 0, 0, 0, 0, b"")),
    Call("put", "ttl_ms empty", body=(b"new", b"payload", b"", b"", 0, 0, 0, 0, 0, b"")),
    Call("put", "since_ms -5", body=(b"new", b"payload", 0, b"", -5, 0, 0, 0, 0, b"")),
    Call("put", "expect_ver x", body=(b"new", b"payload", 0, b"", 0, "x", 0, 0, 0, b"")),
    Call("put", "cost_ms 2.5", body=(b"new", b"payload", 0, b"", 0, 0, "2.5", 0, 0, b"")),
    Call("put", "prewarm 2", body=(b"new", b"payload", 0, b"", 0, 0, 0, 2, 0, b"")),
    Call("put", "prewarm empty", body=(b"new", b"payload", 0, b"", 0, 0, 0, b"", 0, b"")),
    Call("put", "bad second group", body=(b"new", b"payload", 0, b"", 0, 0, 0, 0, 0, b"",
                                          b"n2", b"", 0, b"", 0, 0, 0, 0, 0, b"")),
    Call("put", "grace_ms -1", body=(b"new", b"payload", 1000, b"", 0, 0, 0, 0, -1, b"")),
    Call("put", "grace_ms x", body=(b"new", b"payload", 1000, b"", 0, 0, 0, 0, "x", b"")),
    Call("put", "tags without a length", body=(b"new", b"payload", 0, b"", 0, 0, 0, 0, 0, b"t1")),
    Call("put", "tags longer than said", body=(b"new", b"payload", 0, b"", 0, 0, 0, 0, 0, b"5:t1")),
    Call("put", "an empty tag", body=(b"new", b"payload", 0, b"", 0, 0, 0, 0, 0, b"0:")),
    Call("put", "a tag of 257 bytes", body=(b"new", b"payload", 0, b"", 0, 0, 0, 0, 0, b"257:" + b"t" * 257)),
    Call("put", "65 tags", body=(b"new", b"payload", 0, b"", 0, 0, 0, 0, 0,
                                 b"".join(b"2:%02d" % i for i in range(65)))),
    # untag.lua: the batch, then tag names
    Call("untag", "no batch", body=()),
    Call("untag", "no tags", body=(500,)),
    Call("untag", "batch 0", body=(0, b"t1")),
    Call("untag", "batch x", body=("x", b"t1")),
    Call("untag", "an empty tag", body=(500, b"t1", b"")),
    Call("untag", "a tag of 257 bytes", body=(500, b"t" * 257)),
    # delete.lua: (id, expected_version) pairs
    Call("delete", "no pairs", body=()),
    Call("delete", "odd arguments", body=(b"e",)),
    Call("delete", "three arguments", body=(b"e", b"", b"a")),
    Call("delete", "empty id", body=(b"", b"")),
    Call("delete", "expected_version 0", body=(b"e", 0)),
    Call("delete", "expected_version -1", body=(b"e", -1)),
    Call("delete", "expected_version 1.5", body=(b"e", "1.5")),
    Call("delete", "expected_version abc", body=(b"e", "abc")),
    Call("delete", "bad second pair", body=(b"e", b"", b"a", 0)),
    # flush.lua: batch, now, shard
    Call("flush", "batch 0", body=(0, 0, 0)),
    Call("flush", "batch -1", body=(-1, 0, 0)),
    Call("flush", "batch 1.5", body=("1.5", 0, 0)),
    Call("flush", "batch abc", body=("abc", 0, 0)),
    Call("flush", "batch empty", body=(b"", 0, 0)),
    Call("flush", "no batch", body=()),
    Call("flush", "no now", body=(1,)),
    Call("flush", "now -1", body=(1, -1, 0)),
    Call("flush", "no shard", body=(1, 0)),
    Call("flush", "shard x", body=(1, 0, "x")),
]


def _call_id(call: Call) -> str:
    return f"{call.script}:{call.label}"


def assert_refused_without_writes(call: Call, make_cache: Make, raw: Client, namespace: str,
                                  clock: FakeClock) -> None:
    due = build_due_state(make_cache, raw, namespace, clock)
    before = snapshot(raw, namespace)
    with pytest.raises(ResponseError) as refused:
        run_script(raw, script_named(call.script), call.keys_for(due.shard), call.argv(due.now_ms))
    assert str(refused.value).startswith("VRC_BADARG"), f"not a validation error: {refused.value}"
    assert snapshot(raw, namespace) == before, f"{call.script}.lua wrote before refusing its input"


@pytest.mark.parametrize("call", BAD_CALLS, ids=_call_id)
def test_bad_argv_is_refused_before_the_first_write(call: Call, make_cache: Make, raw: Client,
                                                    namespace: str, clock: FakeClock) -> None:
    assert_refused_without_writes(call, make_cache, raw, namespace, clock)


@pytest.mark.parametrize("script_name", SHARD_SCRIPTS)
def test_the_same_call_with_good_argv_does_write(script_name: str, make_cache: Make, raw: Client,
                                                 namespace: str, clock: FakeClock) -> None:
    """The control for the test above: the state is such that a valid call visibly changes Redis."""
    due = build_due_state(make_cache, raw, namespace, clock)
    before = snapshot(raw, namespace)
    call = Call(script_name, "good")
    run_script(raw, script_named(script_name), call.keys_for(due.shard), call.argv(due.now_ms))
    assert snapshot(raw, namespace) != before


LUA_ONLY_NUMBERS = "Lua's tonumber accepts inf, hex and 1e20, which the checks pass but Redis later rejects or misuses"
TOO_BIG = str(10**17)  # plain digits, but past 2^53, the integers a Lua number holds exactly

GAPS: list[Call] = [
    *(Call(s, f"{f}={v}", head={f: v}) for s in HEADED
      for f, v in (("now", "inf"), ("cap2", "inf"), ("promote_after", "inf"), ("memory", "1e20"), ("idle3", "0x10"),
                   ("cap3", TOO_BIG))),
    Call("touch", "a count inf", body=touch_body("0 0 0 inf 0 0 0 1")),
    Call("touch", "a count 1e20", body=touch_body("0 1e20 0 0 0 0 0 1")),
    Call("touch", "a count 0x10", body=touch_body("0 0 0 0 0x10 0 0 1")),
    Call("touch", "a count past 2^53", body=touch_body(f"{TOO_BIG} 0 0 0 0 0 0 1")),
    Call("touch", "hits inf", body=touch_body(k2=records((b"e", "inf")))),
    Call("touch", "hits nan", body=touch_body(k3=records((b"e", "nan")))),
    Call("touch", "count 1e20", body=touch_body(n=records((b"e", "1e20")))),
    Call("touch", "hits past 2^53", body=touch_body(k2=records((b"e", TOO_BIG)))),
    Call("lease", "lease ttl inf", body=(b"absent", b"token", "inf")),
    Call("lease", "lease ttl 1e20", body=(b"absent", b"token", "1e20")),
    Call("put", "ttl_ms inf", body=(b"new", b"payload", "inf", b"", 0, 0, 0, 0, 0, b"")),
    Call("put", "ttl_ms 1e20", body=(b"new", b"payload", "1e20", b"", 0, 0, 0, 0, 0, b"")),
    Call("put", "ttl_ms past 2^53", body=(b"new", b"payload", TOO_BIG, b"", 0, 0, 0, 0, 0, b"")),
    Call("delete", "expected_version 1e20", body=(b"e", "1e20")),
    Call("flush", "batch inf", body=("inf", 0, 0)),
    Call("flush", "now 1e20", body=(1, "1e20", 0)),
]


@pytest.mark.parametrize("call", GAPS, ids=_call_id)
def test_numbers_only_lua_accepts_are_refused_before_the_first_write(call: Call, make_cache: Make,
                                                                     raw: Client, namespace: str,
                                                                     clock: FakeClock) -> None:
    assert_refused_without_writes(call, make_cache, raw, namespace, clock)


# ---------------------------------------------------------------------------- exact byte totals


def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds (fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.005)


@pytest.mark.parametrize("expiry", ["on-the-scripts-clock", "by-redis-itself"])
def test_byte_totals_stay_exact_when_entries_expire(expiry: str, make_cache: Make, raw: Client, namespace: str,
                                                   clock: FakeClock) -> None:
    """An entry past its absolute ttl is a miss at once; the reader's report of the miss (touch.lua)
    removes it with exactly the bytes its `size` record accounts for, whether Redis has dropped its
    data yet (its own key expiry) or not (a test clock that jumped ahead of Redis's)."""
    space = KeySpace(namespace, 1)
    if expiry == "on-the-scripts-clock":
        cache, reader = make_cache(shards=1, clock=clock), make_cache(shards=1, clock=clock)
        cache.put("gone", "x" * 100, ttl=1)
        cache.put("kept", "y" * 50)
        clock.advance(2)
    else:
        cache, reader = make_cache(shards=1), make_cache(shards=1)
        cache.put("kept", "y" * 50)
        cache.put("gone", "x" * 100, ttl=0.001)
        until(lambda: not raw.exists(space.entry_key(space.ref("gone"))), "Redis expiring the entry's key")
        assert read_namespace(raw, namespace, 1).tier_of(b"gone") == 2, "no script has met it yet"
    assert reader.get("gone") is None
    reader.flush_bookkeeping()
    state = check_invariants(raw, namespace, 1, 10_000, 100_000)  # no leftover allowed: the report removed it
    assert state.l2_ids == {b"kept"}
    (shard,) = state.shards
    assert int(shard.stats[b"l2_bytes"]) == len(shard.entries[b"kept"][b"v"])


MEETINGS = ["touch.lua, a reader's miss", "put.lua, the same key", "put.lua, the bounds", "lease.lua, get_or_set",
            "delete.lua"]


@pytest.mark.parametrize("meeting", MEETINGS)
def test_data_removed_behind_the_scripts_back_is_never_served_and_the_first_script_meeting_it_removes_it(
        meeting: str, make_cache: Make, raw: Client, namespace: str, clock: FakeClock) -> None:
    """When Redis itself drops an entry's data (an allkeys-* eviction, a manual DEL), the entry is a miss
    from then on; its `size` record keeps the byte totals exact, and the first script that meets the
    index member (touch.lua on a reported miss, put.lua, lease.lua, delete.lua, the LRU bounds) removes
    it together with exactly the bytes it accounted for."""
    settings: dict[str, Any] = {"shards": 1, "l2_size": 2, "l3_size": 10, "clock": clock}
    writer = make_cache(**settings)
    writer.put("gone", "x" * 100)
    clock.advance(1)
    writer.put("kept", "y" * 50)
    space = KeySpace(namespace, 1)
    raw.delete(space.entry_key(space.ref("gone")))
    (shard,) = read_namespace(raw, namespace, 1).shards
    assert b"gone" in shard.l2, "the index still lists it: no script has met it yet"
    assert int(shard.stats[b"l2_bytes"]) == int(shard.size[b"gone"]) + int(shard.size[b"kept"])

    reader = make_cache(**settings)
    if meeting.startswith("touch"):
        assert reader.get("gone", MISS) == MISS
        reader.flush_bookkeeping()
    elif meeting == "put.lua, the same key":
        writer.put("gone", "new")
    elif meeting == "put.lua, the bounds":
        clock.advance(1)
        writer.put("third", "z")  # L2 holds 2: its least recent entry, "gone", moves to L3
    elif meeting.startswith("lease"):
        assert reader.get_or_set("gone", lambda: "new") == "new"
    else:
        writer.delete("gone")
    reader.flush_bookkeeping()

    state = check_invariants(raw, namespace, 1, 2, 10)  # the size records and the byte totals agree
    if meeting in ("put.lua, the same key", "lease.lua, get_or_set"):
        assert state.tier_of(b"gone") == 2
        assert make_cache(**settings).get("gone") == "new"
    else:
        assert state.tier_of(b"gone") == 0
        assert make_cache(**settings).get("gone", MISS) == MISS


# ---------------------------------------------------- invariant 6: one hash slot per script call

# Where each shard script's ARGV names entry ids (after the 7-number header; touch.lua: in its triples, see
# touch_ids; flush.lua: none).
ID_POSITIONS = {"touch": slice(0, 0), "put": slice(7, None, 10), "delete": slice(7, None, 2),
                "lease": slice(7, 8), "flush": slice(0, 0), "untag": slice(0, 0)}


def as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


@dataclass
class SlotGuard:
    """Checks every EVALSHA/EVAL of a batch: KEYS share one slot, and so do the entry data keys the
    script derives (``<base>e:<id>``, base = KEYS[1] without its trailing ``l2``)."""

    scripts: Scripts
    calls: Counter[str] = field(default_factory=Counter)  # script name -> calls seen
    commands: Counter[str] = field(default_factory=Counter)  # EVALSHA / EVAL -> calls seen
    violations: list[str] = field(default_factory=list)
    keys_seen: set[bytes] = field(default_factory=set)

    def check(self, batch: Iterable[Sequence[Any]]) -> None:
        for command in batch:
            verb = as_bytes(command[0]).upper().decode()
            if verb in ("EVALSHA", "EVAL"):
                self._check_script_call(verb, command)

    def _check_script_call(self, verb: str, command: Sequence[Any]) -> None:
        self.commands[verb] += 1
        by_ref = {s.sha if verb == "EVALSHA" else s.source: s.name for s in self.scripts.all()}
        name = by_ref.get(command[1])
        numkeys = int(command[2])
        keys = [as_bytes(k) for k in command[3:3 + numkeys]]
        argv = command[3 + numkeys:]
        where = f"{verb} {name or '<unknown script>'} KEYS={keys!r}"
        if name is None:
            self.violations.append(f"{where}: not one of the library's scripts")
            return
        self.calls[name] += 1
        if name == "release":  # one key: the lease, which lives in its entry's shard slot
            if len(keys) != 1 or b":lease:" not in keys[0]:
                self.violations.append(f"{where}: release.lua takes exactly one lease key")
            return
        if not keys or not keys[0].endswith(b":l2"):
            self.violations.append(f"{where}: KEYS[1] is not a shard's l2 index, entry keys derive from it")
            return
        base = keys[0][:-2]
        ids = [as_bytes(i) for i in argv[ID_POSITIONS[name]]]
        if name == "touch":  # ids in its triples, after the counts
            ids = touch_ids(argv)
        ids = ids or [b"any id"]  # flush: ids come from the index
        derived = [base + b"e:" + i for i in ids]
        self.keys_seen.update(keys + derived)
        slot = key_slot(keys[0])
        for key in keys[1:] + derived:
            if key_slot(key) != slot:
                self.violations.append(f"{where}: {key!r} is in slot {key_slot(key)}, KEYS[1] in {slot}")

    def wrap(self, cache: MultiLevelCache) -> MultiLevelCache:
        """Make ``cache`` run every batch it sends past this guard first: the guard sits on the I/O both
        the callers' operations and the bookkeeping thread (its touch.lua calls) go through."""
        io = cache._io
        send = io.send

        def guarded(batch: list[Any], *more: Any) -> list[Any] | redis.RedisError:
            self.check(batch)
            return send(batch, *more)

        io.send = guarded  # type: ignore[method-assign]
        return cache


@pytest.fixture
def slot_guard() -> SlotGuard:
    return SlotGuard(default_scripts())


def test_the_slot_guard_flags_cross_slot_script_calls(slot_guard: SlotGuard) -> None:
    space = KeySpace("guard", 16)
    s0, s1 = space.shard_keys[0], space.shard_keys[1]
    touch, put = default_scripts().touch, default_scripts().put
    head = (0, 1, 1, 0, 0, 1, 1)
    good = ScriptCall(touch, (s0.l2,), (*head, *touch_body(k2=records((b"{other}", 1)), m=records((b"a}{b", 1)))))
    slot_guard.check([good.evalsha(), good.eval(), ("HGETALL", s1.stats)])
    assert slot_guard.violations == []
    assert slot_guard.commands == Counter({"EVALSHA": 1, "EVAL": 1})

    mixed = ScriptCall(touch, (s0.l2, s1.stats), (*head, *touch_body(k2=records((b"x", 1)))))
    not_l2_first = ScriptCall(put, (s0.l3,), (*head, b"x", b"v", 0, b"", 0, 0, 0, 0))
    foreign = ("EVALSHA", "0" * 40, 1, s0.l2)
    for command in (mixed.evalsha(), not_l2_first.evalsha(), foreign):
        slot_guard.violations.clear()
        slot_guard.check([command])
        assert len(slot_guard.violations) == 1, command


BRACE_KEYS: list[str | bytes] = [
    "{tag}", "{}", "}{", "a{b}c", "{{nested}}", "ends{", "}starts", "{s0.10}", "vrc:{s1.2}:l2",
    "ключ {юникод}", b"\x00\xff{bin}\xfe", b"{\x80}", "#leading hash {x}", "long {" + "y" * 2000 + "}",
]


def test_every_script_call_of_a_varied_workload_stays_in_one_slot(make_cache: Make, slot_guard: SlotGuard,
                                                                   raw: Client, clock: FakeClock) -> None:
    settings = {"l2_size": 16, "l3_size": 32, "l2_ttl": 60, "l3_ttl": 600, "promote_after": 2, "clock": clock}
    writer = slot_guard.wrap(make_cache(**settings))
    reader = slot_guard.wrap(make_cache(**settings))
    plain = [f"tool query {i}" for i in range(40)]
    keys: list[str | bytes] = [*BRACE_KEYS, "x" * 3000, "plain"]
    for key in keys:
        writer.put(key, {"key": key})
    for key in keys:
        assert reader.get(key) in ({"key": key}, None)  # tiny tiers: it may already be gone
    writer.put_many({k: i for i, k in enumerate(plain)}, ttl=30)
    assert reader.get_many([*plain, *keys, "absent {key}"])
    clock.advance(61)  # everything idle in L2: the sweeps of the next calls move it to L3
    reader.get_many(plain)  # past their ttl: misses
    reader.flush_bookkeeping()  # touch.lua, one call per shard: the reads above, then its sweep
    reader.get_many(keys)
    reader.get_many(keys)  # L3 hits, two each: promotions once reported
    reader.flush_bookkeeping()
    assert reader.get_or_set("computed {key}", lambda: 1) == 1  # lease.lua, then put.lua and release.lua
    clock.advance(1)
    assert writer.delete("a{b}c") in (True, False)
    writer.invalidate("}{")
    writer.put("after", "v", ttl=5)
    flush_scripts(raw)  # every script call now goes EVALSHA -> NOSCRIPT -> EVAL
    reader.get_many([*keys, "after"])
    reader.flush_bookkeeping()
    writer.put_many({b"\x00{bin2}": 1, "{tag}": 2}, tags=["t{1}", b"\x00}"])
    assert writer.invalidate_tags("t{1}") == 2
    writer.put_many({b"\x00{bin2}": 1, "{tag}": 2})
    writer.delete(b"\x00{bin2}")
    writer.get_metrics()
    reader.get_metrics("fleet")
    writer.invalidate()
    assert make_cache(**settings).get("{tag}") is None

    assert slot_guard.violations == []
    assert set(slot_guard.calls) == {*SHARD_SCRIPTS, "release"}, slot_guard.calls
    assert slot_guard.commands["EVALSHA"] > 0
    assert slot_guard.commands["EVAL"] > 0


# ------------------------------------------------------------------------------------- shard tags


@pytest.mark.parametrize("namespace_", ["vrc", "tools", "agents-prod"])
def test_default_shard_tags_each_hash_into_their_own_sixteenth_of_the_slots(namespace_: str) -> None:
    space = KeySpace(namespace_, 16)
    width = REDIS_CLUSTER_HASH_SLOTS // 16
    slots = []
    for i, sk in enumerate(space.shard_keys):
        shard_slots = {key_slot(k) for k in sk.keys}
        assert len(shard_slots) == 1, f"shard {i}'s keys span slots {shard_slots}"
        (slot,) = shard_slots
        assert i * width <= slot < (i + 1) * width, f"shard {i} is in slot {slot}"
        slots.append(slot)
    # A cluster of m masters with equal contiguous slot ranges (m dividing 16) gets 16/m shards each.
    for masters in (1, 2, 4, 8, 16):
        per_master = Counter(slot * masters // REDIS_CLUSTER_HASH_SLOTS for slot in slots)
        assert sorted(per_master.values()) == [16 // masters] * masters


def test_keys_with_braces_land_in_their_shards_slot(make_cache: Make, raw: Client, namespace: str) -> None:
    writer, reader = make_cache(), make_cache()
    writer.put_many({key: i for i, key in enumerate(BRACE_KEYS)})
    space = KeySpace(namespace, 16)
    shard_slot = [key_slot(sk.l2) for sk in space.shard_keys]
    for key in BRACE_KEYS:
        ref = space.ref(key)
        entry = space.entry_key(ref)
        assert raw.exists(entry), f"no data hash at {entry!r}"
        assert key_slot(entry) == shard_slot[ref.shard], f"{key!r} left its shard's slot"
    tag_of = {sk.l2[: -len(b"l2")]: i for i, sk in enumerate(space.shard_keys)}
    stored = [k for k in raw.scan_iter(match=namespace.encode() + b":*", count=1000) if k != space.config]
    assert len(stored) > len(BRACE_KEYS)
    for name in stored:
        shards = [i for base, i in tag_of.items() if name.startswith(base)]
        assert len(shards) == 1, f"{name!r} is not under exactly one shard"
        assert key_slot(name) == shard_slot[shards[0]], f"{name!r} is outside its shard's slot"
    assert reader.get_many(BRACE_KEYS) == {key: i for i, key in enumerate(BRACE_KEYS)}


@pytest.fixture(scope="module")
def cluster_node() -> Iterator[redis.Redis]:
    """A private cluster-enabled redis-server (no slots assigned): CLUSTER KEYSLOT is Redis's own answer."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs a redis-server binary to start a cluster-enabled node")
    extra = ("--cluster-enabled", "yes", "--cluster-port", str(free_port()))
    with LocalRedisServer(extra_args=extra) as server:
        client = redis.Redis.from_url(server.url)
        yield client
        client.close()


def test_slot_arithmetic_agrees_with_a_real_cluster_node(cluster_node: redis.Redis, namespace: str) -> None:
    """The guard and the tag choice rely on redis.crc.key_slot; Redis Cluster itself must agree."""
    space = KeySpace(namespace, 16)
    names = [k for sk in space.shard_keys for k in sk.keys]
    names += [space.entry_key(space.ref(key)) for key in BRACE_KEYS]
    for name in names:
        assert cluster_node.execute_command("CLUSTER", "KEYSLOT", name) == key_slot(name), name


# ------------------------------------------------------------------------------ NOSCRIPT reload


def test_calls_succeed_after_script_flush_and_cache_the_scripts_again(make_cache: Make, raw: Client) -> None:
    """On a cluster each master caches scripts of its own: a script is cached again on the master
    that ran it (flush.lua, run for every shard by invalidate(), on every master)."""
    writer = make_cache()
    writer.put("before", 1)
    scripts = default_scripts()
    shas = [s.sha for s in scripts.all() if s.name in SHARD_SCRIPTS]
    flush_scripts(raw)
    for server in servers(raw):
        assert server.script_exists(*shas) == [False] * len(shas)

    reader = make_cache()
    assert reader.get("before") == 1  # a plain read (HMGET): no script
    assert reader.get_or_set("computed", lambda: 2) == 2  # lease.lua, then put.lua and release.lua
    reader.flush_bookkeeping()  # touch.lua: the hit on "before", the miss on "computed"
    writer.put("after", 3)  # put.lua
    assert writer.delete("before") is True  # delete.lua
    writer.invalidate()  # flush.lua
    assert reader.get("after") is None
    reader.flush_bookkeeping()
    space = writer._core.space
    before, computed, after = (server_of(raw, space.entry_key(space.ref(k))) for k in ("before", "computed", "after"))
    assert before.script_exists(scripts.touch.sha, scripts.delete.sha) == [True, True]
    assert computed.script_exists(scripts.lease.sha, scripts.put.sha, scripts.release.sha,
                                  scripts.touch.sha) == [True] * 4
    assert after.script_exists(scripts.put.sha, scripts.touch.sha) == [True, True]
    for master in servers(raw, replicas=False):
        assert master.script_exists(scripts.flush.sha) == [True]
    assert reader.get_metrics()["health"]["script_reloads"] >= 4  # lease, put, release, touch
    assert writer.get_metrics()["health"]["script_reloads"] >= 2  # delete, flush (the reader reloaded put.lua)

    # Cached again: the next call is a single EVALSHA that Redis runs without a fallback. (Nothing else
    # runs meanwhile: the readers' bookkeeping was sent above, and a put buffers none.)
    writer.put("again", 3)
    masters = servers(raw, replicas=False)
    for master in masters:
        master.config_resetstat()
    writer.put("again", 4)
    stats = [master.info("commandstats") for master in masters]
    evalsha = [s.get("cmdstat_evalsha", {}) for s in stats]
    assert sum(e.get("calls", 0) for e in evalsha) == 1
    assert sum(e.get("failed_calls", 0) + e.get("rejected_calls", 0) for e in evalsha) == 0
    assert not any("cmdstat_eval" in s for s in stats)
    assert make_cache().get("again") == 4


# ------------------------------------------------------------------------------ ACL permissions


def _declared(script: Script, table: str) -> set[str]:
    """The commands a script checks up front (includes/acl.lua), from its `local <table> = {...}`."""
    block = re.search(rb"local " + table.encode() + rb" = \{([^}]*)\}", script.source)
    assert block is not None, f"{script.name} declares no {table}"
    return {name.decode() for name in re.findall(rb"'(\w+)'", block[1])}


# release.lua runs GET and DEL on the lease key alone (nothing to leave half-done); sizing.lua checks its
# three commands inline, before its first write; a read-only script writes nothing to leave half-done.
@pytest.mark.parametrize("script_name",
                         [name for name in SCRIPT_NAMES if name not in ("release", "sizing", *NO_WRITES)])
def test_every_command_a_script_runs_is_checked_before_its_first_write(script_name: str) -> None:
    """A command denied midway would fail the call after some writes: each is checked up front."""
    script = getattr(Scripts(), script_name)
    table = "MODEL_COMMANDS" if script_name in ("record", "predict") else "SHARD_COMMANDS"
    used = {name.decode().lower() for name in re.findall(rb"redis\.p?call\('(\w+)'", script.source)}
    checked = _declared(script, table) | {"spublish"}  # SPUBLISH is checked with its channel
    assert used <= checked, f"{script_name}.lua runs {used - checked} without checking them first"


def test_a_counted_hit_item_does_what_a_hit_and_a_count_item_do(make_cache: Make, raw: Client, namespace: str,
                                                                 clock: FakeClock) -> None:
    """touch.lua's ``2n``/``3n`` (what a batch sends for a hit whose hits all count, a first hit's usual case) is
    ``2``/``3`` plus ``n`` with the same number, in half the arguments: the entry is stamped, its count raised,
    and an L3 entry whose count reaches promote_after moves to L2."""
    cache = make_cache(shards=1, l2_size=3, l3_size=10, promote_after=2, clock=clock, coherence=False)
    for key in ("l3a", "l3b", "idle", "l2a", "l2b"):  # L2 holds three: the first two go down to L3
        cache.put(key, key)
        clock.advance(0.01)
    shard = KeySpace(namespace, 1).shard_keys[0]
    before = read_namespace(raw, namespace, 1).shards[0]
    assert set(before.l3) == {b"l3a", b"l3b"}
    clock.advance(1)
    head = (clock.ms, 3, 10, 0, 0, 2, 300_000)
    run_script(raw, script_named("touch"), [shard.l2], [*head, *touch_body(
        "0 0 0 2 2 0 0 1", k2n=records((b"l2a", 1)), k2=records((b"l2b", 1)), n=records((b"l2b", 1)),
        k3n=records((b"l3a", 2)), k3=records((b"l3b", 2)))])
    after = read_namespace(raw, namespace, 1).shards[0]
    assert after.l2[b"l2a"] > before.l2[b"l2a"]  # both stamped...
    assert after.l2[b"l2b"] > before.l2[b"l2b"]
    counts = {i: server_of(raw, shard.l2).hget(shard.entry(i), "n") for i in (b"l2a", b"l2b")}
    assert counts == {b"l2a": b"1", b"l2b": b"1"}  # ...and both counted
    assert b"l3a" in after.l2  # counted up to promote_after: promoted (the idle L2 entry made room)...
    assert b"l3b" in after.l3  # ...where a hit only stamped is not
    assert b"idle" in after.l3
    check_invariants(raw, namespace, 1, 3, 10, now_ms=clock.ms)
