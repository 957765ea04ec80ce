"""The benchmark harness: ``python -m benchmarks run`` then ``python -m benchmarks report``.

    python -m benchmarks run --group micro|fleet|prewarm|capacity|all [--config NAME ...] [--quick|--tiny] [--repeat N]
                             [--url URL] [--out benchmarks/results/latest.json]
    python -m benchmarks report [--format markdown|json] [--in FILE] [--plot out.png]

``run`` writes one JSON file: the machine facts (benchmarks/facts.py), then one record per run (``--repeat``),
each with its groups' figures (benchmarks/figures.py: value, floor, ratio, target, verdict); progress goes
to stderr. ``report`` reads that file: one table of every figure with its spread over the runs (a figure
passes only if it passed in every run), then the workloads and the fleet's own table; ``--plot`` draws
the latency distributions of L1, L2 and L3 hits against their floors and the fleet's configurations as
hit rate against mean latency. Without ``--url`` a private redis-server is started on a free port
(LocalRedisServer) and stopped at the end. The micro group is benchmarks/bench_micro.py (with
bench_parallel.py); the fleet group is ``run_fleet`` of benchmarks/bench_fleet.py; the prewarm group
(where prewarming pays and where it does not) is ``run_prewarm`` of benchmarks/bench_prewarm.py; the
capacity group (Redis CPU per operation, the capacity model and its check on a fleet) is ``run_capacity`` of
benchmarks/bench_capacity.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import facts
from benchmarks.bench_capacity import run_capacity
from benchmarks.bench_micro import FIGURES, TIMER_CASE, run_micro
from benchmarks.bench_prewarm import WORKLOADS, run_prewarm
from benchmarks.figures import judged
from victor_rcache.local_redis import LocalRedisServer

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
GROUPS = ("micro", "fleet", "prewarm", "capacity")
# The fleet group per mode: process counts, selection costs (ms), requests per worker. Every mode runs
# N = 4 at both costs (the fleet figures); the full run adds N = 1 and 2 to the fleet's table and plot.
FLEET_RUNS = {"full": ((1, 2, 4), (5.0, 0.17), 1500), "quick": ((4,), (5.0, 0.17), 400),
              "tiny": ((4,), (5.0, 0.17), 40)}


def progress_printer() -> Callable[[str], None]:
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    return progress


def load_fleet() -> tuple[Any, str]:
    try:
        from benchmarks import bench_fleet  # noqa: PLC0415 - needs the bench extra's peers only when run
    except ImportError as exc:
        return None, f"benchmarks/bench_fleet.py could not be imported ({exc}); the fleet group was not run"
    return bench_fleet, ""


def split_configs(configs: list[str]) -> tuple[list[str] | None, list[str] | None, list[str] | None]:
    """``--config`` names as (micro figures, prewarm workloads, fleet configurations), each None if none."""
    micro = [c for c in configs if c in FIGURES]
    prewarm = [c for c in configs if c in WORKLOADS]
    fleet = [c for c in configs if c not in FIGURES and c not in WORKLOADS]
    return micro or None, prewarm or None, fleet or None


def run_groups(url: str, groups: tuple[str, ...], mode: str, configs: list[str],
               progress: Callable[[str], None]) -> dict[str, Any]:
    """One run of the selected groups: {group: {..., "figures": [...], "skipped": {...}}}."""
    out: dict[str, Any] = {}
    micro_figures, prewarm_workloads, fleet_configs = split_configs(configs)
    if "micro" in groups and (micro_figures or not configs):
        out["micro"] = run_micro(url, mode, micro_figures, progress)
    if "fleet" in groups and (fleet_configs or not configs):
        bench_fleet, why = load_fleet()
        if bench_fleet is None:
            progress(why)
            out["fleet"] = {"skipped": {"fleet": why}, "figures": []}
        else:
            processes, costs, requests = FLEET_RUNS[mode]
            started = time.perf_counter()
            fleet = bench_fleet.run_fleet(url, mode != "full", fleet_configs, progress, processes=processes,
                                          costs=costs, requests=requests)
            figures, missing = bench_fleet.fleet_figures(fleet["results"], fleet["settings"])
            out["fleet"] = {**fleet, "figures": figures, "skipped": {**fleet["skipped"], **missing},
                            "seconds": round(time.perf_counter() - started, 1)}
    if "prewarm" in groups and (prewarm_workloads or not configs):
        out["prewarm"] = run_prewarm(url, mode, prewarm_workloads, progress)
    if "capacity" in groups and not configs:  # it has no configurations: runs whole, or not at all
        out["capacity"] = run_capacity(url, mode, progress)
    return out


def run(args: argparse.Namespace, argv: list[str]) -> int:
    progress = progress_printer()
    groups = GROUPS if args.group == "all" else (args.group,)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    configs: list[str] = args.config or []
    if configs and groups == ("micro",) and not any(c in FIGURES for c in configs):
        print(f"--config {configs}: the micro group has figures {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    if configs and groups == ("prewarm",) and not any(c in WORKLOADS for c in configs):
        print(f"--config {configs}: the prewarm group has workloads {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    if configs and groups == ("capacity",):
        print("--config: the capacity group has no configurations; run it without --config", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 2
    server = None if args.url else LocalRedisServer().start()
    url = args.url or (server.url if server else "")
    result: dict[str, Any] = {"command": ["python", "-m", "benchmarks", *argv], "mode": mode,
                              "redis": "private redis-server (LocalRedisServer)" if server else "given --url",
                              "repeat": args.repeat, "runs": []}
    started = time.perf_counter()
    try:
        result["machine"] = facts.machine_facts(url)
        progress(f"redis at {url if server else '--url'}; groups: {', '.join(groups)}; mode: {mode}; "
                 f"runs: {args.repeat}")
        for n in range(args.repeat):
            if args.repeat > 1:
                progress(f"run {n + 1} of {args.repeat}")
            load = facts.machine_facts(url)["load_average"]
            run_started = time.perf_counter()
            record = {"load_average": load, "groups": run_groups(url, groups, mode, configs, progress)}
            record["seconds"] = round(time.perf_counter() - run_started, 1)
            result["runs"].append(record)
    finally:
        if server is not None:
            server.stop()
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    failed = [f["id"] for f in aggregate(result) if f["pass"] is False]
    progress(f"results written to {out} ({len(failed)} figures fail their target); show them with: "
             f"python -m benchmarks report --in {out}")
    return 0


# ------------------------------------------------------------------ report


def runs_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of a results file (a file from before ``--repeat`` holds one run's groups at its top)."""
    return result.get("runs") or [{"groups": result.get("groups", {})}]


