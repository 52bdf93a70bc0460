"""Paired, interleaved timing: the models (or backends) of one measured point run in alternating rounds (A B, B A,
A B, ...), so every ratio compares calls taken at the same time, and a burst of load on the machine hits both
sides of a ratio instead of becoming a "speedup". A ratio is the median of the per-round ratios with a bootstrap
95% interval; a point whose interval is wider than ±10% is marked unstable. (Tails are reported, not judged: on a
quiet machine a sub-millisecond call's p99 is one scheduler hiccup, while its speedup is tight.)"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

UNSTABLE_INTERVAL = 0.10  # a ratio whose 95% interval reaches beyond ±10% of it is not a measurement to act on
BOOTSTRAP_SAMPLES = 2000


@dataclass
class Timings:
    """One contender's call times, round by round."""

    rounds: list[list[float]] = field(default_factory=list)

    @property
    def round_medians(self) -> np.ndarray:
        return np.array([np.median(r) for r in self.rounds])

    @property
    def calls(self) -> np.ndarray:
        return np.concatenate([np.asarray(r) for r in self.rounds])


def ratio_interval(baseline: np.ndarray, other: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high) of baseline/other over paired rounds: how many times faster `other` is."""
    ratios = baseline / other
    rng = np.random.default_rng(seed)
    resampled = np.median(rng.choice(ratios, size=(BOOTSTRAP_SAMPLES, len(ratios)), replace=True), axis=1)
    return float(np.median(ratios)), float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))


def instability(ratio: tuple[float, float, float], round_medians: np.ndarray) -> list[str]:
    """Why a measured point is not to be trusted (empty when it is): its speedup's interval is too wide, or (for
    the baseline, whose ratio is 1 by definition) its own round medians spread as widely."""
    median, low, high = ratio
    half_width = max(median - low, high - median) / median
    if low == high == median:  # the baseline against itself: judge the spread of its own rounds instead
        mid = float(np.median(round_medians))
        half_width = float(np.max(np.abs(round_medians - mid))) / mid if len(round_medians) > 1 else 0.0
    if half_width > UNSTABLE_INTERVAL:
        return [f"interval ±{half_width:.0%} (limit ±{UNSTABLE_INTERVAL:.0%})"]
    return []


def interleaved(contenders: dict[str, Callable[[], object]], calls_per_round: int, min_rounds: int,
                max_seconds: float, warmup_s: float, settle: float,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Timings]:
    """Time every contender in alternating rounds until each ratio to the first is known within ±settle (95%),
    after at least min_rounds, or until max_seconds have passed."""
    names = list(contenders)
    started = clock()
    for run in contenders.values():  # warm-up: at least 3 calls each, together at least warmup_s
        for _ in range(3):
            run()
    while clock() - started < warmup_s:
        for run in contenders.values():
            run()
    timings = {name: Timings() for name in names}
    deadline = clock() + max_seconds
    while True:
        order = names if len(timings[names[0]].rounds) % 2 == 0 else names[::-1]
        for name in order:
            calls = []
            for _ in range(calls_per_round):
                t0 = clock()
                contenders[name]()
                calls.append(clock() - t0)
            timings[name].rounds.append(calls)
        rounds = len(timings[names[0]].rounds)
        if rounds >= min_rounds and (clock() > deadline or _settled(timings, names, settle)):
            return timings


def _settled(timings: dict[str, Timings], names: list[str], settle: float) -> bool:
    base = timings[names[0]].round_medians
    for name in names[1:]:
        median, low, high = ratio_interval(base, timings[name].round_medians)
        if max(median - low, high - median) > settle * median:
            return False
    return True
