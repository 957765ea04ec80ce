"""Tool-selection cache: the fleet cache's API for agents choosing tools (docs/tool-selection.md).

A thin layer over :class:`~victor_rcache.MultiLevelCache` (no Lua of its own): one cache namespace per logical
namespace (``<base>-query``, ``<base>-context``, ``<base>-rl``), each with its own ttl and sizes.
Keys are built by pure functions from a canonical JSON encoding of their parts (long parts as
SHA-256), so two different inputs never share a key. :func:`~victor_rcache.cached_selection` serves a selection
function (sync or async) through ``get_or_set``: computed once per fleet on a miss.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import TracebackType
from typing import Any

from .. import forksafe
from ..aio import AsyncMultiLevelCache
from ..cache import MultiLevelCache, release_resources
from ..config import ENV_PREFIX, CacheConfig, check_ttl
from ..errors import CacheError, CacheUnavailableError, ConfigurationError, InvalidArgumentError
from .warmer import (
    AsyncPredictiveCacheWarmer,
    PredictiveCacheWarmer,
    PrewarmPlan,
    PrewarmTarget,
    SelectionFn,
    store_as_is,
)

log = logging.getLogger("victor_rcache")

NAMESPACES = ("query", "context", "rl")
TOOLS_ENV_PREFIX = ENV_PREFIX + "TOOLS_"
CONTEXT_MESSAGES = 3  # a context key covers the last 3 messages
SYNCED_HASHES = 64  # tool sets one process remembers having registered in Redis
_MISS = object()


# ---------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class NamespaceSettings:
    """TTL (absolute life of an entry, seconds) and tier sizes of one logical namespace."""

    ttl: float
    l1_size: int
    l2_size: int
    l3_size: int


DEFAULT_NAMESPACES: Mapping[str, NamespaceSettings] = {
    "query": NamespaceSettings(3600.0, 1000, 5000, 50_000),
    "context": NamespaceSettings(300.0, 500, 2000, 10_000),
    "rl": NamespaceSettings(3600.0, 1000, 5000, 20_000),
}


@dataclass(frozen=True)
class ToolSelectionConfig:
    """Settings of a :class:`ToolSelectionCache`; ``cache`` holds the shared core settings (URL, ...)."""

    base: str = "tools"
    namespaces: Mapping[str, NamespaceSettings] = field(default_factory=lambda: dict(DEFAULT_NAMESPACES))
    cache: CacheConfig = field(default_factory=CacheConfig)
    clock: Callable[[], float] = time.time  # wall clock: record timestamps and the rl key's hour bucket
    hit_tracking: int = 10_000  # entries whose per-process hit count is remembered (LRU)
    fail_safe: bool = True
    """A selection whose function raises (the model API rate-limited or down) is answered with the last
    selection made for the query, for up to the cache's ``fail_safe_grace`` past its ttl
    (docs/fail-safe.md). False: the exception reaches the caller."""

    def __post_init__(self) -> None:
        if set(self.namespaces) != set(NAMESPACES):
            raise ConfigurationError(f"namespaces must configure exactly {NAMESPACES}, not {sorted(self.namespaces)}")
        for name, s in self.namespaces.items():
            check_ttl(s.ttl, f"{name} ttl", ConfigurationError)
        for namespace in NAMESPACES:
            self.cache_config(namespace)  # validates every namespace's sizes now, with the core's messages

    def cache_config(self, namespace: str) -> CacheConfig:
        """The core settings of one namespace's cache: ``<base>-<namespace>`` with its sizes."""
        s = self.namespaces[namespace]
        return replace(self.cache, namespace=f"{self.base}-{namespace}", l1_size=s.l1_size,
                       l2_size=s.l2_size, l3_size=s.l3_size, fail_safe=self.fail_safe)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ToolSelectionConfig:
        """Read ``VICTOR_RCACHE_TOOLS_*`` (and the core's ``VICTOR_RCACHE_*``); keywords take precedence.

        Keywords that are not fields of this class (``redis_url=``, ``cluster=``...) go to the core.
        """
        env = os.environ if environ is None else environ
        own = {f.name for f in fields(cls)}
        mine = {k: v for k, v in overrides.items() if k in own}
        core = {k: v for k, v in overrides.items() if k not in own}
        mine.setdefault("cache", CacheConfig.from_env(env, **core))
        mine.setdefault("base", env.get(TOOLS_ENV_PREFIX + "NAMESPACE", "tools"))
        mine.setdefault("namespaces", {ns: _settings_from_env(env, ns) for ns in NAMESPACES})
        return cls(**mine)


def _settings_from_env(env: Mapping[str, str], namespace: str) -> NamespaceSettings:
    base = DEFAULT_NAMESPACES[namespace]
    values: dict[str, Any] = {}
    for f in fields(NamespaceSettings):
        var = f"{TOOLS_ENV_PREFIX}{namespace.upper()}_{f.name.upper()}"
        raw = env.get(var)
        if raw is None:
            continue
        try:
            values[f.name] = float(raw) if f.name == "ttl" else int(raw)
        except ValueError:
            raise ConfigurationError(f"{var}={raw!r} is not a valid number; fix the variable") from None
    return replace(base, **values)


