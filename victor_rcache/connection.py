"""Redis clients built from a :class:`CacheConfig`, sync and async, standalone or cluster.

redis-py's own retries are switched off: a cache call must return within its timeout, and
retrying is the resilience layer's decision, not the driver's.

A batch of one command (most often one script call on one shard) goes without a pipeline
(:func:`send_alone`, :func:`send_alone_async`); its reply comes back as a pipeline's would, with an
error Redis answered standing in place of the reply.
"""

from __future__ import annotations

import bisect
import importlib
import inspect
import itertools
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, RedisClusterException, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from . import forksafe
from .config import CacheConfig, redact
from .errors import ConfigurationError
from .periodic import in_background
from .resilience import raise_transient
from .scripts import Command

# The redis-py releases the suite runs against (`make test-compat`: the oldest and the newest). Keep in
# step with pyproject.toml's dependency range. 5.0.1 is the floor: 5.0.0's asyncio clients have no aclose().
REDIS_PY_TESTED = ((5, 0, 1), (8, 3))  # oldest tested, first release past the range


def redis_py_verdict(version: str) -> tuple[str, str] | None:
    """None for a redis-py release in the tested range; else ``("refuse" | "warn", why and what to do)``.

    Older releases lack what the cache needs (and are refused); a newer one may have changed the few
    internals the cache relies on (cluster pipeline routing), so it runs with a warning.
    """
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    oldest, past = REDIS_PY_TESTED
    wanted = f"redis>={'.'.join(map(str, oldest))},<{'.'.join(map(str, past))}"
    if parts < oldest:
        return "refuse", f"victor_rcache needs redis-py >= {'.'.join(map(str, oldest))}, found {version}; " \
                         f"install a tested release: pip install '{wanted}'"
    if parts >= past:
        return "warn", f"redis-py {version} is newer than the releases victor_rcache is tested with ({wanted}); " \
                       "it should work, but pin a tested release if anything misbehaves"
    return None


def _check_redis_py() -> None:
    verdict = redis_py_verdict(redis.__version__)
    if verdict is None:
        return
    kind, why = verdict
    if kind == "refuse":
        raise ImportError(why)
    warnings.warn(why, RuntimeWarning, stacklevel=3)


_check_redis_py()


def _options(config: CacheConfig) -> dict[str, Any]:
    url = config.url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(
            f"Redis URL {redact(url)!r} must start with redis://, rediss:// (TLS) or unix://, "
            "e.g. redis://localhost:6379/0"
        )
    if url.startswith(("redis://", "rediss://")):
        path = urlsplit(url).path.strip("/")
        if path and not path.isdigit():  # redis-py would ignore it and use database 0
            raise ConfigurationError(f"Redis URL {redact(url)!r}: the database after the port must be a number, "
                                     f"not {path!r}; use e.g. redis://localhost:6379/0")
    return {"socket_timeout": config.socket_timeout, "socket_connect_timeout": config.connect_timeout,
            "decode_responses": False}


def _checked(build: Any, config: CacheConfig, retry: Any, **extra: Any) -> Any:
    options = _options(config)  # its own ConfigurationError is clear as it is
    try:
        built = build(config.url, retry=retry, **options, **extra)
        # redis-py takes unknown URL query options at construction and fails on every connection
        # later: make one connection object now (it does not connect) so a bad option fails here.
        pool = getattr(built, "connection_pool", built)
        if hasattr(pool, "connection_class") and hasattr(pool, "connection_kwargs"):
            pool.connection_class(**pool.connection_kwargs)
    except ValueError as exc:
        raise ConfigurationError(f"Redis URL {redact(config.url)!r} is malformed ({exc}); "
                                 "use redis://[user:password@]host:port/db") from exc
    except TypeError as exc:
        raise ConfigurationError(f"Redis URL {redact(config.url)!r} has an option redis-py does not take ({exc}); "
                                 "check its spelling, and use rediss:// for TLS options such as ssl_ca_certs") from exc
    return built


SyncClient: TypeAlias = redis.Redis | RedisCluster
AsyncClient: TypeAlias = redis.asyncio.Redis | AsyncRedisCluster


