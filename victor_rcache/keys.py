"""Key layout: how a user key becomes a shard and Redis key names.

Every Redis key starts with ``<namespace>:``. A namespace is split into ``shards``; each shard's
keys share one hash tag (the part in braces), so a script never touches two hash slots, and the
shards' tags are chosen to fall in evenly spaced slot ranges, so Redis Cluster spreads a namespace
over all its masters::

    <ns>:config                  HASH  fleet-wide settings every worker checks (shards, format)
    <ns>:{s<i>.<salt>}:inval     the shard's invalidation channel, sharded pub/sub (not a key)
    <ns>:{s<i>.<salt>}:l2        ZSET  L2 index: entry id -> last touch (ms)
    <ns>:{s<i>.<salt>}:l3        ZSET  L3 index: entry id -> last touch (ms)
    <ns>:{s<i>.<salt>}:exp       ZSET  entry id -> absolute expiry (ms), entries with a ttl only
    <ns>:{s<i>.<salt>}:size      HASH  entry id -> payload bytes, every indexed entry
    <ns>:{s<i>.<salt>}:stats     HASH  the shard's fleet counters, byte totals and version counter
    <ns>:{s<i>.<salt>}:fence     ZSET  entry id -> when it was deleted, expired or removed (ms)
    <ns>:{s<i>.<salt>}:ghost     ZSET  entry id -> when L3 overflow evicted it (sizing evidence)
    <ns>:{s<i>.<salt>}:e:<id>    HASH  one entry: v payload, ver, t tier, n hits, x expiry, k key, d, w
    <ns>:{s<i>.<salt>}:lease:<id>  STRING  the token of the process computing a missing value
    <ns>:{s<i>.<salt>}:tags      HASH  entry id -> its tags ("<length>:<name>" each), tagged entries only
    <ns>:{s<i>.<salt>}:tag:<name>  SET  ids of the shard's entries tagged <name>

An entry id is the key itself (UTF-8 for ``str``), readable in ``redis-cli``; keys over 1 KiB, or
starting with ``#``, are stored as ``#`` + SHA-256 hex, with the original key kept in field ``k``.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .errors import ConfigurationError, InvalidArgumentError, InvalidKeyError
from .scripts import pack

MAX_RAW_KEY_BYTES = 1024
MAX_SHARDS = 1024
REFS_BYTES = 1 << 20  # key bytes a KeySpace keeps located (the ref cache is emptied when it would hold more)
_HASHED = b"#"


def key_bytes(key: str | bytes) -> bytes:
    """The canonical bytes of a user key (str is UTF-8); raises InvalidKeyError."""
    if isinstance(key, str):
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidKeyError(f"key {key!r} is not valid Unicode ({exc.reason}); pass bytes instead") from exc
    elif isinstance(key, bytes):
        raw = key
    else:
        raise InvalidKeyError(f"a key must be str or bytes, not {type(key).__name__}; convert it with str()")
    if not raw:
        raise InvalidKeyError("a key must not be empty; use a descriptive non-empty key")
    return raw


MAX_TAGS = 64  # per entry (lua/includes/shard.lua checks the same bounds)
MAX_TAG_BYTES = 256


def tag_names(tags: Iterable[str | bytes] | str | bytes) -> tuple[bytes, ...]:
    """Validated tag names (str as UTF-8), in order, without repeats; raises InvalidArgumentError."""
    if isinstance(tags, (str, bytes)):
        tags = (tags,)  # one tag, not its characters
    names: dict[bytes, None] = {}
    for tag in tags:
        if not isinstance(tag, (str, bytes)):
            raise InvalidArgumentError(f"a tag must be str or bytes, not {type(tag).__name__}; convert it with str()")
        try:
            name = tag.encode("utf-8") if isinstance(tag, str) else tag
        except UnicodeEncodeError as exc:
            raise InvalidArgumentError(f"tag {tag!r} is not valid Unicode ({exc.reason}); pass bytes instead") from exc
        if not 1 <= len(name) <= MAX_TAG_BYTES:
            raise InvalidArgumentError(f"tag {tag!r} must be 1 to {MAX_TAG_BYTES} bytes; use a short name such as "
                                       "'tenant:42' or 'model:gpt-4o'")
        names[name] = None
    if len(names) > MAX_TAGS:
        raise InvalidArgumentError(f"{len(names)} tags on one entry; at most {MAX_TAGS} are allowed")
    return tuple(names)


def encode_tags(names: tuple[bytes, ...]) -> bytes:
    """``(b"a", b"bc")`` -> ``b"1:a2:bc"``: how put.lua receives an entry's tags and the shard keeps them."""
    return b"".join(b"%d:%s" % (len(name), name) for name in names)


