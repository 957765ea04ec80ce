"""The facts every benchmark report opens with: when, on what software, on how busy a machine."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import redis

from victor_rcache import __version__


def machine_facts(url: str) -> dict[str, Any]:
    """Date, versions (library, Python, redis-py, redis-server), CPUs and load of this run."""
    with redis.Redis.from_url(url) as client:
        info: dict[str, Any] = client.info("server")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "victor_rcache": __version__,
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "redis_server": info.get("redis_version", "?"),
        "nproc": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
    }