def _script_routing(fallback: Any = None) -> dict[str, Any]:
    """Cluster options that route EVALSHA/EVAL by their KEYS inside a pipeline.

    redis-py 8's sync cluster pipeline otherwise asks a node (``COMMAND GETKEYS``, one extra round
    trip per script call) where each script call goes. Older redis-py routes them by KEYS already.
    """
    try:  # redis-py >= 8 only; imported by name, as its typing of this module changes between releases
        policies: Any = importlib.import_module("redis.commands.policies")
    except ImportError:
        return {}
    keyed = policies.CommandPolicies(request_policy=policies.RequestPolicy.DEFAULT_KEYED,
                                     response_policy=policies.ResponsePolicy.DEFAULT_KEYED)

    class ScriptsByKeys(policies.BasePolicyResolver):  # type: ignore[misc]  # (a base class of type Any)
        def __init__(self, fallback: Any = None) -> None:
            super().__init__({"core": {"evalsha": keyed, "eval": keyed}}, fallback or policies.StaticPolicyResolver())

        def with_fallback(self, fallback: Any) -> Any:
            return ScriptsByKeys(fallback)

    return {"policy_resolver": ScriptsByKeys(fallback)}


def sync_client(config: CacheConfig) -> SyncClient:
    """A redis-py client for ``config.url`` (raises ConfigurationError on a malformed URL)."""
    if config.cluster:
        cluster: RedisCluster = _checked(RedisCluster.from_url, config, Retry(NoBackoff(), 0), **_script_routing())
        return cluster
    client: redis.Redis = _checked(redis.Redis.from_url, config, Retry(NoBackoff(), 0))
    return client


# What the Redis I/O itself can raise. redis-py's cluster errors (no slot covered, topology being
# rebuilt) are not RedisError subclasses; to the cache they are Redis failures like the others.
IO_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)