# ---------------------------------------------------------------------------------------- keys


def canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces; the one encoding every key is built from."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return {"$set": sorted(canonical(v) for v in value)}  # tagged: never equal to a list of strings
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, type):  # a model class as a schema (LangChain's args_schema): its JSON schema
        schema = getattr(value, "model_json_schema", None) or getattr(value, "schema", None)
        if callable(schema):
            return schema()
        raise InvalidArgumentError(f"class {value.__name__} cannot be part of a key: pass its JSON schema")
    dump = getattr(value, "model_dump", None)  # pydantic models (tool schemas often are)
    if callable(dump):
        return dump()
    raise InvalidArgumentError(f"{type(value).__name__} cannot be part of a key: use JSON-like values")


def sha256_of(value: Any) -> str:
    """SHA-256 (hex) of a value's canonical JSON."""
    return hashlib.sha256(canonical(value).encode("utf-8")).hexdigest()


def normalize_query(query: str) -> str:
    """Lowercase, whitespace collapsed, stripped: the form a query key holds."""
    if not isinstance(query, str):
        raise InvalidArgumentError(f"a query must be str, not {type(query).__name__}")
    return " ".join(query.lower().split())


def _tool_list(tools: Any) -> list[Any]:
    """The tools of a list, a ``{name: tool}`` mapping or a registry (``list_tools()`` / ``.tools``)."""
    lister = getattr(tools, "list_tools", None)
    if callable(lister):
        return list(lister())
    inner = getattr(tools, "tools", None)
    if inner is not None and not isinstance(tools, Mapping):
        return _tool_list(inner)
    if isinstance(tools, Mapping):
        return [{"name": name, "tool": tool_descriptor(tool)} for name, tool in tools.items()]
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Iterable):
        raise InvalidArgumentError("tools must be a list of tools, a {name: tool} mapping or a registry")
    return list(tools)


def tool_descriptor(tool: Any) -> Any:
    """What a tool contributes to the tools hash: name, description and parameter schema."""
    if isinstance(tool, (str, Mapping)):
        return tool  # a name alone, or a whole tool description (every field counts)
    return {"name": getattr(tool, "name", type(tool).__name__),
            "description": getattr(tool, "description", None),
            "parameters": _first_attr(tool, ("parameters", "input_schema", "schema", "args_schema"))}


