"""Recipe ``method = "auto"``: pick the method and strength that meet a target, before the rewrite.

Targets: predicted speedup / MACs ratio (MACs model) and, with calibration images, a quality floor
measured on the merged graph (eager, no compile). Candidates are the registered methods with an
``auto_rank``, over their strength r; with images, the most faithful one that takes one r per block is
also searched block by block (:mod:`.evolve`). Without images the preference follows that rank (the papers'
quality ranking: DFE+LGTM, DFE, ToMe) at the weakest strength that meets the target; with images,
each candidate's mean output cosine against the unmerged graph decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from ..methods import MergeMethod, get_method, method_names
from ..schedule import Schedule, make_schedule
from .evolve import evolve

if TYPE_CHECKING:
    from ..graph.match import MatchResult
    from ..recipe import Recipe


@dataclass
class Candidate:
    method: str
    r: object                      # int, or one int per block
    recipe: "Recipe"
    schedule: Schedule
    cosine: Optional[float] = None

    def describe(self) -> str:
        cos = f", cos {self.cosine:.4f}" if self.cosine is not None else ""
        return f"{self.method} r={self.r} ({self.schedule.predicted_speedup:.2f}x{cos})"


@dataclass
class Choice:
    """What ``auto`` resolved to: a concrete recipe, its schedule, and the candidates it weighed."""

    recipe: "Recipe"
    schedule: Schedule
    candidates: list[Candidate]
    note: str


def auto_methods() -> list[MergeMethod]:
    ranked = [get_method(n) for n in method_names() if get_method(n).auto_rank is not None]
    return sorted(ranked, key=lambda m: m.auto_rank)


def _speed_ok(s: Schedule, recipe: "Recipe") -> bool:
    if recipe.search.target_speedup and s.predicted_speedup < recipe.search.target_speedup:
        return False
    return not (recipe.search.max_macs_ratio and s.macs_ratio > recipe.search.max_macs_ratio)


def _at(recipe: "Recipe", method: MergeMethod, r: int) -> "Recipe":
    """``recipe`` with ``method`` at strength ``r`` (its own fields at their defaults, the shared ones the recipe's)."""
    asked = recipe.merge
    return recipe.with_merge(method.candidate(r).replace(prop_attn=asked.prop_attn, kernel=asked.kernel))


def _candidate(match, recipe, method: MergeMethod, r: int, fidelity) -> Candidate:
    cand = _at(recipe, method, r)
    c = Candidate(method.name, r, cand, make_schedule(match, cand))
    if fidelity is not None:
        c.cosine = fidelity(cand)
    return c


def weakest_meeting(match: "MatchResult", recipe: "Recipe", method: MergeMethod) -> Optional[int]:
    """The smallest r of ``method`` whose schedule meets the speed target (None if none does)."""
    for r in range((match.tokens - match.prefix) // 2 + 1):
        if _speed_ok(make_schedule(match, _at(recipe, method, r)), recipe):
            return r
    return None


def _searched(match, recipe, fidelity, considered: list[Candidate]) -> Optional[Candidate]:
    """Per-block r searched on the calibration images at the target's MACs budget, for the method of the most
    faithful candidate that takes one r per block (a registered method's capability, never a fixed name)."""
    per_block = [c for c in considered if get_method(c.method).per_block_r]
    if not per_block:
        return None
    method = get_method(max(per_block, key=lambda c: c.cosine).method)
    budget = min(recipe.search.max_macs_ratio or 1.0, 1.0 / (recipe.search.target_speedup or 1.0))
    res = evolve(match, _at(recipe, method, 0), fidelity, budget, iterations=recipe.search.search_iterations,
                 children=4)
    return Candidate(f"{method.name} (searched)", res.recipe.merge.r, res.recipe, res.schedule, res.score)


def _strongest_under_floor(match, recipe, method, fidelity) -> int:
    """The largest r whose fidelity keeps ``min_cosine`` (bisection: fidelity falls with r)."""
    lo, hi = 0, (match.tokens - match.prefix) // 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fidelity(_at(recipe, method, mid)) >= recipe.search.min_cosine:
            lo = mid
        else:
            hi = mid - 1
    return lo


def choose(match: "MatchResult", recipe: "Recipe", fidelity: Optional[Callable[["Recipe"], float]] = None) -> Choice:
    """Resolve ``recipe`` (method ``auto``) for ``match``; ``fidelity`` scores a candidate recipe."""
    methods = auto_methods()
    if recipe.search.target_speedup or recipe.search.max_macs_ratio:
        considered = []
        for method in methods:
            r = weakest_meeting(match, recipe, method)
            if r is not None:
                considered.append(_candidate(match, recipe, method, r, fidelity))
        if not considered:
            most = (match.tokens - match.prefix) // 2
            best = max((make_schedule(match, _at(recipe, m, most)) for m in methods),
                       key=lambda s: s.predicted_speedup)
            raise ValueError(f"impossible schedule: at most {best.predicted_speedup:.2f}x predicted speedup "
                             f"(MACs ratio {best.macs_ratio:.2f}) for this model and input")
        searched = None
        if fidelity is not None and recipe.search.search_iterations:
            searched = _searched(match, recipe, fidelity, considered)
        if searched is not None:
            considered.append(searched)
        ok = [c for c in considered if c.cosine is None or c.cosine >= recipe.search.min_cosine]
        if not ok:
            raise ValueError(f"no schedule meets both the speed target and min_cosine={recipe.search.min_cosine}: "
                             + ", ".join(c.describe() for c in considered))
        pick = max(ok, key=lambda c: c.cosine) if fidelity is not None else ok[0]
    else:  # quality floor only: the fastest schedule per method that keeps the floor
        if fidelity is None:
            raise ValueError("recipe 'auto' with only 'min_cosine' needs calibration images")
        considered = [_candidate(match, recipe, m, _strongest_under_floor(match, recipe, m, fidelity), fidelity)
                      for m in methods]
        pick = max(considered, key=lambda c: c.schedule.predicted_speedup)
    note = f"auto: chose {pick.method} r={pick.r} among " + "; ".join(c.describe() for c in considered)
    return Choice(pick.recipe, pick.schedule, considered, note)