def decode_tags(encoded: bytes) -> list[bytes]:
    """The inverse of :func:`encode_tags` (for the CLI); raises ValueError on a malformed record."""
    names, pos = [], 0
    while pos < len(encoded):
        colon = encoded.index(b":", pos)
        end = colon + 1 + int(encoded[pos:colon])
        names.append(encoded[colon + 1:end])
        pos = end
    return names


class EntryRef(NamedTuple):
    """Where one user key lives: its canonical bytes, shard, entry id and the Redis key of its data.
    (A named tuple: a get_many of keys never read before makes one per key, and a frozen dataclass
    costs three times as much to make.)"""

    key: bytes
    shard: int
    id: bytes
    entry: bytes
    read: bytes | None = None  # the plain read of the entry, packed (see TierCore.read_command)

    @property
    def hashed(self) -> bool:
        return self.id != self.key


@dataclass(frozen=True)
class ShardKeys:
    """The index and counter keys of one shard. Scripts are given ``l2`` alone and derive the others."""

    index: int
    l2: bytes
    l3: bytes
    exp: bytes
    size: bytes
    stats: bytes
    fence: bytes
    ghost: bytes
    tags: bytes

    @property
    def keys(self) -> list[bytes]:
        """Every index and counter key of the shard (not its entries, leases and tag sets)."""
        return [self.l2, self.l3, self.exp, self.size, self.stats, self.fence, self.ghost, self.tags]

    def entry(self, entry_id: bytes) -> bytes:
        return self.l2[:-2] + b"e:" + entry_id

    def lease(self, entry_id: bytes) -> bytes:
        return self.l2[:-2] + b"lease:" + entry_id

    @property
    def channel(self) -> bytes:
        """The shard's invalidation channel (sharded pub/sub): its hash tag puts it in the shard's slot."""
        return self.l2[:-2] + b"inval"

    def tag(self, name: bytes) -> bytes:
        """The set of the shard's entry ids tagged ``name``."""
        return self.l2[:-2] + b"tag:" + name


def _shard_tag(index: int, shards: int) -> str:
    """A tag for shard ``index`` whose slot lies in the index-th of ``shards`` equal slot ranges."""
    lo = index * REDIS_CLUSTER_HASH_SLOTS // shards
    hi = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
    salt = 0
    while not lo <= key_slot(f"s{index}.{salt}".encode()) < hi:
        salt += 1
    return f"s{index}.{salt}"


