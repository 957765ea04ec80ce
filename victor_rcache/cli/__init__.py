"""The ``victor-rcache`` command: look inside a namespace and steer it from a shell.

It configures itself exactly like the library (``MultiLevelCache.from_env``): ``--url`` else
``VICTOR_RCACHE_URL`` else ``REDIS_URL``; ``--namespace`` else ``VICTOR_RCACHE_NAMESPACE``;
``--cluster`` else ``VICTOR_RCACHE_CLUSTER``; every other ``VICTOR_RCACHE_*`` variable too. Every
command prints a table for people, or JSON with ``--json``.

Reading commands (``stats``, ``inspect``, ``top``, ``keys``, ``predict``) write nothing and run no
script that counts a hit or moves an entry; ``inspect``, ``top`` and ``keys`` read the tiers' keys
with plain commands on the node holding them (see docs/key-layout.md). ``stats``, ``top`` and
``inspect`` show Redis's view: workers send the bookkeeping of their reads (hit counts, LRU order,
promotions, fleet counters) in batches, so it lags their reads by one bookkeeping window.

Exit codes: 0 done; 1 not cached, Redis failed, a ``doctor`` check failed, ``flush`` not confirmed;
2 usage or configuration error; 130 interrupted.

This module holds ``main``, the argument parser and the error handling; the commands live in:

- ``stats.py``: ``stats`` (and ``stats --watch``)
- ``entries.py``: ``inspect``, ``top``, ``keys``
- ``predict.py``: ``predict``
- ``admin.py``: ``delete``, ``invalidate --tag``, ``flush``
- ``doctor.py``: ``doctor``
- here: ``demo`` (it only forwards its arguments to ``victor_rcache.demo``)
- ``common.py``: what they share (Context, opening the cache, node helpers, formatting)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from ..bookkeeping import WINDOW
from ..config import CacheConfig, redact
from ..connection import IO_ERRORS
from ..errors import CacheError, ConfigurationError, InvalidArgumentError
from .admin import cmd_delete, cmd_flush, cmd_invalidate
from .common import FAILED, INTERRUPTED, USAGE, Context, Exit, open_cache, redis_problem
from .doctor import cmd_doctor
from .entries import cmd_inspect, cmd_keys, cmd_top
from .predict import cmd_predict
from .stats import WATCH_SECONDS, cmd_stats


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the fleet demo with the remaining arguments (and the global --url/--namespace/--cluster)."""
    from .. import demo  # noqa: PLC0415  (multiprocessing and friends: only for this command)

    given = [a.split("=", 1)[0] for a in rest]
    forwarded = []
    for option in ("url", "namespace"):
        value = getattr(args, option, None)
        if value and f"--{option}" not in given:
            forwarded += [f"--{option}", value]
    if args.cluster and "--cluster" not in given:
        forwarded.append("--cluster")
    return demo.main([*forwarded, *rest])


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 1")
    return value


def common_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """The global options; on subcommands too (``default`` SUPPRESS), so they may follow the command."""
    parser.add_argument("--url", default=default,
                        help="Redis URL (default: VICTOR_RCACHE_URL, then REDIS_URL, then redis://localhost:6379/0)")
    parser.add_argument("--namespace", default=default,
                        help="namespace (default: VICTOR_RCACHE_NAMESPACE, then vrc)")
    parser.add_argument("--cluster", action="store_true", default=default,
                        help="the URL is a Redis Cluster node (default: VICTOR_RCACHE_CLUSTER)")
    parser.add_argument("--json", action="store_true", default=default, help="JSON on stdout, for scripts")


# Workers send the bookkeeping of their Redis hits (hit counts, LRU stamps, promotions, fleet counters)
# in batches: what the reading commands show lags their reads by up to one window.
LAG = f"about {WINDOW:g} s"

