"""LangChain adapters (the optional extra: ``pip install victor-rcache[langchain]``); docs/langchain.md.

::

    from langchain_core.globals import set_llm_cache
    from victor_rcache.contrib.langchain import FleetByteStore, FleetLLMCache

    set_llm_cache(FleetLLMCache(MultiLevelCache.from_env(namespace="llm"), ttl=86400))
    store = FleetByteStore(MultiLevelCache.from_env(namespace="embeddings"))  # for CacheBackedEmbeddings

* :class:`FleetLLMCache` is a ``langchain_core`` ``BaseCache``: what one process paid a model for, every
  process is served. Entry ``llm:<model>:<sha256(prompt)>``, ``<model>`` the first 16 hex digits of
  ``sha256(llm_string)``; tagged ``langchain:llm`` and ``llm:<model>``, so ``clear()`` removes every
  answer it wrote and ``clear(llm_string=...)`` one model's.
* :class:`FleetByteStore` is a ``BaseStore[str, bytes]`` (what ``CacheBackedEmbeddings`` takes): the
  key as given, the bytes as they are, tagged ``langchain:store``. ``yield_keys`` lists the namespace's
  entries (SCAN, like ``victor-rcache keys``): give the store a namespace of its own.

Both adapt a cache: they keep nothing of their own. The async methods use the ``AsyncMultiLevelCache``
given, else run the sync ones in a thread (LangChain's default). ``victor_rcache`` never imports this
module; only it imports ``langchain_core``.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from ..aio import AsyncMultiLevelCache
from ..cache import MultiLevelCache
from ..cli.entries import glob_escape, scan_entries
from ..errors import InvalidArgumentError

INSTALL_HINT = "pip install victor-rcache[langchain]"

try:
    from langchain_core import messages
    from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
    from langchain_core.load import dumps, loads
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, Generation, GenerationChunk
    from langchain_core.stores import BaseStore
except ImportError as exc:  # the extra is not installed: say how to get it
    raise ImportError(f"victor_rcache.contrib.langchain needs langchain-core: {INSTALL_HINT}") from exc

__all__ = ["LLM_TAG", "STORE_TAG", "FleetByteStore", "FleetLLMCache", "llm_key", "model_tag"]

log = logging.getLogger("victor_rcache")

LLM_TAG = "langchain:llm"  # every answer FleetLLMCache writes
STORE_TAG = "langchain:store"  # every entry FleetByteStore writes

# What an answer may revive as: generations and the messages a chat generation carries, nothing else.
# The namespace is shared by the fleet, so an entry is data, never a recipe for arbitrary objects
# (langchain-core >= 0.3.81 / 1.2.5 take the allowlist; older ones revive their default set).
_REVIVABLE = [Generation, GenerationChunk, ChatGeneration, ChatGenerationChunk,
              *(getattr(messages, name) for name in (
                  "AIMessage", "AIMessageChunk", "HumanMessage", "HumanMessageChunk", "SystemMessage",
                  "SystemMessageChunk", "ToolMessage", "ToolMessageChunk", "ChatMessage", "ChatMessageChunk",
                  "FunctionMessage", "FunctionMessageChunk"))]
_LOADS_OPTIONS: dict[str, Any] = (
    {"allowed_objects": _REVIVABLE} if "allowed_objects" in inspect.signature(loads).parameters else {})


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def model_tag(llm_string: str) -> str:
    """The tag of one model configuration's answers: ``llm:`` + 16 hex digits of ``sha256(llm_string)``."""
    return "llm:" + _digest(llm_string)[:16]


def llm_key(prompt: str, llm_string: str) -> str:
    """The cache key of an answer: ``llm:<model>:<sha256(prompt)>`` (fixed length, no prompt text in Redis
    key names)."""
    return f"{model_tag(llm_string)}:{_digest(prompt)}"


def _revive(value: Any) -> RETURN_VAL_TYPE | None:
    """The generations an entry holds, or None when it holds anything else (a miss, never an error)."""
    if not isinstance(value, str):
        return None
    try:
        revived = loads(value, **_LOADS_OPTIONS)
    except Exception as exc:  # corrupt, or a class outside the allowlist: recomputing is the remedy
        log.debug("an LLM cache entry does not load: %s", exc)
        return None
    if isinstance(revived, list) and all(isinstance(g, Generation) for g in revived):
        return revived
    return None


