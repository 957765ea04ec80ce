"""Smoke test of the benchmark harness (``python -m benchmarks``): the micro and prewarm groups in their
tiny mode write every figure to the results file, and the report renders it; the report's verdicts and
spreads over several runs, the fleet's figures and the prewarm verdicts, on made-up results. Nothing here
is timed."""

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
                "rt:record_query", "rt:predict_next_queries", "learn:caller", *cpu_ids(SIZES["tiny"])}
    assert expected == figures.keys()
    for f in figures.values():
        assert {"figure", "value", "unit", "floor", "floor_value", "ratio", "target", "pass"} <= f.keys()
        assert isinstance(f["value"], float | int), f
        assert f["floor_value"] > 0, f  # every figure has a floor measured in the run
    assert figures["rt:get"]["detail"]["slowlog_agrees"]
    assert figures["rt:get"]["value"] == figures["rt:get_many(100)"]["value"] == 1  # one round trip each
    assert figures["learn:caller"]["bound"] == ["ratio", "<=", 0.15]
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


def _tiny_run(group: str, redis_url: str, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A tiny run of ``group`` into a results file: the file, and the group's result in it."""
    out = tmp_path / "latest.json"
    assert harness.main(["run", "--group", group, "--tiny", "--url", redis_url, "--out", str(out)]) == 0
    [run] = json.loads(out.read_text())["runs"]
    return out, run["groups"][group]


def _report(out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The markdown report of the results file ``out``."""
    capsys.readouterr()
    assert harness.main(["report", "--in", str(out)]) == 0
    return capsys.readouterr().out


@pytest.mark.standalone_only(reason="Redis CPU is one server's INFO cpu; the fleet's workers take one URL")
def test_prewarm_tiny_run_and_report(redis_url: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out, prewarm = _tiny_run("prewarm", redis_url, tmp_path)
    rows = {(r["workload"], r["config"]): r for r in prewarm["results"]}
    assert rows.keys() == {(w, c) for w in ("steady", "ttl", "evicting") for c in ("fleet", "fleet+prewarm")}
    for r in rows.values():
        assert r["reads"] + r["writes"] == 2 * 16  # tiny: 2 processes x 16 requests
        assert r["wrong"] == 0
        assert r["redis_cpu_gross_us_per_request"] > 0
    assert rows["steady", "fleet"]["background_selections"] == 0
    assert rows["steady", "fleet"]["learn_ms"] < 0.1 < rows["steady", "fleet"]["mean_ms"]  # no prewarm path
    ttl = rows["ttl", "fleet"]
    assert ttl["ttl_ms"] == pytest.approx(0.5 * (ttl["ttl_from_step_ms"] + ttl["ttl_from_revisit_ms"]), abs=1)
    assert ttl["ttl_from_revisit_ms"] == pytest.approx(rows["steady", "fleet"]["revisit_ms"])
    assert ttl["ttl_from_step_ms"] == pytest.approx(rows["steady", "fleet"]["step_gap_ms"])
    assert ttl["ttl_ordered"] == (ttl["ttl_from_step_ms"] < ttl["ttl_from_revisit_ms"])
    assert {r["workflow_skew"] for r in rows.values()} == {3.0}
    assert 0.8 < ttl["oracle_top1"] < 0.9  # the chain's oracle top-1, stationary-weighted
    _, l2, l3 = rows["evicting", "fleet"]["sizes"]
    assert l2 + l3 == max(2 * 16, round(0.25 * rows["evicting", "fleet"]["distinct_queries"]))  # 2 slots per shard
    ids = {f["id"] for f in prewarm["figures"]}
    assert ids == {"prewarm:steady@5ms:mean", "prewarm:steady@5ms:redis_cpu"} | {
        f"prewarm:{w}@5ms:{what}" for w in ("ttl", "evicting") for what in ("mean", "hit_rate", "background")}
    text = _report(out, capsys)
    assert "## Prewarming: where it pays" in text
    assert "(`prewarm:ttl@5ms:background`)" in text


@pytest.mark.standalone_only(reason="Redis CPU is one server's INFO cpu; the fleet's workers take one URL")
def test_capacity_tiny_run_and_report(redis_url: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out, capacity = _tiny_run("capacity", redis_url, tmp_path)
    assert {f["id"] for f in capacity["figures"]} == {
        *(f"capacity:{k}" for k in ("l2_hit", "l3_hit", "miss", "put", "touch_call", "per_subscriber", "record",
                                    "model_round", "memory_per_entry")), "capacity:model"}
    v = capacity["validation"]
    assert v["requests"] == 2 * 20  # tiny: 2 processes x 20 requests
    assert v["wrong"] == 0
    assert v["predicted_us_per_second"] > 0
    assert v["measured_gross_us_per_second"] > 0
    assert v["commands"]["spublish"] >= v["writes"]  # every write announced
    assert capacity["measured"]["connections"]["one cache, opened"] >= 1
    assert len(capacity["table"]) == 18
    text = _report(out, capsys)
    assert "## Capacity" in text
    assert "(`capacity:model`)" in text
    assert harness.main(["run", "--group", "capacity", "--config", "l2", "--tiny", "--url", redis_url]) == 2


def test_prewarm_verdicts_from_made_up_rows() -> None:
    from benchmarks.bench_prewarm import figures_of

    def row(workload: str, config: str, hit_rate: float, mean: float, cpu: float, fg: int, bg: int) -> dict[str, Any]:
        return {"workload": workload, "config": config, "processes": 4, "cost_ms": 5.0, "hit_rate": hit_rate,
                "mean_ms": mean, "p99_ms": 3 * mean, "redis_cpu_us_per_request": cpu, "selections": fg,
                "background_selections": bg, "sizes": [100, 300, 600], "reads": 900, "writes": 100,
                "think_ms": 20.0, "ttl_ms": 80.0, "ttl_from_revisit_ms": 100.0, "ttl_from_step_ms": 60.0,
                "ttl_ordered": True, "workflow_skew": 3.0, "oracle_top1_walked": 0.84, "least_bg_per_saved": 1 / 0.84,
                "distinct_queries": 250}

    rows = [row("steady", "fleet", 0.9, 1.0, 100.0, 100, 0), row("steady", "fleet+prewarm", 0.9, 1.04, 140.0, 100, 0),
            row("ttl", "fleet", 0.3, 5.0, 150.0, 700, 0), row("ttl", "fleet+prewarm", 0.45, 3.9, 200.0, 550, 200),
            row("evicting", "fleet", 0.5, 4.0, 150.0, 500, 0),
            row("evicting", "fleet+prewarm", 0.48, 3.0, 200.0, 520, 300)]
    verdicts = {f["id"]: f["pass"] for f in figures_of(rows)}
    assert verdicts == {
        "prewarm:steady@5ms:mean": True, "prewarm:steady@5ms:redis_cpu": False,  # 1.4x the Redis CPU
        "prewarm:ttl@5ms:mean": True, "prewarm:ttl@5ms:hit_rate": True,  # 0.78x, +15 points
        "prewarm:ttl@5ms:background": True,  # 200 background selections for 150 misses saved
        "prewarm:evicting@5ms:mean": True, "prewarm:evicting@5ms:hit_rate": False,
        "prewarm:evicting@5ms:background": False}  # misses went up: none saved
    [saved] = [f for f in figures_of(rows) if f["id"] == "prewarm:ttl@5ms:background"]
    assert (saved["value"], saved["floor_value"], saved["ratio"]) == (200, 150, pytest.approx(4 / 3))
    assert saved["detail"]["least_bg_per_saved"] == pytest.approx(1 / 0.84)
    assert "halfway between a session's step gap 60 ms" in saved["detail"]["workload"]


def test_workflow_skew_weights_the_same_successors() -> None:
    """The prewarm group's chain has the fleet's successors, its likeliest one weighted far more: the fleet's
    chain (skew 1) is unchanged, 1/rank normalized."""
    from benchmarks.bench_fleet import successor_probabilities, zipf_chain

    assert successor_probabilities(3) == pytest.approx((6 / 11, 3 / 11, 2 / 11))
    assert successor_probabilities(2, 3.0) == pytest.approx((8 / 9, 1 / 9))
    fleet, workflows = zipf_chain(10, 200, 1.0), zipf_chain(10, 200, 1.0, 3.0)
    assert workflows.successors == fleet.successors
    assert all(p == successor_probabilities(len(p)) for p in fleet.probabilities)
    assert all(p == successor_probabilities(len(p), 3.0) for p in workflows.probabilities)
    assert fleet.expected_oracle_accuracy(1) < 0.5
    assert workflows.expected_oracle_accuracy(1) > 0.8


def test_ttl_between_the_step_gap_and_the_revisit_time() -> None:
    from benchmarks.bench_fleet import Report
    from benchmarks.bench_prewarm import revisit_gaps, step_gaps, ttl_between, ttl_ordered

    assert ttl_between(0.06, 0.10) == pytest.approx(0.08)
    assert ttl_ordered(0.06, 0.10)
    assert not ttl_ordered(0.10, 0.10)
    # worker 0: session a asks q1, q2; worker 1: session b asks q1 (read), then writes q2
    one, two = Report("fleet", 0), Report("fleet", 1)
    one.stamps = [(0.0, "q1", False, "a"), (0.5, "q2", False, "a")]
    two.stamps = [(0.2, "q1", False, "b"), (0.3, "q2", True, "b")]
    assert sorted(step_gaps([one, two])) == pytest.approx([0.1, 0.5])
    assert sorted(revisit_gaps([one, two])) == pytest.approx([0.2, 0.2])  # q1 at 0.2 after 0.0, q2 at 0.5 after 0.3


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
