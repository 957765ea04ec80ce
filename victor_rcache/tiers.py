"""The tiering core: every decision of the multi-level cache, with no I/O of its own.

::

    get(key)
      │
      ▼
    L1 ─ this process, LRU + TTL ──────── hit ──▶ value (a fresh copy for each caller, unless nobody
      │                                             can mutate it, or copy_on_read=False)
      │ miss
      ▼
    Redis ─ one plain read (HMGET) ────── hit ──▶ value; L1 copy once the entry is hot (fleet-wide
      │     of the entry, no script;                 hits >= promote_after); the hit is buffered and
      │     Redis's own expiry hides a value         sent with others as one touch.lua call per shard
      │     past its deadline                        (LRU stamps, counts, promotion: bookkeeping.py)
      │ miss
      ▼
    loader ─ get_or_set: once per process ─▶ lease.lua, then put.lua: ─▶ SPUBLISH: every other
             (single-flight), once per fleet   L2 + this L1 (refused if     process drops its older
             (the fill lease in Redis)          the key changed since)      L1 copy (every write says so)

Operations are generators ("sans-I/O"): they yield instructions — a batch of Redis commands (one
network round trip: a lone command is sent as is, several as a pipeline), a pause, or "run the
loader" — and receive the outcome (replies with errors in place, or the loaded value), so the sync
and async front ends share all of this logic and only do the I/O. The two hottest paths skip the
generator machinery: an L1 hit (:meth:`TierCore.get_from_l1`) needs no I/O, and a Redis read
(:meth:`TierCore.read_command`, then :meth:`TierCore.took`) is one command the front end sends itself.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar, Union

from redis.exceptions import AuthenticationError, NoPermissionError, OutOfMemoryError, RedisError, ResponseError

from . import forksafe
from .bookkeeping import COUNTED, EXPIRING, FILLED, PREWARMED, Bookkeeping, ShardBatch
from .codec import FORMAT_VERSION, Envelope, copier
from .coherence import Coherence, FillWatch, NoCoherence
from .config import MAX_TTL_SECONDS, CacheConfig, check_ttl, redact
from .errors import (
    CacheError,
    CacheUnavailableError,
    ConfigurationError,
    InvalidArgumentError,
    SerializationError,
    ValueTooLargeError,
)
from .fleet_sizing import FleetSizing, run_safely
from .keys import EntryRef, KeySpace, encode_tags, tag_names
from .l1 import NOT_DECODED, NOT_SHARED, L1Entry, LocalCache
from .metrics import SOURCES, Counters, Timing, build_metrics, fleet_tally
from .replicas import ReplicaReads, VersionFence
from .scripts import Command, ScriptCall, Scripts, needs_reload, pack
from .stampede import refresh_early

T = TypeVar("T")
Batch = list[Command]


class Reads(list[Command]):
    """A batch of plain reads that also carries them packed (``packed``, one per command): a front end on
    a standalone client sends those bytes as they are (connection.send_packed)."""

    packed: list[bytes]


Instruction = Union[Batch, "Pause", "WaitFill", "Load", "Wait"]
Step = Generator[Instruction, Any, T]
Scope = Literal["process", "fleet"]
Prewarmed = Literal["completed", "cached", "busy", "refused", "failed"]

log = logging.getLogger("victor_rcache")

FLUSH_BATCH = 500  # entries one flush.lua call removes: bounded work per call
UNTAG_BATCH = 500  # entries one untag.lua call removes (the same bound)
CHECKS_INTERVAL = 1.0  # seconds between two touch.lua batches of a shard that check types and permissions
LEASE_ATTEMPTS = 3  # times get_or_set waits for another worker's fill before computing itself
# While it waits, it looks in Redis after these intervals (seconds, growing): announcements wake it at
# once; the polls find a lease that ended without a fill (a failed loader), or serve without a channel.
FILL_POLL_FIRST, FILL_POLL_WATCHED, FILL_POLL_MAX = 0.005, 0.05, 0.1
FAILURE_LOG_INTERVAL = 10.0  # seconds between two warnings about Redis failing
RELOAD_ROUNDS = 8  # NOSCRIPT rounds before every call still missing its script reloads it itself
RELOAD_PAUSE = 0.002  # seconds a call first waits while another call reloads its script; doubling, so
# a waiting call gives a slow reload (a busy server) about 250 ms before reloading the script itself

_scripts: dict[bool, Scripts] = {}
MISS: Any = object()  # what TierCore.get_from_l1 and TierCore.took return when they have no value
# The fields a Redis read asks of an entry (see lua/includes/shard.lua), in this order.
READ_FIELDS = (b"v", b"ver", b"t", b"n", b"x", b"d", b"w", b"e", b"z")


def feed(step: Step[T], outcome: Any) -> tuple[Instruction | None, T | None]:
    """Advance an operation with the outcome of its last instruction (None to start it).

    Returns ``(next instruction, None)`` while it needs the front end, ``(None, result)`` once it is
    done. Outcomes: the replies of a batch, the Redis error that stopped it, :class:`Loaded`, or
    the loader's exception; exceptions are thrown into the operation, which decides.
    """
    try:
        if outcome is None:
            return next(step), None
        if isinstance(outcome, BaseException):
            return step.throw(outcome), None
        return step.send(outcome), None
    except StopIteration as done:
        return None, done.value


def queue(pipe: Any, batch: Batch) -> Any:
    """Queue a batch on a (sync or async) redis-py pipeline."""
    for command in batch:
        pipe.execute_command(*command)
    return pipe


def default_scripts(shebang: bool = True) -> Scripts:
    """The process-wide script registry (read from disk once)."""
    if shebang not in _scripts:
        _scripts[shebang] = Scripts(shebang=shebang)
    return _scripts[shebang]


def split_capacity(total: int, shards: int) -> list[int]:
    """Per-shard capacities that sum exactly to ``total``."""
    return [total // shards + (1 if i < total % shards else 0) for i in range(shards)]


def _seconds(ms: int) -> float | None:
    return None if ms == 0 else ms / 1000


@dataclass(frozen=True)
class Pause:
    """Instruction to a front end: wait this long (seconds), then resume the operation."""

    seconds: float


@dataclass(frozen=True)
class Load:
    """Instruction to a front end: run the caller's loader now and send back :class:`Loaded`. With a
    ``timeout`` (fail-safe's soft timeout), a loader still running after it is left to finish in the
    background: send back :class:`Pending` instead."""

    timeout: float | None = None


@dataclass(frozen=True)
class Pending:
    """A front end's answer to ``Load(timeout)`` when the loader outlived it: ``job`` is the running loader
    (a ``concurrent.futures.Future`` or an asyncio task), whose outcome the front end passes to
    :meth:`TierCore.fill_later` once it has one."""

    job: Any


@dataclass(frozen=True)
class WaitFill:
    """Instruction to a front end: wait until ``watch`` is set (an announcement named the entry) or
    ``seconds`` have passed, whichever comes first, then resume the operation (send back ``[]``)."""

    watch: FillWatch
    seconds: float


@dataclass(frozen=True)
class Wait:
    """Instruction to a front end: wait for this process's flight leader (``future``, sync or asyncio)
    and send back its result, the payload (or its exception, thrown into the operation)."""

    future: Any


@dataclass(frozen=True)
class Loaded:
    value: Any
    seconds: float  # how long the loader took


@dataclass(frozen=True)
class Uncached:
    """What a loader returns to hand ``value`` to its caller without caching it (an error page, an empty
    result, anything worth computing again next time): ``return Uncached(value)``. The fill lease is
    given back; callers waiting in this process get the value too, other workers compute their own."""

    value: Any


@dataclass(frozen=True)
class Write:
    """How a value is written, as put.lua takes it: its absolute ttl, its fail-safe grace (ms) and its
    tags (keys.encode_tags); ``fail_safe``: a failing loader of this get_or_set falls back on a stale value."""

    ttl_ms: int = 0
    grace_ms: int = 0
    tags: bytes = b""
    fail_safe: bool = False


@dataclass(frozen=True)
class Stale:
    """A value a read found past its ttl but inside its fail-safe grace (the writer's, field ``z``): its
    value, payload and the end of its ttl (ms)."""

    value: Any
    payload: bytes
    expired_ms: int
    kept_ms: int  # when Redis removes it


@dataclass(frozen=True)
class Refresh:
    """A value worth recomputing early (XFetch): what the background refresh needs."""

    key: str | bytes
    version: int
    ttl: float | None
    write: Write = Write()


@dataclass(frozen=True)
class FillLater:
    """A fill the front end finishes in the background (:meth:`TierCore.fill_later`): one whose loader
    outlived fail-safe's soft timeout (the caller got the stale value; ``job`` is the loader's task), or,
    with ``behind``, one whose value the caller already has (``job`` is its :class:`Loaded`, ``payload``
    its encoding): the write and the lease's release leave the caller's path."""

    ref: EntryRef
    write: Write
    since_ms: int
    lease: bytes | None
    token: str
    job: Any
    payload: bytes | None = None
    computed_at: float | None = None  # behind: the core's clock when the value was computed (its L1 copy's start)


@dataclass(frozen=True)
class Got:
    """What get_or_set found or computed: the value, its payload (followers decode their own copy)
    and, when early refresh picked this hit, the refresh to run in the background."""

    value: Any
    payload: bytes | None  # None: a value that could not be encoded (returned, not cached)
    refresh: Refresh | None = None
    source: str = "miss"  # the tier that served it ("l1", "l2", "l3"), "miss" (the loader computed it),
    # "stale" (fail-safe: the loader failed, a value past its ttl was served) or "coalesced" (another
    # call of this process computed or found it)
    fill_later: FillLater | None = None  # fail-safe's soft timeout: the fill to finish in the background


@dataclass
class Fetched:
    """What one round of Redis reads found, by entry id."""

    values: dict[bytes, Any] = field(default_factory=dict)
    payloads: dict[bytes, bytes] = field(default_factory=dict)
    hits: dict[bytes, tuple[int, float | None, float]] = field(default_factory=dict)  # version, ttl_left, cost
    tiers: dict[bytes, int] = field(default_factory=dict)  # id -> the tier that served it (1: L1 fallback)
    stale: dict[bytes, Stale] = field(default_factory=dict)  # values past their ttl, kept for fail-safe
    failed: bool = False

    def source(self, entry_id: bytes) -> str:
        """``"l1"``/``"l2"``/``"l3"``: the tier that served ``entry_id``; ``"miss"`` if none did."""
        tier = self.tiers.get(entry_id)
        return "miss" if tier is None else SOURCES[tier]



class Claim(NamedTuple):
    """A prewarm's fill lease, taken: what fill_prewarm needs to compute and store the value."""

    ref: EntryRef
    ttl_ms: int
    since: int  # the server's clock when the lease was taken (ms)
    lease: bytes
    token: str


@dataclass(frozen=True)
class Looked:
    """What lease.lua answered after a miss: the entry was filled meanwhile (``reply``, read fields), or
    whether this call took the fill lease, the lease's PTTL (ms) and the server's clock (ms)."""

    reply: list[Any] | None
    taken: bool = False
    pttl: int = -2
    since: int = 0


class ServerTime:
    """The clock the scripts use, as this process can tell it without asking: the injected test clock,
    or the server's, estimated from the ``now`` that replies carry.

    An estimate errs late, never early: a reply's ``now`` was read at most one round trip after the
    request was sent, so (reply's now - monotonic time at sending) bounds the server's lead over this
    process's monotonic clock from above. An L1 copy of a value with an absolute expiry lives until
    the estimated server time reaches that expiry: never past it (by more than the clocks' drift
    since the last reply, microseconds per second), at worst one round trip short.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._lead: float | None = None  # ms the server's clock is ahead of time.monotonic(), an upper bound

    def observe(self, server_ms: int, sent: float) -> None:
        """A reply's ``now`` (ms) to a request sent at ``sent`` (time.monotonic())."""
        if self._clock is None and server_ms > 0:
            self._lead = server_ms - sent * 1000

    def now_ms(self) -> float | None:
        """The scripts' clock now (ms), at the latest; None before the first reply told it."""
        if self._clock is not None:
            return float(math.floor(self._clock() * 1000))
        lead = self._lead
        return None if lead is None else time.monotonic() * 1000 + lead

class TierCore:
    """L1 + the Redis tiers of one namespace, as I/O-free operations."""

    def __init__(self, config: CacheConfig, scripts: Scripts | None = None,
                 coherence: Coherence | None = None) -> None:
        self.config = config
        self.space = KeySpace(config.namespace, config.shards, READ_FIELDS)
        self.envelope = Envelope(config.codec, config.signing_key)
        self.scripts = scripts or default_scripts(config.lua_shebang)
        self.l1 = LocalCache(config.l1_size, config.l1_ttl, config.clock or time.monotonic, config.l1_sizing)
        self._refs = self.space.refs  # located keys (see get_from_l1)
        self._serve = self.l1.serve
        self.coherence: Coherence = coherence or NoCoherence()  # (also makes get_from_l1: see its setter)
        # Threads of this cache's warmers (their model's background rounds): closed when the cache closes.
        self.companions: list[Any] = []
        self.resilience: Any = None  # the front end's Resilience (breaker and retries), for metrics
        # read_from_replicas: the fence (fed by L1's invalidations and by this process's writes and master
        # reads), and the front end's ReplicaReader once it can send ReplicaReads (for metrics too).
        self.fence = VersionFence(config.shards) if config.read_from_replicas else None
        self.l1.fence = self.fence
        self.replicas: Any = None
        self.fenced = 0  # replica replies the fence did not trust: read again on the master
        self.replica_fallbacks = 0  # replica batches that failed: read on the master instead
        self.counters = Counters(served=lambda: self.l1.hits)  # L1 hits are counted by L1 itself
        self.book = Bookkeeping(self.counters)
        self.book.unreported = lambda: (self.l1.hits, self.l1.evictions) != (self._reported_l1_hits,
                                                                             self._reported_l1_evictions)
        self.server_time = ServerTime(config.clock)
        self._caps2 = split_capacity(config.l2_size, config.shards)
        self._caps3 = split_capacity(config.l3_size, config.shards)
        self.sizing = FleetSizing(config, self.space, self.scripts) if config.adaptive_redis else None
        self.book.evidence = self.sizing is not None  # (its batches carry the evidence: smaller ones)
        self._idle_ms = tuple(0 if t is None else max(1, round(t * 1000)) for t in (config.l2_ttl, config.l3_ttl))
        # The idle steps the scripts move an entry's Redis expiry by (idle_step() in lua/includes/shard.lua):
        # in L2 both idle times (it leaves through L3), in L3 its own; 0 = no idle deadline.
        l2_idle = sum(self._idle_ms) if all(self._idle_ms) else 0
        self._idle_steps = tuple(max(1, idle // 64) if idle else 0 for idle in (l2_idle, self._idle_ms[1]))
        # `fence` records must outlive every fill they may refuse (a fill's miss is at most this old).
        self._memory_ms = max(1, round(1000 * max(config.l1_ttl or MAX_TTL_SECONDS, config.lease_ttl)))
        self._lease_ms = max(1, round(config.lease_ttl * 1000))
        self.ready_done = False  # the namespace's settings agreed with the fleet (see ready())
        self._failing = False
        self._failure_logged_at = -FAILURE_LOG_INTERVAL
        self._lock = threading.Lock()
        self._share_all = not config.copy_on_read  # share every decoded L1 value, mutable ones too
        self._promote_after = config.promote_after
        self._fill_after = config.promote_after - 1  # an L2 entry with this many fleet hits fills L1 on the next
        self._reported_l1_hits = 0  # of self.l1.hits, those sent to the fleet totals
        self._reported_l1_evictions = 0
        self._refreshing: set[bytes] = set()  # ids this process is refreshing early right now
        self._checked_at: dict[int, float] = {}  # shard -> when a touch.lua batch last checked (see _checks_due)
        self._writes: dict[float | None, Write] = {}  # ttl -> the Write of a call without tags (write_options)
        self._script_gen: dict[str, int] = {}  # script name -> reloads done (see run_scripts)
        self._reloading: set[str] = set()  # scripts whose reload is on its way to Redis
        forksafe.register(self)

    FORK_ORDER = 1  # after the L1 made its fresh lock (and the closure over it that _serve is)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._refreshing = set()
        self._reloading = set()
        self._serve = self.l1.serve  # the child's L1 serves under its own new lock
        # The parent reports the L1 hits and evictions it had; the child, only its own.
        self._reported_l1_hits, self._reported_l1_evictions = self.l1.hits, self.l1.evictions
        self.get_from_l1 = self._l1_reader()  # type: ignore[method-assign,assignment]  # (over that serve)

    # ------------------------------------------------------------------ reads

    def get(self, key: str | bytes, default: Any = None, trace: Timing | None = None) -> Step[Any]:
        """The value under ``key``, or ``default`` on a miss (a cached None is a hit).

        ``trace``, the call's own timing when the cache is observed, is told which tier served it.
        The front ends run the same steps without a generator: :meth:`get_from_l1`, and only if it
        returns :data:`MISS`, the plain read (:meth:`read_command`, :meth:`took`).
        """
        value = self.get_from_l1(key, trace)
        if value is not MISS:
            return value
        return (yield from self.get_from_redis(key, default, trace))

    @property
    def coherence(self) -> Coherence:
        """What tells whether L1 may be served (the invalidation listener, or NoCoherence)."""
        return self._coherence

    @coherence.setter
    def coherence(self, listener: Coherence) -> None:
        self._coherence = listener
        self._trusted = listener.trusted  # bound once: every L1 read asks
        if hasattr(self, "l1"):
            self.get_from_l1 = self._l1_reader()  # type: ignore[method-assign,assignment]

    def get_from_l1(self, key: str | bytes, trace: Timing | None = None) -> Any:
        """The first step of :meth:`get`, plain code (no I/O): the value if this process's L1 may serve
        ``key``, else :data:`MISS`, after which the caller reads Redis. An L1 hit is counted by L1 (under
        the lock it takes anyway); a miss is counted by the read that follows.

        (An instance attribute made by :meth:`_l1_reader` stands in for this method: the same steps.)"""
        return self._l1_reader()(key, trace)

    def _l1_reader(self) -> Callable[[str | bytes, Timing | None], Any]:
        """:meth:`get_from_l1` as a closure over what it uses: the hottest path of the library makes no
        attribute lookup it can avoid. Made again whenever one of those changes (coherence, a fork)."""
        refs_get, locate, serve = self._refs.get, self.space.ref, self.l1.serve
        first_hit, miss, not_decoded, not_shared = self._l1_value, MISS, NOT_DECODED, NOT_SHARED

        def get_from_l1(key: str | bytes, trace: Timing | None = None) -> Any:
            kind = key.__class__
            ref = refs_get(key) if kind is str or kind is bytes else None
            if ref is None:
                ref = locate(key)  # validates the key; remembers it
            entry = serve(ref.id)  # (None too while the invalidation channel cannot vouch for L1)
            if entry is None:
                return miss
            if trace is not None:
                trace.outcome = "l1"
            value = entry.decoded
            if value is not_decoded or value is not_shared:
                return first_hit(entry)
            copy = entry.copy
            return value if copy is None else copy(value)

        return get_from_l1

    def get_from_redis(self, key: str | bytes, default: Any = None, trace: Timing | None = None) -> Step[Any]:
        """The rest of :meth:`get` after :meth:`get_from_l1` returned :data:`MISS`, as a generator (the
        front ends take this way until :meth:`ready` has run once, then read with :meth:`read_command`)."""
        ref = self.space.ref(key)
        found = yield from self._fetch([ref])
        if trace is not None:
            trace.outcome = found.source(ref.id)
        return found.values.get(ref.id, default)

    def read_command(self, ref: EntryRef) -> Command:
        """The plain read of an entry: one HMGET, the only command a Redis hit costs."""
        return ("HMGET", ref.entry, *READ_FIELDS)

    @staticmethod
    def _reads(refs: list[EntryRef]) -> Reads:
        """The plain reads of ``refs`` as one batch, packed too (KeySpace packs each entry's read once)."""
        reads = Reads([("HMGET", r.entry, *READ_FIELDS) for r in refs])
        reads.packed = [r.read or pack(c) for r, c in zip(refs, reads, strict=True)]
        return reads

    def reads(self, ref: EntryRef) -> Reads:
        """The plain read of ``ref`` as the batch a front end sends (packed too: see :class:`Reads`)."""
        reads = Reads((("HMGET", ref.entry, *READ_FIELDS),))
        reads.packed = [ref.read or pack(reads[0])]
        return reads

    def took(self, ref: EntryRef, reply: Any, sent_at: float, out: Fetched | None = None,
             trace: Timing | None = None) -> Any:
        """What a plain read of ``ref``'s entry (:meth:`read_command`) found: the value, or :data:`MISS`.

        Plain code for both front ends. Counts the request and buffers its bookkeeping (no lock, no I/O),
        copies a hot L2 entry into L1, and notes details in ``out`` when given. ``reply`` is the HMGET
        reply, or the error Redis answered for this one key (a key of another type: a corrupt entry).
        ``sent_at`` is :meth:`since` taken before the read was sent; ``trace`` (an observed call's
        timing) is told which tier served it.
        """
        return self.took_all((ref,), (reply,), sent_at, out, trace=trace)

    def took_all(self, refs: Sequence[EntryRef], replies: Sequence[Any], sent_at: float, out: Fetched | None = None,
                 found: dict[bytes, Any] | None = None, trace: Timing | None = None) -> Any:
        """:meth:`took` of each plain read of one round trip (``replies[i]`` answers ``refs[i]``): the values
        found go into ``found`` (by id) and ``out`` when given; returns the last one's value, or :data:`MISS`.

        One implementation for one read and for a batch: a batch binds what it uses once, reads the
        server's clock once (after every reply arrived, so an expiry is judged as late as per key, or
        later: never too early to serve a value Redis no longer holds), and wakes the bookkeeping flusher
        once at its end, not in the middle of the batch."""
        l1, unwrap, book = self.l1, self.envelope.unwrap, self.book
        unconfirmed, hit = l1.unconfirmed, book.events.append
        fill_after, promote_after, idle_steps = self._fill_after, self._promote_after, self._idle_steps
        now = self.server_time.now_ms()
        # The idle step each tier's touch falls in now (one clock reading per batch, so once per batch too).
        step2, step3 = idle_steps
        now_steps = (None if now is None or not step2 else int(now // step2),
                     None if now is None or not step3 else int(now // step3))
        value: Any = MISS
        for ref, reply in zip(refs, replies, strict=True):
            value = MISS
            entry_id = ref.id
            if trace is not None:
                trace.outcome = "miss"  # until a hit says otherwise
            if unconfirmed:  # Redis answered for this key: a copy it never confirmed is not needed
                l1.forget_unconfirmed(entry_id)
            payload = reply[0] if reply.__class__ is list or not isinstance(reply, Exception) else None
            if payload is None:
                if isinstance(reply, Exception):
                    self._corrupt(ref, b"", str(reply))
                else:
                    book.miss(ref.shard, entry_id)
                continue
            _, ver, tier, hits, expiry_ms, cost_ms, prewarmed, step, kept_ms = reply
            try:
                # Plain digits only, as the scripts write them: int() would also take " 7", "+7" or "1_0".
                if not (ver.isdigit() and (expiry_ms is None or expiry_ms.isdigit())
                        and (cost_ms is None or cost_ms.isdigit()) and (hits is None or hits.isdigit())):
                    raise ValueError("a field that must be a whole number is not")
                version = int(ver)
                expiry = None if expiry_ms is None else int(expiry_ms)
                cost = 0.0 if cost_ms is None else int(cost_ms) / 1000
                count = 0 if hits is None else int(hits)
                got = unwrap(payload)
            except Exception as exc:  # fields written by hand, or a payload that does not decode: a miss
                self._corrupt(ref, ver or b"", str(exc))
                continue
            ttl_left = None
            if expiry is not None:
                if now is not None and now >= expiry:  # past its ttl: kept only for fail-safe, or expiring now
                    book.miss(ref.shard, entry_id)
                    kept = int(kept_ms) if kept_ms is not None and kept_ms.isdigit() else 0
                    if out is not None and now < kept:  # inside its fail-safe grace (field z)
                        out.stale[entry_id] = Stale(got, payload, expiry, kept)
                    continue
                ttl_left = None if now is None else (expiry - now) / 1000
            in_l2 = tier != b"3"
            flags = 0 if prewarmed is None else PREWARMED
            # What the bookkeeping must do beyond the LRU stamp: count the hit while the count still decides
            # something (an L1 copy at promote_after - 1 in L2, promotion at promote_after in L3), and move
            # the entry's Redis expiry once its touch is a whole idle step past the one it was set from.
            if count < (fill_after if in_l2 else promote_after):
                flags |= COUNTED
            tier_index = 0 if in_l2 else 1
            if idle_steps[tier_index] and (now is None or step is None or not step.isdigit()
                                           or now_steps[tier_index] != int(step)):
                flags |= EXPIRING
            if (in_l2 and count >= fill_after and (expiry is None or ttl_left is not None)
                    and l1.set(entry_id, payload, version, ttl_left, since=sent_at, cost=cost, shard=ref.shard)):
                flags |= FILLED
            hit((2 if in_l2 else 3, ref.shard, entry_id, flags))  # (see Bookkeeping.wake_if_due, called below)
            value = got
            if trace is not None:
                trace.outcome = "l2" if in_l2 else "l3"
            if found is not None:
                found[entry_id] = got
            if out is not None:
                out.values[entry_id], out.payloads[entry_id] = got, payload
                out.hits[entry_id] = (version, ttl_left, cost)
                out.tiers[entry_id] = 2 if in_l2 else 3
        book.wake_if_due()
        return value

    def _corrupt(self, ref: EntryRef, seen: bytes, why: str) -> None:
        log.warning("entry %r in namespace %s is not one the cache wrote (%s); counted as a miss and removed",
                    ref.key[:100], self.config.namespace, why,
                    extra=self.log_fields("entry_undecodable", "get", key=_text(ref.key), error=why))
        self.book.corrupt(ref.shard, ref.id, seen)

    def read_failed(self, ref: EntryRef, exc: RedisError, default: Any, trace: Timing | None = None) -> Any:
        """A plain read could not reach Redis: fail open (L1's copy, even an unconfirmed one, else
        ``default``) or raise :class:`CacheUnavailableError`."""
        self.redis_failed("get", exc)
        found = self._fall_back_to_l1([ref])
        if trace is not None:
            trace.outcome = found.source(ref.id)
        return found.values.get(ref.id, default)

    def get_many(self, keys: Iterable[str | bytes]) -> Step[dict[Any, Any]]:
        """The hits among ``keys``, keyed as given (every spelling asked for: ``"k"`` and ``b"k"`` are one
        key); one round trip for all keys L1 cannot serve."""
        keys = keys if isinstance(keys, (list, tuple)) else list(keys)
        refs = self.space.locate(keys)  # every key checked before any I/O
        serve = self.l1.serve
        found: dict[bytes, Any] = {}
        remote: dict[bytes, EntryRef] = {}
        for ref in refs:
            entry_id = ref.id
            if entry_id in found or entry_id in remote:
                continue
            entry = serve(entry_id)  # (None while the invalidation channel cannot vouch for L1)
            if entry is None:
                remote[entry_id] = ref
            else:
                found[entry_id] = self._l1_value(entry)
        if remote:
            yield from self._read_many(list(remote.values()), found)
        get, miss = found.get, MISS
        return {key: value for key, ref in zip(keys, refs, strict=True) if (value := get(ref.id, miss)) is not miss}

    def _read_many(self, refs: list[EntryRef], found: dict[bytes, Any]) -> Step[None]:
        """:meth:`_fetch` for get_many, which needs the values alone: into ``found``, by id."""
        try:
            yield from self.ready()
            sent_at = self.since()
            reads = self._reads(refs)
            replies = (yield reads) if self.fence is None else (yield from self._plain_reads(refs, reads))
        except RedisError as exc:
            self.redis_failed("get", exc)
            found.update(self._fall_back_to_l1(refs).values)
            return
        if all(reply.__class__ is list for reply in replies):  # (the usual case: no error in the batch)
            self.took_all(refs, replies, sent_at, found=found)
            return
        for ref, reply in zip(refs, replies, strict=True):
            if isinstance(reply, Exception) and not str(reply).startswith("WRONGTYPE"):
                self.redis_failed("get", reply)  # an error Redis answered for this key alone
                found.update(self._fall_back_to_l1([ref]).values)
                continue
            self.took_all((ref,), (reply,), sent_at, found=found)

    def _l1_value(self, entry: L1Entry) -> Any:
        """An L1 copy's value for one caller. The first hit decodes the payload and keeps the result on the
        entry with how later hits get theirs: shared as it is when nobody can mutate it (or with
        ``copy_on_read=False``), else copied by a plan of its shape (codec.copier), which costs less than
        decoding again; the first caller gets a copy too. (Two first hits racing both decode; either
        result is right.) Every L1 payload was made here or unwrapped (checked) when it came from Redis:
        only the codec runs."""
        value = entry.decoded
        if value is NOT_SHARED:
            return self.envelope.decode_checked(entry.payload)
        if value is not NOT_DECODED:
            return value if entry.copy is None else entry.copy(value)
        value = self.envelope.decode_checked(entry.payload)
        if self._share_all:
            entry.decoded = value
            return value
        try:
            copy = copier(value)
        except (TypeError, RecursionError):  # a type of a custom codec, or nested very deep: decode each time
            entry.decoded = NOT_SHARED
            return value
        entry.copy = copy  # (before decoded: a racing hit that sees decoded must see its copy plan)
        entry.decoded = value
        return value if copy is None else copy(value)

    def _fetch(self, refs: list[EntryRef]) -> Step[Fetched]:
        """Read ``refs`` from Redis: one plain read each, all in one round trip."""
        out = Fetched()
        try:
            yield from self.ready()
            sent_at = self.since()
            reads = self._reads(refs)
            # (Without replicas, no generator in between: get_many and get_or_set's reads stay as they were.)
            replies = (yield reads) if self.fence is None else (yield from self._plain_reads(refs, reads))
        except RedisError as exc:
            self.redis_failed("get", exc)
            return self._fall_back_to_l1(refs)
        for ref, reply in zip(refs, replies, strict=True):
            if isinstance(reply, Exception) and not str(reply).startswith("WRONGTYPE"):
                self.redis_failed("get", reply)  # an error Redis answered for this key alone
                out.failed = True
                fell = self._fall_back_to_l1([ref])
                out.values.update(fell.values)
                out.payloads.update(fell.payloads)
                out.tiers.update(fell.tiers)
                continue
            self.took(ref, reply, sent_at, out)
        return out

    def _plain_reads(self, refs: list[EntryRef], reads: Reads) -> Step[list[Any]]:
        """The replies to ``reads``, the plain reads of ``refs``: from the master, or with read_from_replicas
        from a replica, fenced (see replicas.py). A reply the fence does not trust, and every reply of a
        replica that failed, comes from the master instead, in one more round trip. Replicas are not asked
        while the invalidation channel is down: the fence may be missing what it would have heard."""
        fence = self.fence
        assert fence is not None, "only with read_from_replicas"
        if self.replicas is None or not self._trusted():
            return (yield from self._master_reads(refs, reads))
        batch, positions = self._replica_batch(refs, reads)
        try:
            answered = yield batch
        except RedisError:  # the replica failed (its breaker counts it): the master answers, as without replicas
            self.replica_fallbacks += 1
            return (yield from self._master_reads(refs, reads))
        replies: list[Any] = [None] * len(refs)
        again: list[int] = []
        for (start, end), places in zip(batch.groups, positions, strict=True):
            seq = answered[start]
            applied = int(seq) if isinstance(seq, bytes) and seq.isdigit() else 0
            for i, reply in zip(places, answered[start + 1:end], strict=True):
                if self._replica_trusted(fence, refs[i], applied, reply):
                    replies[i] = reply
                else:
                    again.append(i)
        if again:
            self.fenced += len(again)
            master = Reads(reads[i] for i in again)
            master.packed = [reads.packed[i] for i in again]
            for i, reply in zip(again, (yield from self._master_reads([refs[i] for i in again], master)),
                                strict=True):
                replies[i] = reply
        return replies

    def _master_reads(self, refs: list[EntryRef], reads: Reads) -> Step[list[Any]]:
        """``reads`` on the master, with the fence told the versions found (see :meth:`saw_on_master`)."""
        replies: list[Any] = yield reads
        for ref, reply in zip(refs, replies, strict=True):
            self.saw_on_master(ref, reply)
        return replies

    def _replica_batch(self, refs: list[EntryRef], reads: Reads) -> tuple[ReplicaReads, list[list[int]]]:
        """``reads`` as a replica batch: per shard, its ``seq`` first (see replicas.py), then its entries; and
        for each shard, the positions in ``refs`` its replies answer."""
        by_shard: dict[int, list[int]] = {}
        for i, ref in enumerate(refs):
            by_shard.setdefault(ref.shard, []).append(i)
        batch = ReplicaReads()
        batch.groups, batch.packed = [], []
        for shard, places in by_shard.items():
            start = len(batch)
            command: Command = ("HGET", self.space.shard_keys[shard].stats, b"seq")
            batch.append(command)
            batch.packed.append(pack(command))
            batch.extend(reads[i] for i in places)
            batch.packed.extend(reads.packed[i] for i in places)
            batch.groups.append((start, len(batch)))
        return batch, list(by_shard.values())

    @staticmethod
    def _replica_trusted(fence: VersionFence, ref: EntryRef, applied: int, reply: Any) -> bool:
        """May a replica's reply to the plain read of ``ref`` be served (``applied``: the shard's seq it said)?"""
        if isinstance(reply, Exception):
            return False  # whatever it is, the master says what the entry really is
        if reply[0] is None:
            return fence.trusts(ref.id, ref.shard, applied, None)
        ver = reply[1]
        return isinstance(ver, bytes) and ver.isdigit() and fence.trusts(ref.id, ref.shard, applied, int(ver))

    def saw_on_master(self, ref: EntryRef, reply: Any) -> None:
        """A master's reply to a plain read of ``ref``: with the fence, its version counts as seen, so no later
        replica read of this process serves an older one (reads in this process never go back in time)."""
        if self.fence is not None and isinstance(reply, list) and reply[0] is not None:
            ver = reply[1]
            if isinstance(ver, bytes) and ver.isdigit():
                self.fence.saw(ref.id, int(ver), ref.shard)

    def _fall_back_to_l1(self, refs: list[EntryRef]) -> Fetched:
        """Redis failed (fail-open): serve copies L1 holds but could not vouch for (an unconfirmed write's
        included); the rest miss."""
        out = Fetched(failed=True)
        for ref in refs:
            entry = self.l1.peek(ref.id)
            if entry is None:
                self.counters.add(gets=1, misses=1)
                continue
            self.counters.add(gets=1, l1_hits=1)
            out.values[ref.id], out.payloads[ref.id] = self.envelope.unwrap(entry.payload), entry.payload
            out.tiers[ref.id] = 1
        return out

    # ----------------------------------------------------------------- writes

    def put(self, key: str | bytes, value: Any, ttl: float | None = None,
            tags: Iterable[str | bytes] = ()) -> Step[None]:
        """Write ``value`` to L2 and to this process's L1; ``ttl`` is its absolute life in seconds, ``tags``
        the names :meth:`invalidate_tags` removes it by."""
        self.space.ref(key)  # the key first: an unhashable one is an InvalidKeyError, not a TypeError
        yield from self.put_many({key: value}, ttl, tags)

    def put_many(self, mapping: Mapping[Any, Any], ttl: float | None = None,
                 tags: Iterable[str | bytes] = ()) -> Step[None]:
        """Write several values; everything is validated and encoded before anything is written.

        Once Redis confirms, this process's L1 holds the new values; every other process is told to drop
        its older copies. If Redis cannot confirm (it failed, or its answer was lost), nothing stays in
        L1 that a later read would trust: the values are kept aside, served only while Redis cannot be
        asked (fail-open), and forgotten as soon as Redis answers for the key.
        """
        write = self.write_options(ttl, tags)
        ttl_ms = write.ttl_ms
        prepared: dict[bytes, tuple[EntryRef, bytes]] = {}
        for key, value in mapping.items():
            ref = self.space.ref(key)
            prepared[ref.id] = (ref, self._encode(ref, value))
        if not prepared:
            return
        groups = _by_shard([ref for ref, _ in prepared.values()])
        calls = [self._shard_call(self.scripts.put, shard,
                                  [x for ref in rs for x in self._put_items(ref, prepared[ref.id][1], write)])
                 for shard, rs in groups.items()]
        sent_at = self.since()
        ttl_s = _seconds(ttl_ms)
        for ref, _ in prepared.values():  # until Redis confirms, no copy of the old value is trusted here
            self.l1.pop(ref.id)
        try:
            yield from self.ready()
            sent = time.monotonic()
            replies = yield from self.run_scripts(calls)
        except RedisError as exc:
            self.redis_failed("put", exc)
            for ref, payload in prepared.values():
                self.l1.hold_unconfirmed(ref.id, payload, ttl_s, since=sent_at, shard=ref.shard)
            return
        self.counters.add(puts=len(prepared))
        for rs, reply in zip(groups.values(), replies, strict=True):
            self._count_events(reply[0], sent)
            for ref, version in zip(rs, reply[1:], strict=True):
                if self.fence is not None:
                    self.fence.saw(ref.id, version, ref.shard)
                self.l1.set(ref.id, prepared[ref.id][1], version, ttl_s, since=sent_at, shard=ref.shard)

    def _put_items(self, ref: EntryRef, payload: bytes, write: Write, since_ms: int = 0, expect: int = 0,
                   cost: float = 0.0, prewarm: bool = False) -> list[bytes | int]:
        """One put.lua group: id, payload, ttl_ms, key, since_ms, expect_ver, cost_ms, prewarm, grace_ms, tags."""
        return [ref.id, payload, write.ttl_ms, ref.key if ref.hashed else b"", since_ms, expect, round(cost * 1000),
                int(prewarm), write.grace_ms, write.tags]

    def write_options(self, ttl: float | None, tags: Iterable[str | bytes] = (),
                      fail_safe: bool | None = None) -> Write:
        """A validated :class:`Write`: with fail-safe on (the setting, or this call's ``fail_safe``), a value
        with a ttl is kept ``fail_safe_grace`` past it."""
        plain = fail_safe is None and tags == ()
        if plain:  # the common call: one Write per ttl, made once (get_or_set's L1 hits pay a dict lookup)
            known = self._writes.get(ttl)
            if known is not None:
                return known
        ttl_ms = self._ttl_ms(ttl)
        safe = self.config.fail_safe if fail_safe is None else bool(fail_safe)
        grace_ms = round(self.config.fail_safe_grace * 1000) if safe and ttl_ms else 0
        write = Write(ttl_ms, grace_ms, encode_tags(tag_names(tags)), safe)
        if plain and isinstance(ttl, (int, float, type(None))):
            if len(self._writes) >= 64:
                self._writes.clear()
            self._writes[ttl] = write
        return write

    def _ttl_ms(self, ttl: float | None) -> int:
        """A validated ttl in whole ms (0 = none); L1 uses exactly what Redis gets."""
        return 0 if ttl is None else max(1, math.floor(check_ttl(ttl) * 1000))

    def _encode(self, ref: EntryRef, value: Any) -> bytes:
        payload = self.envelope.wrap(value)
        if len(payload) > self.config.max_value_bytes:
            raise ValueTooLargeError(
                f"value for key {ref.key[:80]!r} encodes to {len(payload)} bytes, over max_value_bytes="
                f"{self.config.max_value_bytes}; store something smaller or raise max_value_bytes"
            )
        return payload

    def delete(self, key: str | bytes) -> Step[bool]:
        """Remove ``key`` from every tier and every process's L1; True if some tier held it."""
        ref = self.space.ref(key)
        had_local = self.l1.pop(ref.id) | self.l1.forget_unconfirmed(ref.id)  # (both: each forgets its copy)
        try:
            yield from self.ready()
            sent = time.monotonic()
            replies = yield from self.run_scripts([self._shard_call(self.scripts.delete, ref.shard, [ref.id, b""])])
        except RedisError as exc:
            self.redis_failed("delete", exc)
            return had_local
        self._count_events(replies[0][0], sent)
        deleted, announced = replies[0][1]
        if announced:  # a read of the old value that raced with this delete must not be stored
            self.l1.invalidate(ref.id, announced)
        return bool(deleted) or had_local

    def invalidate(self, key: str | bytes | None = None) -> Step[None]:
        """Remove one key, or with no key every entry of the namespace (all tiers, all L1s)."""
        if key is not None:
            yield from self.delete(key)
            return
        self.l1.clear(at=self.since())
        shards = self.space.shard_keys
        try:
            yield from self.ready()
            pending = list(range(len(shards)))
            while pending:
                now_ms = self._now_ms()
                calls = [ScriptCall(self.scripts.flush, (shards[s].l2,), (FLUSH_BATCH, now_ms, s)) for s in pending]
                left = yield from self.run_scripts(calls)
                pending = [s for s, n in zip(pending, left, strict=True) if n > 0]
            if self.fence is not None:  # this process's own flush, before its announcements come back
                batch: Batch = [("HGET", sk.stats, "flushed_ver") for sk in shards]
                for s, version in enumerate((yield batch)):
                    if isinstance(version, bytes) and version.isdigit():
                        self.fence.flushed(s, int(version))
        except RedisError as exc:
            self.redis_failed("invalidate", exc)
        self.l1.clear(at=self.since())  # reads that raced with the flush must not store old values

    def invalidate_tags(self, tags: Iterable[str | bytes]) -> Step[int]:
        """Remove every entry carrying any of ``tags`` (untag.lua on every shard, again while entries are
        left, UNTAG_BATCH per call); each removal is announced to every L1. Returns the entries removed."""
        names = tag_names(tags)
        if not names:
            raise InvalidArgumentError("invalidate_tags needs at least one tag, e.g. invalidate_tags('tenant:42')")
        removed = 0
        try:
            yield from self.ready()
            pending = list(range(len(self.space.shard_keys)))
            while pending:
                calls = [self._shard_call(self.scripts.untag, s, [UNTAG_BATCH, *names]) for s in pending]
                sent = time.monotonic()
                replies = yield from self.run_scripts(calls)
                for reply in replies:
                    self._count_events(reply[0], sent)
                    removed += int(reply[1])
                    for entry_id, version in zip(reply[3::2], reply[4::2], strict=True):
                        self.l1.invalidate(entry_id, int(version))  # this process's own copies: now
                pending = [s for s, reply in zip(pending, replies, strict=True) if int(reply[2]) > 0]
        except RedisError as exc:
            self.redis_failed("invalidate_tags", exc)
        return removed

    # ------------------------------------------------- compute once per fleet

    def get_or_set_from_l1(self, key: str | bytes, ttl: float | None = None, write: Write | None = None) -> Got | None:
        """The first step of :meth:`get_or_set`, plain code (no I/O): an L1 hit (with the early refresh
        it may ask for), or None. A miss is not counted here: the front end then runs
        ``get_or_set(key, ttl, l1_checked=True)`` as the flight's leader (which counts the request), or
        waits for the leader (a coalesced call, not a request of its own)."""
        write = write or self.write_options(ttl)  # a bad ttl or tag is refused whatever L1 holds
        return self._got_from_l1(key, self.space.ref(key), ttl, write)

    def _got_from_l1(self, key: str | bytes, ref: EntryRef, ttl: float | None, write: Write) -> Got | None:
        entry = self.l1.serve(ref.id) if self.coherence.trusted() else None
        if entry is None:
            return None
        ttl_left = None if entry.expires_at is None else entry.expires_at - self.l1.clock()
        return Got(self._l1_value(entry), entry.payload,
                   self._refresh_if_due(key, entry.version, ttl_left, entry.cost, ttl, write), "l1")

    def get_or_set(self, key: str | bytes, ttl: float | None = None, l1_checked: bool = False,
                   write: Write | None = None, behind: bool = False) -> Step[Got]:
        """The value under ``key``; on a miss, the caller's loader computes it once for the fleet.

        Yields :class:`Load` when this process must compute. After a plain read misses, lease.lua looks
        again and takes the fill lease in one atomic step (no other worker's fill can land between the
        two); another process's lease makes this one wait (``Pause``) until the value appears or the
        lease ends, then read or take over. A fill is refused inside put.lua if the key changed after
        the miss. ``l1_checked``: :meth:`get_or_set_from_l1` has just missed; go straight to Redis.
        ``write``: the fill's ttl, tags and fail-safe (:meth:`write_options`; default: ``ttl`` alone).
        ``behind``: the front end writes a computed value in the background (``Got.fill_later``), after
        the caller has it; the value is encoded (and refused if it cannot be) before the call returns.
        """
        write = write or self.write_options(ttl)
        ref = self.space.ref(key)
        if not l1_checked:
            got = self._got_from_l1(key, ref, ttl, write)
            if got is not None:
                return got
        token, lease = "", self.space.lease_key(ref)  # the token once it is needed (a hit never does)
        held, foreign, since, pttl = False, False, 0, -2
        stale: Stale | None = None  # the latest value seen past its ttl (fail-safe falls back on it)
        try:
            for attempt in range(LEASE_ATTEMPTS + 1):  # a first lookup, then one after each wait
                if attempt and pttl == -1 and not foreign:
                    foreign = True  # no expiry: no worker took it (it was written by hand); remove it, retry
                    batch: Batch = [("DEL", lease)]
                    _raise_first_error((yield batch), batch)
                elif attempt:
                    self.counters.add(lease_waits=1)
                    yield from self._wait_for_fill(ref, lease)  # the value appeared, or the lease ended
                found = yield from self._fetch([ref])
                got = self._got(key, ref, found, ttl, write)
                stale = found.stale.get(ref.id, stale)
                if got is not None or found.failed:
                    break
                token = token or uuid.uuid4().hex
                looked = yield from self._lease(ref, token)
                if looked.reply is not None:  # filled since the read: a hit after all
                    self.saw_on_master(ref, looked.reply)
                    found = Fetched()
                    self.took(ref, looked.reply, self.since(), found)
                    got = self._got(key, ref, found, ttl, write)
                    if got is not None:
                        break
                    # Not a value the cache wrote (took counted it): remove that very version, take the lease.
                    looked = yield from self._lease(ref, token, disregard=looked.reply[1] or b"")
                    if looked.reply is not None:
                        continue  # yet another value landed meanwhile: look again, as after a wait
                since, pttl = looked.since, looked.pttl
                if looked.taken:
                    held = True
                    break
        except RedisError as exc:  # Redis failed while we waited: one timeout paid is enough
            self.redis_failed("get_or_set", exc)
            return (yield from self._compute_locally(ref, write.ttl_ms))  # a lease we hold expires by itself
        if got is not None:
            return got
        if found.failed:
            return (yield from self._compute_locally(ref, write.ttl_ms))
        return (yield from self._compute_and_fill(ref, write, since, lease if held else None, token, stale, behind))

    def _lease(self, ref: EntryRef, token: str, disregard: bytes | None = None) -> Step[Looked]:
        """lease.lua for ``ref``: the entry if it is live now, else the fill lease, tried. ``disregard``: the
        ``ver`` field of an entry this process found corrupt; lease.lua removes it if it is still there."""
        sent = time.monotonic()
        items = [ref.id, token, self._lease_ms] + ([] if disregard is None else [disregard])
        reply = (yield from self.run_scripts([self._shard_call(self.scripts.lease, ref.shard, items)]))[0]
        self.server_time.observe(int(reply[3]), sent)
        if reply[0] == 1:
            return Looked(list(reply[4:]))
        return Looked(None, bool(reply[1]), int(reply[2]), int(reply[3]))

    def _compute_locally(self, ref: EntryRef, ttl_ms: int) -> Step[Got]:
        """Redis is failing: compute here; keep the value aside as an unconfirmed write would be."""
        loaded = yield from self._load()
        payload = self._encode(ref, loaded.value)
        self.l1.hold_unconfirmed(ref.id, payload, _seconds(ttl_ms), shard=ref.shard)
        return Got(loaded.value, payload)

    def _got(self, key: str | bytes, ref: EntryRef, found: Fetched, ttl: float | None, write: Write) -> Got | None:
        if ref.id not in found.values:
            return None
        refresh = None
        if ref.id in found.hits:
            version, ttl_left, cost = found.hits[ref.id]
            refresh = self._refresh_if_due(key, version, ttl_left, cost, ttl, write)
        return Got(found.values[ref.id], found.payloads[ref.id], refresh, found.source(ref.id))

    def _wait_for_fill(self, ref: EntryRef, lease: bytes) -> Step[bool]:
        """Wait until the value appears (True) or the lease is gone (False: take over).

        The fill's write is announced on the invalidation channel: a watch registered before the first
        look wakes this wait as soon as it arrives, so a waiter pays the holder's loader and one message,
        not a polling interval. Without the channel (coherence off, or down) it polls."""
        waited = 0.0
        watch = self.coherence.watch(ref.id)
        delay = 0.0 if watch is not None else FILL_POLL_FIRST  # watched: look once first (a fill may be in)
        try:
            while waited <= self.config.lease_ttl + 1.0:
                if delay:
                    yield Pause(delay) if watch is None else WaitFill(watch, delay)
                    waited += delay
                if watch is not None and watch.is_set():  # woken: a fresh watch before looking again
                    self.coherence.unwatch(ref.id, watch)
                    watch = self.coherence.watch(ref.id)
                exists, pttl = yield [("EXISTS", ref.entry), ("PTTL", lease)]
                _raise_first_error([exists, pttl])
                if exists:
                    return True
                if pttl == -2:
                    return False
                first = FILL_POLL_FIRST if watch is None else FILL_POLL_WATCHED
                delay = min(max(delay * 1.5, first), FILL_POLL_MAX)
            return False
        finally:
            if watch is not None:
                self.coherence.unwatch(ref.id, watch)

    def _load(self) -> Step[Loaded]:
        loaded = yield from self._load_within(None)
        assert isinstance(loaded, Loaded)
        return loaded

    def _load_within(self, timeout: float | None) -> Step[Loaded | Pending]:
        """Have the front end run the loader: its :class:`Loaded`, or with a ``timeout`` :class:`Pending`."""
        self.counters.add(loads=1)  # every run of a loader, whether it succeeds or not
        loaded = yield Load(timeout)
        if not isinstance(loaded, (Loaded, Pending)) or (timeout is None and isinstance(loaded, Pending)):
            raise TypeError(f"a front end sent {type(loaded).__name__} for Load")
        return loaded

    def _compute_and_fill(self, ref: EntryRef, write: Write, since_ms: int, lease: bytes | None, token: str,
                          stale: Stale | None = None, behind: bool = False) -> Step[Got]:
        """Run the loader, then fill (refused if the key changed since the miss) and release the lease.

        Fail-safe (``write.fail_safe``): a loader that raises makes the call serve the value the key had
        past its ttl, if Redis still keeps it (see :meth:`_fall_back`); with ``fail_safe_timeout`` and
        such a value at hand, a loader still running after the timeout is left to fill in the
        background (:meth:`fill_later`) and the caller gets the stale value now."""
        timeout = self.config.fail_safe_timeout if write.fail_safe and stale is not None else None
        try:
            loaded = yield from self._load_within(timeout)
        except GeneratorExit:
            raise
        except BaseException as exc:  # a failed, cancelled or interrupted loader gives the lease back at once
            if lease is not None:
                yield from self._release(lease, token)
            if write.fail_safe and isinstance(exc, Exception):
                got = yield from self._fall_back(ref, stale, exc)
                if got is not None:
                    return got
            raise
        if isinstance(loaded, Pending):
            assert stale is not None
            self._served_stale(ref, stale, f"its loader is still running after fail_safe_timeout="
                                            f"{self.config.fail_safe_timeout} s and will fill it in the background")
            return Got(stale.value, stale.payload, source="stale",
                       fill_later=FillLater(ref, write, since_ms, lease, token, loaded.job))
        return (yield from self._fill(ref, write, since_ms, lease, token, loaded, behind))

    def _fill(self, ref: EntryRef, write: Write, since_ms: int, lease: bytes | None, token: str,
              loaded: Loaded, behind: bool = False, payload: bytes | None = None,
              computed_at: float | None = None) -> Step[Got]:
        """Write what the loader computed (a fill, with the lease released in the same round trip). A value
        the loader marked :class:`Uncached`, or one that cannot be stored (too large, not encodable: with
        ``fail_open`` the caller still gets it, and the reason is logged), only gives the lease back."""
        value, uncached = loaded.value, isinstance(loaded.value, Uncached)
        if uncached:
            value = value.value
        try:
            if payload is None:  # (a fill behind was encoded on the caller's path)
                payload = self._encode(ref, value)
        except (SerializationError, ValueTooLargeError) as exc:
            if lease is not None:
                yield from self._release(lease, token)
            if not self.config.fail_open:
                raise
            log.warning("the value computed for %r is returned but not cached: %s", ref.key[:100], exc,
                        extra=self.log_fields("value_not_cached", "get_or_set", key=_text(ref.key), error=str(exc)))
            uncached, payload = True, None
        if uncached:
            self.counters.add(uncached=1)
            if lease is not None and payload is not None:
                yield from self._release(lease, token)
            return Got(value, payload)
        assert payload is not None
        if behind:
            return Got(value, payload, fill_later=FillLater(ref, write, since_ms, lease, token, loaded, payload,
                                                            self.since()))
        calls = [self._shard_call(self.scripts.put, ref.shard,
                                  self._put_items(ref, payload, write, since_ms=since_ms, cost=loaded.seconds))]
        if lease is not None:
            calls.append(ScriptCall(self.scripts.release, (lease,), (token,)))
        sent_at = self.since() if computed_at is None else computed_at  # (an L1 copy's life counts from no later)
        ttl_s = _seconds(write.ttl_ms)
        try:
            sent = time.monotonic()
            replies = yield from self.run_scripts(calls)
        except RedisError as exc:
            self.redis_failed("get_or_set", exc)
            self.l1.hold_unconfirmed(ref.id, payload, ttl_s, since=sent_at, shard=ref.shard)
            return Got(value, payload)
        self._count_events(replies[0][0], sent)
        version = replies[0][1]
        if version:
            self.counters.add(puts=1)
            if self.fence is not None:
                self.fence.saw(ref.id, version, ref.shard)
            self.l1.set(ref.id, payload, version, ttl_s, since=sent_at, cost=loaded.seconds, shard=ref.shard)
        else:
            self.counters.add(fills_refused=1)
        return Got(value, payload)

    def _fall_back(self, ref: EntryRef, stale: Stale | None, exc: Exception) -> Step[Got | None]:
        """Fail-safe after the loader raised: look again (a value written meanwhile wins; a key deleted
        meanwhile has nothing to serve), then serve the value past its ttl that Redis keeps for its grace,
        if any. When Redis cannot answer, the stale value this call saw is served while its grace lasts.
        None: nothing to serve."""
        found = yield from self._fetch([ref])
        if ref.id in found.values:
            return Got(found.values[ref.id], found.payloads[ref.id], source=found.source(ref.id))
        latest = found.stale.get(ref.id)
        if found.failed and latest is None and stale is not None:
            now = self.server_time.now_ms()
            latest = stale if now is not None and now < stale.kept_ms else None
        if latest is None:
            return None
        self._served_stale(ref, latest, f"its loader raised {type(exc).__name__}: {exc}")
        return Got(latest.value, latest.payload, source="stale")

    def _served_stale(self, ref: EntryRef, stale: Stale, why: str) -> None:
        self.counters.add(fail_safe_served=1)
        now = self.server_time.now_ms()
        ago = "" if now is None else f" {max(0.0, (now - stale.expired_ms) / 1000):.1f} s ago"
        log.warning("serving the value of %r that expired%s (fail-safe): %s", ref.key[:100], ago, why,
                    extra=self.log_fields("fail_safe_served", "get_or_set", key=_text(ref.key), error=why))

    def fill_later(self, job: FillLater, outcome: Loaded | BaseException) -> Step[None]:
        """Finish a fill in the background (:class:`FillLater`; the front end runs this once the loader is
        done): write its value, or give the lease back if it failed. Nothing is raised: nobody waits for it."""
        try:
            if isinstance(outcome, BaseException):
                if job.lease is not None:
                    yield from self._release(job.lease, job.token)
                log.warning("the background fill of %r failed: %s", job.ref.key[:100], outcome,
                            extra=self.log_fields("fill_failed", "get_or_set", key=_text(job.ref.key),
                                                  error=str(outcome)))
                return
            yield from self._fill(job.ref, job.write, job.since_ms, job.lease, job.token, outcome, payload=job.payload,
                                  computed_at=job.computed_at)
        except CacheError as exc:
            log.warning("the background fill of %r failed: %s", job.ref.key[:100], exc,
                        extra=self.log_fields("fill_failed", "get_or_set", key=_text(job.ref.key), error=str(exc)))

    def _release(self, lease: bytes, token: str) -> Step[None]:
        try:
            yield from self.run_scripts([ScriptCall(self.scripts.release, (lease,), (token,))])
        except RedisError as exc:
            log.debug("could not release the fill lease %r (it expires by itself): %s", lease, exc)

    def _refresh_if_due(self, key: str | bytes, version: int, ttl_left: float | None, cost: float,
                        ttl: float | None, write: Write) -> Refresh | None:
        if not self.config.early_refresh or not version or ttl is None:
            return None  # without a ttl in this call there is nothing to refresh ahead of
        if not refresh_early(ttl_left, cost, self.config.early_refresh_beta):
            return None
        entry_id = self.space.ref(key).id
        with self._lock:  # one refresh per key per process; the lease makes it one per fleet
            if entry_id in self._refreshing:
                return None
            self._refreshing.add(entry_id)
        return Refresh(key, version, ttl, write)

    def refresh(self, job: Refresh) -> Step[bool]:
        """Recompute a value before it expires, if no other worker is doing it (run in the background).

        The new value replaces the entry only if it still has the version the hit saw; if it has
        already changed, the loader does not even run. Failures are logged and counted, never
        raised: nobody is waiting for a background refresh.
        """
        ref = self.space.ref(job.key)
        try:
            return (yield from self._refresh(ref, job))
        finally:
            with self._lock:
                self._refreshing.discard(ref.id)

    def _refresh(self, ref: EntryRef, job: Refresh) -> Step[bool]:
        token, lease = uuid.uuid4().hex, self.space.lease_key(ref)
        try:
            batch: Batch = [("SET", lease, token, "NX", "PX", self._lease_ms), ("HGET", ref.entry, "ver")]
            taken, version = replies = yield batch
            _raise_first_error(replies, batch)
            if not taken:
                return False
            if version is None or int(version) != job.version:  # refreshed or rewritten already
                yield from self._release(lease, token)
                return False
            try:
                loaded = yield from self._load()
                payload = self._encode(ref, loaded.value)
            except GeneratorExit:
                raise
            except BaseException as exc:  # a refresh's loader failure reaches nobody: count it
                yield from self._release(lease, token)
                if not isinstance(exc, Exception):
                    raise
                log.warning("early refresh of %r failed: %s", ref.key[:100], exc,
                            extra=self.log_fields("refresh_failed", "refresh", key=_text(ref.key), error=str(exc)))
                self.counters.add(refresh_errors=1)
                return False
            ttl_ms = job.write.ttl_ms
            sent_at = self.since()
            sent = time.monotonic()
            replies = yield from self.run_scripts([
                self._shard_call(self.scripts.put, ref.shard,
                                 self._put_items(ref, payload, job.write, expect=job.version, cost=loaded.seconds)),
                ScriptCall(self.scripts.release, (lease,), (token,))])
        except RedisError as exc:
            log.warning("early refresh of %r could not reach Redis: %s", ref.key[:100], exc,
                        extra=self.log_fields("refresh_failed", "refresh", key=_text(ref.key), error=str(exc)))
            return False
        self._count_events(replies[0][0], sent)
        version = replies[0][1]
        if version:
            self.counters.add(refreshes=1, puts=1)
            if self.fence is not None:
                self.fence.saw(ref.id, version, ref.shard)
            self.l1.set(ref.id, payload, version, _seconds(ttl_ms), since=sent_at, cost=loaded.seconds,
                        shard=ref.shard)
        return bool(version)

    # ------------------------------------------------------------- prewarming

    def absent(self, keys: Iterable[str | bytes]) -> Step[list[Any]]:
        """The ``keys`` no tier holds and no worker is computing (its fill lease is free): what prewarming may
        compute. This process's L1 is asked first; the rest is one round trip of plain reads (``EXISTS`` of
        each entry and of its lease), whatever the shards. Redis failing: none (prewarming waits)."""
        refs: dict[bytes, tuple[Any, EntryRef]] = {}
        for key in keys:
            ref = self.space.ref(key)
            if ref.id not in refs and self.l1.peek(ref.id) is None:
                refs[ref.id] = (key, ref)
        if not refs:
            return []
        batch: Batch = [command for _, ref in refs.values()
                        for command in (("EXISTS", ref.entry), ("EXISTS", self.space.lease_key(ref)))]
        try:
            replies = yield batch
            _raise_first_error(replies, batch)
        except RedisError as exc:
            self.redis_failed("prewarm", exc)
            return []
        return [key for (key, _), held, leased in zip(refs.values(), replies[0::2], replies[1::2], strict=True)
                if not held and not leased]

    def prewarm(self, key: str | bytes, ttl: float | None = None) -> Step[Prewarmed]:
        """Compute a value nobody has asked for yet, once per fleet (the caller's loader computes it).

        Skipped when the entry exists or another worker holds its fill lease (prewarming, or a
        get_or_set computing it: that one's waiters then get this value). The fill is refused if the
        key is written or deleted meanwhile, and it does not go into this process's L1: the first
        Redis hit of a prewarmed entry counts it ``prewarm_useful``, fleet-wide.
        """
        claim = (yield from self.claim_prewarms([key], ttl))[0]
        if isinstance(claim, str):
            return claim
        return (yield from self.fill_prewarm(claim))

    def claim_prewarms(self, keys: Sequence[str | bytes], ttl: float | None = None) -> Step[list[Claim | Prewarmed]]:
        """The first half of :meth:`prewarm` for many keys: for each, ``cached`` (in L1 or Redis), ``busy``
        (another worker computes it), ``failed`` (Redis failed), or the :class:`Claim` of its fill lease,
        which :meth:`fill_prewarm` (or :meth:`release_claim`) uses. One round trip of plain reads finds
        what Redis holds (a prediction usually is cached: it costs a read, not a script, and counts as no
        request); a second, of lease.lua calls, claims the rest. With an injected clock only the scripts
        can tell an entry idle past its ttls by that clock: every key goes to lease.lua."""
        ttl_ms = self._ttl_ms(ttl)
        out: list[Claim | Prewarmed] = []
        todo: list[tuple[int, EntryRef, str]] = []
        for key in keys:
            ref = self.space.ref(key)
            if self.l1.peek(ref.id) is not None:
                out.append("cached")
            else:
                todo.append((len(out), ref, uuid.uuid4().hex))
                out.append("failed")
        if not todo or self.config.clock is not None:  # (an injected clock: only the scripts know its idle expiry)
            return (yield from self._lease_prewarms(out, todo, ttl_ms))
        try:
            yield from self.ready()
            reads = Reads(("HMGET", ref.entry, b"ver", b"x") for _, ref, _ in todo)
            reads.packed = [pack(c) for c in reads]
            held = yield reads
        except RedisError as exc:
            self.redis_failed("prewarm", exc)
            return out
        now = self.server_time.now_ms()
        missing = []
        for item, reply in zip(todo, held, strict=True):
            if isinstance(reply, list) and reply[0] is not None and (
                    reply[1] is None or (now is not None and reply[1].isdigit() and now < int(reply[1]))):
                out[item[0]] = "cached"  # fresh in Redis (an entry past its ttl, or odd, goes to lease.lua)
            else:
                missing.append(item)
        return (yield from self._lease_prewarms(out, missing, ttl_ms))

    def _lease_prewarms(self, out: list[Claim | Prewarmed], todo: list[tuple[int, EntryRef, str]],
                        ttl_ms: int) -> Step[list[Claim | Prewarmed]]:
        """claim_prewarms' second round trip: a fill lease for each of ``todo`` (lease.lua each)."""
        if not todo:
            return out
        calls = [self._shard_call(self.scripts.lease, ref.shard, [ref.id, token, self._lease_ms])
                 for _, ref, token in todo]
        try:
            yield from self.ready()
            sent = time.monotonic()
            replies = yield from self.run_scripts(calls)
        except RedisError as exc:
            self.redis_failed("prewarm", exc)
            return out
        for (i, ref, token), reply in zip(todo, replies, strict=True):
            self.server_time.observe(int(reply[3]), sent)
            if reply[0] == 1:
                out[i] = "cached"
            elif not reply[1]:
                out[i] = "busy"
            else:
                out[i] = Claim(ref, ttl_ms, int(reply[3]), self.space.lease_key(ref), token)
        return out

    def fill_prewarm(self, claim: Claim) -> Step[Prewarmed]:
        """Compute (the loader) and store a claimed prewarm; the lease is released either way."""
        return (yield from self._prewarm_fill(claim.ref, claim.ttl_ms, claim.since, claim.lease, claim.token))

    def release_claim(self, claim: Claim) -> Step[None]:
        """Give a claimed prewarm's lease back without computing it."""
        yield from self._release(claim.lease, claim.token)

    def _prewarm_fill(self, ref: EntryRef, ttl_ms: int, since_ms: int, lease: bytes, token: str) -> Step[Prewarmed]:
        try:
            loaded = yield from self._load()
            payload = self._encode(ref, loaded.value)
        except GeneratorExit:
            raise
        except BaseException as exc:  # nobody waits for a prewarm: its loader's failure is counted, not raised
            yield from self._release(lease, token)
            if not isinstance(exc, Exception):
                raise
            log.info("prewarming %r failed: %s", ref.key[:100], exc,
                     extra=self.log_fields("prewarm_failed", "prewarm", key=_text(ref.key), error=str(exc)))
            return "failed"
        calls = [self._shard_call(self.scripts.put, ref.shard,
                                  self._put_items(ref, payload, self.write_options(_seconds(ttl_ms)),
                                                  since_ms=since_ms, cost=loaded.seconds, prewarm=True)),
                 ScriptCall(self.scripts.release, (lease,), (token,))]
        try:
            sent = time.monotonic()
            replies = yield from self.run_scripts(calls)
        except RedisError as exc:
            self.redis_failed("prewarm", exc)
            return "failed"
        self._count_events(replies[0][0], sent)
        return "completed" if replies[0][1] else "refused"

    # ---------------------------------------------------------- bookkeeping

    def touch_calls(self, batches: list[ShardBatch]) -> list[ScriptCall]:
        """One touch.lua call per shard batch; this process's L1 counters ride on the first."""
        deltas = self._take_l1_deltas()
        evidence = int(self.sizing is not None)  # ghost and tail hits: only fleet sizing reads them
        now = time.monotonic()
        calls = []
        for n, batch in enumerate(batches):
            c = batch.counts
            l1_hits, l1_evictions = deltas if n == 0 else (0, 0)
            counts = (f"{l1_hits} {l1_evictions} {c.get('l1_fills', 0)} {c.get('l2_hits', 0)} "
                      f"{c.get('l3_hits', 0)} {c.get('misses', 0)} {evidence} {self._checks_due(batch.shard, now)}")
            calls.append(self._shard_call(self.scripts.touch, batch.shard, [counts, *batch.items()]))
        if not calls and deltas != (0, 0):  # only L1 counters to report: shard 0 takes them
            counts = f"{deltas[0]} {deltas[1]} 0 0 0 0 {evidence} {self._checks_due(0, now)}"
            calls.append(self._shard_call(self.scripts.touch, 0, [counts]))
        self._touch_deltas = deltas
        return calls

    def _checks_due(self, shard: int, now: float) -> int:
        """1 if this batch of ``shard`` asks touch.lua to check key types and permissions first (see its
        header): the first of the shard, then once a second; a failed batch clears the record."""
        if now - self._checked_at.get(shard, -CHECKS_INTERVAL) < CHECKS_INTERVAL:
            return 0
        self._checked_at[shard] = now
        return 1

    def touch(self, batches: list[ShardBatch]) -> Step[None]:
        """Send buffered bookkeeping (the bookkeeping rounds run this): one touch.lua call per shard, one round
        trip. A failure drops the batches (bookkeeping only) and gives the L1 counters back."""
        calls = self.touch_calls(batches)
        if not calls:
            return
        deltas = self._touch_deltas
        try:
            yield from self.ready()
            sent = time.monotonic()
            replies = yield from self.run_scripts(calls)
        except RedisError as exc:
            self._give_back_l1_deltas(deltas)
            self.book.give_up(batches)
            self._checked_at.clear()  # whatever went wrong, the next batches check everything first
            log.debug("bookkeeping of %d shard(s) dropped: %s", len(batches), exc,
                      extra=self.log_fields("bookkeeping_dropped", "touch", error=str(exc)))
            return
        for reply in replies:
            self._count_events(reply, sent)

    def sync(self) -> None:
        """Move buffered hit and miss events into this process's counters (metrics read them)."""
        self.book.collect()

    # ---------------------------------------------------------------- metrics

    def metrics(self, scope: Scope = "process") -> Step[dict[str, Any]]:
        """Per-tier metrics of this process (``"process"``) or of the whole fleet (``"fleet"``).

        Fleet counters are what the processes' bookkeeping has sent: up to one bookkeeping window behind
        (``sync()`` on a cache sends its own first)."""
        if scope not in ("process", "fleet"):
            raise InvalidArgumentError(f"scope={scope!r} must be 'process' or 'fleet'")
        self.sync()
        batch: Batch = []
        for sk in self.space.shard_keys:
            batch += [("ZCARD", sk.l2), ("ZCARD", sk.l3), ("HGETALL", sk.stats)]
        try:
            replies = yield batch
            _raise_first_error(replies, batch)
        except RedisError as exc:
            self.redis_failed("metrics", exc)
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
        return self._metrics(tally, sizes, local, scope, available=replies is not None)

    def local_metrics(self) -> dict[str, Any]:
        """This process's metrics from memory alone, without a Redis round trip: L2/L3 sizes are None
        and ``health.redis_available`` is None (not asked)."""
        self.sync()
        local = self.counters.snapshot()
        return self._metrics(dict(local, l1_evictions=self.l1.evictions), None, local, "process", available=None)

    def _metrics(self, tally: dict[str, int] | None, sizes: dict[str, tuple[int, int]] | None,
                 local: dict[str, int], scope: Scope, available: bool | None) -> dict[str, Any]:
        l1_size = (len(self.l1), self.l1.total_size) if scope == "process" else None
        metrics = build_metrics(tally, l1_size, sizes, local, available=available, coherence=self.coherence_state())
        if self.resilience is not None:
            metrics["health"]["breaker"] = self.resilience.snapshot()
        metrics["health"]["bookkeeping"] = {"pending": self.book.pending(), "dropped_batches": self.book.dropped}
        if scope == "process":
            metrics["l1"]["adaptive"] = self.l1.adaptive_metrics() or {"enabled": False}
        metrics["health"]["fleet_sizing"] = self.sizing.state() if self.sizing else {"enabled": False}
        metrics["health"]["replicas"] = self.replica_state()
        return metrics

    def replica_state(self) -> dict[str, Any]:
        """What reads from replicas did: batches replicas answered and failed, replies the fence sent to the
        master, batches read on the master because a replica failed, entries the fence remembers."""
        if self.fence is None:
            return {"enabled": False}
        reader = self.replicas.snapshot() if self.replicas is not None else {"reads": 0, "failures": 0}
        return {"enabled": True, **reader, "fenced": self.fenced, "fallbacks": self.replica_fallbacks,
                "fence_entries": len(self.fence), "fence_forgotten": self.fence.forgotten}

    def coherence_state(self) -> dict[str, Any]:
        """Whether L1 is kept coherent right now, and what the invalidation channel delivered."""
        listener = self.coherence
        if isinstance(listener, NoCoherence):
            return {"channel": "off", "invalidations": 0, "l1_flushes": 0}
        return {"channel": "up" if listener.trusted() else "down",
                "invalidations": getattr(listener, "messages", 0), "l1_flushes": getattr(listener, "flushes", 0)}

    # --------------------------------------------------------------- plumbing

    def _shard_call(self, script: Any, shard: int, items: list[Any]) -> ScriptCall:
        head = (self._now_ms(), self._caps2[shard], self._caps3[shard], *self._idle_ms, self.config.promote_after,
                self._memory_ms)
        return ScriptCall(script, (self.space.shard_keys[shard].l2,), head + tuple(items))

    def _now_ms(self) -> int:
        """The "now" the scripts get: 0 = the server's TIME, else the injected clock in whole ms."""
        clock = self.config.clock
        return 0 if clock is None else max(1, math.floor(clock() * 1000))

    def since(self) -> float:
        """The L1 clock reading that copies made from the next request count their lifetime from.

        Taken before the request is built, so a copy never outlives the value in Redis: with the
        server's TIME the request runs later than this reading; with an injected clock it is the
        very millisecond the scripts are given.
        """
        clock = self.config.clock
        if clock is None:
            return self.l1.clock()
        return max(1, math.floor(clock() * 1000)) / 1000

    def run_scripts(self, calls: list[ScriptCall]) -> Step[list[Any]]:
        """Run script calls in one round trip (EVALSHA); reload what the server forgot, once.

        After ``SCRIPT FLUSH``, a restart or a failover, every concurrent call gets NOSCRIPT. Only one
        of them per script reloads it (EVAL, which caches it on the server it runs on); calls that
        lost the race pause a moment and send EVALSHA again, so a busy process reloads each script
        once per server, not once per call. The last round reloads whatever is still missing.
        """
        sent = self._script_generations(calls)
        replies: list[Any] = yield [c.evalsha() for c in calls]
        for attempt in range(RELOAD_ROUNDS):
            missing = [i for i, r in enumerate(replies) if needs_reload(r)]
            if not missing:
                break
            reload = missing if attempt == RELOAD_ROUNDS - 1 else self._claim_reloads(calls, missing, sent)
            if reload:
                # A script missing on a fresh or restarted server is expected: debug, not info.
                log.debug("loading %d script(s) into Redis after NOSCRIPT", len(reload),
                          extra=self.log_fields("scripts_reloaded", count=len(reload),
                                                scripts=sorted({calls[i].script.name for i in reload})))
                self.counters.add(script_reloads=len(reload))
            else:
                yield Pause(RELOAD_PAUSE * 2 ** attempt)  # another call is reloading them right now
            waiting = [i for i in missing if i not in reload]
            sent.update(self._script_generations([calls[i] for i in waiting], waiting))
            # In the batch's order (later calls may depend on earlier ones: a model round reads what its
            # records wrote); a script's reload is its first missing call, so its later calls find it.
            order = sorted(reload + waiting)
            try:
                again = yield [calls[i].eval() if i in reload else calls[i].evalsha() for i in order]
            finally:
                with self._lock:  # a reload is counted once it is done: see _claim_reloads
                    for name in {calls[i].script.name for i in reload}:
                        self._reloading.discard(name)
                        self._script_gen[name] = self._script_gen.get(name, 0) + 1
            for i, reply in zip(order, again, strict=True):
                replies[i] = reply
        _raise_first_error(replies)
        self._recovered()
        return replies

    def _script_generations(self, calls: list[ScriptCall], indexes: list[int] | None = None) -> dict[int, int]:
        with self._lock:
            return {i: self._script_gen.get(c.script.name, 0)
                    for i, c in zip(indexes or range(len(calls)), calls, strict=True)}

    def _claim_reloads(self, calls: list[ScriptCall], missing: list[int], sent: dict[int, int]) -> list[int]:
        """The calls that reload their script: one per script that nobody is reloading right now and nobody
        reloaded since they were sent. A call sent while a reload of its script was still on its way may
        have reached that very server before the script did: it does not reload but sends EVALSHA again,
        and reloads only if its server still lacks the script then (another server of a cluster)."""
        claimed: list[int] = []
        with self._lock:
            for i in missing:
                name = calls[i].script.name
                if name not in self._reloading and self._script_gen.get(name, 0) == sent[i]:
                    self._reloading.add(name)
                    claimed.append(i)
        return claimed

    def ready(self) -> Step[None]:
        """Once per process: agree with the fleet on the shard count and data format, and read the server's
        clock. With ``adaptive_redis``, now and then: take part in the fleet's sizing (fleet_sizing.py)."""
        if self.sizing is not None and self.sizing.due() and (yield from run_safely(self.sizing, self.run_scripts)):
            self._caps2 = split_capacity(self.sizing.l2_size, self.config.shards)
            self._caps3 = split_capacity(self.sizing.l3_size, self.config.shards)
        if self.ready_done:
            return
        cfg = self.space.config
        signed = int(self.config.signing_key is not None)
        batch: Batch = [("HSETNX", cfg, "shards", self.config.shards), ("HSETNX", cfg, "format", FORMAT_VERSION),
                        ("HSETNX", cfg, "signed", signed), ("HGETALL", cfg), ("TIME",)]
        sent = time.monotonic()
        replies = yield batch
        if not isinstance(replies[4], Exception):
            seconds, micros = replies[4]
            self.server_time.observe(int(seconds) * 1000 + int(micros) // 1000, sent)
        # A full Redis refuses HSETNX; what the fleet stored before still says how to read the namespace.
        full = [r for r in replies[:3] if _out_of_memory(r)]
        _raise_first_error([None if _out_of_memory(r) else r for r in replies[:4]], batch)
        stored = _int_hash(replies[3])
        if full and "shards" not in stored:
            raise full[0]
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
        if stored.get("signed", 0) != signed:
            raise ConfigurationError(
                f"namespace {self.config.namespace!r} holds {'signed' if stored.get('signed') else 'unsigned'} "
                f"payloads and this worker {'signs' if signed else 'does not sign'} them; give every worker of "
                "the namespace the same signing_key (or none), or use a new namespace"
            )
        self.ready_done = True

    def _take_l1_deltas(self) -> tuple[int, int]:
        with self._lock:
            served = self.l1.hits
            hits, self._reported_l1_hits = served - self._reported_l1_hits, served
            evictions = self.l1.evictions - self._reported_l1_evictions
            self._reported_l1_evictions = self.l1.evictions
        return hits, evictions

    def _give_back_l1_deltas(self, deltas: tuple[int, int]) -> None:
        with self._lock:
            self._reported_l1_hits -= deltas[0]
            self._reported_l1_evictions -= deltas[1]

    def _count_events(self, events: list[int], sent: float) -> None:
        promotions, demotions, evictions, expirations, now = events[:5]
        self.server_time.observe(int(now), sent)
        if promotions or demotions or evictions or expirations:
            self.counters.add(promotions=promotions, demotions=demotions, evictions=evictions,
                              expirations=expirations)

    def redis_failed(self, op: str, exc: Exception) -> None:
        self.counters.add(redis_errors=1)
        self.ready_done = False  # Redis may come back empty: agree on the namespace's settings again
        problem = f"Redis at {redact(self.config.url)} could not serve {op}: {str(exc).rstrip('. ')}. {fix_for(exc)}"
        if not self.config.fail_open:
            raise CacheUnavailableError(problem + "; or construct the cache with fail_open=True to fall back "
                                                  "to L1") from exc
        now = time.monotonic()
        if now - self._failure_logged_at >= FAILURE_LOG_INTERVAL:  # a broken shard must not flood the log
            self._failure_logged_at = now
            self._failing = True
            log.warning("%s. Serving from L1 (or missing) until it recovers", problem,
                        extra=self.log_fields("redis_failed", op, error=str(exc), error_type=type(exc).__name__))

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("Redis at %s is serving again", redact(self.config.url),
                        extra=self.log_fields("redis_recovered"))

    def log_fields(self, event: str, op: str | None = None, **more: Any) -> dict[str, Any]:
        """The structured fields of a log record (``extra=``): what happened, where, during which call."""
        fields: dict[str, Any] = {"event": event, "namespace": self.config.namespace,
                                  "redis_url": redact(self.config.url)}
        if op is not None:
            fields["op"] = op
        return {**fields, **more}


def _out_of_memory(reply: Any) -> bool:
    return isinstance(reply, OutOfMemoryError) or (isinstance(reply, ResponseError) and str(reply).startswith("OOM"))


def fix_for(exc: Exception) -> str:
    """What to do about a Redis failure, in words."""
    text = str(exc)
    if isinstance(exc, AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        return "Check the user name and password in the URL (redis://user:password@host:port/db)"
    # redis-py strips the NOPERM/OOM prefixes into the exception type; inside a script Redis 7.0 says
    # "...has no permissions to run the '<command>' command".
    if (isinstance(exc, NoPermissionError) or "NOPERM" in text or "no permissions" in text
            or "can't run this command" in text):
        return ("The Redis ACL user lacks a command, key or channel the cache needs; grant the rule set in the "
                "README section 'Security'")
    if "VRC_WRONGTYPE" in text:
        return "Delete the key named above"
    if isinstance(exc, OutOfMemoryError) or "OOM" in text or "maxmemory" in text:
        return "Redis is out of memory (maxmemory reached with a no-eviction policy): raise maxmemory or free memory"
    return "Check that it is reachable and healthy"


def _text(key: str | bytes) -> str:
    """A key as log text (the first 100 characters or bytes)."""
    return key[:100].decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key[:100]


def _by_shard(refs: Iterable[EntryRef]) -> dict[int, list[EntryRef]]:
    groups: dict[int, list[EntryRef]] = {}
    for ref in refs:
        groups.setdefault(ref.shard, []).append(ref)
    return groups


def _raise_first_error(replies: list[Any], batch: Batch | None = None) -> None:
    """Raise the first error among a batch's replies; a WRONGTYPE names the key (``batch`` given)."""
    for i, reply in enumerate(replies):
        if isinstance(reply, Exception):
            if batch is not None and str(reply).startswith("WRONGTYPE") and len(batch[i]) > 1:
                key = batch[i][1]
                shown = key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else str(key)
                raise ResponseError(f"VRC_WRONGTYPE {shown} is not of the type {batch[i][0]} needs: it was "
                                    "written outside the cache; delete that key") from reply
            raise reply


def _int_hash(reply: Any) -> dict[str, int]:
    """The integer fields of a Redis hash reply as {str: int} (others, like `tick`, are left out)."""
    items = reply.items() if isinstance(reply, dict) else zip(reply[0::2], reply[1::2], strict=True)
    return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in items if v.lstrip(b"-").isdigit()}
