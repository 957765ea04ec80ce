"""Deferred work done in rounds, by one background thread per process: every cache's bookkeeping
flusher and every warmer's model rounds (see bookkeeping.py and prediction/background.py).

Each :class:`Periodic` is a job of the process's one thread (``victor-rcache-background``): the
thread runs a job's round when the job says it is due, or at once after :meth:`Periodic.wake`;
:meth:`Periodic.flush` does a forced round from the calling thread (``close()``, process exit, tests
that look at Redis). One thread serves them all, so a process holds one such thread however many
caches it has; a slow round (Redis unreachable, up to its timeouts) delays the other jobs' rounds,
which is bookkeeping lag only. The thread exists while some job is started and not closed: the last
one out stops it. A forked child starts it again; a process that exits without closing still gets
a last forced round of every job (not on ``os._exit``: nothing runs then).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

from . import forksafe

P = TypeVar("P", bound="Periodic")

THREAD_NAME = "victor-rcache-background"

_background = threading.local()  # .active: this thread runs rounds (see connection.SharedPool)


def in_background() -> bool:
    """Is the calling thread the background thread? (Its checkouts from a shared pool never grow it.)"""
    return bool(getattr(_background, "active", False))


class Periodic:
    """Runs ``work(force)`` from the process's background thread, at most ``wait()`` seconds apart.

    ``work`` must not raise (what it cannot send, it gives up and counts); one round of a job runs at a
    time, so whatever it sends goes out in order. ``on_error`` counts an unexpected exception, which
    never stops the thread. ``name`` says whose work it is (log messages).
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
        self._stop = threading.Event()
        self._sending = threading.Lock()
        self._woken = False

    def start(self: P) -> P:
        self._started = True
        _SCHEDULER.add(self)
        _RUNNING.add(self)
        return self

    def wake(self) -> None:
        # Once per round at most: a caller may wake on every call while a backlog lasts (a warmer's
        # record_query with 64 records queued), and setting the event each time cost it microseconds.
        # The flag is cleared when the thread takes the job's round, so a wake after that counts again.
        if self._woken:
            return
        self._woken = True
        _SCHEDULER.wake()

    def wake_within(self, delay: float) -> None:
        """A round at most ``delay`` seconds from now (sooner if one is due sooner): what arrives meanwhile
        goes in the same round."""
        _SCHEDULER.due_within(self, delay)

    def flush(self) -> None:
        """A forced round, now, in this thread."""
        self._round(force=True)

    def close(self) -> None:
        """Stop the rounds (one in flight is waited for), then a last forced round (idempotent)."""
        if self._stop.is_set():
            return
        _RUNNING.discard(self)
        self._stop.set()
        _SCHEDULER.remove(self)
        self.flush()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    @property
    def _thread(self) -> threading.Thread | None:
        """The thread that runs the rounds (shared by every job of the process)."""
        return _SCHEDULER.thread

    def _round(self, force: bool) -> None:
        with self._sending:
            self._work(force)

    def _after_fork(self) -> None:
        self._init_state()


class _Scheduler:
    """The process's background thread and its jobs, each with the time its next round is due."""

    FORK_ORDER = 2  # after the jobs (see forksafe)

    def __init__(self) -> None:
        self._jobs: dict[Periodic, float] = {}  # job -> when its next round is due (monotonic seconds)
        self._init_state()
        forksafe.register(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, job: Periodic) -> None:
        with self._lock:
            self._jobs[job] = time.monotonic() + max(job._wait(), 0.001)
            self._start()
        self._event.set()

    def _start(self) -> None:
        # (lock held) The thread stops once it finds no job: one is started when a job arrives.
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
            self.thread.start()

    def remove(self, job: Periodic) -> None:
        """Take ``job`` out; returns once a round of it in flight is done. The last job out stops the thread."""
        with self._lock:
            self._jobs.pop(job, None)
            thread = self.thread if not self._jobs else None
        self._event.set()
        current = threading.current_thread()
        if thread is not None and thread is not current:
            thread.join(timeout=5)
        if thread is not current:
            with job._sending:  # a round of it the thread had begun is over
                pass

    def wake(self) -> None:
        self._event.set()

    def due_within(self, job: Periodic, delay: float) -> None:
        at = time.monotonic() + delay
        with self._lock:
            if job in self._jobs and self._jobs[job] > at:
                self._jobs[job] = at
        self._event.set()

    def _run(self) -> None:
        _background.active = True  # its checkouts never grow a shared pool (see connection.SharedPool)
        while True:
            with self._lock:
                if not self._jobs:
                    self.thread = None
                    return
                now = time.monotonic()
                due = [job for job, at in self._jobs.items() if at <= now or job._woken]
                left = min(self._jobs.values()) - now
            if not due:
                self._event.wait(max(left, 0.001))
                self._event.clear()
                continue
            for job in due:
                job._woken = False
                if job.closed:
                    continue
                try:
                    job._round(force=False)
                except Exception as exc:  # never expected (work does not raise); the thread must not die of it
                    job._on_error(exc)
                with self._lock:
                    if job in self._jobs:
                        self._jobs[job] = time.monotonic() + max(job._wait(), 0.001)

    def _after_fork(self) -> None:
        # Only the forking thread exists in the child: the jobs still started get a thread of their own.
        self._init_state()
        self._jobs = {job: at for job, at in self._jobs.items() if job._started and not job.closed}
        if self._jobs:
            self._start()


_SCHEDULER = _Scheduler()

# A process that exits without closing its caches still sends what they buffered (a worker's one
# cache usually lives as long as the process).
_RUNNING: weakref.WeakSet[Periodic] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for periodic in list(_RUNNING):
        with contextlib.suppress(Exception):  # Redis may be gone by now: only bookkeeping is lost
            periodic.close()
