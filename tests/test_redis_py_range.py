"""The redis-py range: pyproject.toml declares what `make test-compat` tests, and the package refuses an
older release and warns about a newer one, naming the range."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from victor_rcache.connection import REDIS_PY_TESTED, redis_py_verdict

ROOT = Path(__file__).resolve().parent.parent


def _dotted(parts: tuple[int, ...]) -> str:
    return ".".join(map(str, parts))


def test_pyproject_declares_the_tested_range() -> None:
    (spec,) = re.findall(r'^    "(redis\[hiredis\][^"]*)",$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    oldest, past = REDIS_PY_TESTED
    assert spec == f"redis[hiredis]>={_dotted(oldest)},<{_dotted(past)}"


def test_make_test_compat_runs_the_ends_of_the_range() -> None:
    makefile = (ROOT / "Makefile").read_text()
    oldest = re.search(r"^REDIS_PY_OLDEST := (\S+)$", makefile, re.MULTILINE)
    newest = re.search(r"^REDIS_PY_NEWEST := (\S+)$", makefile, re.MULTILINE)
    assert oldest is not None
    assert newest is not None
    assert oldest.group(1) == _dotted(REDIS_PY_TESTED[0])
    assert tuple(map(int, newest.group(1).split("."))) < REDIS_PY_TESTED[1]


def test_make_test_compat_runs_the_release_the_pins_install() -> None:
    """The newest end is the redis-py the lock pins (its newest, across Python versions): a lock refresh
    that brings a newer one in must move REDIS_PY_NEWEST with it."""
    makefile = (ROOT / "Makefile").read_text()
    newest = re.search(r"^REDIS_PY_NEWEST := (\S+)$", makefile, re.MULTILINE)
    pins = re.findall(r"^redis==([0-9.]+)", (ROOT / "requirements" / "dev.txt").read_text(), re.MULTILINE)
    assert newest is not None
    assert pins, "requirements/dev.txt pins no redis"
    assert newest.group(1) == max(pins, key=lambda v: tuple(map(int, v.split("."))))


def test_the_installed_release_is_in_the_range() -> None:
    assert redis_py_verdict(redis.__version__) is None


@pytest.mark.parametrize("version", ["4.6.0", "5.0.0"])  # 5.0.0's asyncio clients have no aclose()
def test_an_older_release_is_refused_naming_the_range(version: str) -> None:
    verdict = redis_py_verdict(version)
    assert verdict is not None
    assert verdict[0] == "refuse"
    assert version in verdict[1]
    assert "pip install 'redis>=5.0.1,<8.3'" in verdict[1]


@pytest.mark.parametrize("version", ["8.3.0", "9.0.0b1"])
def test_a_newer_release_runs_with_a_warning(version: str) -> None:
    verdict = redis_py_verdict(version)
    assert verdict is not None
    assert verdict[0] == "warn"
    assert "redis>=5.0.1,<8.3" in verdict[1]
