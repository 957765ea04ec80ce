"""The LangChain adapters (victor_rcache.contrib.langchain, docs/langchain.md) against a real Redis:
LangChain's own standard suites (langchain-tests) for the LLM cache and the byte store, sync and async
(the async ones also through BaseCache's and BaseStore's thread fallback), then what the suites do not
cover: tags by model and clear per model, corrupt entries, sharing between caches, key listing, the
example, and a library that never imports langchain."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

import pytest_asyncio
from langchain_core.load import dumps
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.prompts import PromptTemplate
from langchain_tests.integration_tests import (
    AsyncCacheTestSuite,
    BaseStoreAsyncTests,
    BaseStoreSyncTests,
    SyncCacheTestSuite,
)

from victor_rcache import AsyncMultiLevelCache, InvalidArgumentError, MultiLevelCache
from victor_rcache.contrib.langchain import (
    LLM_TAG,
    STORE_TAG,
    FleetByteStore,
    FleetLLMCache,
    llm_key,
    model_tag,
)
from victor_rcache.keys import decode_tags

from .helpers import Backend, Client

Make = Callable[..., MultiLevelCache]
MakeAsync = Callable[..., AsyncMultiLevelCache]
ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    # langchain-core marks its loads() beta: LangChain's notice, not a finding of these tests.
    pytest.mark.filterwarnings("ignore:The function `loads` is in beta"),
    # The async suites' classes are marked asyncio (this project runs pytest-asyncio in strict mode), and
    # so is the one plain test they inherit, test_no_overrides_DO_NOT_OVERRIDE, which may not be renamed.
    pytest.mark.filterwarnings("ignore:The test <Function test_no_overrides_DO_NOT_OVERRIDE> is marked"),
]
THREE = (b"\x00first", b"second \xff", b"")  # distinct bytes values, an empty one and non-UTF-8 ones included


# ---------------------------------------------------------------------------------- the standard suites


class TestFleetLLMCacheSync(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self, make_cache: Make) -> FleetLLMCache:
        return FleetLLMCache(make_cache())


@pytest.mark.asyncio
class TestFleetLLMCacheAsync(AsyncCacheTestSuite):
    @pytest_asyncio.fixture
    async def cache(self, make_cache: Make, make_async_cache: MakeAsync) -> AsyncIterator[FleetLLMCache]:
        async with make_async_cache() as async_cache:
            yield FleetLLMCache(make_cache(), async_cache)


@pytest.mark.asyncio
class TestFleetLLMCacheAsyncFallback(AsyncCacheTestSuite):
    """No async cache: BaseCache's default runs the sync methods in a thread."""

    @pytest.fixture
    def cache(self, make_cache: Make) -> FleetLLMCache:
        return FleetLLMCache(make_cache())


class _ThreeBytes:
    """The three values the standard store suites write: bytes, what a FleetByteStore holds."""

    @pytest.fixture
    def three_values(self) -> tuple[bytes, bytes, bytes]:
        return THREE


class TestFleetByteStoreSync(_ThreeBytes, BaseStoreSyncTests[bytes]):
    @pytest.fixture
    def kv_store(self, make_cache: Make) -> FleetByteStore:
        return FleetByteStore(make_cache())


@pytest.mark.asyncio
class TestFleetByteStoreAsync(_ThreeBytes, BaseStoreAsyncTests[bytes]):
    @pytest_asyncio.fixture
    async def kv_store(self, make_cache: Make, make_async_cache: MakeAsync) -> AsyncIterator[FleetByteStore]:
        async with make_async_cache() as async_cache:
            yield FleetByteStore(make_cache(), async_cache)


@pytest.mark.asyncio
class TestFleetByteStoreAsyncFallback(_ThreeBytes, BaseStoreAsyncTests[bytes]):
    """No async cache: BaseStore's default runs the sync methods in a thread."""

    @pytest.fixture
    def kv_store(self, make_cache: Make) -> FleetByteStore:
        return FleetByteStore(make_cache())