def _first_attr(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value() if callable(value) and not isinstance(value, type) else value
    return None


def tools_hash(tools: Any) -> str:
    """SHA-256 over every tool's name, description and parameters, in any order; recomputed each call."""
    if tools is None:
        return "none"
    return sha256_of(sorted(canonical(tool_descriptor(t)) for t in _tool_list(tools)))


def query_key(query: str, tools: Any = None, *, model: Any = None, threshold: Any = None,
              max_tools: Any = None, **config: Any) -> str:
    """``q:`` + canonical JSON of [normalized query, tools hash, selector config]."""
    return query_key_of_hash(query, tools_hash(tools), model=model, threshold=threshold, max_tools=max_tools,
                             **config)


def query_key_of_hash(query: str, registry_hash: str, /, *, model: Any = None, threshold: Any = None,
                      max_tools: Any = None, **config: Any) -> str:
    """:func:`query_key` from the registry's hash (:func:`~victor_rcache.prediction.tools_hash`), not the registry."""
    settings = {"model": model, "threshold": threshold, "max_tools": max_tools, **config}
    return "q:" + canonical([normalize_query(query), registry_hash, settings])


def context_key(messages: Iterable[Any], pending_actions: Iterable[Any] | None = None) -> str:
    """``c:`` + canonical JSON of the SHA-256 of the last 3 messages and of the pending actions."""
    last = list(messages)[-CONTEXT_MESSAGES:]
    return "c:" + canonical([sha256_of(last), sha256_of(list(pending_actions or []))])


def rl_key(task_type: str, tools: Any = None, *, now: float) -> str:
    """``r:`` + canonical JSON of [task type, tools hash, hour bucket of ``now``]."""
    return "r:" + canonical([task_type, tools_hash(tools), int(now // 3600)])


# ---------------------------------------------------------------------------------------- records


@dataclass
class CachedSelection:
    """One cached selection; every ``get`` returns a new one (its lists are copies)."""

    value: Any
    tools: list[str] = field(default_factory=list)
    timestamp: float = 0.0
    hit_count: int = 0  # hits of this entry served to this process since it was stored or first seen
    ttl: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    selection_latency_ms: float = 0.0


def make_record(value: Any, tools: Iterable[str] | None, ttl: float | None, metadata: Mapping[str, Any] | None,
                selection_latency_ms: float, now: float) -> dict[str, Any]:
    """The msgpack-friendly dict a selection is stored as."""
    return {"value": value, "tools": [str(t) for t in (tools or [])], "timestamp": now, "ttl": ttl,
            "metadata": dict(metadata or {}), "selection_latency_ms": float(selection_latency_ms)}


def selection_of(record: Any, hit_count: int) -> CachedSelection | None:
    """The :class:`CachedSelection` of a stored record (None if it is not one)."""
    if not isinstance(record, dict) or "value" not in record:
        return None
    return CachedSelection(value=record["value"], tools=list(record.get("tools") or []),
                           timestamp=float(record.get("timestamp") or 0.0), hit_count=hit_count,
                           ttl=record.get("ttl"), metadata=dict(record.get("metadata") or {}),
                           selection_latency_ms=float(record.get("selection_latency_ms") or 0.0))


def selected_tools(value: Any) -> list[str]:
    """The tool names a selector's result names: the list itself, or its ``"tools"`` entry."""
    if isinstance(value, Mapping):
        value = value.get("tools", [])
    if isinstance(value, (list, tuple)):
        return [str(getattr(t, "name", t)) for t in value]
    return []


# ---------------------------------------------------------------------------------------- counting


@dataclass
class _Counts:
    hits: int = 0
    misses: int = 0
    latency_saved_ms: float = 0.0


class _Tracker:
    """Per-process hit/miss counters, latency saved and per-entry hit counts (bounded LRU)."""

    FORK_ORDER = -1

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._reset()
        forksafe.register(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self.counts = {ns: _Counts() for ns in NAMESPACES}
        self._entries: OrderedDict[tuple[str, str], int] = OrderedDict()

    def _after_fork(self) -> None:
        self._reset()  # a child counts its own hits

    def served(self, namespace: str, key: str, record: Any, hit: bool) -> CachedSelection | None:
        """Count one lookup; the selection it found (or None)."""
        with self._lock:
            counts = self.counts[namespace]
            found = selection_of(record, 0)
            if found is None or not hit:
                counts.misses += 1
                if found is not None:
                    self._set(namespace, key, 0)
                return found
            counts.hits += 1
            counts.latency_saved_ms += found.selection_latency_ms
            found.hit_count = self._set(namespace, key, self._entries.get((namespace, key), 0) + 1)
            return found

    def stored(self, namespace: str, key: str) -> None:
        with self._lock:
            self._set(namespace, key, 0)

    def forget(self, namespace: str, key: str | None = None) -> None:
        with self._lock:
            doomed = [e for e in self._entries if e[0] == namespace and key in (None, e[1])]
            for entry in doomed:
                del self._entries[entry]

    def _set(self, namespace: str, key: str, count: int) -> int:
        self._entries[(namespace, key)] = count
        self._entries.move_to_end((namespace, key))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return count


def _entries(metrics: Mapping[str, Any]) -> int:
    """Entries a namespace holds in Redis (L2 + L3), from a cache's metrics (0 if unknown)."""
    return sum(int(metrics[tier]["entry_count"] or 0) for tier in ("l2", "l3"))


def _namespace_metrics(counts: _Counts, cache_metrics: Mapping[str, Any]) -> dict[str, Any]:
    total = counts.hits + counts.misses
    return {"hits": counts.hits, "misses": counts.misses,
            "evictions": int(cache_metrics["l1"]["evictions"]) + int(cache_metrics["l3"]["evictions"]),
            "hit_rate": counts.hits / total if total else 0.0,
            "total_latency_saved_ms": counts.latency_saved_ms}


def _with_total(per_namespace: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    parts = list(per_namespace.values())
    hits, misses = sum(p["hits"] for p in parts), sum(p["misses"] for p in parts)
    total = {"hits": hits, "misses": misses, "evictions": sum(p["evictions"] for p in parts),
             "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
             "total_latency_saved_ms": sum(p["total_latency_saved_ms"] for p in parts)}
    return {**per_namespace, "total": total}


# ---------------------------------------------------------------------------------------- the caches


def _build_all(config: ToolSelectionConfig, build: Callable[[CacheConfig], Any]) -> dict[str, Any]:
    """One cache per namespace; if one cannot be built, those already built are closed again."""
    built: dict[str, Any] = {}
    try:
        for ns in NAMESPACES:
            built[ns] = build(config.cache_config(ns))
    except BaseException:
        for cache in built.values():  # give back their shares of the process's subscriber, thread and pool
            if isinstance(cache, MultiLevelCache):
                cache.close()
            else:  # an async cache: nothing has run on its loop yet; the rest is sync (threads, a sync pool)
                cache._finalizer.detach()
                release_resources(cache._flusher, cache._core, [cache._bookkeeping_io])
        raise
    return built


class _ToolCacheBase:
    """What the sync and async tool caches share: settings, keys, counting, the tools-hash key."""

    def __init__(self, config: ToolSelectionConfig | None, caches: Mapping[str, Any] | None,
                 build: Callable[[CacheConfig], Any]) -> None:
        self.config = config or ToolSelectionConfig.from_env()
        self.caches: dict[str, Any] = dict(caches) if caches is not None else _build_all(self.config, build)
        if set(self.caches) != set(NAMESPACES):
            raise ConfigurationError(f"caches must be given for exactly {NAMESPACES}")
        self._tracker = _Tracker(self.config.hit_tracking)
        self._synced_hash: str | None = None  # the tools hash this process last registered in Redis
        self._synced: OrderedDict[str, None] = OrderedDict()  # hashes registered (bounded): each once
        self.prewarm = {"scheduled": 0, "skipped": 0, "failed": 0, "completed": 0}
        self._prewarm_lock = threading.Lock()  # background threads count too
        self._warmers: weakref.WeakSet[Any] = weakref.WeakSet()  # those prewarming for cached_selection here

    @property
    def tools_key(self) -> str:
        """The Redis key (a string) holding the fleet's current tools hash: ``<base>:tools``."""
        return f"{self.config.base}:tools"

    def _namespace(self, namespace: str) -> str:
        if namespace not in NAMESPACES:
            raise InvalidArgumentError(f"namespace={namespace!r} must be one of {NAMESPACES}")
        return namespace

    def _ttl(self, namespace: str, ttl: float | None) -> float:
        return check_ttl(ttl) if ttl is not None else self.config.namespaces[namespace].ttl

    def _record(self, value: Any, tools: Iterable[str] | None, namespace: str, ttl: float | None,
                metadata: Mapping[str, Any] | None, selection_latency_ms: float) -> dict[str, Any]:
        return make_record(value, tools, self._ttl(namespace, ttl), metadata, selection_latency_ms,
                           self.config.clock())

    def query_key(self, query: str, tools: Any = None, **config: Any) -> str:
        """See :func:`query_key`."""
        return query_key(query, tools, **config)

    def context_key(self, messages: Iterable[Any], pending_actions: Iterable[Any] | None = None) -> str:
        """See :func:`context_key`."""
        return context_key(messages, pending_actions)

    def rl_key(self, task_type: str, tools: Any = None) -> str:
        """See :func:`rl_key`; the hour bucket comes from this cache's clock."""
        return rl_key(task_type, tools, now=self.config.clock())

    def _tools_reply(self, replies: Any, fail_open: bool) -> str | None:
        """The previous tools hash from a ``SET ... GET`` / ``GET`` reply (None: none, or Redis failed)."""
        reply = replies if isinstance(replies, BaseException) else replies[0]
        if isinstance(reply, BaseException):
            if not fail_open:
                raise CacheUnavailableError(f"could not read {self.tools_key}: {reply}") from reply
            log.warning("tools hash %s unavailable: %s", self.tools_key, reply)
            return None
        return reply.decode() if isinstance(reply, bytes) else reply

    def _note_synced(self, new: str | None, replies: Any) -> None:
        """Remember a tools hash as registered, once Redis really has it (not after a failed call).

        A process may select with several tool sets (several agents): each is registered once,
        so alternating between them does not flush the fleet on every call."""
        if isinstance(replies, BaseException) or any(isinstance(r, BaseException) for r in replies):
            return
        self._synced_hash = new
        if new is not None:
            self._synced[new] = None
            self._synced.move_to_end(new)
            while len(self._synced) > SYNCED_HASHES:
                self._synced.popitem(last=False)

    def _prewarm_done(self, outcome: Any) -> None:
        """A background prewarm's end (a PrewarmPlan's ``done``): its report, or "dropped"/"failed"."""
        if outcome == "dropped":
            self._count_prewarm(skipped=1)
        elif outcome == "failed":
            self._count_prewarm(scheduled=1, failed=1)
        else:
            self._count_prewarm(scheduled=1, completed=outcome.completed, failed=outcome.failed)

    def _count_prewarm(self, **deltas: int) -> None:
        with self._prewarm_lock:
            for name, n in deltas.items():
                self.prewarm[name] += n

    def _metrics(self, namespace: str | None, underlying: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        per = {ns: _namespace_metrics(self._tracker.counts[ns], m) for ns, m in underlying.items()}
        return per[namespace] if namespace is not None else _with_total(per)

    def _stats(self, underlying: Mapping[str, Mapping[str, Any]], stored_hash: str | None) -> dict[str, Any]:
        metrics = self._metrics(None, underlying)
        spaces = {ns: {"cache_namespace": self.caches[ns].namespace, "ttl": self.config.namespaces[ns].ttl,
                       **dataclasses.asdict(self.config.namespaces[ns]), "entries": _entries(m),
                       "l1_entries": m["l1"]["entry_count"], "metrics": metrics[ns], "cache": dict(m)}
                  for ns, m in underlying.items()}
        return {"base": self.config.base, "namespaces": spaces, "total": metrics["total"],
                "tools_hash": {"process": self._synced_hash, "fleet": stored_hash},
                "prewarm": dict(self.prewarm)}


class ToolSelectionCache(_ToolCacheBase):
    """Tool selections cached for the fleet, in three namespaces (``query``, ``context``, ``rl``).

    ``ToolSelectionCache(config=None, caches=None)``: by default one :class:`MultiLevelCache` per
    namespace from ``config`` (else from the environment), each with its own connection pool;
    ``caches={"query": ..., "context": ..., "rl": ...}`` uses caches you built.
    """

    caches: dict[str, MultiLevelCache]

    def __init__(self, config: ToolSelectionConfig | None = None, *,
                 caches: Mapping[str, MultiLevelCache] | None = None) -> None:
        super().__init__(config, caches, lambda c: MultiLevelCache(config=c))

    def cache(self, namespace: str = "query") -> MultiLevelCache:
        """The underlying fleet cache of a namespace (e.g. for a ``PredictiveCacheWarmer``)."""
        return self.caches[self._namespace(namespace)]

    def get(self, key: str, namespace: str = "query") -> CachedSelection | None:
        """The selection under ``key`` (a fresh copy), or None."""
        record = self.cache(namespace).get(key, _MISS)
        return self._tracker.served(namespace, key, record, hit=record is not _MISS)

    def put(self, key: str, value: Any, tools: Iterable[str] | None = None, namespace: str = "query",
            ttl: float | None = None, metadata: Mapping[str, Any] | None = None,
            selection_latency_ms: float = 0.0) -> None:
        """Store a selection for ``ttl`` seconds (default: the namespace's ttl)."""
        record = self._record(value, tools, self._namespace(namespace), ttl, metadata, selection_latency_ms)
        self.cache(namespace).put(key, record, ttl=record["ttl"])
        self._tracker.stored(namespace, key)

    def get_query(self, key: str) -> CachedSelection | None:
        return self.get(key, "query")

    def put_query(self, key: str, value: Any, tools: Iterable[str] | None = None, **options: Any) -> None:
        self.put(key, value, tools, "query", **options)

    def get_context(self, key: str) -> CachedSelection | None:
        return self.get(key, "context")

    def put_context(self, key: str, value: Any, tools: Iterable[str] | None = None, **options: Any) -> None:
        self.put(key, value, tools, "context", **options)

    def get_rl(self, key: str) -> CachedSelection | None:
        return self.get(key, "rl")

    def put_rl(self, key: str, value: Any, tools: Iterable[str] | None = None, **options: Any) -> None:
        self.put(key, value, tools, "rl", **options)

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, Any]], namespace: str = "query",
                       ttl: float | None = None) -> CachedSelection:
        """The selection under ``key``; on a miss ``compute()`` (a record) runs once per fleet."""
        ran: list[bool] = []

        def loader() -> dict[str, Any]:
            ran.append(True)
            return compute()

        record = self.cache(namespace).get_or_set(key, loader, ttl=self._ttl(namespace, ttl))
        found = self._tracker.served(namespace, key, record, hit=not ran)
        if found is None:
            raise InvalidArgumentError(f"{key!r} holds a value that is not a tool selection")
        return found

    def invalidate(self, key: str | None = None, namespace: str | None = None) -> int:
        """Remove ``key`` (from ``namespace``, or every namespace), or whole namespaces; entries removed.

        A namespace's count is its Redis entries (L2 + L3) before minus after the flush.
        """
        spaces = [self._namespace(namespace)] if namespace is not None else list(NAMESPACES)
        removed = 0
        for ns in spaces:
            self._tracker.forget(ns, key)
            if key is not None:
                removed += self.caches[ns].delete(key)
                continue
            before = _entries(self.caches[ns].get_metrics())
            self.caches[ns].invalidate()
            removed += max(0, before - _entries(self.caches[ns].get_metrics()))
        return removed

    def invalidate_on_tools_change(self, tools: Any = None) -> bool:
        """Flush ``query`` and ``rl`` fleet-wide if the tool set differs from the fleet's; True if flushed.

        With ``tools``: its hash replaces the one in Redis (GET and SET in one round trip); a different
        previous one means the tools changed. Without: flush unconditionally and forget the stored hash.
        """
        new = None if tools is None else tools_hash(tools)
        batch = [("GET", self.tools_key), ("DEL", self.tools_key) if new is None else ("SET", self.tools_key, new)]
        query = self.caches["query"]
        replies = query._send(batch)
        previous = self._tools_reply(replies, query.config.fail_open)
        self._note_synced(new, replies)
        if new is not None and previous in (None, new):
            return False
        self.invalidate(namespace="query")
        self.invalidate(namespace="rl")
        return True

    def stored_tools_hash(self) -> str | None:
        """The tools hash the fleet last registered (None if none)."""
        query = self.caches["query"]
        return self._tools_reply(query._send([("GET", self.tools_key)]), query.config.fail_open)

    def tools_changed(self, tools: Any) -> bool:
        """True if the fleet registered another tool set than ``tools`` (one round trip, changes nothing)."""
        stored = self.stored_tools_hash()
        return stored is not None and stored != tools_hash(tools)

    def _sync_tools(self, tools: Any, current: str) -> None:
        if current not in self._synced and tools is not None:
            self.invalidate_on_tools_change(tools)

    def get_metrics(self, namespace: str | None = None) -> dict[str, Any]:
        """This process's hits, misses, evictions, hit rate, latency saved: per namespace and total."""
        spaces = [self._namespace(namespace)] if namespace is not None else list(NAMESPACES)
        return self._metrics(namespace, {ns: self.caches[ns].get_metrics() for ns in spaces})

    def get_stats(self) -> dict[str, Any]:
        """Sizes, ttls, entries, metrics and the underlying caches' metrics of every namespace."""
        return self._stats({ns: self.caches[ns].get_metrics() for ns in NAMESPACES}, self.stored_tools_hash())

    def wait_for_prewarms(self, timeout: float | None = None) -> bool:
        """Wait for the background prewarms of ``cached_selection(prewarm=True)`` over this cache (their
        warmers' queued records are sent first); False if some still run at ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = True
        for warmer in list(self._warmers):
            done &= warmer.wait_for_prewarms(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return done

    def close(self, wait: float = 5.0) -> None:
        """Wait up to ``wait`` seconds for background prewarms, then close the caches."""
        self.wait_for_prewarms(wait)
        for cache in self.caches.values():
            cache.close()

    def __enter__(self) -> ToolSelectionCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncToolSelectionCache(_ToolCacheBase):
    """The coroutine version of :class:`ToolSelectionCache` (on :class:`AsyncMultiLevelCache`)."""

    caches: dict[str, AsyncMultiLevelCache]

    def __init__(self, config: ToolSelectionConfig | None = None, *,
                 caches: Mapping[str, AsyncMultiLevelCache] | None = None) -> None:
        super().__init__(config, caches, lambda c: AsyncMultiLevelCache(config=c))

    def cache(self, namespace: str = "query") -> AsyncMultiLevelCache:
        return self.caches[self._namespace(namespace)]

    async def get(self, key: str, namespace: str = "query") -> CachedSelection | None:
        record = await self.cache(namespace).get(key, _MISS)
        return self._tracker.served(namespace, key, record, hit=record is not _MISS)

    async def put(self, key: str, value: Any, tools: Iterable[str] | None = None, namespace: str = "query",
                  ttl: float | None = None, metadata: Mapping[str, Any] | None = None,
                  selection_latency_ms: float = 0.0) -> None:
        record = self._record(value, tools, self._namespace(namespace), ttl, metadata, selection_latency_ms)
        await self.cache(namespace).put(key, record, ttl=record["ttl"])
        self._tracker.stored(namespace, key)

    async def get_query(self, key: str) -> CachedSelection | None:
        return await self.get(key, "query")

    async def put_query(self, key: str, value: Any, tools: Iterable[str] | None = None, **options: Any) -> None:
        await self.put(key, value, tools, "query", **options)

    async def get_context(self, key: str) -> CachedSelection | None:
        return await self.get(key, "context")

    async def put_context(self, key: str, value: Any, tools: Iterable[str] | None = None, **options: Any) -> None:
        await self.put(key, value, tools, "context", **options)

    async def get_rl(self, key: str) -> CachedSelection | None:
        return await self.get(key, "rl")

    async def put_rl(self, key: str, value: Any, tools: Iterable[str] | None = None, **options: Any) -> None:
        await self.put(key, value, tools, "rl", **options)

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[dict[str, Any]]],
                             namespace: str = "query", ttl: float | None = None) -> CachedSelection:
        ran: list[bool] = []

        async def loader() -> dict[str, Any]:
            ran.append(True)
            return await compute()

        record = await self.cache(namespace).get_or_set(key, loader, ttl=self._ttl(namespace, ttl))
        found = self._tracker.served(namespace, key, record, hit=not ran)
        if found is None:
            raise InvalidArgumentError(f"{key!r} holds a value that is not a tool selection")
        return found

    async def invalidate(self, key: str | None = None, namespace: str | None = None) -> int:
        spaces = [self._namespace(namespace)] if namespace is not None else list(NAMESPACES)
        removed = 0
        for ns in spaces:
            self._tracker.forget(ns, key)
            if key is not None:
                removed += await self.caches[ns].delete(key)
                continue
            before = _entries(await self.caches[ns].get_metrics())
            await self.caches[ns].invalidate()
            removed += max(0, before - _entries(await self.caches[ns].get_metrics()))
        return removed

    async def invalidate_on_tools_change(self, tools: Any = None) -> bool:
        new = None if tools is None else tools_hash(tools)
        batch = [("GET", self.tools_key), ("DEL", self.tools_key) if new is None else ("SET", self.tools_key, new)]
        query = self.caches["query"]
        replies = await query._send(batch)
        previous = self._tools_reply(replies, query.config.fail_open)
        self._note_synced(new, replies)
        if new is not None and previous in (None, new):
            return False
        await self.invalidate(namespace="query")
        await self.invalidate(namespace="rl")
        return True

    async def stored_tools_hash(self) -> str | None:
        query = self.caches["query"]
        return self._tools_reply(await query._send([("GET", self.tools_key)]), query.config.fail_open)

    async def tools_changed(self, tools: Any) -> bool:
        stored = await self.stored_tools_hash()
        return stored is not None and stored != tools_hash(tools)

    async def _sync_tools(self, tools: Any, current: str) -> None:
        if current not in self._synced and tools is not None:
            await self.invalidate_on_tools_change(tools)

    async def get_metrics(self, namespace: str | None = None) -> dict[str, Any]:
        spaces = [self._namespace(namespace)] if namespace is not None else list(NAMESPACES)
        return self._metrics(namespace, {ns: await self.caches[ns].get_metrics() for ns in spaces})

    async def get_stats(self) -> dict[str, Any]:
        underlying = {ns: await self.caches[ns].get_metrics() for ns in NAMESPACES}
        return self._stats(underlying, await self.stored_tools_hash())

    async def wait_for_prewarms(self, timeout: float | None = None) -> bool:
        """:meth:`ToolSelectionCache.wait_for_prewarms`, for prewarm tasks on this event loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = True
        for warmer in list(self._warmers):
            done &= await warmer.wait_for_prewarms(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return done

    async def close(self, wait: float = 5.0) -> None:
        """Wait up to ``wait`` seconds for prewarm tasks (then cancel them), then close the caches."""
        await self.wait_for_prewarms(wait)
        for warmer in list(self._warmers):
            warmer.cancel_prewarms()
        for cache in self.caches.values():
            await cache.close()

    async def __aenter__(self) -> AsyncToolSelectionCache:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


# ---------------------------------------------------------------------------------------- one per process


class _Registry:
    """The process's tool caches: one sync instance, one async instance per event loop."""

    FORK_ORDER = -1

    def __init__(self) -> None:
        self._after_fork()
        forksafe.register(self)

    def _after_fork(self) -> None:
        # A child must not use its parent's caches (their sockets and threads): it builds its own.
        self.lock = threading.Lock()
        self.sync: ToolSelectionCache | None = None
        self.per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncToolSelectionCache] = (
            weakref.WeakKeyDictionary())


_registry = _Registry()


def get_tool_selection_cache() -> ToolSelectionCache:
    """This process's :class:`ToolSelectionCache`, configured from the environment on first use."""
    with _registry.lock:
        if _registry.sync is None:
            _registry.sync = ToolSelectionCache(ToolSelectionConfig.from_env())
        return _registry.sync


def get_async_tool_selection_cache() -> AsyncToolSelectionCache:
    """The running event loop's :class:`AsyncToolSelectionCache`, configured from the environment."""
    loop = asyncio.get_running_loop()
    with _registry.lock:
        cache = _registry.per_loop.get(loop)
        if cache is None:
            cache = _registry.per_loop[loop] = AsyncToolSelectionCache(ToolSelectionConfig.from_env())
        return cache


def reset_tool_selection_cache() -> None:
    """Close and forget this process's sync instance (tests); async instances are only forgotten."""
    with _registry.lock:
        cache, _registry.sync = _registry.sync, None
        _registry.per_loop.clear()
    if cache is not None:
        cache.close()


# ---------------------------------------------------------------------------------------- cached_selection


Selector = Callable[..., Any]  # selector(query, tools=None, **config) -> list[str] | dict (or awaitable)
KeyFn = Callable[..., str]  # key_fn(query, tools, **config) -> key


def selector_name(selector: Any) -> str:
    """``module.qualname`` of a selector: part of its keys, so two selectors never share entries."""
    target = selector if hasattr(selector, "__qualname__") else type(selector)
    return f"{getattr(target, '__module__', '')}.{target.__qualname__}"


def _key_maker(selector: Selector, key_fn: KeyFn | None, name: str | None) -> KeyFn:
    if key_fn is not None:
        return key_fn
    ident = name or selector_name(selector)
    return lambda query, tools, **config: query_key(query, tools, selector=ident, **config)


def _timed_record(value: Any, started: float, cache: _ToolCacheBase, namespace: str,
                  ttl: float | None) -> dict[str, Any]:
    latency = (time.perf_counter() - started) * 1000.0
    return cache._record(value, selected_tools(value), namespace, ttl, None, latency)


def cached_selection(selector: Selector, *, cache: ToolSelectionCache | AsyncToolSelectionCache | None = None,
                     namespace: str = "query", ttl: float | None = None, key_fn: KeyFn | None = None,
                     warmer: PredictiveCacheWarmer | AsyncPredictiveCacheWarmer | None = None,
                     prewarm: bool = False, name: str | None = None) -> Callable[..., Any]:
    """Serve ``selector(query, tools=None, **config)`` from the fleet cache (once per fleet on a miss).

    The wrapper takes ``(query, tools=None, *, session=None, **config)`` and returns the selection.
    With ``warmer``, each query is recorded into the fleet's prediction model (with the registry's
    :func:`~victor_rcache.prediction.tools_hash` when the selection is the list of tool names, so a
    prewarm without a selection function may store it); with ``prewarm=True`` the session's
    predicted next queries are computed in the background (never blocking the call).
    ``cache`` defaults to this process's instance; ``key_fn(query, tools, **config)`` overrides the key.
    """
    if namespace not in NAMESPACES:
        raise InvalidArgumentError(f"namespace={namespace!r} must be one of {NAMESPACES}")
    if prewarm and warmer is None:
        raise ConfigurationError("prewarm=True needs a warmer= (the prediction model to ask)")
    make_key = _key_maker(selector, key_fn, name)
    if inspect.iscoroutinefunction(selector):
        return _async_wrapper(selector, cache, namespace, ttl, make_key, warmer, prewarm)
    return _sync_wrapper(selector, cache, namespace, ttl, make_key, warmer, prewarm)


def _plan(cache: Any, warmer: Any, tools: Any, config: dict[str, Any], make_key: KeyFn, namespace: str,
          ttl: float | None, select: SelectionFn) -> PrewarmPlan:
    """How the warmer prewarms what follows this call's query: computed by the selector with this call's
    tools and settings, stored as a selection record under the key a request with them uses."""
    cache._warmers.add(warmer)
    target = PrewarmTarget(lambda q: make_key(q, tools, **config), None, store_as_is, cache._ttl(namespace, ttl))
    return PrewarmPlan(select, target, cache._prewarm_done)


def _check_prewarm(cache: Any, warmer: Any, namespace: str) -> None:
    if warmer.cache is not cache.cache(namespace):
        raise ConfigurationError(f"prewarm=True stores into the warmer's cache: give cached_selection a warmer over "
                                 f"this tool-selection cache (or its {namespace!r} namespace)")
    if not warmer.config.background:
        raise ConfigurationError("prewarm=True prewarms after the warmer's background rounds: the warmer needs "
                                 "background=True")


def _sync_wrapper(selector: Selector, given: Any, namespace: str, ttl: float | None, make_key: KeyFn,
                  warmer: Any, prewarm: bool) -> Callable[..., Any]:
    if given is not None and not isinstance(given, ToolSelectionCache):
        raise ConfigurationError("a sync selector needs a ToolSelectionCache")
    if warmer is not None and not isinstance(warmer, PredictiveCacheWarmer):
        raise ConfigurationError("a sync selector needs a PredictiveCacheWarmer")

    @functools.wraps(selector)
    def wrapper(query: str, tools: Any = None, *, session: str | None = None, **config: Any) -> Any:
        cache = given or get_tool_selection_cache()
        current = tools_hash(tools)
        cache._sync_tools(tools, current)

        def compute() -> dict[str, Any]:
            started = time.perf_counter()
            return _timed_record(selector(query, tools, **config), started, cache, namespace, ttl)

        found = cache.get_or_compute(make_key(query, tools, **config), compute, namespace, ttl)
        if warmer is not None:
            plan = None
            if prewarm:
                _check_prewarm(cache, warmer, namespace)

                def select(q: Any) -> dict[str, Any]:
                    started = time.perf_counter()
                    return _timed_record(selector(q, tools, **config), started, cache, namespace, ttl)

                plan = _plan(cache, warmer, tools, config, make_key, namespace, ttl, select)
            try:
                if not warmer._record_now(normalize_query(query), found.tools, session,
                                          _recorded_registry(found, current), plan):
                    warmer.record_query(normalize_query(query), found.tools, session=session,
                                        tools_hash=_recorded_registry(found, current))
            except CacheError:
                log.exception("recording %r into the prediction model failed", query)
        return found.value

    return wrapper


def _recorded_registry(found: CachedSelection, current: str) -> str | None:
    """The tools hash recorded with a selection's tools: the registry's when the tools are the selection
    itself (a prewarm storing them stores what the selector returned); None when they only summarize it
    (a dict), so that only a selection function prewarms it."""
    value = found.value
    return current if isinstance(value, (list, tuple)) and list(value) == found.tools else None


def _async_wrapper(selector: Selector, given: Any, namespace: str, ttl: float | None, make_key: KeyFn,
                   warmer: Any, prewarm: bool) -> Callable[..., Any]:
    if given is not None and not isinstance(given, AsyncToolSelectionCache):
        raise ConfigurationError("an async selector needs an AsyncToolSelectionCache")
    if warmer is not None and not isinstance(warmer, AsyncPredictiveCacheWarmer):
        raise ConfigurationError("an async selector needs an AsyncPredictiveCacheWarmer")

    @functools.wraps(selector)
    async def wrapper(query: str, tools: Any = None, *, session: str | None = None, **config: Any) -> Any:
        cache = given or get_async_tool_selection_cache()
        current = tools_hash(tools)
        await cache._sync_tools(tools, current)

        async def compute() -> dict[str, Any]:
            started = time.perf_counter()
            return _timed_record(await selector(query, tools, **config), started, cache, namespace, ttl)

        found = await cache.get_or_compute(make_key(query, tools, **config), compute, namespace, ttl)
        if warmer is not None:
            plan = None
            if prewarm:
                _check_prewarm(cache, warmer, namespace)

                async def select(q: Any) -> dict[str, Any]:
                    started = time.perf_counter()
                    return _timed_record(await selector(q, tools, **config), started, cache, namespace, ttl)

                plan = _plan(cache, warmer, tools, config, make_key, namespace, ttl, select)
            try:
                if warmer._record_now(normalize_query(query), found.tools, session,
                                      _recorded_registry(found, current), plan):
                    warmer._loop = asyncio.get_running_loop()  # where its background prewarms run
                else:
                    await warmer.record_query(normalize_query(query), found.tools, session=session,
                                              tools_hash=_recorded_registry(found, current))
            except CacheError:
                log.exception("recording %r into the prediction model failed", query)
        return found.value

    return wrapper


__all__ = [
    "AsyncToolSelectionCache",
    "CachedSelection",
    "NamespaceSettings",
    "ToolSelectionCache",
    "ToolSelectionConfig",
    "cached_selection",
    "context_key",
    "get_async_tool_selection_cache",
    "get_tool_selection_cache",
    "normalize_query",
    "query_key",
    "query_key_of_hash",
    "reset_tool_selection_cache",
    "rl_key",
    "tools_hash",
]

