"""The package's layering: every module imports only from its own layer or the ones below it.

The layers are the architecture as a reader meets it (docs/design.md, "Architecture"): foundations,
values and keys, settings, the building blocks (L1, coherence, single flight, resilience, Redis
connections, fleet sizing), the tier core, the two front ends, the features built on a cache
(prediction, prewarming, tool selection), and at the top what runs a cache (CLI, demo, exporters,
test helpers). A new module must be given its layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "victor_rcache"

LAYERS: dict[str, int] = {
    # 0: foundations
    "errors": 0, "forksafe": 0, "scripts": 0, "periodic": 0,
    # 1: values, keys and tools with no cache in them
    "codec": 1, "keys": 1, "adaptive": 1, "metrics": 1, "local_redis": 1,
    # 2: settings
    "config": 2,
    # 3: building blocks
    "l1": 3, "coherence": 3, "stampede": 3, "resilience": 3, "connection": 3, "fleet_sizing": 3, "bookkeeping": 3,
    "replicas": 3,
    # 4: the tier core
    "tiers": 4,
    # 5: the front ends
    "cache": 5, "aio": 5, "decorator": 5,
    # 6: features built on a cache
    "prediction": 6,
    # 7: what runs a cache
    "cli": 7, "demo": 7, "contrib": 7, "testing": 7,
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    top = module.split(".", 1)[0]
    if top not in LAYERS:
        raise AssertionError(f"victor_rcache.{module} has no layer: give it one in tests/test_layout.py")
    return LAYERS[top]


def _imports(path: Path) -> set[str]:
    """The victor_rcache modules ``path`` imports (anywhere in it, lazy imports included)."""
    module = _module(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            if node.module:
                found.add(".".join([*base, node.module]))
            else:  # from . import name: a module of that package, or a name of its __init__
                for alias in node.names:
                    is_module = (PACKAGE.joinpath(*base, alias.name).is_dir()
                                 or PACKAGE.joinpath(*base, alias.name + ".py").is_file())
                    found.add(".".join([*base, alias.name] if is_module else base))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("victor_rcache."):
            found.add(node.module.removeprefix("victor_rcache."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("victor_rcache.") for a in node.names
                         if a.name.startswith("victor_rcache."))
    return {f for f in found if f}


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


@pytest.mark.parametrize("path", SOURCES, ids=[_module(p) for p in SOURCES])
def test_nothing_imports_upward(path: Path) -> None:
    module = _module(path)
    upward = sorted(i for i in _imports(path) if i.split(".")[0] != module.split(".")[0]
                    and _layer(i) > _layer(module))
    assert upward == [], f"victor_rcache.{module} (layer {_layer(module)}) imports from a higher layer: {upward}"


def test_the_layout_names_the_architecture() -> None:
    """A reader finds each part by its file name."""
    for name in ("l1.py", "tiers.py", "scripts.py", "coherence.py", "stampede.py", "resilience.py", "cache.py",
                 "aio.py", "prediction/model.py", "prediction/warmer.py", "prediction/tool_selection.py",
                 "cli/__init__.py", "contrib/prometheus.py"):
        assert (PACKAGE / name).is_file(), name