def aggregate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure over the runs that measured it: medians of value, floor and ratio, the spread of the
    number its verdict is taken on, and a verdict that passes only if every run passed."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for run in runs_of(result):
        for group in run.get("groups", {}).values():
            for f in group.get("figures", []):
                by_id.setdefault(f["id"], []).append(f)
    out = []
    for seen in by_id.values():
        def median(key: str, seen: list[dict[str, Any]] = seen) -> float | None:
            values = [f[key] for f in seen if f.get(key) is not None]
            return float(statistics.median(values)) if values else None

        numbers = [x for f in seen if (x := judged(f)) is not None]
        verdicts = [f["pass"] for f in seen]
        passed = None if all(v is None for v in verdicts) else all(v is True for v in verdicts)
        first = seen[0]
        out.append({**first, "value": median("value"), "floor_value": median("floor_value"),
                    "ratio": median("ratio"), "pass": passed, "runs": len(seen),
                    "failed_runs": sum(v is False for v in verdicts),
                    "spread": (min(numbers), max(numbers)) if numbers else None,
                    "spread_on": (first["bound"] or ["ratio" if first.get("ratio") is not None else "value"])[0]})
    return out


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def _verdict(f: dict[str, Any]) -> str:
    if f["pass"] is None:
        return "—"
    if f["pass"]:
        return "pass" if f["runs"] == 1 else f"pass ({f['runs']} of {f['runs']} runs)"
    return "**FAIL**" if f["runs"] == 1 else f"**FAIL** ({f['failed_runs']} of {f['runs']} runs)"


