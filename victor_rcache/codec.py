"""Value encoding: a versioned envelope around a codec's bytes.

Envelope layout (what Redis stores in an entry's ``v`` field)::

    byte 0        format version (currently 1)
    byte 1        length n of the codec name
    bytes 2..n+1  codec name, ASCII ("msgpack")
    rest          the codec's encoding of the value

A worker reading an envelope of another format version or codec treats it as undecodable (a
counted miss), never as a value. msgpack is the default; pickle is never used unless the caller
passes a pickle codec explicitly, because anyone able to write to Redis could then run code in
every worker.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import msgpack

from .errors import ConfigurationError, SerializationError

FORMAT_VERSION = 1
_TUPLE_EXT = 1


@runtime_checkable
class Codec(Protocol):
    """Turns values into bytes and back. ``name`` is stored with every payload."""

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


def _pack_tuple(obj: Any) -> Any:
    if type(obj) is tuple:
        return msgpack.ExtType(_TUPLE_EXT, _packer(list(obj)))
    raise TypeError(f"cannot serialize {type(obj).__name__!r}")


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
        try:
            return _packer(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"cannot encode a value of type {type(value).__name__} with msgpack ({exc}); "
                "convert it to plain data (dict, list, str, int, float, bytes, None) "
                "or pass codec= a Codec that handles it"
            ) from exc

    def decode(self, data: bytes) -> Any:
        return _unpacker(data)


class Envelope:
    """Wraps and unwraps a codec's bytes with the format header."""

    def __init__(self, codec: Codec) -> None:
        name = codec.name.encode("ascii", "strict") if codec.name.isascii() else b""
        if not 0 < len(name) < 256:
            raise ConfigurationError(
                f"codec name {codec.name!r} must be 1-255 ASCII characters; give the codec a short name"
            )
        self.codec = codec
        self._header = bytes([FORMAT_VERSION, len(name)]) + name

    def wrap(self, value: Any) -> bytes:
        """Encode ``value`` into a payload (raises SerializationError)."""
        body = self.codec.encode(value)
        if not isinstance(body, bytes):
            raise SerializationError(
                f"codec {self.codec.name!r} returned {type(body).__name__}, not bytes; fix its encode()"
            )
        return self._header + body

    def unwrap(self, payload: bytes) -> Any:
        """Decode a payload; raises ValueError for a foreign or corrupt one."""
        if not payload.startswith(self._header):
            raise ValueError("payload has another format version or codec")
        return self.codec.decode(payload[len(self._header):])