EPILOG = """\
Every other VICTOR_RCACHE_* variable (shards, signing key, timeouts...) applies as in the library.
Exit codes: 0 done; 1 not cached, Redis failed, a doctor check failed or flush not confirmed;
2 usage or configuration error; 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``victor-rcache`` parser: the global options, and one subcommand per command with its own."""
    parser = argparse.ArgumentParser(prog="victor-rcache", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Look inside a victor_rcache namespace and steer it.")
    common_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    common_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[..., int], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    p = add("stats", cmd_stats, "fleet-wide hit rates, sizes, movements, prediction accuracy and prewarming "
            f"(Redis's view: it lags the workers' reads by one bookkeeping window, {LAG})")
    p.add_argument("--watch", nargs="?", type=positive_float, const=WATCH_SECONDS, metavar="SECONDS",
                   help=f"refresh every SECONDS (default {WATCH_SECONDS:g}) with rates per second; Ctrl-C stops")
    p.add_argument("--count", type=positive_int, help=argparse.SUPPRESS)  # stop after COUNT refreshes (tests)
    p = add("inspect", cmd_inspect, "one entry: tier, hits, version, idle time, ttl, size and decoded value "
            f"(plain reads: counts no hit, moves nothing; hits and idle time lag the workers' reads by {LAG})")
    p.add_argument("key")
    p = add("top", cmd_top, "the hottest entries: most Redis hits among each shard's most recently used entries "
            f"(Redis's view: it lags the workers' reads by {LAG})")
    p.add_argument("--tier", choices=("l2", "l3"), help="only this tier (default: both)")
    p.add_argument("-n", type=positive_int, default=20, help="entries to show (default 20)")
    p = add("keys", cmd_keys, "entries whose key matches a Redis glob (SCAN on every master); long keys "
            "(over 1 KiB, or starting with '#') match on their '#<sha256>' id, not on the key")
    p.add_argument("pattern", help="glob: * ? [abc] [^a] \\x, e.g. 'read*'")
    p = add("predict", cmd_predict, "what the shared model expects after QUERY (only looks: writes nothing)")
    p.add_argument("query")
    p.add_argument("--session", help="the session whose last queries feed the n-gram part")
    p.add_argument("--top-k", type=positive_int, default=5, help="predictions to show (default 5)")
    p.add_argument("--min-confidence", type=float, default=0.0, help="drop predictions below this (default 0)")
    p = add("delete", cmd_delete, "remove one key from every tier and every worker's L1")
    p.add_argument("key")
    p = add("invalidate", cmd_invalidate, "remove every entry carrying a tag, from every tier and every worker's L1")
    p.add_argument("--tag", action="append", required=True, metavar="NAME",
                   help="a tag (repeat for several: an entry carrying any of them goes)")
    p = add("flush", cmd_flush, "remove every entry of the namespace (asks first; the prediction model is kept)")
    p.add_argument("--yes", action="store_true", help="do not ask")
    p = add("doctor", cmd_doctor, "check connectivity, server version, cluster state, ACL permissions, scripts, "
            "memory policy and the namespace's settings; print fixes")
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p = sub.add_parser("demo", add_help=False, help="the fleet demonstration (arguments go to it; demo --help)")
    p.set_defaults(handler=None)
    return parser


def fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the chosen command; every failure becomes a message and an exit code."""
    if args.command == "demo":
        return cmd_demo(args, extra)
    if args.command == "doctor":
        return cmd_doctor(args)
    cache = open_cache(args)
    try:
        code: int = args.handler(Context(args, cache))
        return code
    finally:
        with suppress(*IO_ERRORS, CacheError):
            cache.close()


def error_code(exc: BaseException, url: str) -> int:
    """Print what went wrong (never a traceback) and return the exit code."""
    if isinstance(exc, Exit):
        return fail(exc.code, str(exc)) if str(exc) else exc.code
    if isinstance(exc, (ConfigurationError, InvalidArgumentError)):
        return fail(USAGE, str(exc))
    if isinstance(exc, CacheError):
        return fail(FAILED, str(exc))
    if not isinstance(exc, Exception):
        return fail(INTERRUPTED, "interrupted")
    problem, fix = redis_problem(exc)
    return fail(FAILED, f"Redis at {url}: {problem}; {fix[:1].lower()}{fix[1:]}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``victor-rcache`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return run(args, extra)
    except BrokenPipeError:  # the reader went away (| head): no traceback
        with suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILED
    except (Exit, CacheError, KeyboardInterrupt, RedisError, RedisClusterException) as exc:
        return error_code(exc, redact(CacheConfig(redis_url=args.url).url))
