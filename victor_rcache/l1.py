"""L1: the in-process tier. A thread-safe LRU of encoded payloads with a per-entry deadline.

L1 keeps the *encoded* payload and decodes on every hit, so a caller mutating what it got back
never changes what anyone else gets, and ``total_size`` is the real number of payload bytes held.
Time comes from an injected clock (seconds, monotonic), so TTL tests tick a fake clock instead of
sleeping.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class L1Entry:
    payload: bytes
    version: int
    deadline: float  # clock time after which the copy is dropped


class LocalCache:
    """LRU + TTL map from entry id to payload, bounded by ``max_entries``."""

    def __init__(self, max_entries: int, ttl: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.clock = clock
        self.evictions = 0
        self.total_size = 0
        self._data: OrderedDict[bytes, L1Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> L1Entry | None:
        """The live entry for ``key`` (now most recently used), or None."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if self.clock() >= entry.deadline:
                self._remove(key)
                return None
            self._data.move_to_end(key)
            return entry

    def set(self, key: bytes, payload: bytes, version: int, ttl_left: float | None = None,
            since: float | None = None) -> bool:
        """Store a copy that lives ``l1_ttl`` seconds, or less if the value's own ttl ends sooner.

        Lifetimes count from ``since`` (default: now); callers pass the clock reading taken before
        they asked Redis, so a copy never outlives the value's expiry in Redis. A copy never
        replaces one with a higher Redis version (a slow reader must not overwrite a newer local
        write); version 0 means "written here while Redis was unreachable" and always replaces.
        Returns whether the copy was stored.
        """
        start = self.clock() if since is None else since
        lives = min(t for t in (self.ttl, ttl_left, float("inf")) if t is not None)
        if lives <= 0 or start + lives <= self.clock():
            self.pop(key)
            return False
        entry = L1Entry(payload, version, start + lives)
        with self._lock:
            current = self._data.get(key)
            if version and current is not None and current.version > version:
                return False
            self._remove(key)
            self._data[key] = entry
            self.total_size += len(payload)
            while len(self._data) > self.max_entries:
                oldest = next(iter(self._data))
                self._remove(oldest)
                self.evictions += 1
        return True

    def pop(self, key: bytes) -> bool:
        """Drop ``key``'s copy; True if there was one."""
        with self._lock:
            return self._remove(key)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.total_size = 0

    def __len__(self) -> int:
        return len(self._data)

    def _remove(self, key: bytes) -> bool:
        entry = self._data.pop(key, None)
        if entry is None:
            return False
        self.total_size -= len(entry.payload)
        return True
