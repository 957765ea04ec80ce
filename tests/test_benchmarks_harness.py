"""Smoke test of the benchmark harness (``python -m benchmarks``): the micro group in its tiny mode
writes every figure to the results file, and the report renders it; the report's verdicts and spreads
over several runs, and the fleet's figures, on made-up results. Nothing here is timed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import harness
from benchmarks.bench_micro import SIZES, cpu_ids
from benchmarks.figures import figure

pytest.importorskip("cachetools", reason="the L1 figure's floor is cachetools (the 'bench' extra)")


@pytest.mark.standalone_only(reason="CONFIG RESETSTAT / SLOWLOG counting reads one server")
def test_micro_tiny_run_and_report(redis_url: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "latest.json"
    assert harness.main(["run", "--group", "micro", "--tiny", "--url", redis_url, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"date", "redis_server", "nproc"} <= result["machine"].keys()
    assert result["command"][3:5] == ["run", "--group"]
    [run] = result["runs"]
    micro = run["groups"]["micro"]
    figures = {f["id"]: f for f in micro["figures"]}
    expected = {"l1", "l1:shared", "l2", "l2:async", "l3", "get_many", "parallel:4p", "memory",
                "publish@1", "publish@4", "publish@16", "rt:get", "rt:put", "rt:get_many(100)", "rt:get_or_set",
                "rt:record_query", "rt:predict_next_queries", *cpu_ids(SIZES["tiny"])}
    assert expected == figures.keys()
    for f in figures.values():
        assert {"figure", "value", "unit", "floor", "floor_value", "ratio", "target", "pass"} <= f.keys()
        assert isinstance(f["value"], float | int), f
        assert f["floor_value"] > 0, f  # every figure has a floor measured in the run
    assert figures["rt:get"]["detail"]["slowlog_agrees"]
    assert figures["rt:get"]["value"] == figures["rt:get_many(100)"]["value"] == 1  # one round trip each
    assert {"L1 hit (per call)", "L2 hit", "L2 hit (async)", "L3 hit", "floor: GET + msgpack.unpackb"} \
        <= micro["samples"].keys()

    capsys.readouterr()
    assert harness.main(["report", "--in", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| figure | value | floor | ratio | target | verdict | spread |" in text
    assert "(`l2:async`)" in text
    assert "round trips per op: get_many(100)" in text
    assert harness.main(["report", "--format", "json", "--in", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "tiny"


def _results(*runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"command": ["python", "-m", "benchmarks", "run"], "mode": "quick", "machine": {},
            "runs": [{"groups": {"micro": {"figures": figures}}} for figures in runs]}


def test_report_takes_every_run_into_the_verdict_and_the_spread() -> None:
    passing = figure("l2", "L2 hit", value=100.0, unit="us", floor="GET", floor_value=90.0,
                     bound=("ratio", "<=", 1.3))
    failing = {**copy.deepcopy(passing), "value": 130.0, "ratio": 130.0 / 90.0, "pass": False}
    reported = figure("publish@1", "PUBLISH", value=1.0, unit="us", floor="none", floor_value=0.5)
    [one] = [f for f in harness.aggregate(_results([passing, reported], [failing, reported])) if f["id"] == "l2"]
    assert one["pass"] is False
    assert (one["runs"], one["failed_runs"]) == (2, 1)
    assert one["spread"] == (pytest.approx(100 / 90), pytest.approx(130 / 90))
    text = harness.markdown(_results([passing, reported], [failing, reported]))
    assert "**FAIL** (1 of 2 runs)" in text
    assert "1.11 to 1.44x (2 runs)" in text
    assert "(reported, no target) | — |" in text
    assert "pass (2 of 2 runs)" in harness.markdown(_results([passing], [passing]))


def test_fleet_figures_from_the_fleet_rows() -> None:
    from benchmarks.bench_fleet import fleet_figures

    def row(config: str, cost: float, mean: float, hit_rate: float = 0.9) -> dict[str, Any]:
        return {"config": config, "processes": 4, "cost_ms": cost, "mean_ms": mean, "hit_rate": hit_rate,
                "join_hit_rate": 0.95, "p99_ms": 3 * mean}

    rows = [row("none", 5.0, 8.0, 0.0), row("cachetools", 5.0, 1.0, 0.83), row("fleet", 5.0, 0.45),
            row("cashews", 5.0, 0.6), row("aiocache", 5.0, 0.4), row("none", 0.17, 0.2, 0.0), row("fleet", 0.17, 0.3)]
    figures, skipped = fleet_figures(rows, {"requests": 1500})
    verdicts = {f["id"]: f["pass"] for f in figures}
    assert verdicts == {"fleet:mean_vs_cachetools": True, "fleet:mean_vs_cashews": True,
                        "fleet:mean_vs_aiocache": False, "fleet:mean_vs_none@0.17ms": False,
                        "fleet:hit_rate": True, "fleet:join_hit_rate": True}
    assert not skipped
    _, skipped = fleet_figures([r for r in rows if r["config"] != "cashews"], {})
    assert skipped.keys() == {"fleet:mean_vs_cashews"}


def test_plot_draws_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    f = figure("l2", "L2 hit", value=100.0, unit="us", floor="GET", floor_value=90.0, bound=("ratio", "<=", 1.3))
    result = _results([f])
    result["runs"][0]["groups"]["micro"]["samples"] = {"L2 hit": [100.0, 110.0], "floor: GET + msgpack.unpackb": [90.0]}
    result["runs"][0]["groups"]["fleet"] = {"results": [
        {"config": c, "processes": 4, "cost_ms": 5.0, "mean_ms": m, "hit_rate": h}
        for c, m, h in (("none", 8.0, 0.0), ("fleet", 0.9, 0.93), ("cashews", 0.7, 0.93))]}
    path = tmp_path / "bench.png"
    assert harness.plot(result, str(path)) == f"plot written to {path}"
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_fleet_configurations_take_the_earlier_designs_names() -> None:
    """``run --config baseline --config fleet --config predictive`` (the earlier design's command shape)."""
    from benchmarks.bench_fleet import CONFIGS, resolve_configs

    assert resolve_configs(["baseline", "fleet", "predictive", "none"]) == ["none", "fleet", "fleet+prewarm"]
    assert resolve_configs(["per-process", "adaptive"]) == ["cachetools", "fleet+adaptive"]
    assert resolve_configs(None) == list(CONFIGS)
    with pytest.raises(ValueError, match="baseline"):
        resolve_configs(["fast"])
