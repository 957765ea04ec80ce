"""Tags: ``put(..., tags=)``, ``get_or_set(..., tags=)`` and ``invalidate_tags`` (docs/tags.md).

What a user relies on, checked against what Redis holds: ``invalidate_tags`` removes every entry carrying
a tag, from every tier and every process's L1 (worker processes), and nothing else; it is idempotent;
it works past its per-call batch; a tag's records go with their entries however those go (delete,
rewrite, eviction, expiry, flush), so tags cost no memory of their own over time; bad tags are refused
before any I/O, and a tag's set written by hand with another type is refused before any write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from victor_rcache import InvalidArgumentError, MultiLevelCache, tiers
from victor_rcache.keys import KeySpace, decode_tags

from .helpers import Backend, Client, FakeClock, check_invariants
from .workers import Worker, eventually

Make = Callable[..., MultiLevelCache]
SIZES: dict[str, Any] = {"shards": 2, "l2_size": 20, "l3_size": 40}


def tag_records(raw: Client, namespace: str, shards: int) -> tuple[dict[bytes, set[bytes]], dict[bytes, list[bytes]]]:
    """What Redis holds of the tags: each tag's set (``tag -> ids``) and each tagged entry's record
    (``id -> tags``), over every shard."""
    space = KeySpace(namespace, shards)
    sets: dict[bytes, set[bytes]] = {}
    records: dict[bytes, list[bytes]] = {}
    for sk in space.shard_keys:
        for entry_id, encoded in raw.hgetall(sk.tags).items():  # type: ignore[union-attr]
            records[entry_id] = decode_tags(encoded)
        prefix = sk.tag(b"")
        for key in raw.scan_iter(match=prefix + b"*"):
            sets.setdefault(key[len(prefix):], set()).update(raw.smembers(key))  # type: ignore[arg-type]
    return sets, records


def test_invalidate_tags_removes_every_tagged_entry_and_nothing_else(make_cache: Make, raw: Client,
                                                                      namespace: str) -> None:
    cache = make_cache(**SIZES)
    cache.put("acme-1", 1, tags=["tenant:acme"])
    cache.put_many({"acme-2": 2, "acme-3": 3}, tags=["tenant:acme", "model:a"])
    cache.put("other", 4, tags=["tenant:other"])
    cache.put("untagged", 5)
    assert cache.get_or_set("acme-4", lambda: 6, tags=("tenant:acme",)) == 6
    assert cache.invalidate_tags("tenant:acme") == 4
    reader = make_cache(**SIZES)
    assert {k: reader.get(k) for k in ("acme-1", "acme-2", "acme-3", "acme-4", "other", "untagged")} == {
        "acme-1": None, "acme-2": None, "acme-3": None, "acme-4": None, "other": 4, "untagged": 5}
    sets, records = tag_records(raw, namespace, SIZES["shards"])
    assert sets == {b"tenant:other": {b"other"}}  # model:a went with its entries too
    assert records == {b"other": [b"tenant:other"]}
    check_invariants(raw, namespace, SIZES["shards"], SIZES["l2_size"], SIZES["l3_size"])


def test_invalidate_tags_is_idempotent_and_an_unknown_tag_removes_nothing(make_cache: Make) -> None:
    cache = make_cache(**SIZES)
    cache.put("k", 1, tags=["t"])
    assert cache.invalidate_tags("t") == 1
    assert cache.invalidate_tags("t") == 0
    assert cache.invalidate_tags("never used") == 0


def test_a_tag_holding_more_than_one_call_removes_is_emptied_in_several(make_cache: Make, raw: Client,
                                                                      namespace: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiers, "UNTAG_BATCH", 3)
    cache = make_cache(shards=1, l2_size=100, l3_size=100)
    cache.put_many({f"k{i}": i for i in range(20)}, tags=["big"])
    cache.put("kept", 1, tags=["small"])
    assert cache.invalidate_tags("big") == 20
    assert make_cache(shards=1, l2_size=100, l3_size=100).get_many([f"k{i}" for i in range(20)]) == {}
    assert tag_records(raw, namespace, 1) == ({b"small": {b"kept"}}, {b"kept": [b"small"]})


def test_tag_records_go_with_their_entries_however_they_go(make_cache: Make, raw: Client, namespace: str,
                                                           clock: FakeClock) -> None:
    """A delete, a rewrite with other tags, an LRU eviction, an expiry and a flush each leave no tag record
    behind: a tag's sets hold only entries the tiers hold."""
    cache = make_cache(shards=1, l2_size=2, l3_size=2, clock=clock)
    cache.put("deleted", 1, tags=["a"])
    cache.put("retagged", 1, tags=["a", "b"])
    cache.delete("deleted")
    cache.put("retagged", 2, tags=["c"])
    assert tag_records(raw, namespace, 1) == ({b"c": {b"retagged"}}, {b"retagged": [b"c"]})

    cache.put("expiring", 1, ttl=5, tags=["x"])
    clock.advance(6)
    for i in range(4):  # past L2 + L3 = 4 entries: the oldest are evicted; the puts sweep the expired one
        cache.put(f"filler{i}", i, tags=["f"])
    sets, records = tag_records(raw, namespace, 1)
    state = check_invariants(raw, namespace, 1, 2, 2)
    held = state.l2_ids | state.l3_ids
    assert held == {b"filler0", b"filler1", b"filler2", b"filler3"}  # "expiring" expired, "retagged" evicted
    assert set(records) == held
    assert sets == {b"f": held}

    cache.invalidate()
    assert tag_records(raw, namespace, 1) == ({}, {})