# ---------------------------------------------------------------------------------- the LLM cache


def _entry(cache: MultiLevelCache, key: str) -> tuple[bytes, bytes, bytes]:
    """(the entry's Redis key, its shard's tags hash, its id)."""
    space = cache._core.space
    ref = space.ref(key)
    return space.entry_key(ref), space.shard_keys[ref.shard].tags, ref.id


def _held(raw: Client, cache: MultiLevelCache, key: str) -> bool:
    return bool(raw.exists(_entry(cache, key)[0]))


def _tags(raw: Client, cache: MultiLevelCache, key: str) -> set[bytes]:
    _, tags, entry_id = _entry(cache, key)
    return set(decode_tags(raw.hget(tags, entry_id) or b""))


def test_answers_are_tagged_by_model_and_cleared_per_model(make_cache: Make, raw: Client) -> None:
    cache = make_cache()
    llm = FleetLLMCache(cache)
    answers = {(p, m): [Generation(text=f"{p} by {m}")] for p in ("p1", "p2") for m in ("model-a", "model-b")}
    for (prompt, model), gens in answers.items():
        llm.update(prompt, model, gens)
    cache.put("not an answer", 1, tags=["other"])

    for prompt, model in answers:
        key = llm_key(prompt, model)
        assert key.startswith(model_tag(model) + ":")
        assert _tags(raw, cache, key) == {LLM_TAG.encode(), model_tag(model).encode()}
    assert model_tag("model-a") != model_tag("model-b")

    llm.clear(llm_string="model-a")  # that model's answers only, from Redis itself
    for (prompt, model), gens in answers.items():
        assert _held(raw, cache, llm_key(prompt, model)) == (model == "model-b")
        assert llm.lookup(prompt, model) == (gens if model == "model-b" else None)
    assert _held(raw, cache, "not an answer")

    llm.clear()  # every answer it wrote, and nothing else
    assert not any(_held(raw, cache, llm_key(p, m)) for p, m in answers)
    assert cache.get("not an answer") == 1


def test_async_clear_per_model(make_cache: Make, make_async_cache: MakeAsync, raw: Client) -> None:
    sync = make_cache()

    async def scenario() -> list[Any]:
        async with make_async_cache() as async_cache:
            llm = FleetLLMCache(sync, async_cache)
            await llm.aupdate("p", "model-a", [Generation(text="a")])
            await llm.aupdate("p", "model-b", [Generation(text="b")])
            await llm.aclear(llm_string="model-a")
            return [await llm.alookup("p", "model-a"), await llm.alookup("p", "model-b")]

    assert asyncio.run(scenario()) == [None, [Generation(text="b")]]
    assert not _held(raw, sync, llm_key("p", "model-a"))


def test_chat_generations_with_tool_calls_round_trip(make_cache: Make) -> None:
    llm = FleetLLMCache(make_cache(), ttl=60)
    message = AIMessage(content="calling", tool_calls=[{"name": "search", "args": {"q": "redis"}, "id": "c1"}],
                        usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 7})
    gens = [ChatGeneration(message=message, generation_info={"finish_reason": "tool_calls"})]
    llm.update("a prompt", "a chat model", gens)
    assert FleetLLMCache(make_cache()).lookup("a prompt", "a chat model") == gens  # from Redis, not L1


def test_the_ttl_bounds_an_answers_life(make_cache: Make, raw: Client) -> None:
    cache = make_cache()
    FleetLLMCache(cache, ttl=60).update("p", "m", [Generation(text="x")])
    assert 0 < raw.pttl(_entry(cache, llm_key("p", "m"))[0]) <= 60_000


