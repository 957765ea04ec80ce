"""The Lua script registry: each script is read once from ``lua/``, its includes expanded, its
SHA1 computed; calls go out as EVALSHA and fall back to EVAL (which also reloads the script into
Redis's cache) on NOSCRIPT, e.g. after ``SCRIPT FLUSH``, a restart or a failover.

Every script starts with the Redis 7 shebang ``#!lua`` (no flags): Redis then refuses a script
that may write when it is out of memory *before* it runs, instead of failing midway with earlier
writes kept, and refuses any access to keys of another slot. ``shebang=False`` strips that line
for servers and emulators without it (fakeredis); scripts then run under Redis's legacy rules.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

_INCLUDE = re.compile(r'^[ \t]*-- @include "([\w./-]+)"[ \t]*$', re.MULTILINE)

Command = tuple[Any, ...]


def _packed_arg(raw: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


# Small numbers and the kinds of touch.lua's items, packed once: a bookkeeping batch of 512 hits sends three
# or six arguments per hit, two or four of them among these.
_TOUCH_KINDS = ("2", "3", "2n", "3n", "n", "e", "w", "m", "c")
_PACKED_SMALL: dict[int | str, bytes] = {**{n: _packed_arg(b"%d" % n) for n in range(1024)},
                                         **{k: _packed_arg(k.encode()) for k in _TOUCH_KINDS}}


def pack(command: Command) -> bytes:
    """A command in the Redis protocol (RESP), as connection.send_packed sends it: bytes as they are, str
    as UTF-8, int as digits. An entry's plain read is packed once per key and kept, and script calls
    are packed here on a standalone client: redis-py would run its argument encoder on each argument
    (most of what a read, or a bookkeeping batch, costs in Python)."""
    parts = [b"*%d\r\n" % len(command)]
    append, small = parts.append, _PACKED_SMALL
    for arg in command:
        kind = arg.__class__
        if kind is bytes:
            append(b"$%d\r\n%s\r\n" % (len(arg), arg))
            continue
        if kind is int or kind is str:  # (exact types: True is 1 to a dict, and a bool packs as its repr)
            packed = small.get(arg)
            if packed is not None:
                append(packed)
                continue
            raw = arg.encode() if kind is str else b"%d" % arg
        else:
            raw = repr(arg).encode()
        append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def lua_dir() -> Path:
    """The folder holding the scripts: inside the installed package, else the source checkout's."""
    packaged = Path(str(resources.files("victor_rcache"))) / "lua"
    if (packaged / "put.lua").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "lua"


@dataclass(frozen=True)
class Script:
    name: str
    source: bytes
    sha: str

    @classmethod
    def load(cls, name: str, folder: Path | None = None, shebang: bool = True) -> Script:
        folder = folder or lua_dir()
        text = (folder / f"{name}.lua").read_text("utf-8")
        while _INCLUDE.search(text):  # includes may include others
            text = _INCLUDE.sub(lambda m: (folder / m.group(1)).read_text("utf-8"), text)
        if not shebang and text.startswith("#!"):
            text = text.split("\n", 1)[1]
        source = text.encode()
        return cls(name, source, hashlib.sha1(source).hexdigest())


@dataclass(frozen=True)
class ScriptCall:
    """One script invocation; every key in ``keys`` shares a hash slot."""

    script: Script
    keys: tuple[bytes, ...]
    args: tuple[bytes | int | str, ...]

    def evalsha(self) -> Command:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)

    def eval(self) -> Command:
        return ("EVAL", self.script.source, len(self.keys), *self.keys, *self.args)


class Scripts:
    """The scripts the tiers use, loaded once per process."""

    def __init__(self, folder: Path | None = None, shebang: bool = True) -> None:
        self.touch = Script.load("touch", folder, shebang)
        self.put = Script.load("put", folder, shebang)
        self.delete = Script.load("delete", folder, shebang)
        self.flush = Script.load("flush", folder, shebang)
        self.untag = Script.load("untag", folder, shebang)
        self.release = Script.load("release", folder, shebang)
        self.lease = Script.load("lease", folder, shebang)
        self.sizing = Script.load("sizing", folder, shebang)
        self.record = Script.load("record", folder, shebang)
        self.predict = Script.load("predict", folder, shebang)
        self.view = Script.load("view", folder, shebang)

    def all(self) -> tuple[Script, ...]:
        return (self.touch, self.put, self.delete, self.flush, self.untag, self.release, self.lease, self.sizing,
                self.record, self.predict, self.view)


def needs_reload(reply: object) -> bool:
    return isinstance(reply, NoScriptError)
