"""Settings of a cache, validated once, readable from the environment.

Every setting is a constructor argument of :class:`~victor_rcache.MultiLevelCache`; the same names
in upper case with a ``VICTOR_RCACHE_`` prefix configure :meth:`MultiLevelCache.from_env`
(``VICTOR_RCACHE_L2_SIZE=5000``). The URL comes from ``redis_url``, else ``VICTOR_RCACHE_URL``,
else ``REDIS_URL``, else ``redis://localhost:6379/0``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .adaptive import SizingRule
from .codec import Codec, MsgpackCodec
from .errors import ConfigurationError, InvalidTTLError

DEFAULT_URL = "redis://localhost:6379/0"
ENV_PREFIX = "VICTOR_RCACHE_"
MAX_TTL_SECONDS = 10 * 365 * 86400.0  # ten years: anything longer is almost surely a unit mistake
MAX_VALUE_BYTES_LIMIT = 512 * 1024 * 1024  # Redis's own limit for one string


def redact(url: str) -> str:
    """A Redis URL with its password replaced, for messages and logs."""
    # Up to the authority's last '@', as redis-py (urllib) splits it: a password may contain '@'.
    return re.sub(r"(//[^:/@?#]*:)[^/?#]*@", r"\1***@", url)


def check_ttl(value: object, what: str = "ttl", error: type[Exception] = InvalidTTLError) -> float:
    """Validate a duration in seconds: a finite number, > 0, at most ten years."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what} must be a number of seconds, not {type(value).__name__}; e.g. {what}=60")
    seconds = float(value)
    if math.isnan(seconds) or seconds <= 0:
        raise error(f"{what}={value!r} must be a positive number of seconds; use None for no expiry")
    if seconds > MAX_TTL_SECONDS:
        raise error(f"{what}={value!r} seconds is over ten years; did you pass milliseconds? Use seconds")
    return seconds