def as_redis_error(exc: Exception) -> RedisError:
    """The failure as a RedisError, which is what the tier core handles (fail-open or typed error)."""
    if isinstance(exc, RedisError):
        return exc
    wrapped = RedisConnectionError(f"{type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def pipeline(client: SyncClient) -> Any:
    """A non-transactional pipeline that routes script calls by their KEYS on a cluster too.

    redis-py 8.1's ``RedisCluster.pipeline()`` does not hand the client's ``policy_resolver`` to the
    pipeline it makes, so it is passed on here, with script routing added for a client the
    application built itself (see :func:`_script_routing`).
    """
    pipe = client.pipeline(transaction=False)
    resolver = getattr(client, "_policy_resolver", None)
    if is_cluster(client) and resolver is not None and hasattr(pipe, "_policy_resolver"):
        if resolver.resolve("evalsha") is None:  # a client of the application's: add script routing
            resolver = _script_routing(resolver).get("policy_resolver", resolver)
        pipe._policy_resolver = resolver
    return pipe


SCRIPT_CALLS = frozenset({"EVALSHA", "EVAL"})
# A lone script call on a cluster goes straight to the node serving its keys' slot. What a cluster
# client's pipeline would hand back to the client itself (which follows MOVED and ASK, waits out
# TRYAGAIN and, after a connection failure, reads the slot map again) goes back to it the same way:
# redis-py's sync pipeline does so for all of these, its asyncio pipeline for the redirections only.
RESENT_BY_CLUSTER: tuple[type[RedisError], ...] = (MovedError, AskError, TryAgainError, RedisConnectionError,
                                                    RedisTimeoutError)
RESENT_BY_ASYNC_CLUSTER: tuple[type[RedisError], ...] = (MovedError, AskError, TryAgainError)


_cluster_types: dict[type, bool] = {}


def is_cluster(client: SyncClient | AsyncClient) -> bool:
    """Is ``client`` a (sync or asyncio) cluster client? Remembered per class: an ``isinstance`` check
    against redis-py's client classes (typing Protocols) costs about half a microsecond."""
    kind = type(client)
    known = _cluster_types.get(kind)
    if known is None:
        known = _cluster_types[kind] = issubclass(kind, (RedisCluster, AsyncRedisCluster))
    return known


def goes_alone(client: SyncClient | AsyncClient, batch: list[Command]) -> bool:
    """Is ``batch`` sent without a pipeline? A lone command is; on a cluster, only a script call with keys
    (routed by its first key: every key of a call shares a slot), anything else keeps the pipeline's routing."""
    if len(batch) != 1:
        return False
    command = batch[0]
    return not is_cluster(client) or (command[0] in SCRIPT_CALLS and command[2] > 0)


# redis-py < 5.3 requires a command name here; later releases warn when one is given.
_NAMED_CHECKOUT = inspect.signature(redis.ConnectionPool.get_connection).parameters[
    "command_name"].default is inspect.Parameter.empty


def send_packed(client: redis.Redis, commands: list[bytes]) -> list[Any]:
    """Commands already packed (scripts.pack), on a standalone client, in one round trip: the replies, an
    error Redis answered in place (a transient one raised, as :func:`send_alone` does). The checkout,
    send, read and release of redis-py's own pipeline, without encoding any argument."""
    pool = client.connection_pool
    conn: Any = pool.get_connection("HMGET") if _NAMED_CHECKOUT else pool.get_connection()  # (untyped API)
    mixed = True  # (False: every reply is a list, so none is an error to look at)
    try:
        conn.send_packed_command([b"".join(commands)])  # one write, not one per command
        if len(commands) > 1 and _reads_at_once(conn):  # (one reply gains nothing worth the check)
            replies, mixed = _read_replies(conn._parser, len(commands))
        else:
            replies = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:  # a whole reply was read: the connection is fine
                    replies.append(exc)
    except BaseException:  # a reply may be half read: the connection is not reusable
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    return raise_transient(replies) if mixed else replies


# The replies of a batch straight from the connection's hiredis reader (_read_replies), instead of one
# Connection.read_response call each, whose own work (host text, error checks, the parser's call) costs
# more than hiredis parsing the reply: a get_many of 100 keys reads 100 replies. Only where that call adds
# nothing the batch needs: redis-py's hiredis parser (the same class and reader from 5.0.1 to 8.2), no
# health check to schedule, no reply already taken (5.0's can_read keeps one); with RESP3, only where the
# parser tells push messages from replies (hiredis >= 3.2) and "no whole reply yet" is a sentinel of its
# own (RESP3 has a False reply). Anything else reads reply by reply.
try:
    _hiredis_parsers: Any = importlib.import_module("redis._parsers.hiredis")
    _HIREDIS_PARSER: Any = _hiredis_parsers._HiredisParser if _hiredis_parsers.HIREDIS_AVAILABLE else None
except (ImportError, AttributeError):
    _HIREDIS_PARSER = None
# What the reader answers for "not a whole reply yet": under redis-py 5.0, hiredis's default (False: RESP2
# has no boolean reply, so False never stands for a reply there); later, a sentinel of redis-py's.
_NOT_ENOUGH_DATA: Any = getattr(_hiredis_parsers, "NOT_ENOUGH_DATA", False) if _HIREDIS_PARSER else False


def _reads_at_once(conn: Any) -> bool:
    parser = getattr(conn, "_parser", None)
    if (_HIREDIS_PARSER is None or parser.__class__ is not _HIREDIS_PARSER or conn.health_check_interval
            or getattr(parser, "_next_response", False) is not False or getattr(parser, "_reader", None) is None):
        return False
    if conn.protocol in (2, "2"):
        return True
    return (conn.protocol in (3, "3") and _NOT_ENOUGH_DATA is not False
            and getattr(parser, "_hiredis_PushNotificationType", None) is not None)


def _read_replies(parser: Any, count: int) -> tuple[list[Any], bool]:
    """``count`` replies from a hiredis parser's reader (see _reads_at_once), and whether any is not a list:
    an error Redis answered stays in place, as :func:`send_packed` puts it; a push message is handed to
    redis-py, as its parser does; a connection error is raised, as redis-py raises it (the caller then
    drops the connection)."""
    reader = parser._reader
    gets, fill, more = reader.gets, parser.read_from_socket, _NOT_ENOUGH_DATA
    push = getattr(parser, "_hiredis_PushNotificationType", None) or ()  # (isinstance of () is False)
    replies: list[Any] = []
    append = replies.append
    others = False
    try:
        while count:
            reply = gets()
            if reply is more:
                fill()  # (raises redis-py's TimeoutError or ConnectionError)
                continue
            if reply.__class__ is not list:
                if isinstance(push, type) and isinstance(reply, push):
                    parser.handle_push_response(reply)  # not a reply: the one it came before follows
                    continue
                if isinstance(reply, RedisConnectionError):  # what redis-py's parser raises, not returns
                    raise reply
                others = True
            elif reply and isinstance(reply[0], RedisConnectionError):
                raise reply[0]
            append(reply)
            count -= 1
    except OSError as exc:  # the socket itself failed, as Connection.read_response words it
        raise RedisConnectionError(f"Error while reading from the socket: {exc.args}") from exc
    return replies, others


_NAMED_ASYNC_CHECKOUT = inspect.signature(redis.asyncio.ConnectionPool.get_connection).parameters[
    "command_name"].default is inspect.Parameter.empty


async def send_packed_async(client: redis.asyncio.Redis, commands: list[bytes]) -> list[Any]:
    """:func:`send_packed` on an asyncio standalone client (not a single-connection one)."""
    pool: Any = client.connection_pool  # (its checkout is untyped in some redis-py releases)
    conn: Any = await (pool.get_connection("HMGET") if _NAMED_ASYNC_CHECKOUT else pool.get_connection())
    try:
        await conn.send_packed_command([b"".join(commands)])  # one write, not one per command
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:  # a whole reply was read: the connection is fine
                replies.append(exc)
    except BaseException:  # cancelled mid-read, or the connection failed: it is not reusable
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)
    return raise_transient(replies)


