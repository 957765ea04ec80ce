"""``delete``, ``invalidate --tag`` and ``flush``: the commands that remove entries (from every tier and every
worker's L1)."""

from __future__ import annotations

import sys

from .common import FAILED, OK, Context, Exit, _show, _text, key_arg


def cmd_delete(ctx: Context) -> int:
    """``delete KEY``: remove one key from every tier and every worker's L1."""
    key = key_arg(ctx.args.key)
    deleted = ctx.cache.delete(key)
    shown = _show(_text(key), 200)
    ctx.emit({"key": _text(key), "deleted": deleted},
             lambda: [f"deleted {shown!r}" if deleted else f"{shown!r} was not cached: nothing deleted"])
    return OK


def cmd_invalidate(ctx: Context) -> int:
    """``invalidate --tag NAME ...``: remove every entry carrying any of the tags."""
    tags = list(ctx.args.tag)
    removed = ctx.cache.invalidate_tags(*tags)
    shown = ", ".join(repr(_show(t, 80)) for t in tags)
    ctx.emit({"tags": tags, "removed": removed},
             lambda: [f"removed {removed} entr{'y' if removed == 1 else 'ies'} tagged {shown} from every tier; "
                      "every worker's L1 told"])
    return OK


def confirm(question: str) -> bool:
    """Ask on the terminal; anything but y/yes is a no (and so is a stdin that is not a terminal)."""
    if not sys.stdin.isatty():
        return False
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_flush(ctx: Context) -> int:
    """``flush``: remove every entry of the namespace once confirmed (or ``--yes``); exit 1 if not."""
    ns = ctx.cache.namespace
    if not ctx.args.yes and not confirm(f"Flush every entry of namespace {ns} at {ctx.url}?"):
        why = "not confirmed" if sys.stdin.isatty() else "stdin is not a terminal: pass --yes to flush"
        raise Exit(FAILED, f"nothing flushed ({why})")
    m = ctx.cache.get_metrics("fleet")
    entries = (m["l2"]["entry_count"] or 0) + (m["l3"]["entry_count"] or 0)
    ctx.cache.invalidate()
    ctx.emit({"namespace": ns, "flushed": True, "entries": entries},
             lambda: [f"flushed namespace {ns}: {entries} entries removed from L2 and L3, every L1 told "
                      "(the prediction model is kept)"])
    return OK
