"""Fleet coherence: every process drops its L1 copy of a value another process changed.

The scripts publish on ``<ns>:inval`` whenever they really change a value (see
``lua/includes/shard.lua``): one line ``<length of id>:<id> <version>`` per changed entry, or
``*<shard> <version>`` when a shard is flushed. An :class:`InvalidationListener` per cache applies
those messages to its L1; the caches of one process on one Redis (same URL and connection settings)
share one :class:`Subscriber`: one subscribed connection and one thread for all their channels, which
hands each channel's messages to that namespace's listener:

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
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from redis.exceptions import ResponseError

from . import forksafe
from .l1 import LocalCache

log = logging.getLogger("victor_rcache")

PING_INTERVAL = 1.0  # seconds between health pings on the subscriber connection
SILENCE = 3.0  # seconds without any reply after which the connection is considered lost
RECONNECT_MAX = 2.0  # cap of the reconnect backoff, seconds


def parse_invalidation(data: bytes) -> list[tuple[bytes, int]]:
    """``b"13:read the file 42\\n..."`` -> ``[(b"read the file", 42), ...]`` (ids may hold any byte)."""
    out, pos = [], 0
    while pos < len(data):
        colon = data.index(b":", pos)
        start = colon + 1
        end = start + int(data[pos:colon])
        if data[end:end + 1] != b" ":
            raise ValueError(f"malformed invalidation at byte {pos}")
        newline = data.index(b"\n", end)
        out.append((data[start:end], int(data[end + 1:newline])))
        pos = newline + 1
    return out


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
    namespace's channel is applied here. The process's caches on one Redis share one subscriber
    (:func:`listen`); a listener built with its own ``connect`` gets a subscriber of its own."""

    FORK_ORDER = 1  # after L1 and the other locks are fresh (see forksafe)

    def __init__(self, connect: Callable[[], Any] | None, channel: bytes, l1: LocalCache,
                 clock: Callable[[], float] | None = None, namespace: str | None = None,
                 subscriber: Subscriber | None = None) -> None:
        if subscriber is None:
            if connect is None:
                raise ValueError("a listener needs a subscriber or a connection factory")
            subscriber = Subscriber(connect)
        self.subscriber = subscriber
        self.channel = channel
        self._channel_text = channel.decode("utf-8", "backslashreplace")  # (for log messages)
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
        return self.subscriber._conn

    def _set_healthy(self, healthy: bool) -> None:
        # L1 holds its own copy of the flag, which its hit path reads (see LocalCache.trusted).
        self._healthy = healthy
        self.l1.trusted = healthy

    @property
    def healthy(self) -> bool:
        return self._healthy

    def trusted(self) -> bool:
        """True if L1 may be served: the channel is up and nothing was lost (no I/O, no lock: the
        thread applies messages as they arrive)."""
        return self._healthy

    def watch(self, entry_id: bytes) -> FillWatch | None:
        """A watch set when a message names ``entry_id`` (see :class:`FillWatch`); None while the channel
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
        """Stop listening (idempotent): the channel is unsubscribed; the last listener of a subscriber
        closes its connection and stops its thread."""
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
            for entry_id, version in parse_invalidation(data):
                self.l1.invalidate(entry_id, version)
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

    def _lost(self, why: str) -> None:
        was_healthy = self._healthy
        self._set_healthy(False)  # first: readers stop trusting L1 at once
        self._wake(None)  # waiting get_or_set calls look in Redis, then poll
        if was_healthy:
            log.warning("invalidation channel %r lost (%s); L1 flushed and bypassed until it is back",
                        self._channel_text, why, extra=self._fields("invalidation_channel_lost", error=why))
        self._clear_l1()
        self.flushes += 1

    def _installed(self) -> None:
        """The server confirmed the subscription: from now on every message is heard."""
        if self._stop.is_set():
            return
        self._clear_l1()  # whatever happened before this subscription was not heard
        self.flushes += 1
        self.subscriptions += 1
        self._set_healthy(True)
        self._first_try.set()
        if self.subscriptions > 1:
            log.warning("invalidation channel %r is back; L1 trusted again", self._channel_text,
                        extra=self._fields("invalidation_channel_back"))

    def _cannot_subscribe(self, exc: BaseException) -> None:
        """Redis is down, or refuses the channel: L1 stays bypassed; the subscriber tries again later."""
        text = str(exc)
        refused = "NOPERM" in text or "permission" in text or "no permissions" in text
        if refused and not self._warned:  # would stay so: say how to fix it, once
            self._warned = True
            log.warning("cannot subscribe to %r: %s. L1 is bypassed until it can; grant the channel "
                        "and SUBSCRIBE (README section 'Security')", self._channel_text, exc,
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


class Subscriber:
    """One subscribed connection and the thread that waits on it, for any number of channels; each
    channel's messages go to its listeners.

    * the thread waits on the socket (``select``) and applies each message as soon as it arrives; it
      pings the server every second and reconnects;
    * a channel is trusted once the server confirms its SUBSCRIBE; a channel the server refuses (ACL)
      is asked for again, with a growing pause, while the others go on;
    * when the connection breaks or goes silent, every listener it served distrusts and flushes its
      L1, until its channel is confirmed on a new connection;
    * a listener that closes unsubscribes its channel (if no other listener of this process wants it);
      the last one out closes the connection and stops the thread.

    Every socket write and read happens with ``_lock`` held; ``select`` waits without it.
    """

    FORK_ORDER = 2  # after the listeners are fresh (see forksafe)

    def __init__(self, connect: Callable[[], Any], key: Any = None) -> None:
        self._connect = connect
        self.key = key  # its key in the process's registry (None: a private one)
        self._channels: dict[bytes, list[InvalidationListener]] = {}
        self.shut = False  # its last listener has gone: never used again
        self._init_state()
        forksafe.register(self)

    def _init_state(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()  # close() wakes the thread's select()
        self._lock = threading.Lock()
        self._conn: Any = None  # a redis-py Connection (its API is untyped)
        self._stop = threading.Event()
        self._confirmed: set[bytes] = set()  # channels subscribed on this connection
        self._pending: deque[bytes] = deque()  # channels of the SUBSCRIBEs sent, in order, unanswered
        self._retry: dict[bytes, float] = {}  # a refused channel -> when to ask again (monotonic)
        self._refusals: dict[bytes, float] = {}  # a refused channel -> its current pause, seconds
        self._last_seen = self._last_ping = time.monotonic()
        self._running = False
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)

    @property
    def channels(self) -> list[bytes]:
        return list(self._channels)

    def catch_up(self) -> None:
        with self._lock:
            self._drain()

    # ------------------------------------------------------ listeners come and go (registry lock held)

    def _add(self, listener: InvalidationListener) -> None:
        with self._lock:
            listeners = self._channels.setdefault(listener.channel, [])
            listeners.append(listener)
            if listener.channel in self._confirmed:  # another listener of this process has it already
                listener._installed()
            elif len(listeners) == 1 and self._conn is not None:
                self._send_subscribe(listener.channel)
            if not self._running:
                self._running = True
                self._thread.start()
        self._poke()

    def _remove(self, listener: InvalidationListener) -> bool:
        """Take ``listener`` out; True if it was the last one (the caller then closes this subscriber)."""
        with self._lock:
            listeners = self._channels.get(listener.channel, [])
            if listener in listeners:
                listeners.remove(listener)
            if not listeners and listener.channel in self._channels:
                channel = listener.channel
                del self._channels[channel]
                self._retry.pop(channel, None)
                self._refusals.pop(channel, None)
                if self._conn is not None and (channel in self._confirmed or channel in self._pending):
                    self._confirmed.discard(channel)
                    try:
                        self._conn.send_command("UNSUBSCRIBE", channel)
                    except Exception as exc:  # the connection is failing: the thread notices
                        log.debug("unsubscribing %r: %s", channel, exc)
            return not self._channels

    def _close(self) -> None:
        self._stop.set()
        self._poke()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            self._drop_connection()
        self._wake_r.close()
        self._wake_w.close()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # closed: nobody waits
            self._wake_w.send(b"x")

    # ------------------------------------------------------------------ internals (lock held)

    def _listeners(self) -> list[InvalidationListener]:
        return [listener for listeners in self._channels.values() for listener in listeners]

    def _send_subscribe(self, channel: bytes) -> None:
        # One channel per SUBSCRIBE: an error reply (an ACL refusal) then names the channel it is about.
        try:
            self._conn.send_command("SUBSCRIBE", channel)
        except Exception as exc:  # a failed write is a lost connection
            self._lost(f"subscribe failed: {exc}")
            return
        self._pending.append(channel)

    def _drain(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.can_read(timeout=0):
                try:
                    reply = conn.read_response(push_request=True)  # redis-py would hand it to a push hook
                except ResponseError as exc:  # an answered SUBSCRIBE refused: the connection is fine
                    self._refused(exc)
                    continue
                self._handle(reply)
        except Exception as exc:  # any failure of the socket or the reply means messages may be lost
            self._lost(f"subscriber connection failed: {exc}")

    def _handle(self, reply: Any) -> None:
        self._last_seen = time.monotonic()
        if not isinstance(reply, list) or not reply:
            return
        kind = reply[0]
        if kind == b"message" and len(reply) == 3:
            for listener in self._channels.get(reply[1], ()):
                listener._message(reply[2])
        elif kind == b"subscribe" and len(reply) >= 2:
            channel = reply[1]
            with contextlib.suppress(ValueError):
                self._pending.remove(channel)
            self._refusals.pop(channel, None)
            listeners = self._channels.get(channel)
            if listeners is None:  # its listeners left meanwhile
                self._conn.send_command("UNSUBSCRIBE", channel)
                return
            self._confirmed.add(channel)
            for listener in listeners:
                if not listener.healthy:
                    listener._installed()

    def _refused(self, exc: ResponseError) -> None:
        if not self._pending:
            log.debug("unexpected error reply on the subscriber connection: %s", exc)
            return
        channel = self._pending.popleft()
        pause = self._refusals.get(channel, 0.025) * 2
        self._refusals[channel] = min(pause, RECONNECT_MAX)
        self._retry[channel] = time.monotonic() + self._refusals[channel]
        for listener in self._channels.get(channel, ()):
            listener._cannot_subscribe(exc)

    def _ask_again(self) -> None:
        """SUBSCRIBE again the refused channels whose pause is over."""
        if not self._retry or self._conn is None:
            return
        now = time.monotonic()
        for channel, at in list(self._retry.items()):
            if at <= now:
                del self._retry[channel]
                if channel in self._channels:
                    self._send_subscribe(channel)

    def _lost(self, why: str) -> None:
        for listener in self._listeners():
            listener._lost(why)
        self._drop_connection()

    def _drop_connection(self) -> None:
        self._confirmed.clear()
        self._pending.clear()
        self._retry.clear()
        if self._conn is not None:
            try:
                self._conn.disconnect()
            except Exception as exc:  # closing a broken socket may fail too; it is gone either way
                log.debug("closing the subscriber connection: %s", exc)
            self._conn = None

    def _install(self, conn: Any) -> None:
        """A new connection: SUBSCRIBE every channel on it (each is trusted once confirmed)."""
        self._conn = conn
        self._last_seen = self._last_ping = time.monotonic()
        for channel in self._channels:
            self._send_subscribe(channel)

    def _keep_alive(self) -> None:
        if self._conn is None:
            return
        now = time.monotonic()
        if now - self._last_seen > SILENCE:
            self._lost(f"no reply for {SILENCE:.0f} s")
            return
        if now - self._last_ping >= PING_INTERVAL:
            self._last_ping = now
            try:
                self._conn.send_command("PING")
            except Exception as exc:  # a failed write is a lost connection
                self._lost(f"ping failed: {exc}")

    # ------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._listen()
        except Exception:  # never expected; but with nobody applying invalidations L1 must not be trusted
            for listener in self._listeners():
                log.exception("the invalidation listener on %r stopped; L1 is bypassed from now on",
                              listener._channel_text, extra=listener._fields("invalidation_listener_failed"))
        finally:
            for listener in self._listeners():
                listener._set_healthy(False)

    def _listen(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            if self._conn is None:
                try:
                    conn = self._connect()  # outside the lock: closing never waits for the network
                    conn.connect()
                except Exception as exc:  # Redis down or refusing: try again later, L1 stays bypassed
                    with self._lock:
                        for listener in self._listeners():
                            listener._cannot_subscribe(exc)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX)
                    continue
                with self._lock:
                    if self._stop.is_set():  # closed while we were connecting
                        conn.disconnect()
                        return
                    self._install(conn)
                backoff = 0.05
            # Drain before waiting: a reply read together with the last one (SUBSCRIBE's, say) may sit
            # in redis-py's buffer, where select() cannot see it. After a drain nothing complete is left.
            with self._lock:
                self._drain()
                self._ask_again()
                self._keep_alive()
            self._wait_for_data()

    def _wait_for_data(self) -> None:
        conn = self._conn
        sock = getattr(conn, "_sock", None)
        if sock is None:
            self._stop.wait(0.05)
            return
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], PING_INTERVAL / 4)
            if self._wake_r in readable:
                self._wake_r.recv(64)
        except (OSError, ValueError):  # the socket was closed under us; the next drain notices
            self._stop.wait(0.01)

    def _after_fork(self) -> None:
        # The child shares the parent's socket: never read or close it here; start afresh, for the
        # listeners it still has.
        self._init_state()
        if self._channels and not self.shut:
            self._running = True
            self._thread.start()


THREAD_NAME = "victor-rcache-invalidation"


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


def listen(key: Any, connect: Callable[[], Callable[[], Any]], channel: bytes, l1: LocalCache, wait: float,
           clock: Callable[[], float] | None = None, namespace: str | None = None) -> InvalidationListener:
    """A started listener of ``channel`` on the process's subscriber for ``key`` (the connection
    settings), made on first use with the connection factory ``connect()`` returns."""
    with _REGISTRY.lock:
        subscriber = _REGISTRY.subscribers.get(key)
        if subscriber is None or subscriber.shut:
            subscriber = _REGISTRY.subscribers[key] = Subscriber(connect(), key)
    listener = InvalidationListener(None, channel, l1, clock=clock, namespace=namespace, subscriber=subscriber)
    return listener.start(wait)


def _attach(listener: InvalidationListener) -> None:
    with _REGISTRY.lock:
        subscriber = listener.subscriber
        if subscriber.shut:  # its last listener left between listen()'s lookup and now: the key's new one
            key = subscriber.key
            found = _REGISTRY.subscribers.get(key) if key is not None else None
            if found is None or found.shut:
                found = Subscriber(subscriber._connect, key)
                if key is not None:
                    _REGISTRY.subscribers[key] = found
            subscriber = found
            listener.subscriber = subscriber
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