def send_alone(client: SyncClient, command: Command) -> list[Any]:
    """Send one command (see :func:`goes_alone`): ``[reply]``, or ``[error]`` for an error Redis answered,
    as a pipeline's ``execute(raise_on_error=False)`` puts it; a transient one is raised (the batch is
    retried), like any failure to reach Redis."""
    sender: Any = client  # (redis-py's cluster client is untyped)
    try:
        if is_cluster(client):
            node = sender.get_redis_connection(sender.get_node_from_key(command[3]))
            try:
                return [node.execute_command(*command)]
            except RESENT_BY_CLUSTER:
                pass  # the cluster client sends it again, following the cluster
        return [sender.execute_command(*command)]
    except ResponseError as exc:
        return raise_transient([exc])


async def send_alone_async(client: AsyncClient, command: Command) -> list[Any]:
    """:func:`send_alone` on an asyncio client."""
    sender: Any = client
    try:
        if is_cluster(client):
            await sender.initialize()  # nothing to do unless a failure asked for a fresh slot map
            try:
                return [await sender.get_node_from_key(command[3]).execute_command(*command)]
            except RESENT_BY_ASYNC_CLUSTER:
                pass
        return [await sender.execute_command(*command)]
    except ResponseError as exc:
        return raise_transient([exc])


def async_client(config: CacheConfig) -> AsyncClient:
    """A redis.asyncio client for ``config.url``."""
    build = AsyncRedisCluster.from_url if config.cluster else redis.asyncio.Redis.from_url
    client: AsyncClient = _checked(build, config, AsyncRetry(NoBackoff(), 0))
    return client


def cluster_nodes(client: Any) -> Callable[[], list[tuple[str, int]]] | None:
    """For a cluster client, the nodes it knows (where the subscriber may ask for the slot map)."""
    if not isinstance(client, (RedisCluster, AsyncRedisCluster)):
        return None
    return lambda: [(str(node.host), int(node.port)) for node in client.get_nodes()]


Address: TypeAlias = "tuple[str, int] | None"  # a node; None: the URL's server


