"""Fleet-wide L2/L3 sizing (``adaptive_redis=True``): the adaptive rule of adaptive.py, applied by one
worker at a time to the fleet's counters, with the capacities stored in Redis for every worker.

::

    every worker, every interval / 4 ──▶ sizing.lua: the lease, and the capacities in force
    the lease holder, once per interval ──▶ the shards' stats (one batch): hits, misses,
                                           ghost hits, tail hits since the last decision
                                        ──▶ decide() ──▶ HSET <ns>:sizing l2_size l3_size ...

The evidence is the scripts' own (lua/includes/shard.lua): a miss on one of the last evictions of a
shard's L3 (``ghost_hits``) is a hit a bigger L3 would have had; a hit on one of the least recently
used entries of an L3 (``tail_hits``) one a smaller L3 would have lost. The rule sizes L3; L2 keeps
its configured share of the Redis capacity. A shrink takes effect through the scripts' normal LRU
bounds: each shard demotes and evicts down to its new capacity on its next call. Like the tiers, this
does no I/O: :meth:`FleetSizing.step` is a generator the front ends run.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from .adaptive import Interval, SizingRule, decide
from .config import CacheConfig
from .keys import KeySpace
from .scripts import ScriptCall, Scripts

log = logging.getLogger("victor_rcache")

EVIDENCE = ("l2_hits", "l3_hits", "misses", "ghost_hits", "tail_hits")
LEASE_INTERVALS = 2  # the holder keeps the role this many intervals without calling again


class FleetSizing:
    """One worker's part in sizing the namespace's L2/L3 (sans-I/O; its caller holds no lock)."""

    def __init__(self, config: CacheConfig, space: KeySpace, scripts: Scripts) -> None:
        self.config = config
        self.rule = config.redis_sizing
        self.key = space.prefix + b"sizing"
        self.stats_keys = [sk.stats for sk in space.shard_keys]
        self.scripts = scripts
        self.token = uuid.uuid4().hex
        self.l2_size, self.l3_size = config.l2_size, config.l3_size
        self.holder = False
        self.decisions = 0  # made by this process
        self.last_result: dict[str, Any] | None = None
        self._next = float("-inf")

    def _now(self) -> float:
        # Wall-clock seconds: the lease is compared across processes (or the injected test clock).
        clock = self.config.clock
        return clock() if clock is not None else time.time()

    def due(self) -> bool:
        return self._now() >= self._next

    def step(self, run_scripts: Callable[[list[ScriptCall]], Any]) -> Any:
        """Renew or take the lease, learn the capacities in force, and decide when it is time.

        Yields batches (a Step, with ``run_scripts`` the tiers' EVALSHA runner); returns True if this
        process's capacities changed.
        """
        rule: SizingRule = self.rule
        now = self._now()
        self._next = now + rule.adjustment_interval / 4
        interval_ms = max(1, round(rule.adjustment_interval * 1000))
        call = ScriptCall(self.scripts.sizing, (self.key,),
                          (self.token, max(1, round(now * 1000)), LEASE_INTERVALS * interval_ms, interval_ms))
        holder, due, l2, l3, *snapshot = (yield from run_scripts([call]))[0]
        self.holder = bool(holder)
        before = (self.l2_size, self.l3_size)
        if l2 is not None and l3 is not None:
            self.l2_size, self.l3_size = int(l2), int(l3)
        if due:
            yield from self._decide(snapshot)
        return (self.l2_size, self.l3_size) != before

    def _decide(self, snapshot: list[Any]) -> Any:
        batch = [("HMGET", key, *EVIDENCE) for key in self.stats_keys]
        replies = yield batch
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        totals = dict.fromkeys(EVIDENCE, 0)
        for reply in replies:
            for name, value in zip(EVIDENCE, reply, strict=True):
                totals[name] += int(value or 0)
        hits, misses = totals["l2_hits"] + totals["l3_hits"], totals["misses"]
        now = (hits, misses, totals["ghost_hits"], totals["tail_hits"])
        fields: dict[str, int] = dict(zip(("snap_hits", "snap_misses", "snap_ghost_hits", "snap_tail_hits"), now,
                                          strict=True))
        if all(v is not None for v in snapshot):
            hit_d, miss_d, ghost_d, tail_d = (max(0, a - int(b)) for a, b in zip(now, snapshot, strict=True))
            seen = Interval(hits=hit_d, misses=miss_d, tail_hits=tail_d, ghost_hits=ghost_d)
            adjustment, new_l3, reason = decide(self.rule, self.l3_size, seen)
            if new_l3 != self.l3_size:
                share = self.config.l2_size / self.config.l3_size
                new_l2 = min(self.config.redis_l2_max, max(self.config.shards, round(new_l3 * share)))
                log.info("fleet sizing: L3 %s from %d to %d entries, L2 %d: %s", adjustment, self.l3_size, new_l3,
                         new_l2, reason, extra={"event": "fleet_resized", "namespace": self.config.namespace,
                                                "old_size": self.l3_size, "new_size": new_l3})
                self.l2_size, self.l3_size = new_l2, new_l3
            self.last_result = {"adjustment": adjustment, "l2_size": self.l2_size, "l3_size": self.l3_size,
                                "reason": reason, "requests": seen.accesses}
            self.decisions += 1
        fields.update(l2_size=self.l2_size, l3_size=self.l3_size)
        replies = yield [("HSET", self.key, *(x for kv in fields.items() for x in kv)),
                         ("HINCRBY", self.key, "decisions", 1)]
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    def state(self) -> dict[str, Any]:
        return {"enabled": True, "holder": self.holder, "l2_size": self.l2_size, "l3_size": self.l3_size,
                "decisions": self.decisions, "last_decision": self.last_result}


def run_safely(sizing: FleetSizing, run_scripts: Callable[[list[ScriptCall]], Any]) -> Any:
    """The step, with Redis failures logged and dropped: sizing must never fail a cache call."""
    try:
        return (yield from sizing.step(run_scripts))
    except (RedisError, ValueError, TypeError) as exc:  # Redis failing, or the hash edited by hand
        log.debug("fleet sizing skipped: %s", exc)
        return False
