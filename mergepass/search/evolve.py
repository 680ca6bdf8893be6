"""Calibrated static schedules: search per-block r under a MACs budget, offline, on calibration images.

A candidate is a shape, one positive weight per block; its schedule is the per-block r
``round(scale * weight)`` with the largest scale whose MACs ratio stays within the budget, so every
candidate spends the whole budget. A (1 + lambda) evolution strategy mutates the weights and keeps a
child when its score (mean output cosine against the unmerged model, CLS token for token features)
beats its parent's; a generation without improvement narrows the mutations. Deterministic for a fixed seed.
The result is an ordinary recipe (the base recipe's method, or for a method without per-block r the
registry's :func:`~mergepass.methods.base.search_method`, and ``r = [...]``) that can be written as TOML,
reviewed and shipped.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..methods import get_method
from ..methods.base import search_method, total_macs
from ..schedule import Schedule, make_schedule


@dataclass
class SearchResult:
    recipe: object                 # the best Recipe found (per-block r)
    schedule: Schedule
    score: float
    start_score: float             # constant r at the same budget
    history: list[tuple[tuple[int, ...], float]] = field(default_factory=list)  # (r, score) per evaluation


def searchable(recipe, match):
    """``recipe`` ready for a per-block search: a registered method that takes per-block r (the registry's
    :func:`~mergepass.methods.base.search_method` otherwise), its fields resolved for ``match`` except those the
    method's ``search_keeps`` names (they follow r: LGTM's transition)."""
    depth = len(match.blocks)
    name = search_method(recipe.merge.method)
    if name != recipe.merge.method:
        recipe = recipe.replace(merge={"method": name, "skip": 0})
    method = get_method(name)
    asked = recipe.merge
    resolved = method.resolve(asked.replace(r=(0,) * depth, match_tome_r=0), match, depth)
    kept = {f: getattr(asked, f) for f in method.search_keeps}
    return recipe.with_merge(resolved.replace(**kept) if kept else resolved)


def fit_budget(match, recipe, weights: Sequence[float], max_macs_ratio: float) -> tuple[int, ...]:
    """The per-block r proportional to ``weights`` with the least merging whose MACs ratio is within
    ``max_macs_ratio``: bisection on the scale (MACs fall monotonically as r grows)."""
    method = get_method(recipe.merge.method)
    depth = len(match.blocks)
    cfg = recipe.merge
    base = total_macs(match, method.plan_blocks(cfg.replace(r=(0,) * depth), match, depth))

    def r_for(scale: float) -> tuple[int, ...]:
        return tuple(max(0, int(round(scale * w))) for w in weights)

    def ratio(r: tuple[int, ...]) -> float:
        return total_macs(match, method.plan_blocks(cfg.replace(r=r), match, depth)) / base

    lo, hi = 0.0, float(match.tokens) / max(min(weights), 1e-3)
    for _ in range(50):
        mid = (lo + hi) / 2
        if ratio(r_for(mid)) <= max_macs_ratio:
            hi = mid
        else:
            lo = mid
    return r_for(hi)


def evolve(match, recipe, score: Callable[[object], float], max_macs_ratio: float, *, iterations: int = 12,
           children: int = 6, sigma: float = 0.35, seed: int = 0,
           log: Optional[Callable[[str], None]] = None) -> SearchResult:
    """Search per-block r for ``recipe`` (a ToMe recipe) on ``match``; ``score(recipe)`` is higher-better."""
    rng = random.Random(seed)
    depth = len(match.blocks)
    recipe = searchable(recipe, match)
    history: list = []
    cache: dict = {}

    def evaluate(weights):
        r = fit_budget(match, recipe, weights, max_macs_ratio)
        if r not in cache:
            cache[r] = score(recipe.with_merge(recipe.merge.replace(r=r)))
            history.append((r, cache[r]))
        return r, cache[r]

    parent = [1.0] * depth
    r_best, best = evaluate(parent)
    start = best
    if log:
        log(f"constant r: {r_best} score {best:.5f}")
    for it in range(iterations):
        kids = [[max(1e-3, w * pow(2.718281828, sigma * rng.gauss(0.0, 1.0))) for w in parent] for _ in range(children)]
        scored = [(evaluate(k), k) for k in kids]
        (r, s), k = max(scored, key=lambda t: t[0][1])
        if s > best:
            parent, r_best, best = k, r, s
        else:  # no child improved: search closer to the parent
            sigma *= 0.7
        if log:
            log(f"iteration {it + 1}: best {best:.5f} r={r_best}")
    final = recipe.with_merge(recipe.merge.replace(r=r_best))
    return SearchResult(final, make_schedule(match, final), best, start, history)


def search_schedule(model, batches: Sequence, recipe="tome", max_macs_ratio: float = 0.6, **kwargs) -> SearchResult:
    """Capture ``model``'s graph for the first batch and :func:`evolve` a schedule on ``batches``
    (input tensors of one shape: the calibration/search images, never the ones reported on)."""
    from ..rewrite.matched import first_match
    from ..quantize import fit_to_graph
    from ..recipe import load
    from .score import graph_fidelity
    r = load(recipe)
    batches = [b if isinstance(b, (tuple, list)) else (b,) for b in batches]
    m = first_match(model, batches[0][0])
    score = graph_fidelity(m.base, m.inputs, fit_to_graph(batches, m.base, m.inputs))
    return evolve(m.match, r, score, max_macs_ratio, **kwargs)
