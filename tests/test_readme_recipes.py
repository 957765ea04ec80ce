"""The README's redis-cli recipes answer what they say, run verbatim through the real `redis-cli`.

Each ```sh block the README introduces as redis-cli commands for an operator is parsed, pointed at
a private server holding the README's own example data, and every command must answer (exit 0,
non-empty output) with what its comment promises.
"""

from __future__ import annotations

import calendar
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from victor_rcache import MultiLevelCache, PredictiveCacheWarmer
from victor_rcache.local_redis import LocalRedisServer

README = Path(__file__).resolve().parents[1] / "README.md"
AT_14_UTC = float(calendar.timegm((2026, 11, 26, 14, 5, 0)))

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")


def recipes(after: str) -> list[list[str]]:
    """The redis-cli commands (as argv, comments dropped) of the first ```sh block after ``after``."""
    text = README.read_text("utf-8")
    start = text.index(after)
    block = re.search(r"```sh\n(.*?)```", text[start:], re.DOTALL)
    assert block is not None, f"no sh block after {after!r} in the README"
    commands = [shlex.split(line, comments=True) for line in block[1].splitlines()]
    return [c for c in commands if c and c[0] == "redis-cli"]


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRedisServer]:
    with LocalRedisServer() as srv:
        yield srv


def run(server: LocalRedisServer, argv: list[str]) -> str:
    done = subprocess.run(["redis-cli", "-p", str(server.port), *argv[1:]], capture_output=True, text=True,
                          check=False, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), argv
    assert not done.stdout.startswith(("(nil)", "(error)")), (argv, done.stdout)
    return done.stdout


def test_the_model_recipes_answer_with_what_the_model_learned(server: LocalRedisServer) -> None:
    with MultiLevelCache(server.url, namespace="tools", fail_open=False) as cache:
        warmer = PredictiveCacheWarmer(cache, clock=lambda: AT_14_UTC)
        for _ in range(3):
            for query, tools in (("read the file", ["read"]), ("analyze code", ["read", "search"]),
                                 ("write tests", ["write"])):
                warmer.record_query(query, tools, session="agent-7")
        commands = recipes("What the model believes, with `redis-cli`")
        assert len(commands) == 6
        answers = [run(server, argv) for argv in commands]
    assert answers[0].split("\n")[0] == "analyze code"  # what follows "read the file"
    assert answers[1].split("\n")[0] == "write tests"  # after "read the file", "analyze code"
    assert {"read the file", "analyze code", "write tests"} <= set(answers[2].split("\n"))
    assert answers[3].strip() == '["read","search"]'
    assert "records" in answers[4].split("\n")
    assert int(answers[5]) > 0
