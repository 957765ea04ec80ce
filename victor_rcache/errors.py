"""One exception family: every error the library raises is a :class:`CacheError`.

Each message names the problem and the fix. Errors that are also ordinary Python argument errors
subclass ``ValueError``/``TypeError`` too, so ``except ValueError`` keeps working for callers who
expect it.
"""

from __future__ import annotations


class CacheError(Exception):
    """Base class of every error raised by victor_rcache."""


class ConfigurationError(CacheError, ValueError):
    """A setting is invalid, or disagrees with what the fleet already uses in Redis."""


class InvalidArgumentError(CacheError, ValueError):
    """An argument of a call is invalid (the subclasses say which)."""


class InvalidKeyError(InvalidArgumentError):
    """A key is empty, of the wrong type, or cannot be encoded."""


class InvalidTTLError(InvalidArgumentError):
    """A ``ttl`` is zero, negative, not a number, or larger than the supported maximum."""


class SerializationError(CacheError, TypeError):
    """A value cannot be encoded by the configured codec."""


class ValueTooLargeError(CacheError, ValueError):
    """An encoded value is larger than ``max_value_bytes``; nothing was written."""


class CacheUnavailableError(CacheError):
    """Redis could not serve the call (with ``fail_open=False``; fail-open callers never see it)."""


class CacheClosedError(CacheError, RuntimeError):
    """The cache was used after ``close()``: build a new one (``close()`` ends a cache's life)."""