class FleetLLMCache(BaseCache):
    """LangChain's LLM cache on a victor_rcache namespace, shared by every process using it.

    ``cache`` serves the sync methods, ``async_cache`` (if given) the async ones; ``ttl`` (seconds)
    bounds an answer's life (None: the cache's tiers decide).
    """

    def __init__(self, cache: MultiLevelCache, async_cache: AsyncMultiLevelCache | None = None, *,
                 ttl: float | None = None) -> None:
        self.cache = cache
        self.async_cache = async_cache
        self.ttl = ttl

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        return _revive(self.cache.get(llm_key(prompt, llm_string)))

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        self.cache.put(llm_key(prompt, llm_string), dumps(list(return_val)), self.ttl,
                       tags=(LLM_TAG, model_tag(llm_string)))

    def clear(self, **kwargs: Any) -> None:
        """Remove every answer this adapter wrote, or with ``llm_string=`` that model configuration's."""
        self.cache.invalidate_tags(_clear_tag(kwargs))

    async def alookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        if self.async_cache is None:
            return await super().alookup(prompt, llm_string)
        return _revive(await self.async_cache.get(llm_key(prompt, llm_string)))

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        if self.async_cache is None:
            return await super().aupdate(prompt, llm_string, return_val)
        await self.async_cache.put(llm_key(prompt, llm_string), dumps(list(return_val)), self.ttl,
                                   tags=(LLM_TAG, model_tag(llm_string)))
        return None

    async def aclear(self, **kwargs: Any) -> None:
        if self.async_cache is None:
            return await super().aclear(**kwargs)
        await self.async_cache.invalidate_tags(_clear_tag(kwargs))
        return None


def _clear_tag(kwargs: dict[str, Any]) -> str:
    llm_string = kwargs.get("llm_string")
    return LLM_TAG if llm_string is None else model_tag(llm_string)


class FleetByteStore(BaseStore[str, bytes]):
    """A LangChain byte store on a victor_rcache namespace (``CacheBackedEmbeddings``' store), shared by
    every process using it. ``cache``, ``async_cache`` and ``ttl`` as for :class:`FleetLLMCache`."""

    def __init__(self, cache: MultiLevelCache, async_cache: AsyncMultiLevelCache | None = None, *,
                 ttl: float | None = None) -> None:
        self.cache = cache
        self.async_cache = async_cache
        self.ttl = ttl

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        found = self.cache.get_many(keys)  # one round trip for the keys L1 misses
        return [_as_bytes(found.get(key)) for key in keys]

    def mset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        self.cache.put_many(_byte_values(key_value_pairs), self.ttl, tags=(STORE_TAG,))

    def mdelete(self, keys: Sequence[str]) -> None:
        for key in keys:  # the cache deletes one key per call (each announced to every process's L1)
            self.cache.delete(key)

    def yield_keys(self, *, prefix: str | None = None) -> Iterator[str]:
        """The keys the namespace holds in Redis (every entry's, the store's or not), optionally those
        starting with ``prefix``; SCAN on every master, like ``victor-rcache keys``."""
        space = self.cache._core.space
        # The glob matches entry ids: a hashed key's id is "#<sha256>", so those are checked on their key.
        patterns = [b"*"] if prefix is None else [glob_escape(prefix.encode("utf-8", "surrogatepass")) + b"*", b"#*"]
        seen: set[str] = set()
        for pattern in patterns:
            for row in scan_entries(self.cache.client, space, pattern):
                key = row["key"]
                if (prefix is None or key.startswith(prefix)) and row["id"] not in seen:
                    seen.add(row["id"])
                    yield key

    async def amget(self, keys: Sequence[str]) -> list[bytes | None]:
        if self.async_cache is None:
            return await super().amget(keys)
        found = await self.async_cache.get_many(keys)
        return [_as_bytes(found.get(key)) for key in keys]

    async def amset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        if self.async_cache is None:
            return await super().amset(key_value_pairs)
        await self.async_cache.put_many(_byte_values(key_value_pairs), self.ttl, tags=(STORE_TAG,))
        return None

    async def amdelete(self, keys: Sequence[str]) -> None:
        if self.async_cache is None:
            return await super().amdelete(keys)
        await asyncio.gather(*(self.async_cache.delete(key) for key in keys))
        return None

    async def ayield_keys(self, *, prefix: str | None = None) -> AsyncIterator[str]:
        # The listing reads with the sync client (plain SCAN and HMGET): in a thread, off the event loop.
        for key in await asyncio.to_thread(lambda: list(self.yield_keys(prefix=prefix))):
            yield key


def _byte_values(pairs: Sequence[tuple[str, bytes]]) -> dict[str, bytes]:
    values = dict(pairs)  # a key given twice: its last value, as writing them in turn would leave
    wrong = [v for v in values.values() if not isinstance(v, bytes)]
    if wrong:  # refused before any write: mget would answer None for it
        raise InvalidArgumentError(f"FleetByteStore stores bytes, not {type(wrong[0]).__name__}; encode the value")
    return values


def _as_bytes(value: Any) -> bytes | None:
    # A byte store answers bytes: anything else under the key (another use of the namespace) is no value.
    return value if isinstance(value, bytes) else None
