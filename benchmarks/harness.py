"""The benchmark harness: ``python -m benchmarks run`` then ``python -m benchmarks report``.

    python -m benchmarks run --group micro|fleet|all [--config NAME ...] [--quick|--tiny] [--url URL]
                             [--out benchmarks/results/latest.json]
    python -m benchmarks report [--format markdown|json] [--in FILE] [--plot out.png]

``run`` writes one JSON file (machine facts from benchmarks/facts.py, then each group's figures);
progress goes to stderr. ``report`` reads that file. Without ``--url`` a private redis-server is
started on a free port (LocalRedisServer) and stopped at the end. The micro group is
benchmarks/bench_micro.py; the fleet group is ``run_fleet`` of benchmarks/bench_fleet.py, when that
module exists.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import facts
from benchmarks.bench_micro import FIGURES, run_micro
from victor_rcache.local_redis import LocalRedisServer

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
GROUPS = ("micro", "fleet")


def progress_printer() -> Callable[[str], None]:
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    return progress


def load_fleet() -> tuple[Callable[..., dict[str, Any]] | None, str]:
    try:
        from benchmarks.bench_fleet import run_fleet  # noqa: PLC0415 - written separately; optional here
    except ImportError as exc:
        return None, f"benchmarks/bench_fleet.py is not available ({exc}); the fleet group was not run"
    return run_fleet, ""


def run(args: argparse.Namespace) -> int:
    progress = progress_printer()
    groups = GROUPS if args.group == "all" else (args.group,)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    configs: list[str] = args.config or []
    micro_figures = [c for c in configs if c in FIGURES] or None
    if configs and groups == ("micro",) and not micro_figures:
        print(f"--config {configs}: the micro group has figures {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    fleet_configs = [c for c in configs if c not in FIGURES] or None
    server = None if args.url else LocalRedisServer().start()
    url = args.url or (server.url if server else "")
    result: dict[str, Any] = {"command": ["python", "-m", "benchmarks", *sys.argv[1:]], "mode": mode,
                              "redis": "private redis-server (LocalRedisServer)" if server else "given --url",
                              "groups": {}}
    try:
        result["machine"] = facts.machine_facts(url)
        progress(f"redis at {url if server else '--url'}; groups: {', '.join(groups)}; mode: {mode}")
        if "micro" in groups and (micro_figures or not configs):
            result["groups"]["micro"] = run_micro(url, mode, micro_figures, progress)
        if "fleet" in groups and (fleet_configs or not configs):
            run_fleet, why = load_fleet()
            if run_fleet is None:
                progress(why)
                result["groups"]["fleet"] = {"skipped": why}
            else:
                started = time.perf_counter()
                fleet = run_fleet(url, mode != "full", fleet_configs, progress)
                result["groups"]["fleet"] = {**fleet, "seconds": round(time.perf_counter() - started, 1)}
    finally:
        if server is not None:
            server.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    progress(f"results written to {out}; show them with: python -m benchmarks report --in {out}")
    return 0


# ------------------------------------------------------------------ report


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "" if x is None else str(x)
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def _verdict(passed: bool | None) -> str:
    return "—" if passed is None else "pass" if passed else "**FAIL**"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """A list of dicts as a markdown table: columns in first-seen order, nested values as JSON."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    def cell(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {_num(x)}" for k, x in v.items())
        return ", ".join(_num(x) for x in v) if isinstance(v, list) else _num(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def markdown(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    lines = [
        "# victor_rcache benchmarks",
        "",
        f"{m.get('date', '?')} · victor_rcache {m.get('victor_rcache', '?')} · Python {m.get('python', '?')} · "
        f"redis-py {m.get('redis_py', '?')} · redis-server {m.get('redis_server', '?')} · "
        f"nproc {m.get('nproc', '?')} · "
        f"load average at start {m.get('load_average', '?')} · {m.get('platform', '?')}",
        "",
        f"`{' '.join(result.get('command', []))}` (mode: {result.get('mode', '?')}; {result.get('redis', '')})",
    ]
    groups = result.get("groups", {})
    micro = groups.get("micro")
    if micro is not None:
        lines += ["", f"## Micro figures ({micro.get('seconds', '?')} s)", "",
                  "| figure | value | unit | measured | floor / baseline | target | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for f in micro.get("figures", []):
            lines.append(f"| {f['figure']} | {_num(f['value'])} | {f['unit']} | {f['measured']} | {f['floor']} | "
                         f"{f['target']} | {_verdict(f['pass'])} |")
        for fid, why in micro.get("skipped", {}).items():
            lines.append(f"| {fid} | — | | not measured: {why} | | | |")
    fleet = groups.get("fleet")
    if fleet is not None:
        lines += ["", "## Fleet workload", ""]
        if isinstance(fleet.get("skipped"), str):
            lines.append(f"Not run: {fleet['skipped']}")
        else:
            for key, value in fleet.items():
                if key == "facts":  # the same machine as above
                    continue
                if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                    lines += ["", f"**{key}**", "", *_table(value)]
                elif isinstance(value, dict):
                    if value:
                        lines.append(f"- {key}: " + ", ".join(f"{k}={_num(v)}" for k, v in value.items()))
                else:
                    lines.append(f"- {key}: {_num(value)}")
    if not groups:
        lines += ["", "No group was run."]
    return "\n".join(lines).rstrip() + "\n"


def _fleet_rows(fleet: dict[str, Any]) -> list[dict[str, Any]]:
    """The first list of per-configuration dicts in the fleet results (its shape is bench_fleet.py's)."""
    for value in fleet.values():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return value
    return []


def _pick(row: dict[str, Any], *words: str) -> float | None:
    for key, value in row.items():
        if all(w in key.lower() for w in words) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def plot(result: dict[str, Any], path: str) -> str:
    """Micro ratios against their targets, and per fleet configuration latency and hit rate (if present)."""
    try:
        import matplotlib  # noqa: PLC0415 - optional: pip install -e '.[bench]'

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]' or pip install matplotlib)"
    micro = [f for f in result.get("groups", {}).get("micro", {}).get("figures", [])
             if f["id"] in ("l1", "l1:shared", "l2")]
    rows = _fleet_rows(result.get("groups", {}).get("fleet", {}))
    costs = sorted({r["cost_ms"] for r in rows if "cost_ms" in r}, reverse=True)
    cost = 5.0 if 5.0 in costs else (costs[0] if costs else None)
    shown = [r for r in rows if r.get("cost_ms") == cost and "config" in r and "processes" in r]
    configs = list(dict.fromkeys(r["config"] for r in shown))
    counts = sorted({r["processes"] for r in shown})
    fleet_panels = (("mean", "mean latency (ms)"), ("hit_rate", "hit rate")) if shown else ()
    fig, axes = plt.subplots(1, 1 + len(fleet_panels), figsize=(5 + 5 * len(fleet_panels), 4.5), squeeze=False)
    ax = axes[0][0]
    ax.bar([f["id"] for f in micro], [f["value"] for f in micro], color="tab:blue")
    for f in micro:  # each ratio's target, as a short dash over its bar
        target = {"l1": 4.0, "l1:shared": 4.0, "l2": 1.3}[f["id"]]
        ax.plot([micro.index(f) - 0.4, micro.index(f) + 0.4], [target, target], color="black", linestyle="--")
    ax.set_title("micro: x floor (median); dashes: targets")
    height = 0.8 / max(1, len(counts))
    for panel, (field, title) in enumerate(fleet_panels, start=1):
        axis = axes[0][panel]
        for i, n in enumerate(counts):
            values = [next((_pick(r, *field.split("_")) or 0.0 for r in shown
                            if r["config"] == c and r["processes"] == n), 0.0) for c in configs]
            axis.barh([y + i * height for y in range(len(configs))], values, height=height, label=f"N={n}")
        axis.set_yticks([y + height * (len(counts) - 1) / 2 for y in range(len(configs))], configs)
        axis.invert_yaxis()
        axis.set_title(f"fleet, {cost:g} ms selection: {title}")
        axis.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot written to {path}"


def report(args: argparse.Namespace) -> int:
    path = Path(args.infile)
    if not path.exists():
        print(f"{path} does not exist: run `python -m benchmarks run` first", file=sys.stderr)
        return 2
    result = json.loads(path.read_text())
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(markdown(result), end="")
    if args.plot:
        print(plot(result, args.plot), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run benchmark groups and write the results file")
    r.add_argument("--group", choices=(*GROUPS, "all"), default="all")
    r.add_argument("--config", action="append", metavar="NAME",
                   help=f"only these (repeatable): micro figures {', '.join(FIGURES)}, or fleet configurations "
                        "none (alias baseline), cachetools (per-process), fleet, fleet+prewarm (predictive), "
                        "fleet+adaptive (adaptive), cashews, aiocache")
    size = r.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller samples and namespaces (1k/10k/100k entries)")
    size.add_argument("--tiny", action="store_true", help="a smoke run: every figure, too small to mean anything")
    r.add_argument("--url", help="benchmark this Redis instead of a private redis-server (CONFIG RESETSTAT is used)")
    r.add_argument("--out", default=str(DEFAULT_RESULTS), help="results file (default benchmarks/results/latest.json)")
    p = sub.add_parser("report", help="print the results file")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown")
    p.add_argument("--in", dest="infile", default=str(DEFAULT_RESULTS), help="results file to read")
    p.add_argument("--plot", metavar="PNG", help="also draw a PNG (needs matplotlib, the 'bench' extra)")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else report(args)