@pytest.mark.parametrize("stored", [
    "not JSON", '{"a": 1}', "[1, 2]", "", b"bytes", 42, None,
    '[{"lc": 1, "type": "not_implemented", "id": ["x"]}]',
    '[{"lc": 1, "type": "secret", "id": ["HOME"]}]',
    dumps([PromptTemplate.from_template("{a}")]),  # a class outside the allowlist: never revived
], ids=repr)
def test_a_corrupt_entry_is_a_miss(make_cache: Make, stored: Any) -> None:
    cache = make_cache()
    llm = FleetLLMCache(cache)
    cache.put(llm_key("p", "m"), stored)
    assert llm.lookup("p", "m") is None
    llm.update("p", "m", [Generation(text="fresh")])  # the next answer replaces it
    assert llm.lookup("p", "m") == [Generation(text="fresh")]


def test_an_undecodable_payload_is_a_miss(make_cache: Make, make_async_cache: MakeAsync, raw: Client) -> None:
    writer = make_cache()
    FleetLLMCache(writer).update("p", "m", [Generation(text="x")])
    raw.hset(_entry(writer, llm_key("p", "m"))[0], "v", b"\xc1 not an envelope")
    assert FleetLLMCache(make_cache()).lookup("p", "m") is None

    async def scenario() -> Any:
        writer.put(llm_key("p", "m"), "garbage")
        async with make_async_cache() as async_cache:
            return await FleetLLMCache(make_cache(), async_cache).alookup("p", "m")

    assert asyncio.run(scenario()) is None


def test_two_caches_share_answers(make_cache: Make, make_async_cache: MakeAsync) -> None:
    worker_a, worker_b = FleetLLMCache(make_cache()), FleetLLMCache(make_cache())  # two processes' worth
    worker_a.update("What is Redis?", "gpt", [Generation(text="A data store.")])
    assert worker_b.lookup("What is Redis?", "gpt") == [Generation(text="A data store.")]
    assert worker_b.lookup("What is Redis?", "another model") is None

    async def scenario() -> Any:
        async with make_async_cache() as async_cache:
            worker_c = FleetLLMCache(make_cache(), async_cache)
            await worker_c.aupdate("What is Lua?", "gpt", [Generation(text="A language.")])
            return await worker_c.alookup("What is Redis?", "gpt")

    assert asyncio.run(scenario()) == [Generation(text="A data store.")]
    assert worker_a.lookup("What is Lua?", "gpt") == [Generation(text="A language.")]


# ---------------------------------------------------------------------------------- the byte store


def _eventually(check: Callable[[], bool], seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_two_stores_share_embeddings(make_cache: Make) -> None:
    a, b = FleetByteStore(make_cache()), FleetByteStore(make_cache())
    a.mset([("doc:1", b"\x01\x02"), ("doc:2", b"\x03")])
    assert b.mget(["doc:1", "doc:2", "doc:3"]) == [b"\x01\x02", b"\x03", None]
    assert sorted(b.yield_keys()) == ["doc:1", "doc:2"]
    b.mdelete(["doc:1"])
    assert b.mget(["doc:1"]) == [None]
    assert _eventually(lambda: a.mget(["doc:1"]) == [None])  # a's L1 copy goes with the announcement


def test_keys_are_listed_as_given_long_ones_included(make_cache: Make) -> None:
    cache = make_cache()
    store = FleetByteStore(cache)
    long_key = "emb:" + "x" * 2000  # over 1 KiB: stored under a digest, listed by its own name
    keys = [long_key, "emb:short", "emb:[glob]*?", "other:1", "#emb:hash-marked"]
    store.mset([(k, k.encode()[:8]) for k in keys])
    assert cache._core.space.ref(long_key).hashed
    assert sorted(store.yield_keys()) == sorted(keys)
    assert sorted(store.yield_keys(prefix="emb:")) == sorted([long_key, "emb:short", "emb:[glob]*?"])
    assert list(store.yield_keys(prefix="emb:[glob]")) == ["emb:[glob]*?"]  # glob characters are literal
    assert list(store.yield_keys(prefix="#emb")) == ["#emb:hash-marked"]
    assert list(store.yield_keys(prefix="none:")) == []
    assert store.mget([long_key]) == [long_key.encode()[:8]]


def test_store_entries_are_tagged_and_other_values_are_no_bytes(make_cache: Make, raw: Client) -> None:
    cache = make_cache()
    store = FleetByteStore(cache, ttl=60)
    store.mset([("k1", b"v1"), ("k2", b"v2")])
    assert _tags(raw, cache, "k1") == {STORE_TAG.encode()}
    assert 0 < raw.pttl(_entry(cache, "k1")[0]) <= 60_000
    cache.put("not bytes", {"a": 1})  # another use of the namespace: not a value of a byte store
    assert store.mget(["not bytes", "k1"]) == [None, b"v1"]
    assert cache.invalidate_tags(STORE_TAG) == 2
    assert store.mget(["k1", "k2"]) == [None, None]
    store.mset([])  # nothing to do
    store.mdelete([])
    with pytest.raises(InvalidArgumentError, match="stores bytes, not str"):
        store.mset([("k3", b"fine"), ("k4", "text")])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="not NoneType"):
        store.mset([("k3", None)])  # type: ignore[list-item]
    assert store.mget(["k3"]) == [None]  # refused whole, before any write


