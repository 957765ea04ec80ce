"""Fork safety: objects holding locks or threads start afresh in a forked child.

A lock held by another thread at ``fork()`` stays held forever in the child, where that thread does
not exist. Objects register here and get ``_after_fork()`` called in the child (then only the forking
thread runs), where they replace their locks without acquiring them and drop per-process state.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class ForkAware(Protocol):
    def _after_fork(self) -> None: ...


_OBJECTS: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def register(obj: ForkAware) -> None:
    """Have ``obj._after_fork()`` called in every child forked from now on."""
    _OBJECTS.add(obj)


def _reset_all() -> None:
    # Locks first (plain state), listeners last: they restart threads that use those locks.
    for obj in sorted(list(_OBJECTS), key=lambda o: getattr(o, "FORK_ORDER", 0)):
        obj._after_fork()


os.register_at_fork(after_in_child=_reset_all)
