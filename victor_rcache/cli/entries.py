"""``inspect``, ``top`` and ``keys``: the entries of the tiers, read with plain commands on the node
holding them (no script call: nothing is counted or moved).

They show Redis's view: the workers send the bookkeeping of their reads (LRU stamps, hit counts `n`,
promotions) in batches, so what these commands show lags the workers' reads by one bookkeeping
window (``bookkeeping.WINDOW``)."""

from __future__ import annotations

import fnmatch
import pprint
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..keys import KeySpace, ShardKeys, decode_tags
from .common import (
    FAILED,
    OK,
    Context,
    Exit,
    _int,
    _ms,
    _scored,
    _show,
    _text,
    by_node,
    fmt_bytes,
    fmt_seconds,
    jsonable,
    key_arg,
    node_for,
    primaries,
    table,
)

SHOWN_VALUE_CHARS = 4000


def read_entry(ctx: Context, key: bytes) -> tuple[dict[str, Any], Any]:
    """Where ``key`` lives, its fields and its decoded value, read with plain commands (no script call:
    nothing is counted or moved). It is cached when a worker's read would hit: its data exists (Redis
    drops it at its deadline) and its absolute expiry has not passed; its tier is field ``t``."""
    space = ctx.space
    ref = space.ref(key)
    sk = space.shard_keys[ref.shard]
    entry_key = space.entry_key(ref)
    pipe = node_for(ctx.cache.client, sk.l2).pipeline(transaction=False)
    pipe.zscore(sk.l2, ref.id)
    pipe.zscore(sk.l3, ref.id)
    pipe.hgetall(entry_key)
    pipe.hget(sk.tags, ref.id)
    pipe.time()
    s2, s3, fields, tags, now_reply = pipe.execute()
    now = _ms(now_reply)
    f = {_text(k): v for k, v in fields.items()}
    original = f.get("k") or ref.key
    out: dict[str, Any] = {"key": _text(original), "id": _text(ref.id), "hashed": ref.hashed, "shard": ref.shard,
                           "redis_key": _text(entry_key), "cached": False}
    expiry = _int(f.get("x"))
    if "v" not in f:
        # An index member without data is one whose deadline passed (or that Redis evicted): the next
        # script call on its shard that meets it drops it.
        out["reason"] = "not in L2 or L3" if s2 is None and s3 is None else "index entry without data"
        return out, None
    if expiry is not None and expiry <= now:
        kept = _int(f.get("z"))
        out["reason"] = ("expired (Redis removes it at once)" if kept is None or kept <= now else
                         f"past its ttl; kept for fail-safe {round((kept - now) / 1000, 3)} s more")
        return out, None
    # The tier a read reports is field `t` (b"3": L3, else L2), which mirrors the index; the index
    # member may be missing (evicted by an allkeys-* policy) until the next reported hit re-indexes it.
    tier = "l3" if f.get("t") == b"3" else "l2"
    index_score = s3 if tier == "l3" else s2
    score = None if index_score is None else float(index_score)
    out.update(cached=True, tier=tier, hits=_int(f.get("n")) or 0, version=_int(f.get("ver")), size=len(f["v"]),
               last_used_ms=score, idle_seconds=None if score is None else round(max(0.0, now - score) / 1000, 3),
               expires_at_ms=expiry, ttl_seconds=None if expiry is None else round((expiry - now) / 1000, 3),
               cost_ms=_int(f.get("d")), prewarmed=f.get("w") == b"1",
               tags=_tags(tags))
    try:
        value = ctx.cache._core.envelope.unwrap(f["v"])
    except Exception as exc:  # whatever the codec raises: show it instead of the value
        out.update(value=None, value_repr=None, value_type=None, decode_error=f"{type(exc).__name__}: {exc}")
        return out, None
    out.update(value=jsonable(value), value_repr=repr(value), value_type=type(value).__name__, decode_error=None)
    return out, value


