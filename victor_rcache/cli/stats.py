"""``stats``: the namespace's fleet-wide counters, once or (``--watch``) refreshed with rates per second."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from ..errors import CacheUnavailableError
from .common import FAILED, OK, Context, _int, _json_default, by_node, fmt_bytes, fmt_pct, table

WATCH_SECONDS = 2.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"
RATE_COUNTERS = ("gets", "hits", "misses", "l1_hits", "l2_hits", "l3_hits", "puts", "deletes", "promotions",
                 "demotions", "evictions", "expirations", "records", "predictions_judged", "prewarm_completed")


def shard_counters(ctx: Context) -> dict[str, int]:
    """Fleet counters get_metrics leaves out: explicit deletes, and the last flush (ms)."""
    out = {"deletes": 0, "last_flush_ms": 0}
    for node, shards in by_node(ctx.cache.client, ctx.space.shard_keys):
        pipe = node.pipeline(transaction=False)
        for sk in shards:
            pipe.hmget(sk.stats, "deletes", "flushed")
        for deletes, flushed in pipe.execute():
            out["deletes"] += _int(deletes) or 0
            out["last_flush_ms"] = max(out["last_flush_ms"], _int(flushed) or 0)
    return out


def stats_sample(ctx: Context) -> dict[str, Any]:
    """Fleet-wide numbers of the namespace: tiers, combined, the model, prewarming."""
    m = ctx.cache.get_metrics("fleet")
    model = ctx.warmer().get_statistics()
    extra = shard_counters(ctx)
    tiers = {t: {"hits": m[t]["hits"], "misses": m[t]["misses"], "hit_rate": m[t]["hit_rate"],
                 "entries": m[t]["entry_count"], "bytes": m[t]["total_size"], "promotions": m[t]["promotions"],
                 "demotions": m[t]["demotions"], "evictions": m[t]["evictions"]} for t in ("l1", "l2", "l3")}
    c = m["combined"]
    predictions = model["predictions"]
    return {
        "namespace": ctx.cache.namespace, "url": ctx.url, "time": time.time(),
        "tiers": tiers,
        "combined": {"gets": c["gets"], "hits": c["total_hits"], "misses": c["total_misses"],
                     "hit_rate": c["hit_rate"], "puts": c["puts"], "deletes": extra["deletes"],
                     "promotions": c["total_promotions"], "demotions": c["total_demotions"],
                     "evictions": c["total_evictions"], "expirations": c["total_expirations"],
                     "last_flush_ms": extra["last_flush_ms"] or None},
        "prediction": {"patterns": model["patterns"]["total"], "max_patterns": model["patterns"]["max_patterns"],
                       "queries": model["patterns"]["queries"], "records": model["records"]["total"],
                       "predictions_judged": predictions["total"], "correct": predictions["correct"],
                       "accuracy": predictions["accuracy"]},
        "prewarming": {k: model["prewarming"][k] for k in ("completed", "useful", "skipped", "failed")},
        "breaker": m["health"]["breaker"]["state"],
    }


def counters_of(sample: dict[str, Any]) -> dict[str, float]:
    """The sample's ever-growing counters, for rates."""
    c, t, p = sample["combined"], sample["tiers"], sample["prediction"]
    flat = {k: c[k] for k in ("gets", "hits", "misses", "puts", "deletes", "promotions", "demotions", "evictions",
                              "expirations")}
    flat.update({f"{tier}_hits": t[tier]["hits"] for tier in ("l1", "l2", "l3")})
    flat.update(records=p["records"], predictions_judged=p["predictions_judged"],
                prewarm_completed=sample["prewarming"]["completed"])
    return {k: float(flat[k]) for k in RATE_COUNTERS}