def _spread(f: dict[str, Any]) -> str:
    if f["runs"] < 2 or f["spread"] is None:
        return "1 run" if f["runs"] == 1 else ""
    lo, hi = f["spread"]
    unit = "x" if f["spread_on"] == "ratio" else f" {f['unit']}"
    return f"{_num(lo)} to {_num(hi)}{unit} ({f['runs']} runs)"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """A list of dicts as a markdown table: columns in first-seen order, nested values inline."""
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
    runs = runs_of(result)
    loads = [r.get("load_average") for r in runs if r.get("load_average") is not None]
    lines = [
        "# victor_rcache benchmarks",
        "",
        f"{m.get('date', '?')} · victor_rcache {m.get('victor_rcache', '?')} · Python {m.get('python', '?')} · "
        f"redis-py {m.get('redis_py', '?')} · redis-server {m.get('redis_server', '?')} · "
        f"nproc {m.get('nproc', '?')} · load average at the start of each run "
        f"{', '.join(_num(x) for x in loads) or m.get('load_average', '?')} · {m.get('platform', '?')}",
        "",
        f"`{' '.join(result.get('command', []))}` (mode: {result.get('mode', '?')}; {len(runs)} run(s); "
        f"{result.get('redis', '')}; {result.get('seconds', '?')} s)",
        "",
        "Every figure is taken against its floor in the same run; with several runs, value, floor and ratio are "
        "medians over the runs, the spread is that of the number the target applies to, and a figure passes "
        "only if it passed in every run.",
    ]
    figures = aggregate(result)
    if figures:
        lines += ["", "## Figures", "",
                  "| figure | value | floor | ratio | target | verdict | spread |", "|---|---|---|---|---|---|---|"]
        for f in figures:
            floor = f["floor"] if f["floor_value"] is None else f"{_num(f['floor_value'])} {f['unit']}: {f['floor']}"
            ratio = "" if f["ratio"] is None else f"{_num(f['ratio'])}x"
            lines.append(f"| {f['figure']} (`{f['id']}`) | {_num(f['value'])} {f['unit']} | {floor} | {ratio} | "
                         f"{f['target']} | {_verdict(f)} | {_spread(f)} |")
    skipped: dict[str, str] = {}
    for run in runs:
        for group in run.get("groups", {}).values():
            skipped.update(group.get("skipped") or {})
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- `{k}`: {why}" for k, why in skipped.items()]
    workloads: dict[str, list[str]] = {}  # workload -> the figures measured on it
    for f in figures:
        if f.get("detail", {}).get("workload"):
            workloads.setdefault(f["detail"]["workload"], []).append(f"`{f['id']}`")
    if workloads:
        lines += ["", "## Workloads (as the first run of each figure describes them)", ""] + \
            [f"- {', '.join(ids)}: {text}" for text, ids in workloads.items()]
    fleet = runs[-1].get("groups", {}).get("fleet")
    if fleet and fleet.get("results"):
        from benchmarks.bench_fleet import table  # noqa: PLC0415 - the fleet's own table

        lines += ["", f"## Fleet workload (last run, {fleet.get('seconds', '?')} s)", "", "```",
                  table({**fleet, "skipped": {k: v for k, v in fleet["skipped"].items() if k in FLEET_NAMES}}), "```",
                  "", "Settings: " + ", ".join(f"{k}={_num(v)}" for k, v in (fleet.get("settings") or {}).items()
                                              if k not in ("namespace", "processes", "cost_ms"))]
    prewarm = runs[-1].get("groups", {}).get("prewarm")
    if prewarm and prewarm.get("results"):
        from benchmarks.bench_prewarm import table as prewarm_table  # noqa: PLC0415 - the group's own table

        lines += ["", f"## Prewarming: where it pays (last run, {prewarm.get('seconds', '?')} s)", "", "```",
                  prewarm_table(prewarm), "```", "",
                  "Settings: " + ", ".join(f"{k}={_num(v)}" for k, v in (prewarm.get("settings") or {}).items())]
    capacity = runs[-1].get("groups", {}).get("capacity")
    if capacity and capacity.get("costs"):
        from benchmarks.bench_capacity import table as capacity_table  # noqa: PLC0415 - the group's own table

        lines += ["", f"## Capacity: Redis CPU per operation, the model and its check (last run, "
                  f"{capacity.get('seconds', '?')} s)", "", "```", capacity_table(capacity), "```"]
    if not any(run.get("groups") for run in runs):
        lines += ["", "No group was run."]
    return "\n".join(lines).rstrip() + "\n"


