"""The versioned envelope and the msgpack codec (pure logic, no Redis)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from victor_rcache import ConfigurationError, MsgpackCodec, SerializationError
from victor_rcache.codec import FORMAT_VERSION, Envelope


@pytest.mark.parametrize("value", [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 1.5, "", "text ✓", b"", b"\x00\xff", [], [1, [2, [3]]],
    (), (1, "a", (b"b", None)), {}, {"a": {"b": [1, (2, 3)]}}, {1: "int key", (1, 2): "tuple key"},
])
def test_values_round_trip_exactly(value: Any) -> None:
    env = Envelope(MsgpackCodec())
    out = env.unwrap(env.wrap(value))
    assert out == value
    assert type(out) is type(value)


def test_nan_round_trips() -> None:
    env = Envelope(MsgpackCodec())
    assert math.isnan(env.unwrap(env.wrap(float("nan"))))


@pytest.mark.parametrize("value", [{1, 2}, object(), 2**64, [lambda: 1], {"k": frozenset()}])
def test_unsupported_values_raise_a_serialization_error_naming_the_fix(value: Any) -> None:
    with pytest.raises(SerializationError, match="codec="):
        Envelope(MsgpackCodec()).wrap(value)


def test_payload_carries_format_version_and_codec_name() -> None:
    payload = Envelope(MsgpackCodec()).wrap(1)
    assert payload[0] == FORMAT_VERSION
    assert payload[2:2 + payload[1]] == b"msgpack"


def test_foreign_format_or_codec_is_rejected_not_misread() -> None:
    env = Envelope(MsgpackCodec())
    good = env.wrap("x")
    for bad in (b"", b"\x02" + good[1:], b"\x01\x04json" + good[9:], b"\x00garbage"):
        with pytest.raises(ValueError, match="format version or codec"):
            env.unwrap(bad)


class UpperCodec:
    name = "upper"

    def encode(self, value: Any) -> bytes:
        return str(value).upper().encode()

    def decode(self, data: bytes) -> Any:
        return data.decode()


def test_a_user_codec_is_used_and_named_in_the_payload() -> None:
    env = Envelope(UpperCodec())
    payload = env.wrap("abc")
    assert payload.endswith(b"ABC")
    assert env.unwrap(payload) == "ABC"
    with pytest.raises(ValueError, match="codec"):
        Envelope(MsgpackCodec()).unwrap(payload)


def test_a_codec_returning_non_bytes_is_a_serialization_error() -> None:
    class Broken(UpperCodec):
        def encode(self, value: Any) -> bytes:
            return str(value)  # type: ignore[return-value]

    with pytest.raises(SerializationError, match="not bytes"):
        Envelope(Broken()).wrap(1)


@pytest.mark.parametrize("name", ["", "x" * 300, "naïve"])
def test_codec_names_must_be_short_ascii(name: str) -> None:
    class Named(UpperCodec):
        pass

    Named.name = name
    with pytest.raises(ConfigurationError):
        Envelope(Named())


KEY = b"k" * 32


def test_signed_payloads_round_trip_and_reject_tampering_or_another_key() -> None:
    signer = Envelope(MsgpackCodec(), KEY)
    payload = signer.wrap({"tools": ["read"]})
    assert payload[0] == 2
    assert signer.unwrap(payload) == {"tools": ["read"]}
    forged = payload[:-1] + bytes([payload[-1] ^ 1])
    with pytest.raises(ValueError, match="signature"):
        signer.unwrap(forged)
    with pytest.raises(ValueError, match="signature"):
        Envelope(MsgpackCodec(), b"x" * 32).unwrap(payload)
    with pytest.raises(ValueError, match="signed"):
        signer.unwrap(Envelope(MsgpackCodec()).wrap({"tools": ["read"]}))  # an unsigned payload
    with pytest.raises(ValueError, match="format version"):
        Envelope(MsgpackCodec()).unwrap(payload)  # and an unsigned reader refuses a signed one


def test_pickle_is_only_there_when_chosen() -> None:
    from victor_rcache import CacheConfig, PickleCodec

    assert CacheConfig().codec.name == "msgpack"
    env = Envelope(PickleCodec(), KEY)
    assert env.unwrap(env.wrap({1, 2})) == {1, 2}  # what msgpack cannot carry
    with pytest.raises(SerializationError):
        env.wrap(lambda: 1)


@pytest.mark.parametrize("key", [b"short", "a str key of enough length", 12345])
def test_a_signing_key_must_be_long_enough_bytes(key: object) -> None:
    from victor_rcache import CacheConfig

    with pytest.raises(ConfigurationError, match="signing_key"):
        CacheConfig(signing_key=key)  # type: ignore[arg-type]
