"""Stampede protection: an expensive miss is computed once per process and once per fleet.

* :class:`Flights` (single-flight): concurrent ``get_or_set`` calls for one key in one process share
  the first caller's computation; the others wait for its result (or its exception).
* Fleet lease: the lookup that misses takes ``SET <ns>:{tag}:lease:<id> <token> NX PX <lease_ttl>`` in
  the same get.lua call (atomic with the miss) before the core asks for the loader; other processes
  poll, with growing pauses, until the value appears or the lease ends and then look up again (reading
  the value, or taking the lease themselves in that lookup).
* Early refresh (XFetch, Vattani et al., VLDB 2015): a hit on a value with a ttl is recomputed in
  the background, by whichever worker gets the lease, with a probability that grows as expiry
  nears, scaled by how long the value took to compute, so a hot key never expires everywhere at
  once.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

from . import forksafe


class Settable(Protocol):
    """What a flight's future must offer (``concurrent.futures.Future`` and ``asyncio.Future`` do)."""

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...

    def exception(self) -> BaseException | None: ...


F = TypeVar("F", bound=Settable)


class LeaderGone(Exception):
    """The caller computing a key was cancelled or interrupted; a waiting caller should try itself."""


def refresh_early(ttl_left: float | None, cost: float, beta: float,
                  draw: Callable[[], float] = random.random) -> bool:
    """XFetch's test: recompute now if ``cost * beta * -ln(U) >= ttl_left`` (U uniform in (0, 1])."""
    if ttl_left is None or cost <= 0 or beta <= 0:
        return False
    return -cost * beta * math.log(1.0 - draw()) >= ttl_left


class Flights(Generic[F]):
    """The computations under way in this process, one future per key."""

    def __init__(self, new_future: Callable[[], F]) -> None:
        self._new_future = new_future
        self._flights: dict[Hashable, F] = {}
        self._lock = threading.Lock()
        forksafe.register(self)

    def _after_fork(self) -> None:
        # Leaders of the parent's flights do not exist in the child: nobody would ever finish them.
        self._lock = threading.Lock()
        self._flights = {}

    def join(self, key: Hashable) -> tuple[F, bool]:
        """The key's future, and whether the caller leads (must compute and then call :meth:`land`)."""
        with self._lock:
            future = self._flights.get(key)
            if future is not None:
                return future, False
            future = self._flights[key] = self._new_future()
            return future, True

    @contextmanager
    def lead(self, key: Hashable, future: F) -> Iterator[Callable[[Any], None]]:
        """The leader's side: ``with flights.lead(key, future) as done: ... done(result)``.

        On an exception the waiting callers get it too, unless the leader was cancelled or
        interrupted (not an ``Exception``): then they get :class:`LeaderGone` and try themselves.
        """
        try:
            yield future.set_result
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else LeaderGone())
            future.exception()  # marks it retrieved: a flight nobody joined must not warn
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
