"""One benchmark figure: a value measured next to its floor in the same run, with its target and verdict.

Every group (micro, parallel, fleet) returns its figures as :func:`figure` dicts, so the harness reports,
repeats and plots them the same way::

    {"id": "l2", "figure": "...", "value": 85.9, "unit": "us", "floor": "redis-py GET + msgpack.unpackb",
     "floor_value": 71.0, "ratio": 1.21, "target": "<= 1.3x", "bound": ["ratio", "<=", 1.3],
     "pass": true, "detail": {...}}

``bound`` says what the verdict is taken on (the ``ratio`` to the floor or the ``value`` itself), how it
compares and with what limit; ``None`` for a figure that is only reported.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

Progress = Callable[[str], None]

COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}


def noop(message: str) -> None:
    """A progress callback that says nothing."""


def figure(fid: str, name: str, *, value: float, unit: str, floor: str, floor_value: float | None,
           bound: tuple[str, str, float] | None = None, target: str | None = None,
           **detail: Any) -> dict[str, Any]:
    """One row of the report. ``bound = (on, op, limit)``: the verdict is ``<on> <op> <limit>`` where ``on``
    is "ratio" (value / floor_value) or "value"; without it the figure is reported with no verdict."""
    ratio = value / floor_value if floor_value else None
    passed = None
    if bound is not None:
        on, op, limit = bound
        judged = ratio if on == "ratio" else value
        passed = judged is not None and COMPARE[op](judged, limit)
        if target is None:
            target = f"{op} {limit:g}x" if on == "ratio" else f"{op} {limit:g} {unit}"
    return {"id": fid, "figure": name, "value": value, "unit": unit, "floor": floor, "floor_value": floor_value,
            "ratio": ratio, "target": target or "(reported, no target)", "bound": list(bound) if bound else None,
            "pass": passed, "detail": detail}


def judged(f: dict[str, Any]) -> float | None:
    """The number a figure's verdict is taken on (its ratio or its value; the ratio when it has no target)."""
    on = f["bound"][0] if f.get("bound") else ("ratio" if f.get("ratio") is not None else "value")
    value = f.get(on)
    return None if value is None else float(value)
