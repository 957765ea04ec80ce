"""A background thread that does a cache's deferred work in rounds: the bookkeeping flusher's and
the prediction model's (see bookkeeping.py and prediction/background.py).

It sleeps until the work says it is due, or until :meth:`Periodic.wake`; :meth:`Periodic.flush`
does a forced round from the calling thread (``close()``, process exit, tests that look at Redis).
A forked child starts the thread again; a process that exits without closing still gets a last
forced round (not on ``os._exit``: nothing runs then).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

from . import forksafe

P = TypeVar("P", bound="Periodic")


class Periodic:
    """Runs ``work(force)`` in a daemon thread named ``name``, at most ``wait()`` seconds apart.

    ``work`` must not raise (what it cannot send, it gives up and counts); one round runs at a time,
    so whatever it sends goes out in order. ``on_error`` counts an unexpected exception, which never
    stops the thread.
    """

    FORK_ORDER = 1  # after the locks of the objects it uses are fresh (see forksafe)

    def __init__(self, name: str, work: Callable[[bool], None], wait: Callable[[], float],
                 on_error: Callable[[BaseException], None]) -> None:
        self.name = name
        self._work = work
        self._wait = wait
        self._on_error = on_error
        self._started = False
        self._init_state()
        forksafe.register(self)

    def _init_state(self) -> None:
        self._event = threading.Event()
        self._stop = threading.Event()
        self._sending = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self: P) -> P:
        self._started = True
        self._thread.start()
        _RUNNING.add(self)
        return self

    def wake(self) -> None:
        self._event.set()

    def flush(self) -> None:
        """A forced round, now, in this thread."""
        self._round(force=True)

    def close(self) -> None:
        """Stop the thread, then a last forced round (idempotent)."""
        if self._stop.is_set():
            return
        _RUNNING.discard(self)
        self._stop.set()
        self._event.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def _round(self, force: bool) -> None:
        with self._sending:
            self._work(force)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._event.wait(max(self._wait(), 0.001))
            self._event.clear()
            if self._stop.is_set():
                break
            try:
                self._round(force=False)
            except Exception as exc:  # never expected (work does not raise); the thread must not die of it
                self._on_error(exc)

    def _after_fork(self) -> None:
        was_running = self._started and not self._stop.is_set()
        self._init_state()
        if was_running:
            self._thread.start()


# A process that exits without closing its caches still sends what they buffered (a worker's one
# cache usually lives as long as the process).
_RUNNING: weakref.WeakSet[Periodic] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for periodic in list(_RUNNING):
        with contextlib.suppress(Exception):  # Redis may be gone by now: only bookkeeping is lost
            periodic.close()
