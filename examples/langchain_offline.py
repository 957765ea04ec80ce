"""LangChain on the fleet cache, offline: fake models, a real Redis (victor_rcache.contrib.langchain).

Two "workers" (two cache objects, as two processes would have) share a chat model's and an LLM's
answers through ``FleetLLMCache`` and embeddings through ``FleetByteStore``: what one computes, the
other is served.

    pip install 'victor-rcache[langchain]'   # langchain-core; the embeddings need numpy (or use the stand-in)
    python examples/langchain_offline.py     # a private redis-server unless --url or VICTOR_RCACHE_URL

The embeddings go through ``CacheBackedEmbeddings`` when it is installed (``langchain-classic``, or
``langchain`` before 1.0); without it, a ten-line wrapper does the same with the store (the output
says which).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from langchain_core.embeddings import Embeddings
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from victor_rcache import MultiLevelCache
from victor_rcache.contrib.langchain import FleetByteStore, FleetLLMCache
from victor_rcache.local_redis import redis_url

QUESTION = "What is the capital of France?"
# The fake models' answers, in turn; each is asked once, so the second is never given (but makes their
# counter `i` move on with each answer computed).
CHAT = ["Paris.", "(a second answer)"]
LLM = ["Paris, on the Seine.", "(a second answer)"]
DOCUMENTS = ["Redis is an in-memory data store.", "LangChain composes LLM applications.",
             "An L1 cache lives in the worker process."]


class CountingEmbeddings(Embeddings):
    """The 'expensive' model: DeterministicFakeEmbedding (numpy), or a hash if numpy is missing; counts texts."""

    def __init__(self) -> None:
        self.computed = 0
        try:
            import numpy  # noqa: F401, PLC0415 (DeterministicFakeEmbedding needs it when it embeds)
            from langchain_core.embeddings import DeterministicFakeEmbedding  # noqa: PLC0415

            self.model: Callable[[str], list[float]] = DeterministicFakeEmbedding(size=16).embed_query
        except ImportError:
            self.model = lambda text: [b / 255 for b in hashlib.sha256(text.encode()).digest()[:16]]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.computed += len(texts)
        return [self.model(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class StoreBackedEmbeddings(Embeddings):
    """The stand-in for CacheBackedEmbeddings: vectors kept in the byte store as JSON, by SHA-256 of the text."""

    def __init__(self, model: Embeddings, store: FleetByteStore, namespace: str) -> None:
        self.model, self.store, self.namespace = model, store, namespace

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        keys = [self.namespace + hashlib.sha256(t.encode()).hexdigest() for t in texts]
        found = self.store.mget(keys)
        missing = [i for i, raw in enumerate(found) if raw is None]
        vectors = self.model.embed_documents([texts[i] for i in missing]) if missing else []
        self.store.mset([(keys[i], json.dumps(v).encode()) for i, v in zip(missing, vectors, strict=True)])
        new = dict(zip(missing, vectors, strict=True))
        return [new[i] if raw is None else json.loads(raw) for i, raw in enumerate(found)]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def cache_backed_embeddings_class() -> Any:
    """CacheBackedEmbeddings if installed (in langchain-classic since langchain 1.0, in langchain before), or None."""
    for module in ("langchain_classic.embeddings", "langchain.embeddings"):
        try:
            return importlib.import_module(module).CacheBackedEmbeddings
        except (ImportError, AttributeError):  # not installed, or langchain >= 1.0 without it
            continue
    return None


def cached_embeddings(model: Embeddings, store: FleetByteStore, namespace: str) -> tuple[Embeddings, str]:
    """CacheBackedEmbeddings over the store if installed, else the stand-in; and which one it is."""
    backed = cache_backed_embeddings_class()
    if backed is None:
        return StoreBackedEmbeddings(model, store, namespace), "a small wrapper over FleetByteStore"
    options: dict[str, Any] = {"namespace": namespace, "query_embedding_cache": True}
    if "key_encoder" in inspect.signature(backed.from_bytes_store).parameters:
        options["key_encoder"] = "sha256"  # the default, SHA-1, warns
    return backed.from_bytes_store(model, store, **options), "CacheBackedEmbeddings"


def ask(worker: str, kind: str, model: FakeListLLM | FakeListChatModel) -> None:
    before, started = model.i, time.perf_counter()
    answer = model.invoke(QUESTION)
    ms = (time.perf_counter() - started) * 1000
    text = answer if isinstance(answer, str) else answer.content
    how = "computed by the model" if model.i != before else "served from the fleet cache"
    print(f"  worker {worker}, {kind}: {text!r} {how} ({ms:.1f} ms)")


def run(url: str, namespace: str) -> None:
    with ExitStack() as stack:
        def cache(kind: str) -> MultiLevelCache:
            return stack.enter_context(MultiLevelCache.from_env(redis_url=url, namespace=f"{namespace}-{kind}"))

        llm_a, llm_b = cache("llm"), cache("llm")  # two workers' caches of one namespace
        llm_a.invalidate()  # a fresh start: the same output on every run
        print(f"LLM answers (FleetLLMCache, namespace {namespace}-llm):")
        for worker, llm_cache in (("A", llm_a), ("B", llm_b)):
            # Each worker has its own model objects, configured alike (the same llm_string).
            answers = FleetLLMCache(llm_cache, ttl=3600)
            ask(worker, "chat model", FakeListChatModel(responses=CHAT, sleep=0.2, cache=answers))
            ask(worker, "LLM", FakeListLLM(responses=LLM, cache=answers))

        emb_a, emb_b = cache("embeddings"), cache("embeddings")
        emb_a.invalidate()
        model = CountingEmbeddings()
        first, kind = cached_embeddings(model, FleetByteStore(emb_a), "fake-16:")
        second, _ = cached_embeddings(model, FleetByteStore(emb_b), "fake-16:")
        print(f"embeddings ({kind}, namespace {namespace}-embeddings):")
        first.embed_documents(DOCUMENTS)
        print(f"  worker A embedded {len(DOCUMENTS)} documents: {model.computed} computed")
        done, texts = model.computed, [*DOCUMENTS, "A new document."]
        second.embed_documents(texts)
        computed = model.computed - done
        print(f"  worker B embedded {len(texts)} documents: {computed} computed, {len(texts) - computed} shared "
              "by worker A")
        keys = sorted(FleetByteStore(emb_b).yield_keys(prefix="fake-16:"))
        print(f"  the store holds {len(keys)} vectors, e.g. {keys[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="The function `loads` is in beta")  # langchain-core's notice
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="Redis URL (default: VICTOR_RCACHE_URL, REDIS_URL, else a private server)")
    parser.add_argument("--namespace", default="langchain-example",
                        help="namespace prefix (its -llm and -embeddings namespaces are emptied first)")
    args = parser.parse_args(argv)
    with redis_url(args.url, say=print) as url:
        run(url, args.namespace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