FLEET_NAMES = ("none", "cachetools", "fleet", "fleet+prewarm", "fleet+adaptive", "cashews", "aiocache")


# ------------------------------------------------------------------ plot

# The latency distributions drawn, per tier: (case names as bench_micro records them, label).
CDF_PANELS = (
    ("L1 hit", (("L1 hit (per call)", "get, copy_on_read=True"),
                ("L1 hit, copy_on_read=False (per call)", "get, copy_on_read=False"),
                ("floor: cachetools.LRUCache.get (per call)", "floor: cachetools.LRUCache.get"))),
    ("L2 hit, cold L1", (("L2 hit", "MultiLevelCache.get"), ("floor: GET + msgpack.unpackb", "floor: GET + unpack"),
                         ("L2 hit (async)", "AsyncMultiLevelCache.get"),
                         ("floor: redis.asyncio GET + msgpack.unpackb", "floor: asyncio GET + unpack"))),
    ("L3 hit, cold L1", (("L3 hit", "MultiLevelCache.get"), ("floor: GET + msgpack.unpackb", "floor: GET + unpack"))),
)


MARGIN_CAP = 1000.0  # the targets panel's bars: measured / limit within 1/MARGIN_CAP .. MARGIN_CAP


def plot(result: dict[str, Any], path: str) -> str:
    """Latency CDFs of L1, L2 and L3 hits against their floors; the fleet's configurations as hit rate against
    mean latency (one panel per selection cost); every targeted figure against its target."""
    try:
        import matplotlib  # noqa: PLC0415 - optional: pip install -e '.[bench]'

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]' or pip install matplotlib)"
    runs = runs_of(result)
    samples: dict[str, list[float]] = {}
    for run in runs:  # every run's samples pooled (one mode per file)
        for name, values in (run.get("groups", {}).get("micro", {}).get("samples") or {}).items():
            samples.setdefault(name, []).extend(values)
    rows = (runs[-1].get("groups", {}).get("fleet") or {}).get("results") or []
    costs = sorted({r["cost_ms"] for r in rows}, reverse=True)
    targeted = [f for f in aggregate(result) if f["bound"] and judged(f) is not None]
    panels = [h for h, shown in ((5.0, bool(samples)), (5.0, bool(costs)), (0.3 * len(targeted) + 1, bool(targeted)))
              if shown]  # the rows drawn, by height: distributions, fleet, targets
    if not panels:
        return "no plot: the results file holds no samples, fleet rows or targeted figures"
    fig = plt.figure(figsize=(18, sum(panels) + 1))
    grid = fig.add_gridspec(len(panels), 6, height_ratios=panels)
    row = 0
    if samples:
        for i, (title, cases) in enumerate(CDF_PANELS):
            ax = fig.add_subplot(grid[row, 2 * i:2 * i + 2])
            for name, label in cases:
                values = sorted(samples.get(name, []))
                if values:
                    median = f"median {_num(values[len(values) // 2])} us"
                    ax.plot(values, [(k + 1) / len(values) for k in range(len(values))],
                            linestyle="--" if name.startswith("floor") else "-", label=f"{label} ({median})")
            ax.set_xscale("log")
            timer = samples.get(TIMER_CASE)
            own = f" (each includes the timer's own {_num(statistics.median(timer))} us)" if i == 0 and timer else ""
            ax.set_xlabel("microseconds per call" + own)
            ax.set_ylabel("fraction of calls")
            ax.set_title(f"{title}: latency distribution")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize="small", loc="lower right")
        row += 1
    markers = {1: "s", 2: "^", 4: "o"}
    for i, cost in enumerate(costs[:2]):
        ax = fig.add_subplot(grid[row, 3 * i:3 * i + 3])
        shown = [r for r in rows if r["cost_ms"] == cost]
        configs = list(dict.fromkeys(r["config"] for r in shown))
        colors = {c: plt.get_cmap("tab10")(k) for k, c in enumerate(configs)}
        top = max(x["processes"] for x in shown)
        for r in shown:
            ax.scatter(r["mean_ms"], 100 * r["hit_rate"], color=colors[r["config"]],
                       marker=markers.get(r["processes"], "D"), s=60)
        # Labels at the largest N, staggered over three heights in the order of x, so neighbours do not overlap.
        labelled = sorted((r for r in shown if r["processes"] == top), key=lambda r: r["mean_ms"])
        for k, r in enumerate(labelled):
            ax.annotate(r["config"], (r["mean_ms"], 100 * r["hit_rate"]), textcoords="offset points",
                        xytext=(4, (6, -13, 17)[k % 3]), fontsize="small", color=colors[r["config"]])
        ax.margins(x=0.12, y=0.1)
        for n, marker in markers.items():
            if any(r["processes"] == n for r in shown):
                ax.scatter([], [], color="grey", marker=marker, label=f"N = {n} processes")
        ax.set_xlabel("mean latency per read (ms)")
        ax.set_ylabel("hit rate (%)")
        ax.set_title(f"fleet, {cost:g} ms selection, last run: hit rate against mean latency (labels: N = {top})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    row += bool(costs)
    if targeted:
        ax = fig.add_subplot(grid[row, :])
        names, margins, lows, highs, colors_ = [], [], [], [], []
        for f in targeted:
            _, op, limit = f["bound"]

            def margin(x: float, op: str = op, limit: float = limit) -> float:
                # <= 1 passes: the measured number over its limit (the limit over it, for "at least" targets);
                # kept within 1e-3..1e3 for the log scale (a hit rate gain of 0 or less, a negative extra cost)
                at_least = op in (">=", ">")
                m = (limit / x if x > 0 else MARGIN_CAP) if at_least else (x / limit if limit else x)
                return min(max(m, 1 / MARGIN_CAP), MARGIN_CAP)

            mid = margin(judged(f) or 0.0)
            lo, hi = sorted(margin(x) for x in (f["spread"] or (judged(f), judged(f))))
            names.append(f"{f['id']} ({f['target']})")
            margins.append(mid)
            lows.append(mid - lo)
            highs.append(hi - mid)
            colors_.append("tab:green" if f["pass"] else "tab:red")
        y = range(len(names))
        ax.barh(y, margins, xerr=[lows, highs], color=colors_, alpha=0.7)
        ax.axvline(1.0, color="black", linestyle="--")
        ax.set_yticks(list(y), names, fontsize="small")
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("measured / target limit (for 'at least' targets: limit / measured); left of 1 passes; "
                      "whiskers: spread over runs")
        ax.set_title("every figure against its target")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plot written to {path}"


def report(args: argparse.Namespace) -> int:
    path = Path(args.infile)
    if not path.exists():
        print(f"{path} does not exist: run `python -m benchmarks run` first", file=sys.stderr)
        return 2
    result = json.loads(path.read_text())
    if args.format == "json":
        print(json.dumps({**result, "figures": aggregate(result)}, indent=1))
    else:
        print(markdown(result), end="")
    if args.plot:
        print(plot(result, args.plot), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run benchmark groups and write the results file")
    r.add_argument("--group", choices=(*GROUPS, "all"), default="all")
    r.add_argument("--config", action="append", metavar="NAME",
                   help=f"only these (repeatable): micro figures {', '.join(FIGURES)}, fleet configurations "
                        "none (alias baseline), cachetools (per-process), fleet, fleet+prewarm (predictive), "
                        f"fleet+adaptive (adaptive), cashews, aiocache, or prewarm workloads {', '.join(WORKLOADS)}")
    size = r.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smaller samples and namespaces; the fleet at N = 4 only; fewer prewarm requests")
    size.add_argument("--tiny", action="store_true", help="a smoke run: every figure, too small to mean anything")
    r.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the selected groups N times (default 1); the report shows each figure's spread")
    r.add_argument("--url", help="benchmark this Redis instead of a private redis-server (CONFIG RESETSTAT is used)")
    r.add_argument("--out", default=str(DEFAULT_RESULTS), help="results file (default benchmarks/results/latest.json)")
    p = sub.add_parser("report", help="print the results file")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown")
    p.add_argument("--in", dest="infile", default=str(DEFAULT_RESULTS), help="results file to read")
    p.add_argument("--plot", metavar="PNG", help="also draw a PNG (needs matplotlib, the 'bench' extra)")
    args = parser.parse_args(argv)
    return run(args, argv) if args.command == "run" else report(args)
