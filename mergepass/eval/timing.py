"""Timing in one process: every round calls every contender in turn, so machine noise hits each alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, iters: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument function, one value per round."""
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            per_round[name].append((time.perf_counter() - t0) / iters)
    return per_round


def medians(per_round: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in per_round.items()}


def ratios(per_round: dict[str, list[float]], base: str) -> dict[str, list[float]]:
    """Per-round speedup of each contender over ``base`` (same round, so the same machine state)."""
    return {k: [b / t for b, t in zip(per_round[base], v)] for k, v in per_round.items()}
