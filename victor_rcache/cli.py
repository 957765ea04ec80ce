"""The ``victor-rcache`` command: look inside a namespace and steer it from a shell.

It configures itself exactly like the library (``MultiLevelCache.from_env``): ``--url`` else
``VICTOR_RCACHE_URL`` else ``REDIS_URL``; ``--namespace`` else ``VICTOR_RCACHE_NAMESPACE``;
``--cluster`` else ``VICTOR_RCACHE_CLUSTER``; every other ``VICTOR_RCACHE_*`` variable too. Every
command prints a table for people, or JSON with ``--json``.

Reading commands (``stats``, ``inspect``, ``top``, ``keys``, ``predict``) write nothing and run no
script that counts a hit or moves an entry; ``inspect``, ``top`` and ``keys`` read the tiers' keys
with plain commands on the node holding them (see the README's key layout).

Exit codes: 0 done; 1 not cached, Redis failed, a ``doctor`` check failed, ``flush`` not confirmed;
2 usage or configuration error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import json
import math
import os
import pprint
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.cluster import RedisCluster
from redis.exceptions import AskError, MovedError, NoPermissionError, RedisClusterException, RedisError, ResponseError

from .cache import MultiLevelCache
from .codec import FORMAT_VERSION
from .config import ENV_PREFIX, CacheConfig, redact
from .connection import IO_ERRORS
from .errors import CacheError, CacheUnavailableError, ConfigurationError, InvalidArgumentError
from .keys import KeySpace, ShardKeys
from .prediction import ModelKeys
from .tiers import default_scripts, fix_for
from .warmer import PredictiveCacheWarmer

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
WATCH_SECONDS = 2.0
SHOWN_KEY_CHARS = 60  # longer keys are cut in tables (--json shows them whole)
SHOWN_VALUE_CHARS = 4000
CLEAR_SCREEN = "\x1b[H\x1b[2J"
STATUS_MARK = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "unknown": "??", "skip": "--"}


class Exit(Exception):
    """Stop with ``code`` after printing ``message`` (if any) as ``error: ...`` on stderr."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------ plumbing


@dataclass
class Context:
    """What a command works with: its arguments and a fail-closed cache without coherence."""

    args: argparse.Namespace
    cache: MultiLevelCache
    _warmer: PredictiveCacheWarmer | None = None

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    @property
    def space(self) -> KeySpace:
        return self.cache._core.space

    @property
    def url(self) -> str:
        return redact(self.cache.config.url)

    def warmer(self) -> PredictiveCacheWarmer:
        """The shared model's front end (a prewarm timeout that fits any lease_ttl: the CLI never prewarms)."""
        if self._warmer is None:
            timeout = min(10.0, self.cache.config.lease_ttl)
            self._warmer = PredictiveCacheWarmer(self.cache, prewarm_timeout=timeout)
        return self._warmer

    def emit(self, data: Any, lines: Callable[[], list[str]]) -> None:
        """Print ``data`` as JSON (``--json``) or the human-readable ``lines``."""
        if self.json:
            print(json.dumps(data, ensure_ascii=False, indent=2, default=_json_default))
        else:
            print("\n".join(lines()))


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's settings for ``from_env``: fail closed (errors surface), no L1 subscriber."""
    overrides: dict[str, Any] = {"fail_open": False, "coherence": False}
    if args.url:
        overrides["redis_url"] = args.url
    if args.namespace:
        overrides["namespace"] = args.namespace
    if args.cluster:
        overrides["cluster"] = True
    return overrides


def open_cache(args: argparse.Namespace, adopt_shards: bool = True) -> MultiLevelCache:
    """A cache configured like the library's ``from_env``, failing closed, without an L1 subscriber.

    With ``adopt_shards`` the namespace's shard count (``<ns>:config``) is used unless
    ``VICTOR_RCACHE_SHARDS`` says otherwise, which is refused like a worker would be.
    """
    overrides = settings(args)
    cache = MultiLevelCache.from_env(**overrides)
    if not adopt_shards:
        return cache
    try:
        stored = _int(cache.client.hget(cache._core.space.config, "shards"))
    except BaseException:
        cache.close()
        raise
    if stored is None or stored == cache.config.shards:
        return cache
    cache.close()
    if os.environ.get(ENV_PREFIX + "SHARDS"):
        raise ConfigurationError(
            f"namespace {cache.namespace!r} uses shards={stored} but {ENV_PREFIX}SHARDS={cache.config.shards}; "
            f"set {ENV_PREFIX}SHARDS={stored} (or unset it)")
    return MultiLevelCache.from_env(**overrides, shards=stored)


