"""What every command shares: the exit codes, the Context a command works with, opening the cache as
the library's ``from_env`` would, finding the server holding a key, and formatting (tables, sizes,
durations, JSON)."""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import AskError, MovedError

from ..cache import MultiLevelCache
from ..config import ENV_PREFIX, redact
from ..errors import ConfigurationError
from ..keys import KeySpace, ShardKeys
from ..prediction.warmer import PredictiveCacheWarmer
from ..tiers import fix_for

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
SHOWN_KEY_CHARS = 60  # longer keys are cut in tables (--json shows them whole)


class Exit(Exception):
    """Stop with ``code`` after printing ``message`` (if any) as ``error: ...`` on stderr."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code


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
        """The shared model's front end: every question asked of Redis as it is now (no background view), and
        a prewarm timeout that fits any lease_ttl (the CLI never prewarms)."""
        if self._warmer is None:
            timeout = min(10.0, self.cache.config.lease_ttl)
            self._warmer = PredictiveCacheWarmer(self.cache, prewarm_timeout=timeout, background=False)
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


def redis_problem(exc: Exception) -> tuple[str, str]:
    """What a Redis failure means, and the fix."""
    if isinstance(exc, (MovedError, AskError)):
        return f"it is a Redis Cluster node (it answered MOVED {exc})", f"pass --cluster or set {ENV_PREFIX}CLUSTER=1"
    if "WRONGTYPE" in str(exc):
        return str(exc), "A key of the namespace was written outside the cache: delete it"
    return str(exc).rstrip(". "), fix_for(exc)
