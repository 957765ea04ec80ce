"""Sphinx configuration: Markdown pages (MyST), the API reference from the package's docstrings."""

from __future__ import annotations

from typing import Any

from sphinx.util import logging

import victor_rcache

project = "victor_rcache"
author = "The victor_rcache authors"
copyright = "the victor_rcache authors, MIT License"
release = version = victor_rcache.__version__

# No napoleon: the docstrings are reST prose, and napoleon would read "True: ..." in an attribute's
# docstring as a type named "True".
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.viewcode"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # `[text](page.md#a-heading)` links to headings, checked at build time
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"victor_rcache {release}"
autodoc_member_order = "bysource"
autodoc_typehints = "description"

# A reference to a name the docs do not document is a warning, and warnings fail the build. Names of
# the standard library and of third-party packages cannot be resolved offline (no intersphinx), so
# only those are let through; every name of this package that a signature mentions is documented.
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(collections\.abc|typing|asyncio|asyncio\.events|concurrent\.futures)\.\w+"),
    ("py:class", r"(redis|prometheus_client)(\.\w+)*"),
    ("py:class", r"CollectorRegistry|Histogram|Metric"),  # prometheus_client's, imported for type checking only
    ("py:class", r"SyncClient|AsyncClient"),  # victor_rcache.connection's aliases of redis-py's client classes
    ("py:class", r"victor_rcache\.\w+(\.\w+)*\.[A-Z]"),  # type variables (``T``, ``K``, ``V``)
    ("py:class", r"~?[PR]"),  # the decorator's ParamSpec and result type, as autodoc spells them
    ("py:obj", r"typing\.~?[PR]"),
    ("py:class", r"_Backend|KeySpec|TagSpec"),  # victor_rcache.decorator's protocol and aliases
    ("py:class", r"Prewarm|SelectionFn"),  # victor_rcache.prediction.warmer's aliases (a function, or True)
]


def _check_public_names(app: Any, env: Any) -> None:
    """Every name of ``victor_rcache.__all__`` is documented in the API reference."""
    documented = env.get_domain("py").objects
    missing = [name for name in victor_rcache.__all__
               if not name.startswith("__") and f"victor_rcache.{name}" not in documented]
    if missing:
        logging.getLogger(__name__).warning("public names missing from docs/api.md: %s", ", ".join(missing))


def setup(app: Any) -> None:
    app.connect("env-check-consistency", _check_public_names)