def rates(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Per-second rates of every counter between two samples."""
    return {k: round((after[k] - before[k]) / seconds, 3) for k in RATE_COUNTERS}


def stats_lines(s: dict[str, Any]) -> list[str]:
    t, c, p, w = s["tiers"], s["combined"], s["prediction"], s["prewarming"]
    rows = [(tier.upper(), x["hits"], x["misses"], fmt_pct(x["hit_rate"]),
             "-" if x["entries"] is None else x["entries"], fmt_bytes(x["bytes"]), x["promotions"],
             x["demotions"], x["evictions"]) for tier, x in t.items()]
    rows.append(("all", c["hits"], c["misses"], fmt_pct(c["hit_rate"]), "", "", c["promotions"], c["demotions"],
                 c["evictions"]))
    lines = [f"namespace {s['namespace']} at {s['url']}: fleet-wide counters of every worker", ""]
    lines += table(("tier", "hits", "misses", "hit rate", "entries", "bytes", "promotions", "demotions",
                    "evictions"), rows, right=range(1, 9))
    flushed = "never" if c["last_flush_ms"] is None else time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(c["last_flush_ms"] / 1000))
    judged = f"{fmt_pct(p['accuracy'])} ({p['correct']} of {p['predictions_judged']} judged)"
    lines += ["", f"requests    gets {c['gets']}, puts {c['puts']}, deletes {c['deletes']}, "
                  f"expirations {c['expirations']}; last flush {flushed}",
              f"prediction  accuracy {judged}; patterns {p['patterns']}/{p['max_patterns']}, "
              f"queries {p['queries']}, records {p['records']}",
              f"prewarming  completed {w['completed']}, useful {w['useful']}, skipped {w['skipped']}, "
              f"failed {w['failed']}",
              f"breaker     {s['breaker']} (this command's connection)"]
    if "rates" in s:
        r = s["rates"]
        if r is None:
            lines += ["", "per second  (after the next refresh)"]
        else:
            shown = ("gets", "hits", "misses", "l1_hits", "l2_hits", "l3_hits", "puts", "deletes", "promotions",
                     "demotions", "evictions", "expirations", "records")
            lines += ["", f"per second over the last {s['interval_seconds']:.1f} s"]
            lines += ["  " + line for line in table(shown, [[f"{r[k]:g}" for k in shown]], right=range(len(shown)))]
    return lines


def cmd_stats(ctx: Context) -> int:
    """``stats``: the fleet-wide numbers once, or refreshed every few seconds with ``--watch``."""
    if ctx.args.watch is None:
        sample = stats_sample(ctx)
        ctx.emit(sample, lambda: stats_lines(sample))
        return OK
    return watch_stats(ctx, ctx.args.watch, ctx.args.count)


def watch_stats(ctx: Context, interval: float, count: int | None) -> int:
    """Refresh every ``interval`` seconds, with rates from the previous refresh, until Ctrl-C (or ``count``).

    A refresh that fails (Redis down) is reported on stderr and the next one tried: a watch outlives it."""
    previous: tuple[float, dict[str, float]] | None = None
    refreshes, code = 0, OK
    try:
        while count is None or refreshes < count:
            started = time.monotonic()
            refreshes += 1
            try:
                sample = stats_sample(ctx)
            except (CacheUnavailableError, RedisError, RedisClusterException) as exc:
                print(f"error: {exc} (trying again in {interval:g} s)", file=sys.stderr, flush=True)
                previous, code = None, FAILED
            else:
                now, counters = time.monotonic(), counters_of(sample)
                sample["interval_seconds"] = None if previous is None else round(now - previous[0], 3)
                sample["rates"] = None if previous is None else rates(previous[1], counters, now - previous[0])
                previous, code = (now, counters), OK
                show_refresh(ctx, sample, interval)
            if count is None or refreshes < count:
                time.sleep(max(0.0, started + interval - time.monotonic()))
    except KeyboardInterrupt:
        if not ctx.json:
            print()
        return OK
    return code


def show_refresh(ctx: Context, sample: dict[str, Any], interval: float) -> None:
    """One refresh: a JSON line, or the table (redrawn in place on a terminal)."""
    if ctx.json:
        print(json.dumps(sample, ensure_ascii=False, default=_json_default), flush=True)
        return
    body = "\n".join([f"victor-rcache stats --watch: every {interval:g} s, Ctrl-C to stop", "",
                      *stats_lines(sample)])
    print((CLEAR_SCREEN + body) if sys.stdout.isatty() else body + "\n", flush=True)