def test_async_store_shares_with_a_sync_one(make_cache: Make, make_async_cache: MakeAsync) -> None:
    sync = FleetByteStore(make_cache())

    async def scenario() -> tuple[list[bytes | None], list[str]]:
        async with make_async_cache() as async_cache:
            store = FleetByteStore(make_cache(), async_cache)
            await store.amset([("q:1", b"one"), ("q:2", b"two"), ("d:1", b"doc")])
            await store.amdelete(["q:2", "missing"])
            got = await store.amget(["q:1", "q:2", "d:1"])
            return got, sorted([k async for k in store.ayield_keys(prefix="q:")])

    assert asyncio.run(scenario()) == ([b"one", None, b"doc"], ["q:1"])
    assert sync.mget(["q:1", "d:1"]) == [b"one", b"doc"]


# ---------------------------------------------------------------------------------- example and imports


def test_the_example_runs_offline(backend: Backend, namespace: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VICTOR_RCACHE_URL", "REDIS_URL")}
    env.update(VICTOR_RCACHE_CLUSTER="1" if backend.cluster else "0")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "langchain_offline.py"), "--url", backend.url,
                           "--namespace", namespace], capture_output=True, text=True, timeout=120, env=env,
                          check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("computed by the model") == 2, out  # worker A's chat model and LLM
    assert "worker B, chat model: 'Paris.' served from the fleet cache" in out
    assert "worker B, LLM: 'Paris, on the Seine.' served from the fleet cache" in out
    assert "worker A embedded 3 documents: 3 computed" in out
    assert "worker B embedded 4 documents: 1 computed, 3 shared by worker A" in out
    assert "the store holds 4 vectors" in out
    assert "Traceback" not in done.stderr


def test_the_example_starts_its_own_redis_without_a_url() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VICTOR_RCACHE_URL", "REDIS_URL")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "langchain_offline.py")], capture_output=True,
                          text=True, timeout=120, env=env, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "started a private redis-server" in done.stdout
    assert "served from the fleet cache" in done.stdout


BLOCK_LANGCHAIN = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith("langchain"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def test_the_library_never_imports_langchain() -> None:
    code = ("import sys, victor_rcache, victor_rcache.cli.entries, victor_rcache.contrib.prometheus\n"
            "print(sorted(m for m in sys.modules if m.startswith('langchain')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
    code = BLOCK_LANGCHAIN + (
        "import victor_rcache\n"
        "try:\n    import victor_rcache.contrib.langchain\nexcept ImportError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install victor-rcache[langchain]" in done.stdout
