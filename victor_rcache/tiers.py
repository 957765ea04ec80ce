"""The tiering core: every decision of the multi-level cache, with no I/O of its own.

::

    get(key)
      │
      ▼
    L1 ─ this process, LRU + TTL ───────── hit ──▶ value (decoded fresh for each caller)
      │ miss
      ▼
    Redis ─ get.lua on the key's shard ─── hit ──▶ value; L1 copy once the entry is hot
      │     L2 then L3 in one round trip;           (fleet-wide hits >= promote_after)
      │     promotion, demotion, expiry inside
      │ miss
      ▼
    loader (the caller computes) ──▶ put ─ put.lua: L2 + this L1 ─▶ other processes
                                           new version               drop their L1 copy

Operations are generators ("sans-I/O"): they yield batches of Redis commands and receive the
replies (errors in place), so the sync and async front ends share all of this logic and only
send batches. A batch is one pipeline, i.e. one network round trip.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Generator, Iterable, Mapping
from typing import Any, Literal, TypeVar

from redis.exceptions import RedisError

from .codec import FORMAT_VERSION, Envelope
from .config import CacheConfig, check_ttl
from .errors import CacheUnavailableError, ConfigurationError, InvalidArgumentError, ValueTooLargeError
from .keys import EntryRef, KeySpace
from .l1 import LocalCache
from .metrics import Counters, build_metrics, fleet_tally
from .scripts import Command, ScriptCall, Scripts, needs_reload

T = TypeVar("T")
Batch = list[Command]
Step = Generator[Batch, list[Any], T]
Scope = Literal["process", "fleet"]

log = logging.getLogger("victor_rcache")

MISSING: Any = object()
FLUSH_BATCH = 500  # entries one flush.lua call removes: bounded work per call

_scripts: Scripts | None = None


def feed(step: Step[T], outcome: list[Any] | RedisError | None) -> tuple[Batch | None, T | None]:
    """Advance an operation with the outcome of its last batch (None to start it).

    Returns ``(next batch, None)`` while it needs I/O, ``(None, result)`` once it is done. A front
    end's whole job is: send the batch as one pipeline, feed back the replies or the Redis error.
    """
    try:
        if outcome is None:
            return next(step), None
        if isinstance(outcome, RedisError):
            return step.throw(outcome), None
        return step.send(outcome), None
    except StopIteration as done:
        return None, done.value


def queue(pipe: Any, batch: Batch) -> Any:
    """Queue a batch on a (sync or async) redis-py pipeline."""
    for command in batch:
        pipe.execute_command(*command)
    return pipe


def default_scripts() -> Scripts:
    """The process-wide script registry (read from disk once)."""
    global _scripts
    if _scripts is None:
        _scripts = Scripts()
    return _scripts


def split_capacity(total: int, shards: int) -> list[int]:
    """Per-shard capacities that sum exactly to ``total``."""
    return [total // shards + (1 if i < total % shards else 0) for i in range(shards)]


def redact(url: str) -> str:
    """A Redis URL with its password replaced, for messages and logs."""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


class TierCore:
    """L1 + the Redis tiers of one namespace, as I/O-free generator operations."""

    def __init__(self, config: CacheConfig, scripts: Scripts | None = None) -> None:
        self.config = config
        self.space = KeySpace(config.namespace, config.shards)
        self.envelope = Envelope(config.codec)
        self.scripts = scripts or default_scripts()
        self.l1 = LocalCache(config.l1_size, config.l1_ttl, config.clock or time.monotonic)
        self.counters = Counters()
        self._caps2 = split_capacity(config.l2_size, config.shards)
        self._caps3 = split_capacity(config.l3_size, config.shards)
        self._idle_ms = tuple(0 if t is None else max(1, round(t * 1000)) for t in (config.l2_ttl, config.l3_ttl))
        self._config_checked = False
        self._failing = False
        self._lock = threading.Lock()
        self._unreported_l1_hits = 0
        self._reported_l1_evictions = 0

    # ------------------------------------------------------------------ reads

    def get(self, key: str | bytes, default: Any = None) -> Step[Any]:
        """The value under ``key``, or ``default`` on a miss (a cached None is a hit)."""
        ref = self.space.ref(key)
        value = self._from_l1(ref)
        if value is MISSING:
            found = yield from self._fetch([ref])
            value = found.get(ref.key, MISSING)
        return default if value is MISSING else value

    def get_many(self, keys: Iterable[str | bytes]) -> Step[dict[Any, Any]]:
        """The hits among ``keys``, keyed as given; one script call per shard, one round trip."""
        wanted: dict[bytes, tuple[Any, EntryRef]] = {}
        for key in keys:
            ref = self.space.ref(key)
            wanted.setdefault(ref.key, (key, ref))
        out: dict[Any, Any] = {}
        remote: list[EntryRef] = []
        for key, ref in wanted.values():
            value = self._from_l1(ref)
            if value is MISSING:
                remote.append(ref)
            else:
                out[key] = value
        if remote:
            found = yield from self._fetch(remote)
            for raw, value in found.items():
                out[wanted[raw][0]] = value
        return out

    def _from_l1(self, ref: EntryRef) -> Any:
        entry = self.l1.get(ref.key)
        if entry is None:
            self.counters.add(gets=1)
            return MISSING
        with self._lock:
            self._unreported_l1_hits += 1
        self.counters.add(gets=1, l1_hits=1)
        return self.envelope.unwrap(entry.payload)

    def _fetch(self, refs: list[EntryRef]) -> Step[dict[bytes, Any]]:
        groups = _by_shard(refs)
        deltas = (0, 0)
        try:
            yield from self._ready()
            sent_at = self._since()
            deltas = self._take_l1_deltas()
            calls = [self._shard_call(self.scripts.get, shard, [r.id for r in rs], deltas if n == 0 else (0, 0))
                     for n, (shard, rs) in enumerate(groups.items())]
            replies = yield from self._run(calls)
        except RedisError as exc:
            self._give_back_l1_deltas(deltas)
            self._redis_failed("get", exc)
            self.counters.add(misses=len(refs))
            return {}
        out: dict[bytes, Any] = {}
        corrupt: list[tuple[EntryRef, int]] = []
        for rs, reply in zip(groups.values(), replies, strict=True):
            self._count_events(reply[0])
            for ref, (tier, *hit) in zip(rs, reply[1:], strict=True):
                if tier == 0:
                    self.counters.add(misses=1)
                    continue
                payload, fill, ttl_left_ms, version = hit
                try:
                    value = self.envelope.unwrap(payload)
                except Exception as exc:  # whatever the codec raises, a bad payload is a miss
                    log.warning("entry %r in namespace %s does not decode (%s); counted as a miss and removed",
                                ref.key[:100], self.config.namespace, exc)
                    self.counters.add(misses=1, decode_errors=1)
                    corrupt.append((ref, version))
                    continue
                self.counters.add(**{f"l{tier}_hits": 1})
                ttl_left = None if ttl_left_ms < 0 else ttl_left_ms / 1000
                if fill and self.l1.set(ref.key, payload, version, ttl_left, since=sent_at):
                    self.counters.add(l1_fills=1)
                out[ref.key] = value
        if corrupt:
            yield from self._remove_corrupt(corrupt)
        return out

    def _remove_corrupt(self, corrupt: list[tuple[EntryRef, int]]) -> Step[None]:
        # Only that very version is removed: a good value written meanwhile survives.
        calls = [self._shard_call(self.scripts.delete, ref.shard, [ref.id, version]) for ref, version in corrupt]
        try:
            yield from self._run(calls)
        except RedisError as exc:
            log.debug("could not remove undecodable entries: %s", exc)

    # ----------------------------------------------------------------- writes

    def put(self, key: str | bytes, value: Any, ttl: float | None = None) -> Step[None]:
        """Write ``value`` to L2 and to this process's L1; ``ttl`` is its absolute life in seconds."""
        yield from self.put_many({key: value}, ttl)

    def put_many(self, mapping: Mapping[Any, Any], ttl: float | None = None) -> Step[None]:
        """Write several values; everything is validated and encoded before anything is written."""
        ttl_ms = 0 if ttl is None else max(1, math.floor(check_ttl(ttl) * 1000))
        ttl_s = None if ttl is None else ttl_ms / 1000  # L1 uses exactly the ttl Redis gets
        prepared: dict[bytes, tuple[EntryRef, bytes]] = {}
        for key, value in mapping.items():
            ref = self.space.ref(key)
            prepared[ref.key] = (ref, self._encode(ref, value))
        if not prepared:
            return
        groups = _by_shard([ref for ref, _ in prepared.values()])
        calls = []
        for shard, rs in groups.items():
            items: list[bytes | int] = []
            for ref in rs:
                items += [ref.id, prepared[ref.key][1], ttl_ms, ref.key if ref.hashed else b""]
            calls.append(self._shard_call(self.scripts.put, shard, items))
        sent_at = self._since()
        try:
            yield from self._ready()
            replies = yield from self._run(calls)
        except RedisError as exc:
            self._redis_failed("put", exc)
            for ref, payload in prepared.values():  # this process still sees its own write
                self.l1.set(ref.key, payload, 0, ttl_s, since=sent_at)
            return
        self.counters.add(puts=len(prepared))
        for rs, reply in zip(groups.values(), replies, strict=True):
            self._count_events(reply[0])
            for ref, version in zip(rs, reply[1:], strict=True):
                self.l1.set(ref.key, prepared[ref.key][1], version, ttl_s, since=sent_at)

    def _encode(self, ref: EntryRef, value: Any) -> bytes:
        payload = self.envelope.wrap(value)
        if len(payload) > self.config.max_value_bytes:
            raise ValueTooLargeError(
                f"value for key {ref.key[:80]!r} encodes to {len(payload)} bytes, over max_value_bytes="
                f"{self.config.max_value_bytes}; store something smaller or raise max_value_bytes"
            )
        return payload

    def delete(self, key: str | bytes) -> Step[bool]:
        """Remove ``key`` from every tier; True if any tier held it."""
        ref = self.space.ref(key)
        had_local = self.l1.pop(ref.key)
        try:
            yield from self._ready()
            replies = yield from self._run([self._shard_call(self.scripts.delete, ref.shard, [ref.id, b""])])
        except RedisError as exc:
            self._redis_failed("delete", exc)
            return had_local
        self._count_events(replies[0][0])
        return bool(replies[0][1]) or had_local

    def invalidate(self, key: str | bytes | None = None) -> Step[None]:
        """Remove one key, or with no key every entry of the namespace, in bounded batches."""
        if key is not None:
            yield from self.delete(key)
            return
        self.l1.clear()
        shards = self.space.shard_keys
        try:
            yield from self._ready()
            pending = list(range(len(shards)))
            while pending:
                calls = [ScriptCall(self.scripts.flush, tuple(shards[s].keys), (FLUSH_BATCH,)) for s in pending]
                left = yield from self._run(calls)
                pending = [s for s, n in zip(pending, left, strict=True) if n > 0]
        except RedisError as exc:
            self._redis_failed("invalidate", exc)

    # ---------------------------------------------------------------- metrics

    def metrics(self, scope: Scope = "process") -> Step[dict[str, Any]]:
        """Per-tier metrics of this process (``"process"``) or of the whole fleet (``"fleet"``)."""
        if scope not in ("process", "fleet"):
            raise InvalidArgumentError(f"scope={scope!r} must be 'process' or 'fleet'")
        batch: Batch = []
        deltas = (0, 0)
        if scope == "fleet":
            deltas = self._take_l1_deltas()
            batch += self._report_commands(deltas)
        reports = len(batch)
        for sk in self.space.shard_keys:
            batch += [("ZCARD", sk.l2), ("ZCARD", sk.l3), ("HGETALL", sk.stats)]
        try:
            replies = yield batch
            _raise_first_error(replies)
            replies = replies[reports:]
        except RedisError as exc:
            self._give_back_l1_deltas(deltas)
            self._redis_failed("metrics", exc)
            replies = None
        local = self.counters.snapshot()
        stats = None if replies is None else [_int_hash(h) for h in replies[2::3]]
        if scope == "fleet":
            tally = None if stats is None else fleet_tally(stats)
        else:
            tally = dict(local, l1_evictions=self.l1.evictions)
        sizes = None
        if replies is not None and stats is not None:
            sizes = {"l2": (sum(replies[0::3]), sum(s.get("l2_bytes", 0) for s in stats)),
                     "l3": (sum(replies[1::3]), sum(s.get("l3_bytes", 0) for s in stats))}
        l1_size = (len(self.l1), self.l1.total_size) if scope == "process" else None
        return build_metrics(tally, l1_size, sizes, local, available=replies is not None)

    def report_counters(self) -> Step[None]:
        """Send this process's unreported L1 counters to the fleet totals (done on close)."""
        deltas = self._take_l1_deltas()
        if deltas == (0, 0):
            return
        try:
            _raise_first_error((yield self._report_commands(deltas)))
        except RedisError:
            self._give_back_l1_deltas(deltas)

    # --------------------------------------------------------------- plumbing

    def _shard_call(self, script: Any, shard: int, items: list[Any],
                    deltas: tuple[int, int] = (0, 0)) -> ScriptCall:
        clock = self.config.clock
        now_ms = 0 if clock is None else max(1, math.floor(clock() * 1000))  # 0 = the server's TIME
        head = (now_ms, self._caps2[shard], self._caps3[shard], *self._idle_ms, self.config.promote_after, *deltas)
        return ScriptCall(script, tuple(self.space.shard_keys[shard].keys), head + tuple(items))

    def _since(self) -> float:
        """The L1 clock reading that copies made from the next request count their lifetime from.

        Taken before the request is built, so a copy never outlives the value in Redis: with the
        server's TIME the request runs later than this reading; with an injected clock it is the
        very millisecond the scripts are given.
        """
        clock = self.config.clock
        if clock is None:
            return self.l1.clock()
        return max(1, math.floor(clock() * 1000)) / 1000

    def _run(self, calls: list[ScriptCall]) -> Step[list[Any]]:
        """Run script calls in one round trip: EVALSHA, then EVAL for any the server forgot."""
        replies = yield [c.evalsha() for c in calls]
        missing = [i for i, r in enumerate(replies) if needs_reload(r)]
        if missing:
            log.info("reloading %d script(s) after NOSCRIPT", len(missing))
            self.counters.add(script_reloads=len(missing))
            again = yield [calls[i].eval() for i in missing]
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        _raise_first_error(replies)
        self._recovered()
        return replies

    def _ready(self) -> Step[None]:
        """Once per process: agree with the fleet on the shard count and data format."""
        if self._config_checked:
            return
        cfg = self.space.config
        replies = yield [("HSETNX", cfg, "shards", self.config.shards),
                         ("HSETNX", cfg, "format", FORMAT_VERSION), ("HGETALL", cfg)]
        _raise_first_error(replies)
        stored = _int_hash(replies[2])
        if stored.get("shards") != self.config.shards:
            raise ConfigurationError(
                f"namespace {self.config.namespace!r} in Redis uses shards={stored.get('shards')}, "
                f"this worker shards={self.config.shards}; every worker of a namespace must use the same "
                f"shard count (set shards={stored.get('shards')}, or use a new namespace)"
            )
        if stored.get("format") != FORMAT_VERSION:
            raise ConfigurationError(
                f"namespace {self.config.namespace!r} holds data format {stored.get('format')}, this release "
                f"reads format {FORMAT_VERSION}; use a new namespace or upgrade every worker"
            )
        self._config_checked = True

    def _report_commands(self, deltas: tuple[int, int]) -> Batch:
        stats = self.space.shard_keys[0].stats
        fields = ("l1_hits", "l1_evictions")
        return [("HINCRBY", stats, field, n) for field, n in zip(fields, deltas, strict=True) if n]

    def _take_l1_deltas(self) -> tuple[int, int]:
        with self._lock:
            hits, self._unreported_l1_hits = self._unreported_l1_hits, 0
            evictions = self.l1.evictions - self._reported_l1_evictions
            self._reported_l1_evictions = self.l1.evictions
        return hits, evictions

    def _give_back_l1_deltas(self, deltas: tuple[int, int]) -> None:
        with self._lock:
            self._unreported_l1_hits += deltas[0]
            self._reported_l1_evictions -= deltas[1]

    def _count_events(self, events: list[int]) -> None:
        promotions, demotions, evictions, expirations = events
        self.counters.add(promotions=promotions, demotions=demotions, evictions=evictions, expirations=expirations)

    def _redis_failed(self, op: str, exc: Exception) -> None:
        self.counters.add(redis_errors=1)
        if not self.config.fail_open:
            raise CacheUnavailableError(
                f"Redis at {redact(self.config.url)} could not serve {op}: {exc}. Check that it is reachable "
                "and healthy, or construct the cache with fail_open=True to fall back to L1"
            ) from exc
        if not self._failing:
            self._failing = True
            log.warning("Redis at %s failed during %s (%s); serving from L1 until it recovers",
                        redact(self.config.url), op, exc)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("Redis at %s is serving again", redact(self.config.url))


def _by_shard(refs: Iterable[EntryRef]) -> dict[int, list[EntryRef]]:
    groups: dict[int, list[EntryRef]] = {}
    for ref in refs:
        groups.setdefault(ref.shard, []).append(ref)
    return groups


def _raise_first_error(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _int_hash(reply: Any) -> dict[str, int]:
    """The integer fields of a Redis hash reply as {str: int} (others, like `tick`, are left out)."""
    items = reply.items() if isinstance(reply, dict) else zip(reply[0::2], reply[1::2], strict=True)
    return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in items if v.lstrip(b"-").isdigit()}
