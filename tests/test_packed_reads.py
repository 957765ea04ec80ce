"""Plain reads go out packed (connection.send_packed) and, on redis-py's hiredis parser, their replies are
taken from its reader in one loop (connection._read_replies) rather than one Connection.read_response each.
They must come back exactly as reply by reply: in order, an error Redis answered in place (not raised),
a batch whose replies span many socket reads whole, and a connection that fails mid-batch dropped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from victor_rcache import connection
from victor_rcache.config import CacheConfig
from victor_rcache.connection import send_packed
from victor_rcache.scripts import pack

from .helpers import Backend

pytestmark = pytest.mark.standalone_only(reason="send_packed is the standalone client's path (a cluster pipelines)")


@pytest.fixture
def client(backend: Backend) -> Iterator[redis.Redis]:
    made: Any = connection.sync_client(CacheConfig(redis_url=backend.url))
    yield made
    made.close()


def _batch(client: redis.Redis, prefix: str) -> list[bytes]:
    client.set(f"{prefix}:string", "s")
    client.hset(f"{prefix}:hash", mapping={"v": b"x" * 3000, "ver": 7})
    commands: list[tuple[Any, ...]] = []
    for i in range(300):  # ~1 MB of replies: many socket reads, replies cut anywhere
        commands += [("HMGET", f"{prefix}:hash", "v", "ver", "absent"), ("HMGET", f"{prefix}:string", "v"),
                     ("GET", f"{prefix}:none{i}")]
    return [pack(c) for c in commands]


def test_replies_read_at_once_are_the_replies_read_one_by_one(client: redis.Redis, namespace: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pool: Any = client.connection_pool
    conn = pool.get_connection("GET") if connection._NAMED_CHECKOUT else pool.get_connection()
    try:
        assert connection._reads_at_once(conn), "the installed redis-py and hiredis take the batch path"
    finally:
        pool.release(conn)
    batch = _batch(client, namespace)
    at_once = send_packed(client, batch)
    monkeypatch.setattr(connection, "_reads_at_once", lambda conn: False)
    one_by_one = send_packed(client, batch)
    assert len(at_once) == len(one_by_one) == len(batch)
    for got, want in zip(at_once, one_by_one, strict=True):
        if isinstance(want, Exception):
            assert type(got) is type(want) is ResponseError
            assert str(got) == str(want)
            assert str(got).startswith("WRONGTYPE")
        else:
            assert got == want
    assert at_once[0] == [b"x" * 3000, b"7", None]
    assert at_once[2] is None
    assert client.ping(), "the connection is fine after errors answered in place"


def test_a_connection_that_fails_mid_batch_is_dropped_and_the_failure_raised(client: redis.Redis, namespace: str,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _batch(client, namespace)
    fill = connection._HIREDIS_PARSER.read_from_socket
    reads = []

    def failing(parser: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(1)
        if len(reads) == 3:  # some replies read, the rest cut off
            raise ConnectionResetError(104, "Connection reset by peer")
        return fill(parser, *args, **kwargs)

    monkeypatch.setattr(connection._HIREDIS_PARSER, "read_from_socket", failing)
    with pytest.raises(RedisConnectionError):
        send_packed(client, batch)
    monkeypatch.undo()
    pool: Any = client.connection_pool
    assert all(conn._sock is None for conn in pool._available_connections), "the half-read connection is closed"
    assert send_packed(client, batch[:3])[2] is None  # a new connection, nothing left over from the old one


@pytest.mark.parametrize("args", [
    ("EVALSHA", b"f" * 40, 1, b"ns:{s0.1}:l2", "2", b"id", 1, "n", b"id", 1, "w", b"id", 0),
    ("SET", "ключ", "значение", 1023, 1024, -1, 10**20, "", b"", "22"),
    ("ECHO", True, 1.5, None),
])
def test_pack_matches_redis_py_s_own_encoding(args: tuple[Any, ...]) -> None:
    """scripts.pack keeps some arguments packed in advance (small numbers, touch.lua's one-letter kinds):
    every argument still packs as redis-py would send it, or as the repr of a type it would refuse."""
    encodable = tuple(a if a.__class__ in (bytes, str, int, float) else repr(a) for a in args)
    assert pack(args) == b"".join(redis.Connection().pack_command(*encodable))
