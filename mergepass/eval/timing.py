"""Timing in one process: every round calls every contender in turn, so machine noise hits each alike."""
from __future__ import annotations

import statistics

from ..decide import interleaved  # noqa: F401  (re-exported: the benchmarks time with it)


def medians(per_round: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in per_round.items()}


def ratios(per_round: dict[str, list[float]], base: str) -> dict[str, list[float]]:
    """Per-round speedup of each contender over ``base`` (same round, so the same machine state)."""
    return {k: [b / t for b, t in zip(per_round[base], v)] for k, v in per_round.items()}
