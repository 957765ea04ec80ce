"""Values and keys at the edges (docs/design.md#values-and-keys).

* a ``bytearray`` or ``memoryview`` (alone or nested) would come back as ``bytes``: it is refused with
  SerializationError and nothing is written;
* a key of a type that cannot be a key (even an unhashable one) is an InvalidKeyError, from ``put`` too;
* ``get_many`` answers for every spelling it was asked (``"k"`` and ``b"k"`` are one key);
* the keys a cache keeps located are bounded by their bytes, not by their count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import InvalidKeyError, MultiLevelCache, SerializationError
from victor_rcache.keys import MAX_RAW_KEY_BYTES, REFS_BYTES, KeySpace

from .helpers import Client, read_namespace

Make = Callable[..., MultiLevelCache]


@pytest.mark.parametrize("value", [bytearray(b"raw"), memoryview(b"raw"), {"nested": [1, bytearray(b"x")]},
                                   ("tuple", memoryview(b"x")), {"key": {"deeper": [memoryview(b"x")]}}],
                         ids=["bytearray", "memoryview", "nested bytearray", "in a tuple", "deep memoryview"])
def test_values_that_would_come_back_as_bytes_are_refused(make_cache: Make, raw: Client, namespace: str,
                                                          value: Any) -> None:
    cache = make_cache()
    with pytest.raises(SerializationError, match="bytes"):
        cache.put("k", value)
    with pytest.raises(SerializationError):
        cache.put_many({"a": 1, "k": value})  # all validated before anything is written
    with pytest.raises(SerializationError):
        cache.get_or_set("computed", lambda: value)
    assert read_namespace(raw, namespace, 16).l2_ids == set()
    cache.put("k", bytes(value) if not isinstance(value, (dict, tuple)) else "plain")
    assert cache.get("k") is not None


@pytest.mark.parametrize("key", [["a", "list"], {"a": 1}, 42, None, b"", ""])
def test_put_refuses_a_key_of_the_wrong_kind_with_invalid_key_error(make_cache: Make, key: Any) -> None:
    cache = make_cache()
    with pytest.raises(InvalidKeyError):
        cache.put(key, "value")
    with pytest.raises(InvalidKeyError):
        cache.get(key)
    with pytest.raises(InvalidKeyError):
        cache.delete(key)


def test_get_many_answers_for_every_spelling_asked(make_cache: Make) -> None:
    writer, reader = make_cache(), make_cache()
    writer.put("k", "value")
    assert reader.get_many(["k", b"k", "missing"]) == {"k": "value", b"k": "value"}
    assert reader.get_many([b"k", "k"]) == {"k": "value", b"k": "value"}  # now from L1 or Redis alike


def test_located_keys_are_bounded_by_their_bytes() -> None:
    space = KeySpace("bounded", 16)
    for i in range(3 * REFS_BYTES // MAX_RAW_KEY_BYTES):
        space.ref(f"{i:08d}".ljust(MAX_RAW_KEY_BYTES, "x"))
        assert space.refs_bytes <= REFS_BYTES
    assert len(space.refs) <= REFS_BYTES // MAX_RAW_KEY_BYTES
    space.ref("p" * (MAX_RAW_KEY_BYTES + 1))  # a long key (a prompt) is located each time, never kept
    assert all(len(k) <= MAX_RAW_KEY_BYTES for k in space.refs)
