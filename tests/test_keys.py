"""Key layout: shards, hash tags, entry ids (pure logic, no Redis)."""

from __future__ import annotations

import zlib

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from victor_rcache import ConfigurationError, InvalidKeyError
from victor_rcache.keys import KeySpace


@pytest.mark.parametrize("shards", [1, 3, 16, 64])
def test_each_shard_hashes_into_its_own_equal_slot_range(shards: int) -> None:
    space = KeySpace("tools", shards)
    for i, sk in enumerate(space.shard_keys):
        slots = {key_slot(k) for k in (*sk.keys, sk.entry(b"any {key}"))}
        assert len(slots) == 1
        (slot,) = slots
        assert i * REDIS_CLUSTER_HASH_SLOTS // shards <= slot < (i + 1) * REDIS_CLUSTER_HASH_SLOTS // shards


def test_key_names_are_readable_and_namespaced() -> None:
    space = KeySpace("tools", 16)
    sk = space.shard_keys[0]
    assert sk.l2 == b"tools:{s0.10}:l2"
    assert sk.entry(b"read the file") == b"tools:{s0.10}:e:read the file"
    assert space.config == b"tools:config"
    assert all(k.startswith(b"tools:") for s in space.shard_keys for k in s.keys)


def test_str_and_utf8_bytes_are_the_same_key_and_shard_by_crc32() -> None:
    space = KeySpace("ns", 16)
    a, b = space.ref("ключ"), space.ref("ключ".encode())
    assert a == b
    assert a.shard == zlib.crc32("ключ".encode()) % 16
    assert a.id == a.key == "ключ".encode()
    assert not a.hashed


def test_long_keys_and_hash_prefixed_keys_get_a_digest_id() -> None:
    space = KeySpace("ns", 16)
    long_ref = space.ref("x" * 1025)
    assert long_ref.hashed
    assert long_ref.id.startswith(b"#")
    assert len(long_ref.id) == 65
    assert space.ref("x" * 1024).id == b"x" * 1024
    tagged = space.ref("#literal")
    assert tagged.hashed
    assert tagged.id != b"#literal"  # a raw key can never collide with a digest id


@pytest.mark.parametrize(("key", "message"), [
    ("", "empty"), (b"", "empty"), (None, "str or bytes"), (42, "str or bytes"), (["a"], "str or bytes"),
    ("\ud800", "Unicode"),
])
def test_bad_keys_are_refused_with_a_clear_error(key: object, message: str) -> None:
    with pytest.raises(InvalidKeyError, match=message):
        KeySpace("ns", 16).ref(key)  # type: ignore[arg-type]


@pytest.mark.parametrize("namespace", ["", "a b", "a:b", "a{b", "a}b", "tab\t"])
def test_bad_namespaces_are_refused(namespace: str) -> None:
    with pytest.raises(ConfigurationError, match="namespace"):
        KeySpace(namespace, 16)


@pytest.mark.parametrize("shards", [0, -1, 1025])
def test_shard_count_is_bounded(shards: int) -> None:
    with pytest.raises(ConfigurationError, match="shards"):
        KeySpace("ns", shards)