class SubscriberRoutes:
    """Where the invalidation subscriber connects: fresh, unpooled connections for each node it needs.

    On a standalone Redis every channel is on the URL's server (``sharded`` is False). On a cluster
    (``sharded``) a shard's channel lives in its hash slot, on the master that owns the slot:
    :meth:`refresh` reads the slot map (``CLUSTER SLOTS``) from a node that answers, and :meth:`owner`
    says which master to subscribe a channel on.
    """

    def __init__(self, config: CacheConfig, nodes: Callable[[], list[tuple[str, int]]] | None = None) -> None:
        self._pool: redis.ConnectionPool = _checked(redis.ConnectionPool.from_url, config, Retry(NoBackoff(), 0))
        self._nodes = nodes
        self.sharded = config.cluster or nodes is not None
        self._starts: list[int] = []  # first slot of each range of the slot map, ascending
        self._owners: list[tuple[int, tuple[str, int]]] = []  # (last slot, master) of each range
        self._turn = itertools.count()

    def connect(self, address: Address) -> Any:
        """A new connection (not yet connected) to ``address``."""
        kwargs = self._pool.connection_kwargs
        if address is None:
            return self._pool.make_connection()
        return self._pool.connection_class(**{**kwargs, "host": address[0], "port": address[1]})

    def _seeds(self) -> list[tuple[str, int]]:
        kwargs = self._pool.connection_kwargs
        known = list(self._nodes()) if self._nodes is not None else []
        known += [address for _, address in self._owners]
        if "host" in kwargs:
            known.append((str(kwargs["host"]), int(kwargs.get("port", 6379))))
        seeds = list(dict.fromkeys(known))
        start = next(self._turn) % len(seeds) if seeds else 0  # a node that failed is not asked first again
        return seeds[start:] + seeds[:start]

    def refresh(self) -> None:
        """Read the slot map from the first node that answers (raises the last failure if none does)."""
        failure: Exception = RedisConnectionError("no cluster node known")
        for address in self._seeds():
            conn = self.connect(address)
            try:
                conn.connect()
                conn.send_command("CLUSTER", "SLOTS")
                reply = conn.read_response()
            except Exception as exc:  # that node is down or refuses: ask the next one
                failure = exc
                continue
            finally:
                conn.disconnect()
            ranges = sorted((int(r[0]), int(r[1]), _node_address(r[2], address)) for r in reply)
            self._starts = [start for start, _, _ in ranges]
            self._owners = [(end, node) for _, end, node in ranges]
            return
        raise failure

    def owner(self, channel: bytes) -> Address:
        """The master that owns ``channel``'s slot (None on a standalone Redis, or a slot no one owns)."""
        if not self.sharded:
            return None
        slot = key_slot(channel)
        at = bisect.bisect_right(self._starts, slot) - 1
        if at < 0 or slot > self._owners[at][0]:
            return None
        return self._owners[at][1]


def _node_address(node: list[Any], asked: tuple[str, int]) -> tuple[str, int]:
    host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
    return (host or asked[0], int(node[1]))  # an empty host: the node we asked


# ------------------------------------------------------------------ what the caches of one process share

# Caches of one process on the same Redis with the same connection settings share one command client
# (one connection pool), one invalidation subscriber and one background thread, so a process holds a
# fixed number of connections and threads whatever the number of namespaces (docs/design.md, "Connections
# and threads per process").

BACKGROUND_WAIT = 1.0  # seconds a background checkout waits for an idle connection before opening one