@pytest.mark.parametrize("tags", [[""], ["t" * 257], [f"t{i}" for i in range(65)], [1]])
def test_a_bad_tag_is_refused_before_any_io(make_cache: Make, raw: Client, namespace: str, tags: list[Any]) -> None:
    cache = make_cache(**SIZES)
    before = raw.dbsize()
    with pytest.raises(InvalidArgumentError):
        cache.put("k", 1, tags=tags)
    with pytest.raises(InvalidArgumentError):
        cache.get_or_set("k", lambda: 1, tags=tags)
    assert raw.dbsize() == before


def test_invalidate_tags_needs_a_tag(make_cache: Make) -> None:
    with pytest.raises(InvalidArgumentError, match="at least one tag"):
        make_cache(**SIZES).invalidate_tags()


def test_a_tag_set_written_by_hand_refuses_the_put_before_any_write(make_cache: Make, raw: Client,
                                                                   namespace: str) -> None:
    cache = make_cache(shards=1, l2_size=10, l3_size=10)
    tag_key = KeySpace(namespace, 1).shard_keys[0].tag(b"t")
    raw.set(tag_key, "written by hand")
    with pytest.raises(Exception, match=f"VRC_WRONGTYPE {tag_key.decode()} holds a string"):
        make_cache(shards=1, l2_size=10, l3_size=10, fail_open=False).put("k", 1, tags=["t"])
    assert cache.get("k") is None
    raw.delete(tag_key)
    cache.put("k", 1, tags=["t"])
    assert cache.invalidate_tags("t") == 1


def test_tags_are_a_single_name_when_given_as_a_string(make_cache: Make, raw: Client, namespace: str) -> None:
    cache = make_cache(shards=1, l2_size=10, l3_size=10)
    cache.put("k", 1, tags="tenant:acme")  # one tag, not its letters
    assert tag_records(raw, namespace, 1)[1] == {b"k": [b"tenant:acme"]}


@pytest.mark.slow
def test_invalidate_tags_empties_every_processs_l1_of_the_tagged_entries_only(backend: Backend,
                                                                              namespace: str) -> None:
    """Three worker processes hold L1 copies of tagged and untagged entries; one invalidates a tag; every
    process stops serving the tagged copies and still serves the others from its L1."""
    settings: dict[str, Any] = {"promote_after": 1, "cluster": backend.cluster, **SIZES}  # (the first Redis hit
    # copies an entry into L1)
    workers = [Worker(backend.url, namespace, **settings) for _ in range(3)]
    try:
        workers[0].call("put_tagged", "tagged", "v", ["tenant:acme"])
        workers[0].put("untagged", "v")
        for w in workers:
            assert (w.get("tagged"), w.get("untagged")) == ("v", "v")  # Redis hits: now in every L1
            assert (w.get("tagged"), w.get("untagged")) == ("v", "v")  # L1 hits
        assert workers[1].call("invalidate_tags", "tenant:acme") == 1
        for w in workers:
            eventually(lambda w=w: w.get("tagged") is None, "a process still serves the tagged entry")
        for w in workers:
            before = w.health()["l1"]["hits"]
            assert w.get("untagged") == "v"
            assert w.health()["l1"]["hits"] == before + 1, "the untagged copy left L1"
    finally:
        for w in workers:
            w.close()