def _tags(record: bytes | None) -> list[str]:
    try:
        return [_text(t) for t in decode_tags(record or b"")]
    except ValueError:
        return [f"(unreadable tags record {_show(_text(record or b''), 80)!r})"]


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
            ("tags", ", ".join(_show(t, 80) for t in e["tags"]) or "none"),
            ("value", shown.replace("\n", "\n" + " " * 11))]
    return [f"{name:<9}  {text}" for name, text in rows]


def cmd_inspect(ctx: Context) -> int:
    """``inspect KEY``: one entry's tier, fields and decoded value; exit 1 if it is not cached."""
    entry, value = read_entry(ctx, key_arg(ctx.args.key))
    if not entry["cached"]:
        if ctx.json:
            ctx.emit(entry, list)
        raise Exit(FAILED, f"{_show(entry['key'], 200)!r} is not cached in namespace {ctx.cache.namespace} "
                           f"({entry['reason']})")
    ctx.emit(entry, lambda: inspect_lines(entry, value))
    return OK


@dataclass(frozen=True)
class Candidate:
    sk: ShardKeys
    tier: str
    id: bytes
    score: float
    now: float


def cmd_top(ctx: Context) -> int:
    """``top``: the entries with the most Redis hits among each shard's most recently used ones."""
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
            pipe.hmget(c.sk.entry(c.id), "n", "k", "ver")
            pipe.hget(c.sk.size, c.id)  # the payload bytes the shard accounts for this indexed entry
        replies = pipe.execute()
        for c, (hits, original, version), size in zip(found, replies[0::2], replies[1::2], strict=True):
            if version is None:
                continue  # an index entry whose data is gone: the next script call that meets it drops it
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
    """``keys PATTERN``: the entries whose key matches a Redis glob, with their tier."""
    space = ctx.space
    pattern = key_arg(ctx.args.pattern)
    rows = list(scan_entries(ctx.cache.client, space, pattern))
    rows.sort(key=lambda r: (r["key"], r["id"]))
    ctx.emit({"namespace": space.namespace, "pattern": _text(pattern), "entries": rows}, lambda: keys_lines(rows))
    return OK


def scan_entries(client: Any, space: KeySpace, pattern: bytes) -> Iterator[dict[str, Any]]:
    """The entries of ``space`` whose entry id matches the Redis glob ``pattern`` (a hashed key's id is
    ``#<sha256>``), unsorted: SCAN on every master, then their fields in one pipeline per master. Each
    is ``{"key", "id", "tier", "shard"}``, ``key`` the original key (field ``k`` for a hashed id)."""
    by_tag = {sk.l2[len(space.prefix) + 1:-4]: sk for sk in space.shard_keys}
    match = glob_escape(space.prefix) + b"{*}:e:" + pattern
    for _, node in primaries(client):
        found: list[tuple[ShardKeys, bytes]] = []
        for name in node.scan_iter(match=match, count=1000):
            tag, _, entry_id = name[len(space.prefix) + 1:].partition(b"}:e:")
            # '{*}' may also match across '}:e:' inside an id: only such ids need the second look
            if tag in by_tag and (b"}:e:" not in entry_id or redis_glob_match(pattern, entry_id)):
                found.append((by_tag[tag], entry_id))
        pipe = node.pipeline(transaction=False)
        for sk, entry_id in found:
            pipe.hmget(sk.entry(entry_id), "k", "t", "ver")  # t: the tier (b"2" or b"3") a read reports
        for (sk, entry_id), (original, t, version) in zip(found, pipe.execute(), strict=True):
            if original is None and t is None and version is None:
                continue  # its deadline passed between SCAN and now: Redis dropped it
            tier = {b"2": "l2", b"3": "l3"}.get(t)
            yield {"key": _text(original or entry_id), "id": _text(entry_id), "tier": tier, "shard": sk.index}


def keys_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{(r['tier'] or '-').upper():<4} {_show(r['key'], 200)}" for r in rows]
    return [*lines, f"({len(rows)} entries)"]
