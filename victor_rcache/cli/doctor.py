"""``doctor``: check what the cache needs of Redis (connectivity, server version, cluster state, ACL
permissions, the pub/sub mode of invalidations, scripts, memory policy, the namespace's settings) and
print a fix for each problem."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from ..codec import FORMAT_VERSION
from ..config import ENV_PREFIX, CacheConfig, redact
from ..connection import IO_ERRORS
from ..errors import CacheError
from ..prediction.model import ModelKeys
from ..tiers import default_scripts
from .common import (
    FAILED,
    OK,
    Context,
    _int,
    _json_default,
    _text,
    command,
    fmt_bytes,
    open_cache,
    primaries,
    redis_problem,
    settings,
)

STATUS_MARK = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "unknown": "??", "skip": "--"}


@dataclass
class Check:
    """One doctor line: what was checked, how it went (ok, warn, fail, unknown, skip), and the fix."""

    check: str
    status: str
    result: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)


SECURITY_FIX = "grant the ACL rule set in the README section 'Security'"
DOCTOR_CHECKS = ("connectivity", "server version", "cluster state", "ACL permissions", "pub/sub mode", "scripts",
                 "memory policy", "namespace config")
# The pub/sub commands the cache sends, checked on each shard's channel: the scripts SPUBLISH, the subscriber
# SSUBSCRIBEs (and SUNSUBSCRIBEs a closed cache's channels).
CHANNEL_COMMANDS = ("spublish", "ssubscribe", "sunsubscribe")
ACL_PROBE = """
if not redis.acl_check_cmd then return -1 end
local denied, invalid, i, n = {}, {}, 1, 1
while i <= #ARGV do
  local size = tonumber(ARGV[i])
  local ok, allowed = pcall(redis.acl_check_cmd, unpack(ARGV, i + 1, i + size))
  if not ok then invalid[#invalid + 1] = n elseif not allowed then denied[#denied + 1] = n end
  i, n = i + size + 1, n + 1
end
return {denied, invalid}
"""
# Commands the library sends itself (the scripts' own commands are read from the scripts): the scripts
# (EVALSHA, EVAL), a Redis hit (HMGET of the entry), a fill's lease (SET, EXISTS, PTTL, HGET, DEL), the
# first call's handshake (HSETNX, HGETALL, TIME), metrics (ZCARD, HGETALL, HMGET), the model and fleet
# sizing (HSET, HINCRBY, ZRANGE, DEL), the tool-selection cache (GET, SET, DEL) and the health check (PING).
CLIENT_COMMANDS = ("evalsha", "eval", "hmget", "set", "exists", "pttl", "hget", "del", "hsetnx", "hgetall", "time",
                   "zcard", "hset", "hincrby", "zrange", "get", "ping")
# Well-formed arguments after the key (K) for each command: redis.acl_check_cmd does not check arity, and
# with arguments missing Redis 7.0 reads stale ones for some commands (SET, EVAL, ZUNIONSTORE): a random answer.
PROBE_ARGS: dict[str, tuple[str, ...]] = {
    "hget": ("K", "f"), "hmget": ("K", "f"), "hset": ("K", "f", "v"), "hsetnx": ("K", "f", "v"),
    "hincrby": ("K", "f", "1"), "hdel": ("K", "f"), "hexists": ("K", "f"), "hstrlen": ("K", "f"),
    "zadd": ("K", "1", "m"), "zrem": ("K", "m"), "zscore": ("K", "m"), "zmscore": ("K", "m"),
    "zincrby": ("K", "1", "m"), "zrange": ("K", "0", "1"), "zcount": ("K", "0", "1"),
    "zrangebyscore": ("K", "0", "1"), "zremrangebyscore": ("K", "0", "1"), "zremrangebyrank": ("K", "0", "1"),
    "lrange": ("K", "0", "1"), "ltrim": ("K", "0", "1"), "lpush": ("K", "v"), "pexpire": ("K", "1"),
    "pexpireat": ("K", "1"), "set": ("K", "v"), "zunionstore": ("K", "1", "K"), "eval": ("return 1", "1", "K"),
    "evalsha": ("0" * 40, "1", "K"), "time": (), "ping": (), "sadd": ("K", "m"), "srem": ("K", "m"), "scard": ("K",),
    "srandmember": ("K", "1"),
}


@dataclass(frozen=True)
class Probe:
    """One question for ``redis.acl_check_cmd``: may the user run ``args``, which touch ``target``?"""

    args: tuple[str, ...]
    target: str  # the key or channel it touches ("" for none)


def acl_probes(ctx: Context) -> list[Probe]:
    """Every command the cache sends, with a key of the namespace it uses (or its channel)."""
    space, model = ctx.space, ModelKeys(ctx.cache.namespace)
    shard = space.shard_keys[0]
    keyed: dict[str, set[str]] = {}
    for script in default_scripts(ctx.cache.config.lua_shebang).all():
        key = _text(model.stats if script.name in ("record", "predict") else shard.stats)
        for name in re.findall(rb"redis\.p?call\('(\w+)'", script.source):
            keyed.setdefault(name.decode().lower(), set()).add(key)
    for name in CLIENT_COMMANDS:
        keyed.setdefault(name, set()).add(_text(space.config if name in ("hsetnx", "hgetall") else shard.stats))
    probes = []
    for name in sorted(keyed):
        if name in CHANNEL_COMMANDS:  # checked on every shard's channel, below
            continue
        template = PROBE_ARGS.get(name, ("K",))
        for key in sorted(keyed[name]) if "K" in template else [""]:
            probes.append(Probe((name, *(key if a == "K" else a for a in template)), key))
    for channel in map(_text, space.channels):  # sharded pub/sub: one channel per shard
        probes += [Probe(("spublish", channel, "x"), channel), Probe(("ssubscribe", channel), channel),
                   Probe(("sunsubscribe", channel), channel)]
    probes.append(Probe(("client", "setinfo", "lib-name", "redis-py"), ""))  # Redis >= 7.2 only, else invalid
    if ctx.cache.config.cluster:
        probes += [Probe(("cluster", "slots"), ""), Probe(("cluster", "shards"), ""), Probe(("command",), "")]
    return probes


def probe_acl(node: Any, probes: list[Probe]) -> tuple[set[int], set[int]]:
    """Indexes of the probes this node's user is denied, and of those Redis does not know (EVAL of ACL_PROBE)."""
    argv = [x for probe in probes for x in (str(len(probe.args)), *probe.args)]
    reply = command(node, "EVAL", ACL_PROBE, 0, *argv)
    if reply == -1:
        raise ResponseError("redis.acl_check_cmd is missing: Redis >= 7.0 is required")
    denied, invalid = reply
    return {int(i) - 1 for i in denied}, {int(i) - 1 for i in invalid}


def probe_acl_dryrun(node: Any, probes: list[Probe]) -> tuple[set[int], set[int]]:
    """The same as probe_acl with ACL DRYRUN (for a user that may not EVAL but may ask that)."""
    user = command(node, "ACL", "WHOAMI")
    pipe = node.pipeline(transaction=False)
    for probe in probes:
        pipe.execute_command("ACL", "DRYRUN", user, *probe.args)
    denied, invalid = set(), set()
    for i, reply in enumerate(pipe.execute(raise_on_error=False)):
        if isinstance(reply, NoPermissionError):
            raise reply
        if isinstance(reply, Exception):
            invalid.add(i)
        elif reply not in (b"OK", "OK", True):
            denied.add(i)
    return denied, invalid


def explain_denials(probes: list[Probe], denied: set[int]) -> tuple[list[str], list[str]]:
    """(commands, keys or channels) the user lacks: a denied command on a key (or channel) that other
    commands may use lacks the command; a key no command may use is the key's own problem."""
    usable = {p.target for i, p in enumerate(probes) if i not in denied}
    commands, targets = set(), set()
    for i in denied:
        probe = probes[i]
        name = "|".join(probe.args[:2]) if probe.args[0] in ("client", "cluster") else probe.args[0]
        if probe.target and probe.target not in usable:
            targets.add(("&" if probe.args[0] in CHANNEL_COMMANDS else "~") + probe.target)
        else:
            commands.add("+" + name)
    return sorted(commands), sorted(targets)


def check_acl(ctx: Context, nodes: list[tuple[str, Any]]) -> Check:
    probes = acl_probes(ctx)
    denied: set[int] = set()
    how = "redis.acl_check_cmd"
    for _, node in nodes:
        try:
            no, invalid = probe_acl(node, probes)
        except NoPermissionError:
            how = "ACL DRYRUN"
            try:
                no, invalid = probe_acl_dryrun(node, probes)
            except NoPermissionError:
                return Check("ACL permissions", "fail", "EVAL is not permitted (the cache runs its scripts with "
                             "EVALSHA and EVAL), nor ACL DRYRUN: nothing else could be checked",
                             f"grant +eval +evalsha; {SECURITY_FIX}", {"missing_commands": ["+eval"]})
        denied |= no - invalid
    user = unquote(urlsplit(ctx.cache.config.url).username or "") or "default"
    commands, targets = explain_denials(probes, denied)
    count = len({p.args[0] for p in probes})
    if not denied:
        return Check("ACL permissions", "ok", f"user {user} may run the {count} commands the cache needs, on "
                     f"{ctx.cache.namespace}:* and its {len(ctx.space.channels)} shard channels "
                     f"{shard_channels(ctx)} (checked with {how})")
    problems = ([f"missing {' '.join(commands)}"] if commands else []) + (
        [f"may not use {' '.join(targets)}"] if targets else [])
    grant = " ".join(commands + ([f"~{ctx.cache.namespace}:*", f"&{shard_channels(ctx)}"] if targets else []))
    return Check("ACL permissions", "fail", f"user {user}: {'; '.join(problems)}",
                 f"ACL SETUSER {user} {grant}; or {SECURITY_FIX}",
                 {"missing_commands": commands, "denied": targets,
                  "denied_calls": [" ".join(probes[i].args) for i in sorted(denied)]})


def shard_channels(ctx: Context) -> str:
    """The namespace's shard channels as one ACL channel pattern: ``<ns>:{*}:inval``."""
    return f"{ctx.cache.namespace}:{{*}}:inval"


def every_node(client: Any, masters: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """(name, client) of every node, replicas included (a standalone server: itself)."""
    if not isinstance(client, RedisCluster):
        return masters
    cluster: Any = client
    return [(str(node.name), cluster.get_redis_connection(node)) for node in cluster.get_nodes()]


def check_pubsub(ctx: Context, nodes: list[tuple[str, Any]]) -> Check:
    """Which pub/sub the namespace's invalidations use, and who listens: this release's processes subscribe
    each shard's channel (sharded pub/sub); a subscriber of the broadcast channel ``<ns>:inval`` is a
    process of an earlier release, which hears none of this release's writes (and, on a cluster, has every
    write of its own copied to every node)."""
    space = ctx.space
    sharded: dict[str, int] = {}
    broadcast: dict[str, int] = {}
    for name, node in nodes:
        subscribed = sum(_int(n) or 0 for _, n in node.pubsub_shardnumsub(*space.channels))
        if subscribed:
            sharded[name] = subscribed
    for name, node in every_node(ctx.cache.client, nodes):  # an old subscriber may sit on a replica too
        old = sum(_int(n) or 0 for _, n in node.pubsub_numsub(space.channel))
        if old:
            broadcast[name] = old
    mode = f"sharded: SPUBLISH/SSUBSCRIBE on {len(space.channels)} shard channels {shard_channels(ctx)}"
    listening = (f"{sum(sharded.values())} shard-channel subscriptions" if sharded else "no subscriber right now")
    where = "" if len(nodes) == 1 else f" on {len(sharded)} of {len(nodes)} masters"
    details = {"mode": "sharded", "channels": [_text(c) for c in space.channels], "shard_subscriptions": sharded,
               "broadcast_subscribers": broadcast, "broadcast_channel": _text(space.channel)}
    if broadcast:
        count = sum(broadcast.values())
        cluster = " on a Redis Cluster, where the broadcast channel copies each of their writes to every node" \
            if ctx.cache.config.cluster else ""
        return Check("pub/sub mode", "warn", f"{mode}; but {count} subscriber(s) of the broadcast channel "
                     f"{_text(space.channel)}{cluster}: processes of an earlier release, which do not hear this "
                     "release's writes (their L1 copies stay stale up to l1_ttl)",
                     "upgrade every worker of the namespace to this release (or run them with coherence=False "
                     "until then)", details)
    return Check("pub/sub mode", "ok", f"{mode}; {listening}{where}", details=details)


def check_connectivity(nodes: list[tuple[str, Any]]) -> Check:
    latencies = []
    for _, node in nodes:
        node.ping()  # the first PING also connects
        started = time.perf_counter()
        node.ping()
        latencies.append((time.perf_counter() - started) * 1000)
    where = "" if len(nodes) == 1 else f" (slowest of {len(nodes)} masters)"
    return Check("connectivity", "ok", f"PONG in {max(latencies):.2f} ms{where}",
                 details={"latency_ms": round(max(latencies), 3)})


def check_version(nodes: list[tuple[str, Any]]) -> Check:
    versions = {name: str(node.info("server")["redis_version"]) for name, node in nodes}
    lowest = min(versions.values(), key=_version)
    details = {"versions": versions}
    if _version(lowest) < (7, 0):
        return Check("server version", "fail", f"Redis {lowest}: the scripts need >= 7.0 (they start with the "
                     "#!lua shebang)", "upgrade Redis to 7.0 or newer (README section 'Requirements')", details)
    return Check("server version", "ok", f"Redis {lowest}" + ("" if len(nodes) == 1 else f" (lowest of {len(nodes)})"),
                 details=details)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def check_cluster(ctx: Context, nodes: list[tuple[str, Any]]) -> Check:
    states: dict[str, str] = {}
    for name, node in nodes:
        try:
            reply = command(node, "CLUSTER", "INFO")
        except ResponseError as exc:
            if "cluster support disabled" in str(exc):
                states[name] = "disabled"
                continue
            raise
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        found = re.search(r"cluster_state:(\w+)", text)
        states[name] = found.group(1) if found else "unknown"
    if not ctx.cache.config.cluster:
        if "disabled" in states.values():
            return Check("cluster state", "ok", "standalone Redis (not a cluster)")
        return Check("cluster state", "fail", "the server is a Redis Cluster node but cluster mode is off",
                     f"pass --cluster or set {ENV_PREFIX}CLUSTER=1 (and cluster=True in the workers)")
    bad = {name: state for name, state in states.items() if state != "ok"}
    if bad:
        return Check("cluster state", "fail", "cluster_state " + ", ".join(f"{s} on {n}" for n, s in bad.items()),
                     "bring the failed masters back (or wait for their replicas to take over); until then Redis "
                     "refuses every slot unless cluster-require-full-coverage is no", {"states": states})
    return Check("cluster state", "ok", f"cluster_state:ok on all {len(nodes)} masters", details={"states": states})


def check_scripts(ctx: Context, nodes: list[tuple[str, Any]]) -> Check:
    scripts = default_scripts(ctx.cache.config.lua_shebang).all()
    failures = []
    for name, node in nodes:
        for script in scripts:
            try:
                sha = node.script_load(script.source)
            except NoPermissionError:
                raise  # guarded(): unknown, not failed
            except ResponseError as exc:
                failures.append(f"{script.name}.lua on {name}: {str(exc).splitlines()[0]}")
                continue
            if (_text(sha) if isinstance(sha, bytes) else str(sha)) != script.sha:
                failures.append(f"{script.name}.lua on {name}: SHA1 {sha} instead of {script.sha}")
    if failures:
        return Check("scripts", "fail", "; ".join(failures), "Redis >= 7.0 is required (the scripts use the #!lua "
                     "shebang); on an emulator without it set VICTOR_RCACHE_LUA_SHEBANG=0", {"failures": failures})
    where = "" if len(nodes) == 1 else f" on each of {len(nodes)} masters"
    return Check("scripts", "ok", f"all {len(scripts)} scripts load{where}")


def check_memory(nodes: list[tuple[str, Any]]) -> Check:
    fix = ("CONFIG SET maxmemory-policy noeviction (or a volatile-* policy): the scripts bound the tiers "
           "themselves (README section 'Requirements')")
    seen = []
    for name, node in nodes:
        conf = node.config_get("maxmemory*")
        policy, limit = str(conf.get("maxmemory-policy", "")), int(conf.get("maxmemory") or 0)
        text = f"maxmemory-policy {policy} ({'no maxmemory' if limit == 0 else f'maxmemory {fmt_bytes(limit)}'})"
        details = {"policy": policy, "maxmemory": limit}
        if policy.startswith("allkeys-"):
            where = "" if len(nodes) == 1 else f" on {name}"
            return Check("memory policy", "warn", f"{text}{where}: Redis may evict the namespace's keys behind the "
                         "scripts' back (entries vanish, byte totals drift)", fix, details)
        seen.append((text, details))
    return Check("memory policy", "ok", seen[0][0], details=seen[0][1])


def check_namespace(ctx: Context) -> Check:
    cfg = ctx.space.config
    ns = ctx.cache.namespace
    stored = {_text(k): _int(v) for k, v in ctx.cache.client.hgetall(cfg).items()}
    if not stored:
        return Check("namespace config", "ok", f"namespace {ns} is empty ({_text(cfg)} is written by the first "
                     "worker call)")
    signed = int(ctx.cache.config.signing_key is not None)
    problems = []
    if stored.get("shards") != ctx.cache.config.shards:
        problems.append(f"shards={stored.get('shards')} but this configuration has {ctx.cache.config.shards} "
                        f"(set {ENV_PREFIX}SHARDS={stored.get('shards')})")
    if stored.get("format") != FORMAT_VERSION:
        problems.append(f"data format {stored.get('format')} but this release reads {FORMAT_VERSION} "
                        "(use a new namespace or upgrade every worker)")
    if stored.get("signed", 0) != signed:
        problems.append(f"{'signed' if stored.get('signed') else 'unsigned'} payloads but this configuration "
                        f"{'signs' if signed else 'does not sign'} (give every worker the same "
                        f"{ENV_PREFIX}SIGNING_KEY, or none)")
    text = f"shards={stored.get('shards')}, format={stored.get('format')}, " \
           f"{'signed' if stored.get('signed') else 'unsigned'}"
    if problems:
        return Check("namespace config", "fail", f"{_text(cfg)}: " + "; ".join(problems),
                     "workers configured like this are refused: align their settings", {"stored": stored})
    return Check("namespace config", "ok", f"{_text(cfg)}: {text}", details={"stored": stored})


def guarded(name: str, run: Callable[[], Check]) -> Check:
    """Run one check; a permission it lacks makes it unknown, a Redis error makes it fail."""
    try:
        return run()
    except NoPermissionError as exc:
        return Check(name, "unknown", f"not permitted to check: {exc}", "grant that command to run this check "
                     "(the cache itself does not need it)")
    except IO_ERRORS as exc:
        return Check(name, "fail", *redis_problem(exc))


def cmd_doctor(args: argparse.Namespace) -> int:
    """``doctor``: run the checks and report them (a connection that fails is a finding, not an error)."""
    config = CacheConfig.from_env(**settings(args))  # a bad setting stops here (exit 2)
    where = (config.namespace, redact(config.url))
    try:
        cache = open_cache(args, adopt_shards=False)
    except IO_ERRORS as exc:  # a cluster client connects while it is built
        failed = Check("connectivity", "fail", *redis_problem(exc))
        return doctor_report(args, where, [failed, *(Check(n, "skip", "no connection") for n in DOCTOR_CHECKS[1:])])
    try:
        ctx = Context(args, cache)
        nodes = primaries(cache.client)
        checks = [guarded("connectivity", lambda: check_connectivity(nodes))]
        if checks[0].status != "ok":
            return doctor_report(args, where, [*checks, *(Check(n, "skip", "no connection")
                                                          for n in DOCTOR_CHECKS[1:])])
        checks += [guarded("server version", lambda: check_version(nodes)),
                   guarded("cluster state", lambda: check_cluster(ctx, nodes)),
                   guarded("ACL permissions", lambda: check_acl(ctx, nodes)),
                   guarded("pub/sub mode", lambda: check_pubsub(ctx, nodes)),
                   guarded("scripts", lambda: check_scripts(ctx, nodes)),
                   guarded("memory policy", lambda: check_memory(nodes)),
                   guarded("namespace config", lambda: check_namespace(ctx))]
        return doctor_report(args, where, checks)
    finally:
        with suppress(*IO_ERRORS, CacheError):
            cache.close()


def doctor_report(args: argparse.Namespace, where: tuple[str, str], checks: list[Check]) -> int:
    """Print the checks (a table, or JSON); 0 unless one failed (or, with --strict, warned)."""
    bad = {"fail", "warn"} if args.strict else {"fail"}
    ok = not any(c.status in bad for c in checks)
    ns, url = where
    if args.json:
        print(json.dumps({"ok": ok, "namespace": ns, "url": url, "checks": [vars(c) for c in checks]},
                         ensure_ascii=False, indent=2, default=_json_default))
        return OK if ok else FAILED
    print(f"victor-rcache doctor: namespace {ns} at {url}\n")
    width = max(len(c.check) for c in checks)
    for c in checks:
        print(f"{STATUS_MARK[c.status]:<4}  {c.check:<{width}}  {c.result}")
        if c.fix and c.status != "ok":
            print(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    print("\n" + ("all checks passed" if not failed and not warned else f"{failed} failed, {warned} warning(s)"))
    return OK if ok else FAILED