def _check_size(value: object, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{what}={value!r} must be an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class CacheConfig:
    """All settings; docs/configuration.md says what each one means."""

    redis_url: str | None = None
    namespace: str = "vrc"
    l1_size: int = 1000
    adaptive_l1: bool = False  # L1 resizes itself from evidence (see adaptive.py), from l1_size
    l1_min_size: int | None = None  # adaptive bounds (None: l1_size // 4, and l1_size * 4)
    l1_max_size: int | None = None
    l1_target_hit_rate: float = 0.6
    l1_adjustment_interval: float = 300.0  # seconds between two sizing decisions
    l2_size: int = 10_000
    l3_size: int = 100_000
    adaptive_redis: bool = False  # one worker at a time sizes L2/L3 for the fleet (see fleet_sizing.py)
    l3_min_size: int | None = None  # bounds of the fleet-sized L3 (None: l3_size // 4, and l3_size * 4)
    l3_max_size: int | None = None
    l2_max_size: int | None = None  # L2 keeps its share of Redis capacity, up to this (None: l2_size * 4)
    redis_target_hit_rate: float = 0.6  # of the requests that reach Redis
    redis_adjustment_interval: float = 300.0  # seconds between two fleet sizing decisions
    l1_ttl: float | None = 300.0
    l2_ttl: float | None = 3600.0
    l3_ttl: float | None = 86400.0
    promote_after: int = 3
    shards: int = 16
    max_value_bytes: int = 1024 * 1024
    fail_open: bool = True
    socket_timeout: float = 0.5
    connect_timeout: float = 0.5
    breaker_threshold: int = 5
    breaker_cooldown: float = 1.0
    cluster: bool = False
    read_from_replicas: bool = False
    """True: plain reads of hits go to replicas (``replica_urls``, or on a cluster the masters' own replicas);
    a version fence makes their lag invisible (docs/replicas.md). Writes, scripts and misses use the masters."""
    replica_urls: tuple[str, ...] = ()
    """Standalone only: the URLs of the master's replicas that serve reads (with ``read_from_replicas``)."""
    coherence: bool = True
    copy_on_read: bool = True
    """True: an L1 hit returns a freshly decoded copy of a mutable value (list, dict, a tuple holding
    one), so a caller mutating it changes nothing for anyone else; values nobody can mutate (None,
    bool, int, float, str, bytes, tuples of these) are decoded once and shared. False: every L1 value
    is decoded once and shared by all later hits, which is faster; values from L1 are shared, do not
    mutate them (as with cachetools or functools.lru_cache)."""
    lease_ttl: float = 30.0
    fail_safe: bool = False
    """True: when a get_or_set loader raises, serve the last value the key had, for up to
    ``fail_safe_grace`` seconds past its ttl (docs/fail-safe.md); entries are kept that much longer."""
    fail_safe_grace: float = 300.0
    fail_safe_timeout: float | None = None
    """With fail-safe on and a stale value at hand, a loader still running after this many seconds is
    left to finish (and fill) in the background while the caller gets the stale value (None: wait)."""
    early_refresh: bool = False
    early_refresh_beta: float = 1.0
    lua_shebang: bool = True
    signing_key: bytes | None = field(default=None, repr=False)
    codec: Codec = field(default_factory=MsgpackCodec)
    clock: Callable[[], float] | None = None

    def __post_init__(self) -> None:
        _check_size(self.l1_size, "l1_size")
        if not isinstance(self.copy_on_read, bool):
            raise ConfigurationError(f"copy_on_read={self.copy_on_read!r} must be True or False")
        if self.adaptive_l1:
            self.l1_sizing  # noqa: B018  (validates the adaptive settings now, with their names)
        _check_size(self.shards, "shards")
        for name in ("l2_size", "l3_size"):
            size = _check_size(getattr(self, name), name)
            if size < self.shards:
                raise ConfigurationError(
                    f"{name}={size} is smaller than shards={self.shards}: every shard needs room for an entry; "
                    f"raise {name} or lower shards"
                )
        if self.adaptive_redis:
            self.redis_sizing  # noqa: B018  (validates the fleet sizing settings now, with their names)
        _check_size(self.promote_after, "promote_after")
        _check_size(self.breaker_threshold, "breaker_threshold")
        _check_size(self.max_value_bytes, "max_value_bytes")
        if self.max_value_bytes > MAX_VALUE_BYTES_LIMIT:
            raise ConfigurationError(f"max_value_bytes={self.max_value_bytes} exceeds Redis's 512 MiB string limit")
        for name in ("l1_ttl", "l2_ttl", "l3_ttl"):
            if getattr(self, name) is not None:
                check_ttl(getattr(self, name), name, ConfigurationError)
        for name in ("socket_timeout", "connect_timeout", "lease_ttl", "early_refresh_beta", "breaker_cooldown",
                     "fail_safe_grace"):
            check_ttl(getattr(self, name), name, ConfigurationError)
        if not isinstance(self.fail_safe, bool):
            raise ConfigurationError(f"fail_safe={self.fail_safe!r} must be True or False")
        if self.fail_safe_timeout is not None:
            check_ttl(self.fail_safe_timeout, "fail_safe_timeout", ConfigurationError)
        if not isinstance(self.codec, Codec):
            raise ConfigurationError("codec must have a name and encode()/decode() methods (see victor_rcache.Codec)")
        if self.signing_key is not None and (not isinstance(self.signing_key, bytes) or len(self.signing_key) < 16):
            raise ConfigurationError("signing_key must be at least 16 random bytes, e.g. secrets.token_bytes(32); "
                                     "every worker of the namespace needs the same key")
        if self.clock is not None and not callable(self.clock):
            raise ConfigurationError("clock must be a callable returning seconds, like time.monotonic")
        self._check_replicas()

    def _check_replicas(self) -> None:
        """``read_from_replicas`` and ``replica_urls`` must describe where reads go, one way or the other."""
        if not isinstance(self.read_from_replicas, bool):
            raise ConfigurationError(f"read_from_replicas={self.read_from_replicas!r} must be True or False")
        urls = self.replica_urls
        if isinstance(urls, str):  # one URL given as a string, or the variable's comma-separated list
            urls = tuple(u.strip() for u in urls.split(",") if u.strip())
        elif isinstance(urls, (list, tuple)):
            urls = tuple(urls)
        else:
            raise ConfigurationError(f"replica_urls={urls!r} must be a list of Redis URLs, "
                                     "e.g. replica_urls=['redis://replica-1:6379/0']")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
                shown = redact(url) if isinstance(url, str) else repr(url)
                raise ConfigurationError(f"replica_urls: {shown!r} must be a Redis URL starting with redis://, "
                                         "rediss:// or unix://, e.g. redis://replica-1:6379/0")
        object.__setattr__(self, "replica_urls", urls)  # (frozen: the normalized tuple replaces what was given)
        if urls and self.cluster:
            raise ConfigurationError("replica_urls is for a standalone Redis; a cluster's replicas are found from "
                                     "the cluster itself: drop replica_urls and keep read_from_replicas=True")
        if urls and not self.read_from_replicas:
            raise ConfigurationError("replica_urls is set but read_from_replicas is not; set read_from_replicas=True "
                                     "to read from those replicas, or drop replica_urls")
        if self.read_from_replicas and not urls and not self.cluster:
            raise ConfigurationError("read_from_replicas=True needs replicas: give the master's replicas as "
                                     "replica_urls=['redis://replica-1:6379/0', ...] (or use cluster=True, whose "
                                     "masters' replicas serve reads)")

    @property
    def l1_sizing(self) -> SizingRule | None:
        """The adaptive L1's rule, or None when ``adaptive_l1`` is off."""
        if not self.adaptive_l1:
            return None
        low = self.l1_min_size if self.l1_min_size is not None else max(1, self.l1_size // 4)
        high = self.l1_max_size if self.l1_max_size is not None else self.l1_size * 4
        if not low <= self.l1_size <= high:
            raise ConfigurationError(f"l1_size={self.l1_size} must lie between l1_min_size={low} and "
                                     f"l1_max_size={high} (it is where the adaptive L1 starts)")
        return SizingRule(min_size=low, max_size=high, target_hit_rate=self.l1_target_hit_rate,
                          adjustment_interval=self.l1_adjustment_interval)

    @property
    def redis_sizing(self) -> SizingRule:
        """The fleet L3 sizing rule (``adaptive_redis``)."""
        low = self.l3_min_size if self.l3_min_size is not None else max(self.shards, self.l3_size // 4)
        high = self.l3_max_size if self.l3_max_size is not None else self.l3_size * 4
        if not self.shards <= low <= self.l3_size <= high:
            raise ConfigurationError(f"l3_size={self.l3_size} must lie between l3_min_size={low} and "
                                     f"l3_max_size={high}, and l3_min_size must be >= shards={self.shards}")
        if self.redis_l2_max < self.l2_size:
            raise ConfigurationError(f"l2_max_size={self.redis_l2_max} must be >= l2_size={self.l2_size}")
        return SizingRule(min_size=low, max_size=high, target_hit_rate=self.redis_target_hit_rate,
                          adjustment_interval=self.redis_adjustment_interval)

    @property
    def redis_l2_max(self) -> int:
        return self.l2_max_size if self.l2_max_size is not None else self.l2_size * 4

    @property
    def url(self) -> str:
        """The Redis URL in effect (argument, then VICTOR_RCACHE_URL, then REDIS_URL)."""
        return self.redis_url or os.environ.get(ENV_PREFIX + "URL") or os.environ.get("REDIS_URL") or DEFAULT_URL

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> CacheConfig:
        """Build a config from ``VICTOR_RCACHE_*`` variables; keyword arguments take precedence."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if f.name in ("codec", "clock", "redis_url", "signing_key") or raw is None:
                continue
            values[f.name] = _parse_env(f.name, str(f.type), raw)
        values.setdefault("redis_url", env.get(ENV_PREFIX + "URL") or env.get("REDIS_URL"))
        if env.get(ENV_PREFIX + "SIGNING_KEY"):  # hex, so that any bytes fit in an environment variable
            try:
                values["signing_key"] = bytes.fromhex(env[ENV_PREFIX + "SIGNING_KEY"])
            except ValueError:
                raise ConfigurationError(f"{ENV_PREFIX}SIGNING_KEY must be hex (e.g. python -c "
                                         "'import secrets; print(secrets.token_hex(32))')") from None
        values.update(overrides)
        return cls(**values)


def _parse_env(name: str, type_name: str, raw: str) -> Any:
    var = ENV_PREFIX + name.upper()
    text = raw.strip()
    try:
        if type_name == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if type_name.startswith("int"):
            return None if text.lower() in ("", "none") and "None" in type_name else int(text)
        if type_name.startswith("float"):
            return None if text.lower() in ("", "none") and "None" in type_name else float(text)
        return text
    except ValueError:
        kind = type_name.split(" ", maxsplit=1)[0]
        raise ConfigurationError(f"{var}={raw!r} is not a valid {kind}; fix the variable") from None