def node_for(client: Any, key: bytes) -> Any:
    """The client of the server holding ``key`` (the client itself on a standalone Redis)."""
    if isinstance(client, RedisCluster):
        cluster: Any = client  # redis-py leaves these methods untyped
        return cluster.get_redis_connection(cluster.get_node_from_key(key))
    return client


def primaries(client: Any) -> list[tuple[str, Any]]:
    """(name, client) of every master: the cluster's primaries, or the one server."""
    if isinstance(client, RedisCluster):
        cluster: Any = client
        return [(str(node.name), cluster.get_redis_connection(node)) for node in cluster.get_primaries()]
    kwargs = client.connection_pool.connection_kwargs
    name = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    return [(str(name), client)]


def by_node(client: Any, shards: Iterable[ShardKeys]) -> list[tuple[Any, list[ShardKeys]]]:
    """The shards grouped by the server holding them, for one pipeline per server."""
    groups: dict[int, tuple[Any, list[ShardKeys]]] = {}
    for sk in shards:
        node = node_for(client, sk.l2)
        groups.setdefault(id(node), (node, []))[1].append(sk)
    return list(groups.values())


def command(client: Any, *args: Any, **options: Any) -> Any:
    """One raw command (for those redis-py has no typed method for)."""
    return client.execute_command(*args, **options)


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _ms(reply: Any) -> float:
    """TIME's reply in ms."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) / 1000


def _scored(reply: Any) -> list[tuple[bytes, float]]:
    """A WITHSCORES reply, flat (RESP2) or as pairs (RESP3)."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [(bytes(m), float(s)) for m, s in reply]
    return [(bytes(reply[i]), float(reply[i + 1])) for i in range(0, len(reply), 2)]


def _text(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "backslashreplace")


def _show(text: str, limit: int = SHOWN_KEY_CHARS) -> str:
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return _text(value)
    return repr(value)


def jsonable(value: Any) -> Any:
    """A cached value as JSON: tuples as lists, bytes as text (or ``base64:...``), other dict keys as repr,
    NaN and infinities as repr."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(value).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): jsonable(v) for k, v in value.items()}
    plain = value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))
    return value if plain else repr(value)


def key_arg(text: str) -> bytes:
    """A key from the command line, as the bytes the shell passed (UTF-8 keys as a library str key)."""
    return os.fsencode(text)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[int] = ()) -> list[str]:
    """Rows in aligned columns; columns in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    aligned = set(right)
    return ["  ".join((c.rjust(w) if i in aligned else c.ljust(w))
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in cells]


def fmt_pct(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    for limit, unit, div in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600)):
        if s < limit:
            return f"{s / div:.1f} {unit}"
    return f"{s / 86400:.1f} d"


# --------------------------------------------------------------------- stats

RATE_COUNTERS = ("gets", "hits", "misses", "l1_hits", "l2_hits", "l3_hits", "puts", "deletes", "promotions",
                 "demotions", "evictions", "expirations", "records", "predictions_judged", "prewarm_completed")


def shard_counters(ctx: Context) -> dict[str, int]:
    """Fleet counters get_metrics leaves out: explicit deletes, and the last flush (ms)."""
    out = {"deletes": 0, "last_flush_ms": 0}
    for node, shards in by_node(ctx.cache.client, ctx.space.shard_keys):
        pipe = node.pipeline(transaction=False)
        for sk in shards:
            pipe.hmget(sk.stats, "deletes", "flushed")
        for deletes, flushed in pipe.execute():
            out["deletes"] += _int(deletes) or 0
            out["last_flush_ms"] = max(out["last_flush_ms"], _int(flushed) or 0)
    return out


def stats_sample(ctx: Context) -> dict[str, Any]:
    """Fleet-wide numbers of the namespace: tiers, combined, the model, prewarming."""
    m = ctx.cache.get_metrics("fleet")
    model = ctx.warmer().get_statistics()
    extra = shard_counters(ctx)
    tiers = {t: {"hits": m[t]["hits"], "misses": m[t]["misses"], "hit_rate": m[t]["hit_rate"],
                 "entries": m[t]["entry_count"], "bytes": m[t]["total_size"], "promotions": m[t]["promotions"],
                 "demotions": m[t]["demotions"], "evictions": m[t]["evictions"]} for t in ("l1", "l2", "l3")}
    c = m["combined"]
    predictions = model["predictions"]
    return {
        "namespace": ctx.cache.namespace, "url": ctx.url, "time": time.time(),
        "tiers": tiers,
        "combined": {"gets": c["gets"], "hits": c["total_hits"], "misses": c["total_misses"],
                     "hit_rate": c["hit_rate"], "puts": c["puts"], "deletes": extra["deletes"],
                     "promotions": c["total_promotions"], "demotions": c["total_demotions"],
                     "evictions": c["total_evictions"], "expirations": c["total_expirations"],
                     "last_flush_ms": extra["last_flush_ms"] or None},
        "prediction": {"patterns": model["patterns"]["total"], "max_patterns": model["patterns"]["max_patterns"],
                       "queries": model["patterns"]["queries"], "records": model["records"]["total"],
                       "predictions_judged": predictions["total"], "correct": predictions["correct"],
                       "accuracy": predictions["accuracy"]},
        "prewarming": {k: model["prewarming"][k] for k in ("completed", "useful", "skipped", "failed")},
        "breaker": m["health"]["breaker"]["state"],
    }


