"""Value encoding: a versioned envelope around a codec's bytes.

Envelope layout (what Redis stores in an entry's ``v`` field)::

    byte 0        format version: 1, or 2 when payloads are signed
    byte 1        length n of the codec name
    bytes 2..n+1  codec name, ASCII ("msgpack")
    16 bytes      (format 2 only) HMAC-SHA256 of everything else, truncated to 128 bits
    rest          the codec's encoding of the value

A worker reading an envelope of another format version or codec, or one whose signature does not
match its ``signing_key``, treats it as undecodable (a counted miss), never as a value. msgpack is
the default. Pickle is never used unless the caller passes :class:`PickleCodec` explicitly: anyone
able to write to Redis could then run code in every worker; if you must, sign the payloads too.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle  # only for PickleCodec, which a caller must choose explicitly
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, runtime_checkable

import msgpack

from .errors import ConfigurationError, SerializationError

FORMAT_VERSION = 1
SIGNED_FORMAT_VERSION = 2
TAG_BYTES = 16
_TUPLE_EXT = 1
_IMMUTABLE = frozenset({type(None), bool, int, float, str, bytes})


def immutable(value: Any) -> bool:
    """Whether nobody can change ``value``: None, bool, int, float, str, bytes, or a tuple of only
    such values (nested tuples too). Exact types only: a subclass may carry mutable state."""
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is tuple:
            pending.extend(item)
        elif kind not in _IMMUTABLE:
            return False
    return True


def copier(value: Any) -> Callable[[Any], Any] | None:
    """A function that deep-copies this very ``value`` (its shape is built in: use it on nothing else), or
    None when nothing in it can be mutated and it may be shared as it is.

    L1 keeps one decoded value per copy and gives each hit its own copy of it: copying only the lists
    and dicts (and tuples holding them) of a known shape is several times cheaper than decoding the
    payload again, and keeps the promise that a caller mutating what it got changes nothing for others.
    Raises RecursionError for a value nested deeper than Python's recursion limit (the caller then
    decodes afresh instead)."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return None
    if kind is list:
        items = [(i, c) for i, c in ((i, copier(x)) for i, x in enumerate(value)) if c is not None]
        if not items:
            return list.copy
        return partial(_copy_list, items)
    if kind is dict:
        fields = [(k, c) for k, c in ((k, copier(x)) for k, x in value.items()) if c is not None]
        if not fields:
            return dict.copy
        return partial(_copy_dict, fields)
    if kind is tuple:
        members = [copier(x) for x in value]
        return None if all(c is None for c in members) else partial(_copy_tuple, members)
    raise TypeError(f"no copy plan for a {kind.__name__}")  # the codec decodes only the types above


def _copy_list(items: list[tuple[int, Callable[[Any], Any]]], value: list[Any]) -> list[Any]:
    out = value.copy()
    for i, copy in items:
        out[i] = copy(value[i])
    return out


def _copy_dict(fields: list[tuple[Any, Callable[[Any], Any]]], value: dict[Any, Any]) -> dict[Any, Any]:
    out = value.copy()
    for key, copy in fields:
        out[key] = copy(value[key])
    return out


def _copy_tuple(members: list[Callable[[Any], Any] | None], value: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x if copy is None else copy(x) for x, copy in zip(value, members, strict=True))


@runtime_checkable
class Codec(Protocol):
    """Turns values into bytes and back. ``name`` is stored with every payload."""

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


def _pack_tuple(obj: Any) -> Any:
    if type(obj) is tuple:
        return msgpack.ExtType(_TUPLE_EXT, _packer(list(obj)))
    if type(obj) is int:  # msgpack hands over the ints it cannot hold
        raise OverflowError(f"{obj} does not fit in 64 bits")
    raise TypeError(f"cannot serialize {type(obj).__name__!r}")


_BUFFERS = (bytearray, memoryview)


def _buffer_in(value: Any) -> type | None:
    """The first bytearray or memoryview type found in ``value`` (containers walked), else None.

    msgpack writes both as bytes, which come back as ``bytes``: a value that would not round-trip as
    the type it went in as is refused instead (docs/design.md#values-and-keys)."""
    kind = type(value)
    if kind in _BUFFERS:
        return kind
    if kind is not dict and kind is not list and kind is not tuple:
        return None  # a scalar (or a type the codec refuses on its own)
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is dict:
            pending.extend(item.keys())
            pending.extend(item.values())
        elif kind is list or kind is tuple:
            pending.extend(item)
        elif kind in _BUFFERS:
            return kind
    return None


