"""``predict``: what the shared prediction model expects after a query (it only looks: writes nothing)."""

from __future__ import annotations

from typing import Any

from .common import OK, Context, _show, _text, key_arg, table


def cmd_predict(ctx: Context) -> int:
    """``predict QUERY``: the shared model's predictions after QUERY (it remembers nothing)."""
    a = ctx.args
    p = ctx.warmer().predict_next_queries(key_arg(a.query), top_k=a.top_k, min_confidence=a.min_confidence,
                                          session=None if a.session is None else key_arg(a.session),
                                          remember=False)
    rows = [{"query": _text(q) if isinstance(q, bytes) else q, "confidence": conf,
             "transition": parts[0], "ngram": parts[1], "hour": parts[2], "tools": tools}
            for q, conf, parts, tools in zip(p.queries, p.confidences, p.parts, p.tools, strict=True)]
    data = {"query": a.query, "session": a.session, "total_confidence": p.total_confidence, "predictions": rows,
            "weights": ctx.warmer().config.normalized_weights}
    ctx.emit(data, lambda: predict_lines(data))
    return OK


def predict_lines(d: dict[str, Any]) -> list[str]:
    session = "" if d["session"] is None else f" in session {d['session']!r}"
    head = f"after {_show(d['query'])!r}{session}: "
    if not d["predictions"]:
        return [head + "the model expects nothing (never seen, or everything under --min-confidence)"]
    rows = [(_show(r["query"], 40), f"{r['confidence']:.3f}", f"{r['transition']:.3f}", f"{r['ngram']:.3f}",
             f"{r['hour']:.3f}", ", ".join(map(str, r["tools"]))) for r in d["predictions"]]
    return [head + f"total confidence {d['total_confidence']:.3f}", "",
            *table(("query", "confidence", "transition", "n-gram", "hour", "tools"), rows, right=(1, 2, 3, 4)),
            "", "confidence = {:g}·transition + {:g}·n-gram + {:g}·hour: P(next | this query), P(next | the "
                "session's last queries), P(next | this hour of day)".format(*d["weights"])]