def counters_of(sample: dict[str, Any]) -> dict[str, float]:
    """The sample's ever-growing counters, for rates."""
    c, t, p = sample["combined"], sample["tiers"], sample["prediction"]
    flat = {k: c[k] for k in ("gets", "hits", "misses", "puts", "deletes", "promotions", "demotions", "evictions",
                              "expirations")}
    flat.update({f"{tier}_hits": t[tier]["hits"] for tier in ("l1", "l2", "l3")})
    flat.update(records=p["records"], predictions_judged=p["predictions_judged"],
                prewarm_completed=sample["prewarming"]["completed"])
    return {k: float(flat[k]) for k in RATE_COUNTERS}


def rates(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Per-second rates of every counter between two samples."""
    return {k: round((after[k] - before[k]) / seconds, 3) for k in RATE_COUNTERS}


def stats_lines(s: dict[str, Any]) -> list[str]:
    t, c, p, w = s["tiers"], s["combined"], s["prediction"], s["prewarming"]
    rows = [(tier.upper(), x["hits"], x["misses"], fmt_pct(x["hit_rate"]),
             "-" if x["entries"] is None else x["entries"], fmt_bytes(x["bytes"]), x["promotions"],
             x["demotions"], x["evictions"]) for tier, x in t.items()]
    rows.append(("all", c["hits"], c["misses"], fmt_pct(c["hit_rate"]), "", "", c["promotions"], c["demotions"],
                 c["evictions"]))
    lines = [f"namespace {s['namespace']} at {s['url']}: fleet-wide counters of every worker", ""]
    lines += table(("tier", "hits", "misses", "hit rate", "entries", "bytes", "promotions", "demotions",
                    "evictions"), rows, right=range(1, 9))
    flushed = "never" if c["last_flush_ms"] is None else time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(c["last_flush_ms"] / 1000))
    judged = f"{fmt_pct(p['accuracy'])} ({p['correct']} of {p['predictions_judged']} judged)"
    lines += ["", f"requests    gets {c['gets']}, puts {c['puts']}, deletes {c['deletes']}, "
                  f"expirations {c['expirations']}; last flush {flushed}",
              f"prediction  accuracy {judged}; patterns {p['patterns']}/{p['max_patterns']}, "
              f"queries {p['queries']}, records {p['records']}",
              f"prewarming  completed {w['completed']}, useful {w['useful']}, skipped {w['skipped']}, "
              f"failed {w['failed']}",
              f"breaker     {s['breaker']} (this command's connection)"]
    if "rates" in s:
        r = s["rates"]
        if r is None:
            lines += ["", "per second  (after the next refresh)"]
        else:
            shown = ("gets", "hits", "misses", "l1_hits", "l2_hits", "l3_hits", "puts", "deletes", "promotions",
                     "demotions", "evictions", "expirations", "records")
            lines += ["", f"per second over the last {s['interval_seconds']:.1f} s"]
            lines += ["  " + line for line in table(shown, [[f"{r[k]:g}" for k in shown]], right=range(len(shown)))]
    return lines


def cmd_stats(ctx: Context) -> int:
    if ctx.args.watch is None:
        sample = stats_sample(ctx)
        ctx.emit(sample, lambda: stats_lines(sample))
        return OK
    return watch_stats(ctx, ctx.args.watch, ctx.args.count)


def watch_stats(ctx: Context, interval: float, count: int | None) -> int:
    """Refresh every ``interval`` seconds, with rates from the previous refresh, until Ctrl-C (or ``count``).

    A refresh that fails (Redis down) is reported on stderr and the next one tried: a watch outlives it."""
    previous: tuple[float, dict[str, float]] | None = None
    refreshes, code = 0, OK
    try:
        while count is None or refreshes < count:
            started = time.monotonic()
            refreshes += 1
            try:
                sample = stats_sample(ctx)
            except (CacheUnavailableError, RedisError, RedisClusterException) as exc:
                print(f"error: {exc} (trying again in {interval:g} s)", file=sys.stderr, flush=True)
                previous, code = None, FAILED
            else:
                now, counters = time.monotonic(), counters_of(sample)
                sample["interval_seconds"] = None if previous is None else round(now - previous[0], 3)
                sample["rates"] = None if previous is None else rates(previous[1], counters, now - previous[0])
                previous, code = (now, counters), OK
                show_refresh(ctx, sample, interval)
            if count is None or refreshes < count:
                time.sleep(max(0.0, started + interval - time.monotonic()))
    except KeyboardInterrupt:
        if not ctx.json:
            print()
        return OK
    return code


def show_refresh(ctx: Context, sample: dict[str, Any], interval: float) -> None:
    """One refresh: a JSON line, or the table (redrawn in place on a terminal)."""
    if ctx.json:
        print(json.dumps(sample, ensure_ascii=False, default=_json_default), flush=True)
        return
    body = "\n".join([f"victor-rcache stats --watch: every {interval:g} s, Ctrl-C to stop", "",
                      *stats_lines(sample)])
    print((CLEAR_SCREEN + body) if sys.stdout.isatty() else body + "\n", flush=True)


# ------------------------------------------------------------------- inspect


def read_entry(ctx: Context, key: bytes) -> tuple[dict[str, Any], Any]:
    """Where ``key`` lives, its fields and its decoded value, read with plain commands (no script call:
    nothing is counted or moved)."""
    space = ctx.space
    ref = space.ref(key)
    sk = space.shard_keys[ref.shard]
    entry_key = space.entry_key(ref)
    pipe = node_for(ctx.cache.client, sk.l2).pipeline(transaction=False)
    pipe.zscore(sk.l2, ref.id)
    pipe.zscore(sk.l3, ref.id)
    pipe.hgetall(entry_key)
    pipe.time()
    s2, s3, fields, now_reply = pipe.execute()
    now = _ms(now_reply)
    f = {_text(k): v for k, v in fields.items()}
    original = f.get("k") or ref.key
    out: dict[str, Any] = {"key": _text(original), "id": _text(ref.id), "hashed": ref.hashed, "shard": ref.shard,
                           "redis_key": _text(entry_key), "cached": False}
    expiry = _int(f.get("x"))
    if (s2 is None and s3 is None) or "v" not in f:
        out["reason"] = "not in L2 or L3" if s2 is None and s3 is None else "index entry without data"
        return out, None
    if expiry is not None and expiry <= now:
        out["reason"] = "expired (removed by the next script call on its shard)"
        return out, None
    score = float(s2 if s2 is not None else s3)
    out.update(cached=True, tier="l2" if s2 is not None else "l3", hits=_int(f.get("n")),
               version=_int(f.get("ver")), size=_int(f.get("s")), last_used_ms=score,
               idle_seconds=round(max(0.0, now - score) / 1000, 3), expires_at_ms=expiry,
               ttl_seconds=None if expiry is None else round((expiry - now) / 1000, 3),
               cost_ms=_int(f.get("d")), l1_copies_possible=f.get("f") == b"1", prewarmed=f.get("w") == b"1")
    try:
        value = ctx.cache._core.envelope.unwrap(f["v"])
    except Exception as exc:  # whatever the codec raises: show it instead of the value
        out.update(value=None, value_repr=None, value_type=None, decode_error=f"{type(exc).__name__}: {exc}")
        return out, None
    out.update(value=jsonable(value), value_repr=repr(value), value_type=type(value).__name__, decode_error=None)
    return out, value


def inspect_lines(e: dict[str, Any], value: Any) -> list[str]:
    key = _show(e["key"], 200) + (f"   (stored as {e['id'][:20]}…: a long or '#' key)" if e["hashed"] else "")
    ttl = "none" if e["ttl_seconds"] is None else f"{fmt_seconds(e['ttl_seconds'])} left"
    cost = "" if e["cost_ms"] is None else f" (took {e['cost_ms']} ms to compute)"
    if e["decode_error"] is not None:
        shown = f"(does not decode: {e['decode_error']}; a get would count a miss and remove it)"
    else:
        shown = pprint.pformat(value, width=100)
        if len(shown) > SHOWN_VALUE_CHARS:
            shown = f"{shown[:SHOWN_VALUE_CHARS]}… ({len(shown) - SHOWN_VALUE_CHARS} more characters; --json shows all)"
    rows = [("key", key), ("tier", f"{e['tier'].upper()} (shard {e['shard']}, {_show(e['redis_key'], 80)})"),
            ("hits", f"{e['hits']} Redis hits since it was written or last demoted"),
            ("version", e["version"]), ("size", f"{fmt_bytes(e['size'])}{cost}"),
            ("idle", f"{fmt_seconds(e['idle_seconds'])} since its last use"), ("ttl", ttl),
            ("prewarmed", "yes, not hit yet" if e["prewarmed"] else "no"),
            ("value", shown.replace("\n", "\n" + " " * 11))]
    return [f"{name:<9}  {text}" for name, text in rows]


def cmd_inspect(ctx: Context) -> int:
    entry, value = read_entry(ctx, key_arg(ctx.args.key))
    if not entry["cached"]:
        if ctx.json:
            ctx.emit(entry, list)
        raise Exit(FAILED, f"{_show(entry['key'], 200)!r} is not cached in namespace {ctx.cache.namespace} "
                           f"({entry['reason']})")
    ctx.emit(entry, lambda: inspect_lines(entry, value))
    return OK


# ----------------------------------------------------------------- top, keys


@dataclass(frozen=True)
class Candidate:
    sk: ShardKeys
    tier: str
    id: bytes
    score: float
    now: float


def cmd_top(ctx: Context) -> int:
    n = ctx.args.n
    tiers = [ctx.args.tier] if ctx.args.tier else ["l2", "l3"]
    rows: list[dict[str, Any]] = []
    for node, shards in by_node(ctx.cache.client, ctx.space.shard_keys):
        pipe = node.pipeline(transaction=False)
        pipe.time()
        for sk in shards:
            for tier in tiers:  # ZRANGE ... REV, not ZREVRANGE: the README's ACL rule set grants +zrange
                pipe.execute_command("ZRANGE", getattr(sk, tier), 0, n - 1, "REV", "WITHSCORES")
        replies = pipe.execute()
        now = _ms(replies[0])
        shard_tiers = [(sk, tier) for sk in shards for tier in tiers]
        found = [Candidate(sk, tier, member, score, now)
                 for (sk, tier), reply in zip(shard_tiers, replies[1:], strict=True)
                 for member, score in _scored(reply)]
        pipe = node.pipeline(transaction=False)
        for c in found:
            pipe.hmget(c.sk.entry(c.id), "n", "s", "k")
        for c, (hits, size, original) in zip(found, pipe.execute(), strict=True):
            if size is None:
                continue  # an index entry whose data is gone: the next script call on its shard drops it
            rows.append({"key": _text(original or c.id), "id": _text(c.id), "tier": c.tier, "shard": c.sk.index,
                         "hits": _int(hits) or 0, "idle_seconds": round(max(0.0, c.now - c.score) / 1000, 3),
                         "size": _int(size), "last_used_ms": c.score})
    rows.sort(key=lambda r: (-r["hits"], -r["last_used_ms"]))
    rows = rows[:n]
    ctx.emit({"namespace": ctx.cache.namespace, "tiers": tiers, "entries": rows}, lambda: top_lines(rows, tiers))
    return OK


def top_lines(rows: list[dict[str, Any]], tiers: list[str]) -> list[str]:
    if not rows:
        return [f"no entries in {' or '.join(t.upper() for t in tiers)}"]
    return table(("#", "hits", "tier", "idle", "size", "key"),
                 [(i, r["hits"], r["tier"].upper(), fmt_seconds(r["idle_seconds"]), fmt_bytes(r["size"]),
                   _show(r["key"])) for i, r in enumerate(rows, 1)], right=(0, 1, 3, 4))


def glob_escape(raw: bytes) -> bytes:
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", raw)


def redis_glob_match(pattern: bytes, name: bytes) -> bool:
    """Redis's glob (``*``, ``?``, ``[...]``, ``[^...]``, ``\\x``) via fnmatch's (``[!...]``, no escapes)."""
    def one(m: re.Match[bytes]) -> bytes:
        escaped = m.group(1)
        if escaped is None:
            return b"[!"
        return b"[" + escaped + b"]" if escaped in (b"*", b"?", b"[") else escaped

    return fnmatch.fnmatchcase(name, re.sub(rb"\\(.)|\[\^", one, pattern, flags=re.DOTALL))


def cmd_keys(ctx: Context) -> int:
    space = ctx.space
    pattern = key_arg(ctx.args.pattern)
    by_tag = {sk.l2[len(space.prefix) + 1:-4]: sk for sk in space.shard_keys}
    match = glob_escape(space.prefix) + b"{*}:e:" + pattern
    rows: list[dict[str, Any]] = []
    for _, node in primaries(ctx.cache.client):
        found: list[tuple[ShardKeys, bytes]] = []
        for name in node.scan_iter(match=match, count=1000):
            tag, _, entry_id = name[len(space.prefix) + 1:].partition(b"}:e:")
            # '{*}' may also match across '}:e:' inside an id: only such ids need the second look
            if tag in by_tag and (b"}:e:" not in entry_id or redis_glob_match(pattern, entry_id)):
                found.append((by_tag[tag], entry_id))
        pipe = node.pipeline(transaction=False)
        for sk, entry_id in found:
            pipe.zscore(sk.l2, entry_id)
            pipe.zscore(sk.l3, entry_id)
            pipe.hget(sk.entry(entry_id), "k")
        replies = pipe.execute()
        for i, (sk, entry_id) in enumerate(found):
            s2, s3, original = replies[3 * i:3 * i + 3]
            tier = "l2" if s2 is not None else "l3" if s3 is not None else None
            rows.append({"key": _text(original or entry_id), "id": _text(entry_id), "tier": tier, "shard": sk.index})
    rows.sort(key=lambda r: (r["key"], r["id"]))
    ctx.emit({"namespace": space.namespace, "pattern": _text(pattern), "entries": rows}, lambda: keys_lines(rows))
    return OK


def keys_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{(r['tier'] or '-').upper():<4} {_show(r['key'], 200)}" for r in rows]
    return [*lines, f"({len(rows)} entries)"]


# ------------------------------------------------------------------- predict


def cmd_predict(ctx: Context) -> int:
    a = ctx.args
    p = ctx.warmer().predict_next_queries(key_arg(a.query), top_k=a.top_k, min_confidence=a.min_confidence,
                                          session=None if a.session is None else key_arg(a.session),
                                          remember=False)
    rows = [{"query": _text(q) if isinstance(q, bytes) else q, "confidence": conf,
             "transition": parts[0], "ngram": parts[1], "hour": parts[2], "tools": tools}
            for q, conf, parts, tools in zip(p.queries, p.confidences, p.parts, p.tools, strict=True)]
    data = {"query": a.query, "session": a.session, "total_confidence": p.total_confidence, "predictions": rows,
            "weights": ctx.warmer().config.normalized_weights}
    ctx.emit(data, lambda: predict_lines(data))
    return OK


def predict_lines(d: dict[str, Any]) -> list[str]:
    session = "" if d["session"] is None else f" in session {d['session']!r}"
    head = f"after {_show(d['query'])!r}{session}: "
    if not d["predictions"]:
        return [head + "the model expects nothing (never seen, or everything under --min-confidence)"]
    rows = [(_show(r["query"], 40), f"{r['confidence']:.3f}", f"{r['transition']:.3f}", f"{r['ngram']:.3f}",
             f"{r['hour']:.3f}", ", ".join(map(str, r["tools"]))) for r in d["predictions"]]
    return [head + f"total confidence {d['total_confidence']:.3f}", "",
            *table(("query", "confidence", "transition", "n-gram", "hour", "tools"), rows, right=(1, 2, 3, 4)),
            "", "confidence = {:g}·transition + {:g}·n-gram + {:g}·hour: P(next | this query), P(next | the "
                "session's last queries), P(next | this hour of day)".format(*d["weights"])]


# -------------------------------------------------------------- delete, flush


def cmd_delete(ctx: Context) -> int:
    key = key_arg(ctx.args.key)
    deleted = ctx.cache.delete(key)
    shown = _show(_text(key), 200)
    ctx.emit({"key": _text(key), "deleted": deleted},
             lambda: [f"deleted {shown!r}" if deleted else f"{shown!r} was not cached: nothing deleted"])
    return OK


def confirm(question: str) -> bool:
    """Ask on the terminal; anything but y/yes is a no (and so is a stdin that is not a terminal)."""
    if not sys.stdin.isatty():
        return False
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_flush(ctx: Context) -> int:
    ns = ctx.cache.namespace
    if not ctx.args.yes and not confirm(f"Flush every entry of namespace {ns} at {ctx.url}?"):
        why = "not confirmed" if sys.stdin.isatty() else "stdin is not a terminal: pass --yes to flush"
        raise Exit(FAILED, f"nothing flushed ({why})")
    m = ctx.cache.get_metrics("fleet")
    entries = (m["l2"]["entry_count"] or 0) + (m["l3"]["entry_count"] or 0)
    ctx.cache.invalidate()
    ctx.emit({"namespace": ns, "flushed": True, "entries": entries},
             lambda: [f"flushed namespace {ns}: {entries} entries removed from L2 and L3, every L1 told "
                      "(the prediction model is kept)"])
    return OK


# -------------------------------------------------------------------- doctor


@dataclass
class Check:
    """One doctor line: what was checked, how it went (ok, warn, fail, unknown, skip), and the fix."""

    check: str
    status: str
    result: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)


SECURITY_FIX = "grant the ACL rule set in the README section 'Security'"
DOCTOR_CHECKS = ("connectivity", "server version", "cluster state", "ACL permissions", "scripts", "memory policy",
                 "namespace config")
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
# Commands the library sends itself (the scripts' own commands are read from the scripts).
CLIENT_COMMANDS = ("evalsha", "eval", "set", "exists", "pttl", "hgetall", "hsetnx", "hincrby", "hmget", "zcard",
                   "zrange", "del", "ping")
# Well-formed arguments after the key (K) for each command: redis.acl_check_cmd does not check arity, and
# with arguments missing Redis 7.0 reads stale ones for some commands (SET, EVAL, ZUNIONSTORE): a random answer.
PROBE_ARGS: dict[str, tuple[str, ...]] = {
    "hget": ("K", "f"), "hmget": ("K", "f"), "hset": ("K", "f", "v"), "hsetnx": ("K", "f", "v"),
    "hincrby": ("K", "f", "1"), "hdel": ("K", "f"), "hexists": ("K", "f"), "zadd": ("K", "1", "m"),
    "zrem": ("K", "m"), "zscore": ("K", "m"), "zmscore": ("K", "m"),
    "zincrby": ("K", "1", "m"), "zrange": ("K", "0", "1"),
    "zrangebyscore": ("K", "0", "1"), "zremrangebyscore": ("K", "0", "1"), "zremrangebyrank": ("K", "0", "1"),
    "lrange": ("K", "0", "1"), "ltrim": ("K", "0", "1"), "lpush": ("K", "v"), "pexpire": ("K", "1"),
    "set": ("K", "v"), "zunionstore": ("K", "1", "K"), "eval": ("return 1", "1", "K"),
    "evalsha": ("0" * 40, "1", "K"), "time": (), "ping": (),
}


@dataclass(frozen=True)
class Probe:
    """One question for ``redis.acl_check_cmd``: may the user run ``args``, which touch ``target``?"""

    args: tuple[str, ...]
    target: str  # the key or channel it touches ("" for none)


def acl_probes(ctx: Context) -> list[Probe]:
    """Every command the cache sends, with a key of the namespace it uses (or its channel)."""
    space, model = ctx.space, ModelKeys(ctx.cache.namespace)
    shard, channel = space.shard_keys[0], _text(space.channel)
    keyed: dict[str, set[str]] = {}
    for script in default_scripts(ctx.cache.config.lua_shebang).all():
        key = _text(model.stats if script.name in ("record", "predict") else shard.stats)
        for name in re.findall(rb"redis\.p?call\('(\w+)'", script.source):
            keyed.setdefault(name.decode().lower(), set()).add(key)
    for name in CLIENT_COMMANDS:
        keyed.setdefault(name, set()).add(_text(space.config if name in ("hsetnx", "hgetall") else shard.stats))
    probes = []
    for name in sorted(keyed):
        if name == "publish":
            continue
        template = PROBE_ARGS.get(name, ("K",))
        for key in sorted(keyed[name]) if "K" in template else [""]:
            probes.append(Probe((name, *(key if a == "K" else a for a in template)), key))
    probes += [Probe(("publish", channel, "x"), channel), Probe(("subscribe", channel), channel)]
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
            targets.add(("&" if probe.args[0] in ("publish", "subscribe") else "~") + probe.target)
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
                     f"{ctx.cache.namespace}:* and channel {_text(ctx.space.channel)} (checked with {how})")
    problems = ([f"missing {' '.join(commands)}"] if commands else []) + (
        [f"may not use {' '.join(targets)}"] if targets else [])
    grant = " ".join(commands + ([f"~{ctx.cache.namespace}:*", f"&{_text(ctx.space.channel)}"] if targets else []))
    return Check("ACL permissions", "fail", f"user {user}: {'; '.join(problems)}",
                 f"ACL SETUSER {user} {grant}; or {SECURITY_FIX}",
                 {"missing_commands": commands, "denied": targets,
                  "denied_calls": [" ".join(probes[i].args) for i in sorted(denied)]})


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


# ---------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the fleet demo with the remaining arguments (and the global --url/--namespace/--cluster)."""
    from . import demo  # noqa: PLC0415  (multiprocessing and friends: only for this command)

    given = [a.split("=", 1)[0] for a in rest]
    forwarded = []
    for option in ("url", "namespace"):
        value = getattr(args, option, None)
        if value and f"--{option}" not in given:
            forwarded += [f"--{option}", value]
    if args.cluster and "--cluster" not in given:
        forwarded.append("--cluster")
    return demo.main([*forwarded, *rest])


# ---------------------------------------------------------------------- main


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 1")
    return value


def common_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """The global options; on subcommands too (``default`` SUPPRESS), so they may follow the command."""
    parser.add_argument("--url", default=default,
                        help="Redis URL (default: VICTOR_RCACHE_URL, then REDIS_URL, then redis://localhost:6379/0)")
    parser.add_argument("--namespace", default=default,
                        help="namespace (default: VICTOR_RCACHE_NAMESPACE, then vrc)")
    parser.add_argument("--cluster", action="store_true", default=default,
                        help="the URL is a Redis Cluster node (default: VICTOR_RCACHE_CLUSTER)")
    parser.add_argument("--json", action="store_true", default=default, help="JSON on stdout, for scripts")


EPILOG = """\
Every other VICTOR_RCACHE_* variable (shards, signing key, timeouts...) applies as in the library.
Exit codes: 0 done; 1 not cached, Redis failed, a doctor check failed or flush not confirmed;
2 usage or configuration error; 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="victor-rcache", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Look inside a victor_rcache namespace and steer it.")
    common_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    common_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[..., int], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    p = add("stats", cmd_stats, "fleet-wide hit rates, sizes, movements, prediction accuracy and prewarming")
    p.add_argument("--watch", nargs="?", type=positive_float, const=WATCH_SECONDS, metavar="SECONDS",
                   help=f"refresh every SECONDS (default {WATCH_SECONDS:g}) with rates per second; Ctrl-C stops")
    p.add_argument("--count", type=positive_int, help=argparse.SUPPRESS)  # stop after COUNT refreshes (tests)
    p = add("inspect", cmd_inspect, "one entry: tier, hits, version, idle time, ttl, size and decoded value "
            "(plain reads: counts no hit, moves nothing)")
    p.add_argument("key")
    p = add("top", cmd_top, "the hottest entries: most Redis hits among each shard's most recently used entries")
    p.add_argument("--tier", choices=("l2", "l3"), help="only this tier (default: both)")
    p.add_argument("-n", type=positive_int, default=20, help="entries to show (default 20)")
    p = add("keys", cmd_keys, "entries whose key matches a Redis glob (SCAN on every master); long keys "
            "(over 1 KiB, or starting with '#') match on their '#<sha256>' id, not on the key")
    p.add_argument("pattern", help="glob: * ? [abc] [^a] \\x, e.g. 'read*'")
    p = add("predict", cmd_predict, "what the shared model expects after QUERY (only looks: writes nothing)")
    p.add_argument("query")
    p.add_argument("--session", help="the session whose last queries feed the n-gram part")
    p.add_argument("--top-k", type=positive_int, default=5, help="predictions to show (default 5)")
    p.add_argument("--min-confidence", type=float, default=0.0, help="drop predictions below this (default 0)")
    p = add("delete", cmd_delete, "remove one key from every tier and every worker's L1")
    p.add_argument("key")
    p = add("flush", cmd_flush, "remove every entry of the namespace (asks first; the prediction model is kept)")
    p.add_argument("--yes", action="store_true", help="do not ask")
    p = add("doctor", cmd_doctor, "check connectivity, server version, cluster state, ACL permissions, scripts, "
            "memory policy and the namespace's settings; print fixes")
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p = sub.add_parser("demo", add_help=False, help="the fleet demonstration (arguments go to it; demo --help)")
    p.set_defaults(handler=None)
    return parser


def fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the chosen command; every failure becomes a message and an exit code."""
    if args.command == "demo":
        return cmd_demo(args, extra)
    if args.command == "doctor":
        return cmd_doctor(args)
    cache = open_cache(args)
    try:
        code: int = args.handler(Context(args, cache))
        return code
    finally:
        with suppress(*IO_ERRORS, CacheError):
            cache.close()


def redis_problem(exc: Exception) -> tuple[str, str]:
    """What a Redis failure means, and the fix."""
    if isinstance(exc, (MovedError, AskError)):
        return f"it is a Redis Cluster node (it answered MOVED {exc})", f"pass --cluster or set {ENV_PREFIX}CLUSTER=1"
    if "WRONGTYPE" in str(exc):
        return str(exc), "A key of the namespace was written outside the cache: delete it"
    return str(exc).rstrip(". "), fix_for(exc)


def error_code(exc: BaseException, url: str) -> int:
    """Print what went wrong (never a traceback) and return the exit code."""
    if isinstance(exc, Exit):
        return fail(exc.code, str(exc)) if str(exc) else exc.code
    if isinstance(exc, (ConfigurationError, InvalidArgumentError)):
        return fail(USAGE, str(exc))
    if isinstance(exc, CacheError):
        return fail(FAILED, str(exc))
    if not isinstance(exc, Exception):
        return fail(INTERRUPTED, "interrupted")
    problem, fix = redis_problem(exc)
    return fail(FAILED, f"Redis at {url}: {problem}; {fix[:1].lower()}{fix[1:]}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``victor-rcache`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return run(args, extra)
    except BrokenPipeError:  # the reader went away (| head): no traceback
        with suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILED
    except (Exit, CacheError, KeyboardInterrupt, RedisError, RedisClusterException) as exc:
        return error_code(exc, redact(CacheConfig(redis_url=args.url).url))


if __name__ == "__main__":
    sys.exit(main())
