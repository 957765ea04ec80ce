"""Fleet coherence: every process drops its L1 copy of a value another process changed.

The scripts publish on the shard's channel ``<ns>:{<tag>}:inval`` (sharded pub/sub: SPUBLISH)
whenever they really change a value (see ``lua/includes/shard.lua``): one line
``<length of id>:<id> <version>`` per changed entry, or ``*<shard> <version>`` when a shard is
flushed. An :class:`InvalidationListener` per cache applies those messages to its L1; the caches of
one process on one Redis (same URL and connection settings) share one :class:`Subscriber`: one
subscribed connection (one per master on a cluster, where each shard's channel lives on the master
owning its slot) and one thread for all their channels, which hands each channel's messages to that
namespace's listener:

* a background thread waits on the socket (``select``) and applies each message as soon as it
  arrives (within a thread switch, well inside the fleet's 100 ms bound); it also pings the server
  every second and reconnects;
* readers do no I/O and take no lock of the listener's: :meth:`InvalidationListener.trusted` reads
  one flag;
* pub/sub drops messages across a disconnect, so when the connection breaks (or goes silent for
  ``SILENCE`` seconds) that flag goes down first, so readers stop trusting L1 at once, then L1 is
  flushed, and it is not trusted again until a new subscription is confirmed, and flushed again
  then. While untrusted, reads go to Redis. If the thread itself ever stopped, the flag goes down.
  A lost connection distrusts every namespace it served; each is trusted again once its own channel
  is confirmed on the next one.

The same messages wake a ``get_or_set`` waiting for another process's fill: the fill's write is
announced like any other, so the waiter registers a :class:`FillWatch` for the entry and reads as soon
as it is set, instead of polling Redis at intervals that would cost a cheap loader's wait many times
the loader (it still polls, at long intervals, for a lease that ends without a fill).

It uses a plain redis-py connection and a thread for both front ends: an asyncio process keeps no
task of its own for it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from redis.exceptions import ResponseError

from . import forksafe
from .connection import Address, SubscriberRoutes
from .l1 import LocalCache

log = logging.getLogger("victor_rcache")

PING_INTERVAL = 1.0  # seconds between health pings on the subscriber connection
SILENCE = 3.0  # seconds without any reply after which the connection is considered lost
RECONNECT_MAX = 2.0  # cap of the reconnect backoff, seconds


_VERSION = re.compile(rb"(\d+)([ \n])")  # an announcement's version, then its end or its payload
_LENGTH = re.compile(rb"(\d+):")


def parse_announcements(data: bytes) -> list[tuple[bytes, int, bytes | None]]:
    """``b"13:read the file 42\\n9:pick tool 43 5:\\x92...\\n"`` -> ``[(b"read the file", 42, None),
    (b"pick tool", 43, b"\\x92...")]``: each entry's id, new version, and the value's payload when the
    line carries it (a put of a small value without a ttl, see lua/includes/shard.lua). Ids and payloads
    may hold any byte: they are read by their lengths. Raises ValueError on anything else."""
    out: list[tuple[bytes, int, bytes | None]] = []
    pos, size = 0, len(data)
    while pos < size:
        colon = data.index(b":", pos)
        start = colon + 1
        end = start + int(data[pos:colon])
        version = _VERSION.match(data, end + 1) if data[end:end + 1] == b" " else None
        if version is None:
            raise ValueError(f"malformed invalidation at byte {pos}")
        payload, pos = None, version.end()
        if version[2] == b" ":
            length = _LENGTH.match(data, pos)
            stop = length.end() + int(length[1]) if length is not None else size
            if length is None or data[stop:stop + 1] != b"\n":
                raise ValueError(f"malformed payload at byte {pos}")
            payload, pos = data[length.end():stop], stop + 1
        out.append((data[start:end], int(version[1]), payload))
    return out


def parse_invalidation(data: bytes) -> list[tuple[bytes, int]]:
    """:func:`parse_announcements` without the payloads: ``[(id, version), ...]``."""
    return [(entry_id, version) for entry_id, version, _ in parse_announcements(data)]


class FillWatch:
    """Set when an announcement names one entry, or when the listener may have missed one (its channel
    was lost, a shard flushed, the cache closed): a get_or_set waiting for another process's fill then
    looks in Redis again. ``wait`` blocks a thread; ``on_set`` calls back (from the listener's thread)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def on_set(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the watch is set (now, if it already is)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


class Coherence(Protocol):
    """What the tier core asks before it serves from L1 (on every L1 read: it must be cheap)."""

    def trusted(self) -> bool: ...

    def watch(self, entry_id: bytes) -> FillWatch | None:
        """A watch set when the entry is next announced; None when announcements cannot be relied on."""

    def unwatch(self, entry_id: bytes, watch: FillWatch) -> None: ...

    def close(self) -> None: ...


class NoCoherence:
    """L1 is always trusted (``coherence=False``: copies can be stale until ``l1_ttl``)."""

    def trusted(self) -> bool:
        return True

    def watch(self, entry_id: bytes) -> FillWatch | None:
        return None  # nobody listens: waiting for a fill polls

    def unwatch(self, entry_id: bytes, watch: FillWatch) -> None:
        return None

    def close(self) -> None:
        return None


class InvalidationListener:
    """Keeps one namespace's ``l1`` coherent with the fleet: what a :class:`Subscriber` hears on the
    namespace's channels (one per shard) is applied here. The process's caches on one Redis share one
    subscriber (:func:`listen`); a listener built with its own ``connect`` gets a subscriber of its own.

    L1 is trusted while every one of its channels is subscribed: a channel lost (its connection, its
    node, its slot moved) distrusts and flushes the whole namespace's L1 until all are back.
    """

    FORK_ORDER = 1  # after L1 and the other locks are fresh (see forksafe)

    def __init__(self, connect: Callable[[Address], Any] | None, channels: bytes | tuple[bytes, ...], l1: LocalCache,
                 clock: Callable[[], float] | None = None, namespace: str | None = None,
                 subscriber: Subscriber | None = None) -> None:
        if subscriber is None:
            if connect is None:
                raise ValueError("a listener needs a subscriber or a connection factory")
            subscriber = Subscriber(connect)
        self.subscriber = subscriber
        self.channels = (channels,) if isinstance(channels, bytes) else tuple(channels)
        self.channel = self.channels[0]
        # (for log messages: the namespace's channels, by the first one's name)
        self._channel_text = self.channel.decode("utf-8", "backslashreplace") + (
            f" (+{len(self.channels) - 1} more)" if len(self.channels) > 1 else "")
        self.namespace = namespace
        self.l1 = l1
        self._clock = clock or l1.clock  # the reading L1 compares its copies' request times with
        self.messages = 0
        self.flushes = 0
        self.subscriptions = 0
        self._started = False
        self._init_state()
        forksafe.register(self)

    def _init_state(self) -> None:
        self._set_healthy(False)
        self._missing = set(self.channels)  # channels not subscribed now (the subscriber's lock held)
        self._stop = threading.Event()
        self._first_try = threading.Event()
        self._warned = False
        self._watches: dict[bytes, list[FillWatch]] = {}  # entry id -> watches of get_or_set calls waiting
        self._watch_lock = threading.Lock()

    def start(self, wait: float) -> InvalidationListener:
        """Start listening; wait up to ``wait`` seconds for the first subscription attempt."""
        self._started = True
        _attach(self)
        self._first_try.wait(wait)
        return self

    # The subscriber's, for tests and the CLI that look at the connection or hold the thread up.
    @property
    def _lock(self) -> threading.Lock:
        return self.subscriber._lock

    @property
    def _thread(self) -> threading.Thread:
        return self.subscriber._thread

    @property
    def _conn(self) -> Any:
        """The connection carrying this namespace's first channel (None while it has none)."""
        return self.subscriber.connection_of(self.channel)

    def _set_healthy(self, healthy: bool) -> None:
        # L1 holds its own copy of the flag, which its hit path reads (see LocalCache.trusted).
        self._healthy = healthy
        self.l1.trusted = healthy

    @property
    def healthy(self) -> bool:
        return self._healthy

    def trusted(self) -> bool:
        """True if L1 may be served: the channels are up and nothing was lost (no I/O, no lock: the
        thread applies messages as they arrive)."""
        return self._healthy

    def watch(self, entry_id: bytes) -> FillWatch | None:
        """A watch set when a message names ``entry_id`` (see :class:`FillWatch`); None while a channel
        is down (messages may be lost: the caller polls)."""
        if not self._healthy:
            return None
        watch = FillWatch()
        with self._watch_lock:
            self._watches.setdefault(entry_id, []).append(watch)
        if not self._healthy:  # lost meanwhile: the wake-up of everyone may have come before the add
            watch.set()
        return watch

    def unwatch(self, entry_id: bytes, watch: FillWatch) -> None:
        with self._watch_lock:
            watches = self._watches.get(entry_id)
            if watches is not None and watch in watches:
                watches.remove(watch)
                if not watches:
                    del self._watches[entry_id]

    def _wake(self, entry_id: bytes | None) -> None:
        """Set the watches of ``entry_id`` (None: all of them)."""
        if not self._watches:  # (read without the lock: a watch added meanwhile checks again, above)
            return
        with self._watch_lock:
            if entry_id is None:
                woken = [w for watches in self._watches.values() for w in watches]
                self._watches.clear()
            else:
                woken = self._watches.pop(entry_id, [])
        for watch in woken:
            watch.set()

    def catch_up(self) -> None:
        """Apply, now, every message that has reached this process. Readers do not wait for the thread
        (that would cost every L1 hit a lock and a poll), so a message may be applied a thread switch
        after it arrived; a caller that needs "everything received is applied" (a deterministic test)
        calls this."""
        self.subscriber.catch_up()

    def close(self) -> None:
        """Stop listening (idempotent): its channels are unsubscribed; the last listener of a subscriber
        closes its connections and stops its thread."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._set_healthy(False)  # nobody applies invalidations any more: L1 must not be served
        self._wake(None)  # nor wakes a waiting get_or_set: it looks in Redis (and polls from then on)
        _detach(self)

    # ------------------------------------------------- called by the subscriber (its lock held)

    def _message(self, data: bytes) -> None:
        self._apply(data)
        self.messages += 1  # after: whoever sees the count (a metric, a test) sees the message applied

    def _apply(self, data: bytes) -> None:
        try:
            if data.startswith(b"*"):
                shard, _, flushed_at = data[1:].partition(b" ")
                self.l1.invalidate_shard(int(shard), int(flushed_at))
                self._wake(None)
                return
            for entry_id, version, payload in parse_announcements(data):
                self.l1.invalidate(entry_id, version, payload)
                self._wake(entry_id)
        except ValueError as exc:  # a message we cannot read: be safe
            log.warning("unreadable invalidation on %r (%s); clearing L1", self._channel_text, exc,
                        extra=self._fields("invalidation_unreadable", error=str(exc)))
            self._clear_l1()
            self._wake(None)

    def _fields(self, event: str, **more: Any) -> dict[str, Any]:
        """The structured fields of a log record (``extra=``)."""
        return {"event": event, "namespace": self.namespace, "channel": self._channel_text, **more}

    def _clear_l1(self) -> None:
        self.l1.clear(at=self._clock())

    def _lost(self, why: str, channels: Iterable[bytes] | None = None) -> None:
        """Messages on ``channels`` (None: all) may have been missed: distrust and flush L1."""
        self._missing.update(self.channels if channels is None else channels)
        was_healthy = self._healthy
        self._set_healthy(False)  # first: readers stop trusting L1 at once
        self._wake(None)  # waiting get_or_set calls look in Redis, then poll
        if was_healthy:
            log.warning("invalidation channel %r lost (%s); L1 flushed and bypassed until it is back",
                        self._channel_text, why, extra=self._fields("invalidation_channel_lost", error=why))
        self._clear_l1()
        self.flushes += 1

    def _subscribed(self, channel: bytes) -> None:
        """The server confirmed ``channel``: once every channel is, every message is heard from now on."""
        self._missing.discard(channel)
        if self._missing or self._healthy or self._stop.is_set():
            return
        self._clear_l1()  # whatever happened before these subscriptions was not heard
        self.flushes += 1
        self.subscriptions += 1
        self._set_healthy(True)
        self._first_try.set()
        if self.subscriptions > 1:
            log.warning("invalidation channel %r is back; L1 trusted again", self._channel_text,
                        extra=self._fields("invalidation_channel_back"))

    def _cannot_subscribe(self, exc: BaseException) -> None:
        """Redis is down, or refuses a channel: L1 stays bypassed; the subscriber tries again later."""
        text = str(exc)
        refused = "NOPERM" in text or "permission" in text or "no permissions" in text
        if refused and not self._warned:  # would stay so: say how to fix it, once
            self._warned = True
            log.warning("cannot subscribe to %r: %s. L1 is bypassed until it can; grant the channels "
                        "and SSUBSCRIBE (README section 'Security')", self._channel_text, exc,
                        extra=self._fields("invalidation_subscribe_refused", error=text))
        log.debug("cannot subscribe to %r yet: %s", self._channel_text, exc)
        self._first_try.set()

    def _after_fork(self) -> None:
        # The child starts afresh (its subscriber subscribes again): its first subscription is its own
        # first, not one "back" after a loss.
        closed = self._stop.is_set()
        self.subscriptions = 0
        self._clear_l1()
        self._init_state()
        if closed:
            self._stop.set()


class _Link:
    """One subscribed connection (to one node, on a cluster) and the channels routed to it."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.conn: Any = None  # a redis-py Connection (its API is untyped)
        self.channels: set[bytes] = set()  # the channels this node is to carry
        self.confirmed: set[bytes] = set()  # those the server confirmed on this connection
        self.pending: deque[bytes] = deque()  # channels of the SSUBSCRIBEs sent, in order, unanswered
        self.retry: dict[bytes, float] = {}  # a refused channel -> when to ask again (monotonic)
        self.refusals: dict[bytes, float] = {}  # a refused channel -> its current pause, seconds
        self.last_seen = self.last_ping = time.monotonic()
        self.backoff = 0.05  # the pause before the next connection attempt after a failed one
        self.next_try = 0.0  # no connection attempt before this (monotonic)


class Subscriber:
    """The subscribed connections and the one thread that waits on them, for any number of channels;
    each channel's messages go to its listeners.

    Invalidations use sharded pub/sub: the scripts SPUBLISH on the shard's channel, which lives in the
    shard's hash slot. On a standalone Redis one connection carries every channel; on a cluster each
    channel is subscribed (SSUBSCRIBE) on the master owning its slot, one connection per master, and
    the subscriber follows the cluster: a connection lost (a failover), a channel the server drops
    (its slot moved away: Redis sends ``sunsubscribe``) or refuses with MOVED make it read the slot
    map again and subscribe the channel where it lives now. Meanwhile the listeners of those channels
    distrust their L1 (see :class:`InvalidationListener`).

    * the thread waits on the sockets (``select``) and applies each message as soon as it arrives; it
      pings each server every second and reconnects;
    * a channel the server refuses (ACL) is asked for again, with a growing pause, while others go on;
    * a listener that closes unsubscribes its channels (those no other listener of this process wants);
      the last one out closes the connections and stops the thread.

    Every socket write and read happens with ``_lock`` held; ``select`` waits without it.
    """

    FORK_ORDER = 2  # after the listeners are fresh (see forksafe)

    def __init__(self, connect: Callable[[Address], Any], key: Any = None, routes: SubscriberRoutes | None = None
                 ) -> None:
        self._connect = connect
        self.routes = routes  # where each channel lives (None: every channel on the one server)
        self.key = key  # its key in the process's registry (None: a private one)
        self._channels: dict[bytes, list[InvalidationListener]] = {}
        self.shut = False  # its last listener has gone: never used again
        self._init_state()
        forksafe.register(self)

    @property
    def sharded(self) -> bool:
        return self.routes is not None and self.routes.sharded

    def _init_state(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()  # closing wakes the thread's select()
        self._lock = threading.Lock()
        self._links: dict[Address, _Link] = {}
        self._where: dict[bytes, _Link] = {}  # channel -> the link it is routed to
        self._stop = threading.Event()
        self._reroute = self.sharded  # read the slot map before subscribing anything
        self._routed_at = 0.0  # when the slot map was last read (monotonic)
        self._route_backoff = 0.05
        self._running = False
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)

    @property
    def channels(self) -> list[bytes]:
        return list(self._channels)

    def connection_of(self, channel: bytes) -> Any:
        link = self._where.get(channel)
        return None if link is None else link.conn

    def links(self) -> dict[Address, int]:
        """Each connected node and how many channels it carries (for the CLI and the tests)."""
        with self._lock:
            return {link.address: len(link.confirmed) for link in self._links.values() if link.conn is not None}

    def catch_up(self) -> None:
        with self._lock:
            for link in list(self._links.values()):
                self._drain(link)

    # ------------------------------------------------------ listeners come and go (registry lock held)

    def _add(self, listener: InvalidationListener) -> None:
        with self._lock:
            for channel in listener.channels:
                listeners = self._channels.setdefault(channel, [])
                listeners.append(listener)
                link = self._where.get(channel)
                if link is not None and channel in link.confirmed:  # another listener of this process has it
                    listener._subscribed(channel)
                elif len(listeners) == 1:
                    self._route(channel)
            if not self._running:
                self._running = True
                self._thread.start()
        self._poke()

    def _remove(self, listener: InvalidationListener) -> bool:
        """Take ``listener`` out; True if it was the last one (the caller then closes this subscriber)."""
        with self._lock:
            for channel in listener.channels:
                listeners = self._channels.get(channel, [])
                if listener in listeners:
                    listeners.remove(listener)
                if not listeners and channel in self._channels:
                    del self._channels[channel]
                    self._unroute(channel)
            return not self._channels

    def _close(self) -> None:
        self._stop.set()
        self._poke()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            for link in self._links.values():
                self._drop_connection(link)
            self._links.clear()
            self._where.clear()
        self._wake_r.close()
        self._wake_w.close()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # closed: nobody waits
            self._wake_w.send(b"x")

    # ------------------------------------------------------------------ internals (lock held)

    def _route(self, channel: bytes) -> None:
        """Send ``channel`` to the link of the node that carries it (subscribed at once if connected)."""
        address = self.routes.owner(channel) if self.routes is not None else None
        if self.sharded and address is None:  # no slot map yet, or the slot has no master now
            self._reroute = True
            return
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _Link(address)
        link.channels.add(channel)
        self._where[channel] = link
        if link.conn is not None:
            self._send_subscribe(link, channel)

    def _unroute(self, channel: bytes) -> None:
        link = self._where.pop(channel, None)
        if link is None:
            return
        link.channels.discard(channel)
        link.retry.pop(channel, None)
        link.refusals.pop(channel, None)
        if link.conn is not None and (channel in link.confirmed or channel in link.pending):
            link.confirmed.discard(channel)
            try:
                link.conn.send_command("SUNSUBSCRIBE", channel)
            except Exception as exc:  # the connection is failing: the thread notices
                log.debug("unsubscribing %r: %s", channel, exc)

    def _listeners_of(self, channels: Iterable[bytes]) -> dict[InvalidationListener, list[bytes]]:
        out: dict[InvalidationListener, list[bytes]] = {}
        for channel in channels:
            for listener in self._channels.get(channel, ()):
                out.setdefault(listener, []).append(channel)
        return out

    def _send_subscribe(self, link: _Link, channel: bytes) -> None:
        # One channel per SSUBSCRIBE: an error reply (an ACL refusal, MOVED) then names the channel it is
        # about (and on a cluster the channels of one call must share a slot anyway).
        try:
            link.conn.send_command("SSUBSCRIBE", channel)
        except Exception as exc:  # a failed write is a lost connection
            self._lost(link, f"subscribe failed: {exc}")
            return
        link.pending.append(channel)

    def _drain(self, link: _Link) -> None:
        conn = link.conn
        if conn is None:
            return
        try:
            while conn.can_read(timeout=0):
                try:
                    reply = conn.read_response(push_request=True)  # redis-py would hand it to a push hook
                except ResponseError as exc:  # an answered SSUBSCRIBE refused: the connection is fine
                    self._refused(link, exc)
                    continue
                self._handle(link, reply)
                if link.conn is None:
                    return
        except Exception as exc:  # any failure of the socket or the reply means messages may be lost
            self._lost(link, f"subscriber connection failed: {exc}")

    def _handle(self, link: _Link, reply: Any) -> None:
        link.last_seen = time.monotonic()
        if not isinstance(reply, list) or not reply:
            return
        kind = reply[0]
        if kind in (b"smessage", b"message") and len(reply) == 3:
            for listener in self._channels.get(reply[1], ()):
                listener._message(reply[2])
        elif kind == b"ssubscribe" and len(reply) >= 2:
            channel = reply[1]
            with contextlib.suppress(ValueError):
                link.pending.remove(channel)
            link.refusals.pop(channel, None)
            if channel not in link.channels:  # its listeners left (or it was routed elsewhere) meanwhile
                link.conn.send_command("SUNSUBSCRIBE", channel)
                return
            link.confirmed.add(channel)
            for listener in self._channels.get(channel, ()):
                listener._subscribed(channel)
        elif kind == b"sunsubscribe" and len(reply) >= 2 and reply[1] in link.confirmed:
            # Not asked for: the server dropped the channel (its slot moved to another master, or this
            # node became a replica). Messages may be published where we do not listen: distrust, move.
            channel = reply[1]
            link.confirmed.discard(channel)
            for listener, channels in self._listeners_of([channel]).items():
                listener._lost("the channel's slot moved", channels)
            self._unroute(channel)
            self._reroute = True

    def _refused(self, link: _Link, exc: ResponseError) -> None:
        if not link.pending:
            log.debug("unexpected error reply on the subscriber connection: %s", exc)
            return
        channel = link.pending.popleft()
        if str(exc).startswith(("MOVED", "ASK")):  # the slot map changed: read it again, route again
            self._unroute(channel)
            self._reroute = True
            return
        pause = link.refusals.get(channel, 0.025) * 2
        link.refusals[channel] = min(pause, RECONNECT_MAX)
        link.retry[channel] = time.monotonic() + link.refusals[channel]
        for listener in self._channels.get(channel, ()):
            listener._cannot_subscribe(exc)

    def _ask_again(self, link: _Link) -> None:
        """SSUBSCRIBE again the refused channels whose pause is over."""
        if not link.retry or link.conn is None:
            return
        now = time.monotonic()
        for channel, at in list(link.retry.items()):
            if at <= now:
                del link.retry[channel]
                if channel in link.channels:
                    self._send_subscribe(link, channel)

    def _lost(self, link: _Link, why: str) -> None:
        for listener, channels in self._listeners_of(link.channels).items():
            listener._lost(why, channels)
        self._drop_connection(link)
        if self.sharded:  # the node may be gone for good (a failover): ask the cluster where its slots are
            self._reroute = True

    def _drop_connection(self, link: _Link) -> None:
        link.confirmed.clear()
        link.pending.clear()
        link.retry.clear()
        if link.conn is not None:
            try:
                link.conn.disconnect()
            except Exception as exc:  # closing a broken socket may fail too; it is gone either way
                log.debug("closing the subscriber connection: %s", exc)
            link.conn = None

    def _install(self, link: _Link, conn: Any) -> None:
        """A new connection: SSUBSCRIBE each of the link's channels on it (trusted once confirmed)."""
        link.conn = conn
        link.backoff = 0.05
        link.last_seen = link.last_ping = time.monotonic()
        for channel in sorted(link.channels):
            self._send_subscribe(link, channel)

    def _keep_alive(self, link: _Link) -> None:
        if link.conn is None:
            return
        now = time.monotonic()
        if now - link.last_seen > SILENCE:
            self._lost(link, f"no reply for {SILENCE:.0f} s")
            return
        if now - link.last_ping >= PING_INTERVAL:
            link.last_ping = now
            try:
                link.conn.send_command("PING")
            except Exception as exc:  # a failed write is a lost connection
                self._lost(link, f"ping failed: {exc}")

    def _apply_routes(self) -> None:
        """Route every channel to the master that owns its slot now; a channel that moves is lost until
        it is confirmed there (its listeners distrust L1 meanwhile)."""
        assert self.routes is not None
        moved: list[bytes] = []
        for channel in list(self._channels):
            link = self._where.get(channel)
            owner = self.routes.owner(channel)
            if link is not None and link.address == owner:
                continue
            if link is not None:
                if channel in link.confirmed:
                    moved.append(channel)
                self._unroute(channel)
            self._route(channel)
        for listener, channels in self._listeners_of(moved).items():
            listener._lost("the channel's slot moved", channels)
        for address, link in list(self._links.items()):
            if not link.channels:  # a node that carries nothing now (a former master, say)
                self._drop_connection(link)
                del self._links[address]

    # ------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._listen()
        except Exception:  # never expected; but with nobody applying invalidations L1 must not be trusted
            with self._lock:
                listeners = {listener for group in self._channels.values() for listener in group}
            for listener in listeners:
                log.exception("the invalidation listener on %r stopped; L1 is bypassed from now on",
                              listener._channel_text, extra=listener._fields("invalidation_listener_failed"))
        finally:
            for group in list(self._channels.values()):
                for listener in group:
                    listener._set_healthy(False)

    def _refresh_routes(self) -> None:
        """Read the slot map (network I/O: without the lock), then route by it."""
        assert self.routes is not None
        now = time.monotonic()
        if not self._reroute and now - self._routed_at < ROUTES_INTERVAL:
            return
        if self._reroute and now - self._routed_at < self._route_backoff:
            return  # (a cluster in the middle of a failover: not every few ms)
        self._routed_at = now
        try:
            self.routes.refresh()
        except Exception as exc:  # no node answers: try again later, the channels stay lost meanwhile
            self._route_backoff = min(self._route_backoff * 2, RECONNECT_MAX)
            with self._lock:
                for listener in {listener for group in self._channels.values() for listener in group}:
                    listener._cannot_subscribe(exc)
            return
        self._route_backoff = 0.05
        with self._lock:
            self._reroute = False
            self._apply_routes()

    def _listen(self) -> None:
        while not self._stop.is_set():
            if self.sharded:
                self._refresh_routes()
            with self._lock:
                idle = [link for link in self._links.values()
                        if link.conn is None and link.channels and link.next_try <= time.monotonic()]
            for link in idle:
                try:
                    conn = self._connect(link.address)  # outside the lock: closing never waits for the network
                    conn.connect()
                except Exception as exc:  # Redis down or refusing: try again later, L1 stays bypassed
                    with self._lock:
                        for listener in self._listeners_of(link.channels):
                            listener._cannot_subscribe(exc)
                        link.next_try = time.monotonic() + link.backoff
                        link.backoff = min(link.backoff * 2, RECONNECT_MAX)
                        if self.sharded:
                            self._reroute = True
                    continue
                with self._lock:
                    if self._stop.is_set() or self._links.get(link.address) is not link:  # closed, or gone
                        conn.disconnect()
                        continue
                    self._install(link, conn)
            # Drain before waiting: a reply read together with the last one (SSUBSCRIBE's, say) may sit
            # in redis-py's buffer, where select() cannot see it. After a drain nothing complete is left.
            with self._lock:
                for link in list(self._links.values()):
                    self._drain(link)
                    self._ask_again(link)
                    self._keep_alive(link)
            self._wait_for_data()

    def _wait_for_data(self) -> None:
        socks = [sock for link in list(self._links.values())
                 if (sock := getattr(link.conn, "_sock", None)) is not None]
        wait = PING_INTERVAL / 4
        if not socks or any(link.conn is None and link.channels for link in list(self._links.values())):
            wait = 0.05  # a connection to make (after its pause): do not sleep past it
        try:
            readable, _, _ = select.select([*socks, self._wake_r], [], [], wait)
            if self._wake_r in readable:
                self._wake_r.recv(64)
        except (OSError, ValueError):  # a socket was closed under us; the next drain notices
            self._stop.wait(0.01)

    def _after_fork(self) -> None:
        # The child shares the parent's sockets: never read or close them here; start afresh, for the
        # listeners it still has.
        channels = list(self._channels)
        self._init_state()
        for channel in channels:
            self._route(channel)
        if self._channels and not self.shut:
            self._running = True
            self._thread.start()


THREAD_NAME = "victor-rcache-invalidation"
ROUTES_INTERVAL = 10.0  # seconds: the slot map is read again at least this often on a cluster


class _Registry:
    """The process's shared subscribers, by connection key; its lock orders listeners coming and going."""

    FORK_ORDER = 0

    def __init__(self) -> None:
        self.subscribers: dict[Any, Subscriber] = {}
        self._after_fork()
        forksafe.register(self)

    def _after_fork(self) -> None:
        self.lock = threading.Lock()  # (the subscribers themselves start afresh: see Subscriber)


_REGISTRY = _Registry()


def listen(key: Any, routes: Callable[[], SubscriberRoutes], channels: tuple[bytes, ...], l1: LocalCache,
           wait: float, clock: Callable[[], float] | None = None,
           namespace: str | None = None) -> InvalidationListener:
    """A started listener of ``channels`` on the process's subscriber for ``key`` (the connection
    settings), made on first use with the routes ``routes()`` returns."""
    with _REGISTRY.lock:
        subscriber = _REGISTRY.subscribers.get(key)
        if subscriber is None or subscriber.shut:
            found = routes()
            subscriber = _REGISTRY.subscribers[key] = Subscriber(found.connect, key, found)
    listener = InvalidationListener(None, channels, l1, clock=clock, namespace=namespace, subscriber=subscriber)
    return listener.start(wait)


def _attach(listener: InvalidationListener) -> None:
    with _REGISTRY.lock:
        subscriber = listener.subscriber
        if subscriber.shut:  # its last listener left between listen()'s lookup and now: the key's new one
            key = subscriber.key
            found = _REGISTRY.subscribers.get(key) if key is not None else None
            if found is None or found.shut:
                found = Subscriber(subscriber._connect, key, subscriber.routes)
                if key is not None:
                    _REGISTRY.subscribers[key] = found
            subscriber = listener.subscriber = found
        subscriber._add(listener)


def _detach(listener: InvalidationListener) -> None:
    subscriber = listener.subscriber
    with _REGISTRY.lock:
        last = subscriber._remove(listener)
        if last:
            subscriber.shut = True
            if subscriber.key is not None and _REGISTRY.subscribers.get(subscriber.key) is subscriber:
                del _REGISTRY.subscribers[subscriber.key]
    if last:
        subscriber._close()