def _packer(value: Any) -> bytes:
    # strict_types makes tuples reach the `default` hook, so they round-trip as tuples, not lists.
    packed: bytes = msgpack.packb(value, use_bin_type=True, strict_types=True, default=_pack_tuple)
    return packed


def _unpack_ext(code: int, data: bytes) -> Any:
    if code == _TUPLE_EXT:
        return tuple(_unpacker(data))
    return msgpack.ExtType(code, data)


def _unpacker(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_unpack_ext)


class MsgpackCodec:
    """The default codec: None, bool, int, float, str, bytes, list, tuple and dict (nested)."""

    name = "msgpack"

    def encode(self, value: Any) -> bytes:
        buffer = _buffer_in(value)
        if buffer is not None:
            raise SerializationError(
                f"a {buffer.__name__} would come back from the cache as bytes; pass bytes(...) instead "
                "(or pass codec= a Codec that keeps the type)"
            )
        try:
            return _packer(value)
        except OverflowError as exc:
            raise SerializationError(
                f"an integer outside msgpack's range (-2**63 to 2**64 - 1) cannot be encoded ({exc}); store it as "
                "a str (str(n), int(s) on the way back), or pass codec= a Codec that handles it"
            ) from exc
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"cannot encode a value of type {type(value).__name__} with msgpack ({exc}); "
                "convert it to plain data (dict, list, str, int, float, bytes, None) "
                "or pass codec= a Codec that handles it"
            ) from exc

    # The unpacker itself: one call less per decoded value (a get_many of 100 keys decodes 100).
    decode = staticmethod(_unpacker)


class PickleCodec:
    """Any picklable value. Only for caches whose Redis nobody else can write to: unpickling runs
    code that a writer chose. Prefer msgpack or a codec of your own; if you use this, also pass
    ``signing_key`` so a worker refuses payloads it did not sign."""

    name = "pickle"

    def encode(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SerializationError(f"cannot pickle a value of type {type(value).__name__} ({exc})") from exc

    def decode(self, data: bytes) -> Any:
        return pickle.loads(data)  # the caller chose pickle: see the class docstring


class Envelope:
    """Wraps and unwraps a codec's bytes with the format header (and a signature, given a key)."""

    def __init__(self, codec: Codec, signing_key: bytes | None = None) -> None:
        name = codec.name.encode("ascii", "strict") if codec.name.isascii() else b""
        if not 0 < len(name) < 256:
            raise ConfigurationError(
                f"codec name {codec.name!r} must be 1-255 ASCII characters; give the codec a short name"
            )
        self.codec = codec
        self._decode = codec.decode  # (bound once: every Redis hit decodes)
        self._key = signing_key
        version = FORMAT_VERSION if signing_key is None else SIGNED_FORMAT_VERSION
        self._header = bytes([version, len(name)]) + name
        self._body_at = len(self._header) + (0 if signing_key is None else TAG_BYTES)

    def _tag(self, body: bytes) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, self._header + body, hashlib.sha256).digest()[:TAG_BYTES]

    def wrap(self, value: Any) -> bytes:
        """Encode ``value`` into a payload (raises SerializationError)."""
        body = self.codec.encode(value)
        if not isinstance(body, bytes):
            raise SerializationError(
                f"codec {self.codec.name!r} returned {type(body).__name__}, not bytes; fix its encode()"
            )
        if self._key is None:
            return self._header + body
        return self._header + self._tag(body) + body

    def decode_checked(self, payload: bytes) -> Any:
        """Decode a payload this envelope made or has already unwrapped (an L1 copy): the header and
        signature were checked then, so only the codec runs."""
        return self.codec.decode(payload[self._body_at:])

    def unwrap(self, payload: bytes) -> Any:
        """Decode a payload; raises ValueError for a foreign, unsigned, forged or corrupt one."""
        if not payload.startswith(self._header):
            raise ValueError("payload has another format version or codec (or is not signed as expected)")
        if self._key is None:
            return self._decode(payload[self._body_at:])
        body = payload[len(self._header):]
        tag, body = body[:TAG_BYTES], body[TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(body)):
            raise ValueError("payload signature does not match this worker's signing_key")
        return self._decode(body)
