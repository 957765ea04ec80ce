"""Acceptance of the shared prediction model: top-5 accuracy against an oracle, and drift
(docs/benchmarks.md#prediction-accuracy).

The workload is benchmarks/workloads.py, the one ``benchmarks/bench_prediction.py`` reports on:
sessions walking a known Markov chain over 200 queries (3-8 successors each, Zipf-skewed). The
oracle knows the transition matrix and predicts the 5 likeliest successors; the model is scored on
the same requests (top-5 membership of the session's actual next query).

* After a warm-up of 5000 observations, the model's top-5 hits are at least 90% of the oracle's.
* The warmer's own accuracy counters agree with the hits counted here.
* After the chain is replaced by a new random one, accuracy first collapses, and within the stated
  number of observations (``RECOVERY_BOUND``) a window of them is back at 90% of the new oracle.

Seeded and deterministic: one process, one walk, the warmer's hour of day fixed by its clock, so
Redis sees the same sequence of script calls on every run. The settings are the benchmark's main
settings: the library defaults (``max_patterns=500`` pattern sets for 200 transition sets and ~1000
n-gram contexts; n-gram sets are evicted first, see benchmarks/README.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from benchmarks.bench_prediction import DRIFT_SEED_OFFSET, MAIN_SETTINGS, RECOVERY_BOUND, TARGET
from benchmarks.workloads import FIXED_TIME, MarkovChain, Score, SessionWalker, replay
from victor_rcache import MultiLevelCache, PredictiveCacheWarmer

from .helpers import Backend, guard_slots

pytestmark = pytest.mark.standalone_only(
    reason="the accuracy of the model does not depend on the backend (its keys share one hash slot and the "
           "scripts are the same; the slot guard still checks every call): one run keeps this test fast")

SEED = 1
WARMUP = 5000  # observations (requests with a predecessor in their session) before accuracy is measured
EVALUATION = 2000  # observations the accuracy after warm-up is measured on
COLLAPSE = 500  # observations right after the switch: the old model must be wrong about the new chain
FINAL = 1000  # the window ending RECOVERY_BOUND observations after the switch


@dataclass
class Outcome:
    after_warmup: Score
    counters: dict[str, Any]
    right_after_switch: Score
    recovered: Score
    observations_after_switch: int


@pytest.fixture(scope="module")
def outcome(backend: Backend) -> Iterator[Outcome]:
    """Warm up, measure, switch chains, measure right away, learn, measure at the stated bound."""
    first, second = MarkovChain.random(SEED), MarkovChain.random(SEED + DRIFT_SEED_OFFSET)
    namespace = "t" + uuid.uuid4().hex[:12]
    with guard_slots(MultiLevelCache(backend.url, namespace=namespace, fail_open=False,
                                     cluster=backend.cluster)) as cache:
        warmer = PredictiveCacheWarmer(cache, clock=lambda: FIXED_TIME, **MAIN_SETTINGS)
        walker = SessionWalker(SEED)
        replay(warmer, first, walker.walk_observations(first, WARMUP), check=False)
        measured = replay(warmer, first, walker.walk_observations(first, EVALUATION))
        counters = warmer.get_statistics()["predictions"]

        collapse = replay(warmer, second, walker.walk_observations(second, COLLAPSE))
        learning = replay(warmer, second, walker.walk_observations(second, RECOVERY_BOUND - COLLAPSE - FINAL),
                          check=False)
        final = replay(warmer, second, walker.walk_observations(second, FINAL))
        yield Outcome(measured.score(), counters, collapse.score(), final.score(),
                      collapse.transitions + learning.transitions + final.transitions)
        warmer.clear_patterns()


def test_top5_accuracy_after_warmup_is_at_least_90_percent_of_the_oracle(outcome: Outcome) -> None:
    s = outcome.after_warmup
    assert s.checked == EVALUATION
    assert s.oracle > 0.85, f"the workload should let the oracle's top 5 cover most transitions: {s}"
    assert s.ratio >= TARGET, (f"model top-5 accuracy {s.model:.3f} is {s.ratio:.3f} of the oracle's {s.oracle:.3f} "
                               f"after {WARMUP} observations (want >= {TARGET})")


def test_the_warmers_accuracy_counters_agree(outcome: Outcome) -> None:
    # Only the evaluation's predictions were made so far (the warm-up recorded without predicting):
    # each was checked against its session's actual next query, as counted here.
    c, s = outcome.counters, outcome.after_warmup
    assert (c["total"], c["correct"]) == (s.checked, s.model_hits)
    assert (c["process"]["checked"], c["process"]["correct"]) == (s.checked, s.model_hits)


def test_accuracy_recovers_after_a_drift_within_the_stated_observations(outcome: Outcome) -> None:
    collapsed, recovered = outcome.right_after_switch, outcome.recovered
    assert collapsed.ratio < 0.6, f"a new chain should defeat the old model at first (else nothing is tested): " \
                                  f"{collapsed}"
    assert outcome.observations_after_switch == RECOVERY_BOUND
    assert recovered.ratio >= TARGET, (
        f"{FINAL} observations ending {RECOVERY_BOUND} after the switch: model {recovered.model:.3f}, "
        f"oracle {recovered.oracle:.3f}, ratio {recovered.ratio:.3f} (want >= {TARGET})")
