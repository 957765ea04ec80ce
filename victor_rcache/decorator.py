"""``cache.cached(...)``: a function's results cached under keys built from its arguments.

A decorated call is ``cache.get_or_set(key, loader, ttl, tags=..., fail_safe=...)``: computed once
per process and once per fleet, its key built from the call's arguments (docs/decorator.md)::

    @cache.cached(ttl=600, tags=("tenant:{tenant}",))
    def select_tools(tenant: str, query: str, k: int = 3) -> list[str]: ...

    select_tools("acme", "read the file")            # computed, then shared by every worker
    select_tools.key("acme", "read the file")        # 'app.select_tools:{"k":3,"query":...}'
    select_tools.invalidate("acme", "read the file")  # that one call's result, everywhere
    cache.invalidate_tags("tenant:acme")             # every result tagged for the tenant

The default key is the function's module and qualified name, ``:``, then its arguments bound to its
signature (defaults applied, so ``f(1)`` and ``f(x=1)`` share a key) as canonical JSON: dicts sorted
by key, tuples as lists, sets sorted, bytes as ``{"$bytes": "<hex>"}``. A first parameter named
``self`` or ``cls`` is left out (a method's result is shared by every instance). An argument JSON
cannot encode makes the call raise InvalidArgumentError: pass ``key=``, a template
(``"tools:{query}:{k}"``, formatted with the bound arguments) or a callable taking the function's
arguments. Tags are templates the same way, or a callable returning the tags.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from .errors import InvalidArgumentError
from .tiers import Uncached

P = ParamSpec("P")
R = TypeVar("R")

KeySpec = str | Callable[..., "str | bytes"] | None
TagSpec = Iterable[str] | Callable[..., Iterable["str | bytes"]]


class _Backend(Protocol):
    """What the decorator needs of a cache (either front end): get_or_set and delete."""

    def get_or_set(self, key: str | bytes, loader: Callable[[], Any], ttl: float | None = None, *,
                   tags: Iterable[str | bytes] = (), fail_safe: bool | None = None) -> Any: ...

    def delete(self, key: str | bytes) -> Any: ...


def _canonical(value: Any) -> Any:
    """``json.dumps``'s fallback for what JSON has no spelling of; anything else has no canonical key."""
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, (set, frozenset)):
        return sorted(json.dumps(v, sort_keys=True, default=_canonical) for v in value)
    raise TypeError(type(value).__name__)


class _Keys:
    """Builds the key and the tags of one call of ``fn`` (shared by the sync and async wrappers)."""

    def __init__(self, fn: Callable[..., Any], key: KeySpec, tags: TagSpec) -> None:
        self.fn = fn
        self.signature = inspect.signature(fn)
        params = list(self.signature.parameters)
        self.skip = 1 if params and params[0] in ("self", "cls") else 0
        self.prefix = f"{fn.__module__}.{fn.__qualname__}:"
        if key is not None and not isinstance(key, str) and not callable(key):
            raise InvalidArgumentError(f"key= must be a template string or a callable, not {type(key).__name__}")
        self.key_spec = key
        if isinstance(tags, str):
            tags = (tags,)  # one tag, not its characters
        self.tags_spec = tags

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArgumentError(f"{self.fn.__qualname__}(): {exc}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | bytes:
        spec = self.key_spec
        if callable(spec):
            return spec(*args, **kwargs)
        arguments = self.arguments(args, kwargs)
        if isinstance(spec, str):
            return _format(spec, arguments, "key")
        shown = dict(list(arguments.items())[self.skip:])
        try:
            return self.prefix + json.dumps(shown, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                            default=_canonical)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"{self.fn.__qualname__}(): an argument of type {exc} has no canonical key; pass key= (a template "
                "such as 'tools:{query}' or a callable taking the function's arguments)"
            ) from None

    def tags(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterable[str | bytes]:
        spec = self.tags_spec
        if callable(spec):
            return spec(*args, **kwargs)
        if not spec:
            return ()
        arguments = self.arguments(args, kwargs)
        return [_format(tag, arguments, "tag") if "{" in tag else tag for tag in spec]


def _format(template: str, arguments: dict[str, Any], what: str) -> str:
    try:
        return template.format(**arguments)
    except (KeyError, IndexError, ValueError) as exc:
        raise InvalidArgumentError(f"{what} template {template!r} names no argument of the function ({exc}); use "
                                   "the parameter names in braces, and {{ }} for literal braces") from None


def _check_result(keep: Callable[[Any], bool] | None, value: Any) -> Any:
    """The loader's value, marked Uncached when ``cache_if`` says not to keep it."""
    return value if keep is None or keep(value) else Uncached(value)


class _Cached(Generic[P, R]):
    """What both kinds of cached function share: the checks, the key builder, binding as a method."""

    _coroutines: bool  # which kind of function this wrapper takes

    def __init__(self, fn: Callable[P, Any], cache: _Backend, ttl: float | None, key: KeySpec, tags: TagSpec,
                 cache_if: Callable[[R], bool] | None, fail_safe: bool | None) -> None:
        if inspect.iscoroutinefunction(fn) != self._coroutines:
            kind, use = (("is not a coroutine function", "MultiLevelCache.cached (or make it async def)")
                         if self._coroutines else ("is a coroutine function", "AsyncMultiLevelCache.cached"))
            raise InvalidArgumentError(f"{fn.__qualname__} {kind}: decorate it with {use}")
        self._fn, self._cache, self._ttl = fn, cache, ttl
        self._keys = _Keys(fn, key, tags)
        self._keep, self._fail_safe = cache_if, fail_safe
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]  # (a callable object, not a function)

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str | bytes:
        """The cache key of this call."""
        return self._keys.key(args, kwargs)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        """As a method: the call, ``key`` and ``invalidate`` bound to ``instance``."""
        if instance is None:
            return self
        return _Bound(self, instance)


class CachedFunction(_Cached[P, R]):
    """A function whose results ``cache`` keeps (made by ``MultiLevelCache.cached``)."""

    _coroutines = False

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        keys = self._keys
        value: R = self._cache.get_or_set(
            keys.key(args, kwargs), lambda: _check_result(self._keep, self._fn(*args, **kwargs)), self._ttl,
            tags=keys.tags(args, kwargs), fail_safe=self._fail_safe)
        return value

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Forget this call's result, in every tier and every process; True if some tier held it."""
        deleted: bool = self._cache.delete(self._keys.key(args, kwargs))
        return deleted


class AsyncCachedFunction(_Cached[P, R]):
    """A coroutine function whose results ``cache`` keeps (made by ``AsyncMultiLevelCache.cached``)."""

    _coroutines = True

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        keys = self._keys

        async def load() -> Any:
            return _check_result(self._keep, await self._fn(*args, **kwargs))

        value: R = await self._cache.get_or_set(keys.key(args, kwargs), load, self._ttl,
                                                tags=keys.tags(args, kwargs), fail_safe=self._fail_safe)
        return value

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Forget this call's result, in every tier and every process; True if some tier held it."""
        deleted: bool = await self._cache.delete(self._keys.key(args, kwargs))
        return deleted


class _Bound:
    """A cached method looked up on an instance: calls, ``key`` and ``invalidate`` get the instance first."""

    def __init__(self, cached: Any, instance: object) -> None:  # (a CachedFunction or an AsyncCachedFunction)
        self._cached, self._instance = cached, instance
        functools.update_wrapper(self, cached)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached(self._instance, *args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> str | bytes:
        key: str | bytes = self._cached.key(self._instance, *args, **kwargs)
        return key

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached.invalidate(self._instance, *args, **kwargs)
