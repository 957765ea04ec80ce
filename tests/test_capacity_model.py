"""The capacity model of benchmarks/bench_capacity.py: pure arithmetic on per-op costs, no Redis, nothing timed."""

from __future__ import annotations

import math

import pytest

from benchmarks.bench_capacity import (
    Costs,
    Mix,
    capacity_table,
    masters_needed,
    predict,
    rounds_per_second,
    touch_calls_per_second,
)

COSTS = Costs(l2_hit=20.0, l3_hit=40.0, miss=200.0, put=100.0, touch_call=50.0, per_subscriber=10.0,
              idle_per_process=100.0, record=130.0, model_round=40.0)


def test_touch_calls_carry_one_event_when_sparse_and_many_when_dense() -> None:
    assert touch_calls_per_second(0.0) == 0.0
    # sparse: each event is its own call
    assert touch_calls_per_second(0.16, shards=16, window=0.1) == pytest.approx(0.16, rel=0.01)
    # dense: each shard sends at most about one call per window
    assert touch_calls_per_second(1e6, shards=16, window=0.1) == pytest.approx(160.0, rel=0.01)
    # in between: 1 + (shard rate x window) events per call
    assert touch_calls_per_second(160.0, shards=16, window=0.1) == pytest.approx(80.0)


def test_model_rounds_batch_records_up_to_the_wake_size() -> None:
    assert rounds_per_second(0.0) == 0.0
    assert rounds_per_second(20.0, interval=0.05) == pytest.approx(10.0)  # 2 records per round
    assert rounds_per_second(64_000.0, interval=0.05, wake=64) == pytest.approx(1000.0)  # 64 per round


def test_prediction_adds_up_the_parts() -> None:
    mix = Mix(l1=0.5, l2=0.3, l3=0.1, miss=0.1, write_share=0.2)
    got = predict(COSTS, workers=10, rps=10.0, mix=mix)
    reads, writes = 8.0, 2.0  # per worker per second
    events = reads * 0.5
    fanout = 10 * COSTS.per_subscriber  # every write reaches every worker
    per_worker = (reads * (0.3 * 20.0 + 0.1 * 40.0 + 0.1 * (200.0 + fanout)) + writes * (100.0 + fanout)
                  + max(touch_calls_per_second(events), 1.0) * 50.0 + 100.0)
    assert got["us_per_second"] == pytest.approx(10 * per_worker)
    assert got["us_per_request"] == pytest.approx(per_worker / 10.0)
    assert got["cpu_share"] == pytest.approx(10 * per_worker / 1e6)
    parts = sum(got[f"{k}_us_per_second"] for k in ("reads", "writes", "bookkeeping", "model", "idle"))
    assert parts == pytest.approx(got["us_per_second"])
    assert got["model_us_per_second"] == 0.0


def test_prediction_scales_with_workers_and_fanout_with_subscribers() -> None:
    mix = Mix(write_share=0.1)
    one = predict(COSTS, workers=10, rps=10.0, mix=mix, subscribers=10)
    two = predict(COSTS, workers=20, rps=10.0, mix=mix, subscribers=10)
    assert two["us_per_second"] == pytest.approx(2 * one["us_per_second"])
    wider = predict(COSTS, workers=20, rps=10.0, mix=mix)  # subscribers = workers
    assert wider["writes_us_per_second"] > two["writes_us_per_second"]
    assert wider["bookkeeping_us_per_second"] == two["bookkeeping_us_per_second"]


def test_l1_hits_cost_redis_only_their_counters() -> None:
    got = predict(COSTS, workers=1, rps=100.0, mix=Mix(l1=1.0, l2=0.0, l3=0.0, miss=0.0, write_share=0.0))
    assert got["reads_us_per_second"] == 0.0
    assert got["bookkeeping_us_per_second"] == pytest.approx(COSTS.touch_call)  # one counters call per second


def test_records_cost_their_rounds() -> None:
    mix = Mix(write_share=0.0, records_per_read=1.0)
    got = predict(COSTS, workers=1, rps=20.0, mix=mix)
    assert got["model_us_per_second"] == pytest.approx(20 * 130.0 + rounds_per_second(20.0) * 40.0)


def test_mix_is_checked() -> None:
    with pytest.raises(ValueError, match="add up to 1"):
        Mix(l1=0.5, l2=0.1, l3=0.1, miss=0.1)
    with pytest.raises(ValueError, match="write_share"):
        Mix(write_share=1.5)


def test_masters_and_table() -> None:
    assert masters_needed(0.0) == 1
    assert masters_needed(0.6) == 1
    assert masters_needed(0.61) == 2
    assert masters_needed(3.0, ceiling=0.5) == 6
    rows = capacity_table(COSTS)
    assert len(rows) == 3 * 3 * 2
    for row in rows:
        assert row["requests_per_second"] == row["workers"] * row["rps_per_worker"]
        assert math.isclose(row["cpu_share"], row["requests_per_second"] * row["us_per_request"] / 1e6)
        assert row["masters"] == masters_needed(row["cpu_share"])
    by = {(r["workers"], r["rps_per_worker"], r["write_share"]): r["cpu_share"] for r in rows}
    assert by[(1000, 50.0, 0.10)] > by[(1000, 50.0, 0.01)] > by[(100, 50.0, 0.01)]
