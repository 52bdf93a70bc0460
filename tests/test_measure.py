"""Paired, interleaved measurement on fake runners with a fake clock: exact, deterministic, no real timing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import kdship
from kdship.measure import instability, interleaved, ratio_interval


class FakeMachine:
    """A clock and runners whose calls cost a fixed time, plus `load`: extra cost while a burst is on."""

    def __init__(self):
        self.now = 0.0
        self.calls = 0
        self.burst = range(0)  # call numbers (over all runners) that run slower

    def clock(self) -> float:
        return self.now

    def runner(self, cost: float, noise=None):
        def run():
            self.calls += 1
            self.now += cost * (4.0 if self.calls in self.burst else 1.0) * (noise() if noise else 1.0)

        return run


def _measure(machine, runners, **kw):
    settings = {"calls_per_round": 10, "min_rounds": 8, "max_seconds": 50.0, "warmup_s": 0.0, "settle": 0.01} | kw
    return interleaved(runners, clock=machine.clock, **settings)


def test_a_constant_2x_reads_2x_with_a_tight_interval():
    m = FakeMachine()
    t = _measure(m, {"teacher": m.runner(0.002), "student": m.runner(0.001)})
    ratio = ratio_interval(t["teacher"].round_medians, t["student"].round_medians)
    assert ratio == pytest.approx((2.0, 2.0, 2.0))
    assert instability(ratio, t["student"].round_medians) == []
    assert len(t["teacher"].rounds) == 8  # settled at once: no more rounds than asked for


def test_a_burst_during_one_models_turn_does_not_move_the_ratio():
    m = FakeMachine()
    # 6 warm-up calls, round 0 (teacher 7-16, student 17-26), round 1 in the other order: the burst covers the
    # student's whole turn in it (calls 27-36), 4x slower
    m.burst = range(27, 37)
    t = _measure(m, {"teacher": m.runner(0.002), "student": m.runner(0.001)})
    median, low, high = ratio_interval(t["teacher"].round_medians, t["student"].round_medians)
    assert median == pytest.approx(2.0) and low <= 2.0 <= high
    # what a sequential measurement with means would have said: the burst would read as a slowdown
    naive = t["teacher"].calls.mean() / t["student"].calls.mean()
    assert naive < 1.7


def test_alternating_order_and_interval_widen_with_noise_and_noisy_points_are_unstable():
    m = FakeMachine()
    rng = np.random.default_rng(0)
    t = _measure(m, {"a": m.runner(0.002, lambda: rng.uniform(0.3, 3.0)), "b": m.runner(0.001)}, max_seconds=0.5)
    ratio = ratio_interval(t["a"].round_medians, t["b"].round_medians)
    assert ratio[1] < ratio[0] < ratio[2]
    assert instability(ratio, t["a"].round_medians), "a wide interval must be flagged"
    # the baseline's own ratio is 1 by definition: the spread of its rounds decides
    assert instability((1.0, 1.0, 1.0), np.array([1.0, 1.3, 0.9, 1.0]))
    assert not instability((1.0, 1.0, 1.0), np.array([1.0, 1.02, 0.99, 1.0]))


def _bench_json(folder, stable: bool):
    folder.mkdir()
    row = {"model": "student", "backend": "ort-cpu", "batch": 8, "seq": 32, "p50_ms": 1.0, "p99_ms": 1.2,
           "sequences_per_s": 8000.0, "speedup_vs_baseline": 2.0, "speedup_ci95": [1.5, 2.6], "stable": stable,
           "unstable_reasons": [] if stable else ["interval ±27% (limit ±10%)"]}
    (folder / "bench.json").write_text(json.dumps({"results": [row], "device": "CPU", "threads": 2,
                                                   "baseline": "teacher"}))


def test_gate_refuses_a_speed_budget_on_an_unstable_measurement_unless_told(tmp_path):
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("speed:\n  - {backend: ort-cpu, batch: 8, seq: 32, min_speedup: 1.2}\n")
    _bench_json(tmp_path / "noisy", stable=False)
    refused = kdship("gate", tmp_path / "noisy", "--budgets", budgets)
    assert refused.exit_code == 1 and "✗" in refused.output and "unstable: interval ±27%" in refused.output
    allowed = kdship("gate", tmp_path / "noisy", "--budgets", budgets, "--allow-unstable")
    assert allowed.exit_code == 0, allowed.output
    _bench_json(tmp_path / "quiet", stable=True)
    assert kdship("gate", tmp_path / "quiet", "--budgets", budgets).exit_code == 0