class KeySpace:
    """Names every Redis key of one namespace."""

    def __init__(self, namespace: str, shards: int, read_fields: tuple[bytes, ...] = ()) -> None:
        if not namespace or not namespace.isprintable() or any(c in namespace for c in "{}: "):
            raise ConfigurationError(
                f"namespace {namespace!r} must be non-empty printable text without spaces, ':', '{{' or '}}'; "
                "use something like 'tools' or 'agents-prod'"
            )
        if not 1 <= shards <= MAX_SHARDS:
            raise ConfigurationError(f"shards={shards} must be between 1 and {MAX_SHARDS}; the default is 16")
        self.namespace = namespace
        self.shards = shards
        # Given read fields, each EntryRef carries its entry's HMGET of them, packed (scripts.pack): the
        # command's head, then the fields' part, which all entries share.
        self._read_head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(read_fields) + 2)
        self._read_fields = pack(read_fields)[len(b"*%d\r\n" % len(read_fields)):] if read_fields else b""
        self.refs: dict[str | bytes, EntryRef] = {}  # user key -> where it lives (see ref()); read-only for others
        self.refs_bytes = 0
        self.prefix = namespace.encode() + b":"
        self.config = self.prefix + b"config"
        self.channel = self.prefix + b"inval"  # the broadcast channel of releases before sharded pub/sub

    @cached_property
    def channels(self) -> tuple[bytes, ...]:
        """The shards' invalidation channels, by shard index (the scripts SPUBLISH on them)."""
        return tuple(keys.channel for keys in self.shard_keys)

    @cached_property
    def shard_keys(self) -> tuple[ShardKeys, ...]:
        out = []
        for i in range(self.shards):
            base = self.prefix + b"{" + _shard_tag(i, self.shards).encode() + b"}:"
            names = (b"l2", b"l3", b"exp", b"size", b"stats", b"fence", b"ghost", b"tags")
            out.append(ShardKeys(i, *(base + name for name in names)))
        return tuple(out)

    def ref(self, key: str | bytes) -> EntryRef:
        """Locate a user key (raises InvalidKeyError for empty or non-encodable keys).

        Hot keys are looked up again and again: located keys are remembered, up to REFS_BYTES of key
        bytes (keys longer than MAX_RAW_KEY_BYTES, prompts say, are not: they are located anew)."""
        # Exact types only: a str subclass may hash differently, and a memoryview equal to a bytes key
        # is still not a key (the dict lookup would find it).
        found = self.refs.get(key) if key.__class__ is str or key.__class__ is bytes else None
        if found is not None:
            return found
        return self.locate((key,))[0]

    def locate(self, keys: Iterable[str | bytes]) -> list[EntryRef]:
        """:meth:`ref` of each key, in order (raises InvalidKeyError at the first bad one). One loop over the
        batch with what it uses bound once: get_many of keys never read before locates each of them, and
        a call per key (ref, then the hashing and packing) cost more than the hashing itself."""
        refs, get, out, used = self.refs, self.refs.get, [], self.refs_bytes
        prefixes, shards, head, fields = self._entry_prefixes, self.shards, self._read_head, self._read_fields
        crc32, str_, bytes_, make = zlib.crc32, str, bytes, tuple.__new__  # (make: EntryRef without its __new__)
        for key in keys:
            kind = key.__class__
            exact = kind is str_ or kind is bytes_  # (see ref: exact types only are remembered)
            found = get(key) if exact else None
            if found is not None:
                out.append(found)
                continue
            if isinstance(key, str_) and key:  # (a str subclass too: key_bytes encodes it the same way)
                try:
                    raw = key.encode("utf-8")
                except UnicodeEncodeError:
                    raw = key_bytes(key)  # raises the InvalidKeyError that says why
            else:
                raw = key if exact and key else key_bytes(key)  # (key_bytes: every other check)
            shard = crc32(raw) % shards
            entry_id = raw
            if len(raw) > MAX_RAW_KEY_BYTES or raw[:1] == _HASHED:
                entry_id = _HASHED + hashlib.sha256(raw).hexdigest().encode()
            entry = prefixes[shard] + entry_id
            # The HMGET packed by hand (when the space has read fields): only the key's length and name vary.
            read = b"%s$%d\r\n%s\r\n%s" % (head, len(entry), entry, fields) if fields else None
            ref = make(EntryRef, (raw, shard, entry_id, entry, read))
            out.append(ref)
            if exact and len(raw) <= MAX_RAW_KEY_BYTES:
                used += len(raw)
                if used > REFS_BYTES:
                    refs.clear()  # all forgotten at once: cheaper than an LRU, and rare
                    used = len(raw)
                refs[key] = ref
        self.refs_bytes = used
        return out

    @cached_property
    def _entry_prefixes(self) -> list[bytes]:
        return [keys.entry(b"") for keys in self.shard_keys]

    def entry_key(self, ref: EntryRef) -> bytes:
        """The Redis key of an entry's data hash."""
        return ref.entry or self.shard_keys[ref.shard].entry(ref.id)

    def lease_key(self, ref: EntryRef) -> bytes:
        """The Redis key of the fill lease for an entry."""
        return self.shard_keys[ref.shard].lease(ref.id)
