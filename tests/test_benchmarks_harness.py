"""Smoke test of the benchmark harness (``python -m benchmarks``): the micro group in its tiny mode
writes every figure to the results file, and the report renders it. Nothing here is timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.bench_micro import FIGURES

pytest.importorskip("cachetools", reason="the L1 figure's floor is cachetools (the 'bench' extra)")


@pytest.mark.standalone_only(reason="CONFIG RESETSTAT / SLOWLOG counting reads one server")
def test_micro_tiny_run_and_report(redis_url: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "latest.json"
    assert harness.main(["run", "--group", "micro", "--tiny", "--url", redis_url, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"date", "redis_server", "nproc"} <= result["machine"].keys()
    figures = {f["id"]: f for f in result["groups"]["micro"]["figures"]}
    expected = {"l1", "l1:shared", "l2", "memory", "cpu:get_l2", "cpu:get_l3", "cpu:put", "rt:get", "rt:put",
                "rt:get_many(100)", "rt:get_or_set", "rt:record_query", "rt:predict_next_queries"}
    assert expected == figures.keys()
    for f in figures.values():
        assert {"figure", "value", "unit", "floor", "target", "pass"} <= f.keys()
        assert isinstance(f["value"], float | int), f
    assert figures["rt:get"]["detail"]["slowlog_agrees"]
    assert len(result["groups"]["micro"]["figures"]) >= len(FIGURES)

    capsys.readouterr()
    assert harness.main(["report", "--in", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| figure | value |" in text
    assert "L1 hit" in text
    assert "round trips per op: get_many(100)" in text
    assert harness.main(["report", "--format", "json", "--in", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["groups"]["micro"]["mode"] == "tiny"


def test_fleet_configurations_take_the_earlier_designs_names() -> None:
    """``run --config baseline --config fleet --config predictive`` (the earlier design's command shape)."""
    from benchmarks.bench_fleet import CONFIGS, resolve_configs

    assert resolve_configs(["baseline", "fleet", "predictive", "none"]) == ["none", "fleet", "fleet+prewarm"]
    assert resolve_configs(["per-process", "adaptive"]) == ["cachetools", "fleet+adaptive"]
    assert resolve_configs(None) == list(CONFIGS)
    with pytest.raises(ValueError, match="baseline"):
        resolve_configs(["fast"])