class SharedPool(redis.ConnectionPool):
    """The connection pool the sync caches of one process share, which background work does not grow.

    redis-py's pool opens a new connection whenever a checkout finds none idle. A single-threaded worker
    holds its one connection for each round trip; were the background thread (bookkeeping, the model) to
    check one out meanwhile, the pool would open a second connection that the worker never needed. So:

    * a background checkout (from the process's background thread, see periodic.py) takes an idle
      connection, or waits for one to come back (a caller's release hands it over directly), for up
      to BACKGROUND_WAIT seconds (then opens one: the caller's threads keep every connection busy,
      and a pool that size is theirs anyway);
    * a caller's checkout that finds none idle while the background holds one waits for it (one round
      trip), up to the socket timeout, instead of opening one.

    Both decisions are made under the pool's own lock, together with the checkout: no checkout can take
    the connection another was just promised. Only waits take more than that one lock.
    """

    def reset(self) -> None:
        super().reset()
        self._held_in_background: set[Any] = set()  # connections a background thread has checked out
        self._handed: list[Any] = []  # connections released straight to a waiting background checkout
        self._waiting = 0  # callers' checkouts waiting for a background thread's connection to come back
        self._background_waiting = 0  # background checkouts waiting for an idle connection

    def _gate(self) -> threading.Condition:
        # redis-py makes the pool's lock anew in a forked child: the condition follows it.
        lock = self._lock
        gate = getattr(self, "_gate_cond", None)
        if gate is None or getattr(self, "_gate_lock", None) is not lock:
            gate = self._gate_cond = threading.Condition(lock)
            self._gate_lock = lock
        return gate

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        background = in_background()
        if not background and not self._held_in_background:  # the hot path: redis-py's own checkout
            return super().get_connection(*args, **kwargs)
        self._checkpid()
        timeout = BACKGROUND_WAIT if background else (self.connection_kwargs.get("socket_timeout") or 1.0)
        deadline = time.monotonic() + timeout
        gate = self._gate()
        connection = None
        with gate:
            while True:
                if background and self._handed:  # a caller released it to us (in use, held in background)
                    connection = self._handed.pop()
                    break
                if self._available_connections or self._created_connections == 0:
                    break
                if not background and not self._held_in_background:
                    break  # the caller's own threads hold them all: open one, as redis-py would
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if background:
                    self._background_waiting += 1
                else:
                    self._waiting += 1
                try:
                    gate.wait(left)
                finally:
                    if background:
                        self._background_waiting -= 1
                    else:
                        self._waiting -= 1
            if connection is None:
                try:
                    connection = self._available_connections.pop()
                except IndexError:
                    connection = self.make_connection()
                self._in_use_connections.add(connection)
                if background:
                    self._held_in_background.add(connection)
        try:
            self._ready(connection)
        except BaseException:
            self.release(connection)
            raise
        return connection

    def _ready(self, connection: Any) -> None:
        """What redis-py's checkout does after taking a connection: connect it, and make sure no stale
        reply waits on it."""
        ensure = getattr(super(), "ensure_connection", None)  # redis-py >= 5.1
        if ensure is not None:
            ensure(connection)
            return
        connection.connect()
        try:
            if connection.can_read():
                raise RedisConnectionError("Connection has data")
        except (RedisConnectionError, OSError):
            connection.disconnect()
            connection.connect()
            if connection.can_read():
                raise RedisConnectionError("Connection not ready") from None

    def release(self, connection: Any) -> None:
        super().release(connection)
        if self._held_in_background or self._waiting or self._background_waiting:
            gate = self._gate()
            with gate:
                self._held_in_background.discard(connection)
                # A waiting background checkout gets it now: a caller in a loop would otherwise take it
                # back before the woken thread runs, again and again (it then waits, one round trip).
                if self._background_waiting and not self._handed and connection in self._available_connections:
                    self._available_connections.remove(connection)
                    self._in_use_connections.add(connection)
                    self._held_in_background.add(connection)
                    self._handed.append(connection)
                gate.notify_all()


def connection_key(config: CacheConfig) -> tuple[Any, ...]:
    """What two caches must agree on to share connections: the URL (credentials included) and the
    connection settings."""
    return (config.url, config.cluster, config.socket_timeout, config.connect_timeout)


class _Shared:
    """The process's shared command clients, by :func:`connection_key`, each with its number of users."""

    FORK_ORDER = 0  # before the objects that acquire again in the child

    def __init__(self) -> None:
        self._after_fork()
        forksafe.register(self)

    def _after_fork(self) -> None:
        # The parent's clients stay the parent's: a child makes its own (their sockets are the parent's).
        self.lock = threading.Lock()
        self.clients: dict[tuple[Any, ...], list[Any]] = {}  # key -> [client, users]


_SHARED = _Shared()


def acquire_sync_client(config: CacheConfig) -> SyncClient:
    """The process's command client for ``config``'s Redis, made on first use; give it back with
    :func:`release_sync_client`. Raises what :func:`sync_client` raises (nothing is kept then)."""
    key = connection_key(config)
    with _SHARED.lock:
        entry = _SHARED.clients.get(key)
        if entry is None:
            entry = _SHARED.clients[key] = [_shared_sync_client(config), 0]
        entry[1] += 1
        client: SyncClient = entry[0]
        return client


def release_sync_client(config: CacheConfig, client: SyncClient) -> None:
    """One user less of ``client``; the last one out closes it (a client of a parent process: nothing)."""
    key = connection_key(config)
    with _SHARED.lock:
        entry = _SHARED.clients.get(key)
        if entry is None or entry[0] is not client:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _SHARED.clients[key]
    client.close()


def _shared_sync_client(config: CacheConfig) -> SyncClient:
    if config.cluster:  # (its nodes' pools are redis-py's own: see docs/cluster.md)
        return sync_client(config)
    pool: SharedPool = _checked(SharedPool.from_url, config, Retry(NoBackoff(), 0))
    client = redis.Redis(connection_pool=pool)  # what redis.Redis.from_url does, with this pool
    client.auto_close_connection_pool = True
    return client
