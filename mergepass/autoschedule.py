"""Pick recipe parameters that meet a target: predicted speedup / MACs ratio (MACs model) and,
with calibration images, a quality floor measured on the merged graph (eager, no compile).

Candidates: ToMe, DFE and DFE+LGTM over their strength r. Without images the preference follows
the papers' quality ranking (DFE+LGTM > DFE > ToMe) at the weakest strength that meets the target;
with images, each candidate's mean output cosine against the unmerged graph decides.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
from torch import fx

from .match import MatchResult
from .recipe import Recipe
from .schedule import Schedule, make_schedule

METHODS = ("dfe_lgtm", "dfe", "tome")  # preference order without measurements


def _candidate(recipe: Recipe, method: str, r: int) -> Recipe:
    return dataclasses.replace(recipe, method=method, r=r, skip="auto" if method != "tome" else 0,
                               window="auto", transition="auto", match_tome_r=0)


def _speed_ok(s: Schedule, recipe: Recipe) -> bool:
    if recipe.target_speedup and s.predicted_speedup < recipe.target_speedup:
        return False
    if recipe.max_macs_ratio and s.macs_ratio > recipe.max_macs_ratio:
        return False
    return True


def weakest_meeting(match: MatchResult, recipe: Recipe, method: str) -> Optional[tuple[Recipe, Schedule]]:
    """The smallest r of ``method`` whose schedule meets the speed target (None if none does)."""
    patches = match.tokens - match.prefix
    for r in range(0, patches // 2 + 1):
        cand = _candidate(recipe, method, r)
        s = make_schedule(match, cand)
        if _speed_ok(s, recipe):
            return cand, s
    return None


def choose(match: MatchResult, recipe: Recipe,
           fidelity: Optional[Callable[[Recipe], float]] = None) -> tuple[Recipe, Schedule, list[dict]]:
    """(chosen concrete recipe, its schedule, the candidates considered with their scores)."""
    considered = []
    if recipe.target_speedup or recipe.max_macs_ratio:
        for method in METHODS:
            hit = weakest_meeting(match, recipe, method)
            if hit is None:
                continue
            cand, s = hit
            row = dict(method=method, r=s.recipe.r, predicted_speedup=s.predicted_speedup, recipe=cand, schedule=s)
            if fidelity is not None:
                row["cosine"] = fidelity(cand)
            considered.append(row)
        if not considered:
            best = max((make_schedule(match, _candidate(recipe, m, (match.tokens - match.prefix) // 2)) for m in METHODS),
                       key=lambda s: s.predicted_speedup)
            raise ValueError(f"impossible schedule: at most {best.predicted_speedup:.2f}x predicted speedup "
                             f"(MACs ratio {best.macs_ratio:.2f}) for this model and input")
        ok = [c for c in considered if c.get("cosine", 1.0) >= recipe.min_cosine]
        if not ok:
            raise ValueError(f"no schedule meets both the speed target and min_cosine={recipe.min_cosine}: "
                             + ", ".join(f"{c['method']} r={c['r']} cos={c['cosine']:.4f}" for c in considered))
        pick = max(ok, key=lambda c: c.get("cosine", 0.0)) if fidelity is not None else ok[0]
    else:  # quality floor only: the fastest schedule per method that keeps the floor (bisection on r)
        if fidelity is None:
            raise ValueError("recipe 'auto' with only 'min_cosine' needs calibration images")
        for method in METHODS:
            lo, hi = 0, (match.tokens - match.prefix) // 2
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fidelity(_candidate(recipe, method, mid)) >= recipe.min_cosine:
                    lo = mid
                else:
                    hi = mid - 1
            cand = _candidate(recipe, method, lo)
            s = make_schedule(match, cand)
            considered.append(dict(method=method, r=lo, predicted_speedup=s.predicted_speedup,
                                   cosine=fidelity(cand), recipe=cand, schedule=s))
        pick = max(considered, key=lambda c: c["predicted_speedup"])
    chosen = pick["recipe"]
    sched = pick["schedule"]
    sched.problems.append("auto: chose " + f"{pick['method']} r={pick['r']} among "
                          + "; ".join(f"{c['method']} r={c['r']} ({c['predicted_speedup']:.2f}x"
                                      + (f", cos {c['cosine']:.4f}" if "cosine" in c else "") + ")" for c in considered))
    return chosen, sched, considered


def graph_fidelity(gm: fx.GraphModule, example_inputs: Sequence, batches: Sequence) -> Callable[[Recipe], float]:
    """A scorer: mean cosine of the merged graph's first output vs the unmerged graph's on ``batches``."""
    from .quantize import Lifted
    from .rewrite import rewrite

    def run(module, args_list):
        outs = []
        with torch.no_grad():
            for b in args_list:
                o = module(*b)
                o = o[0] if isinstance(o, (tuple, list)) else o
                outs.append(o.reshape(o.shape[0], -1).float())
        return torch.cat(outs)

    base = Lifted(gm, example_inputs)
    user_ex = [example_inputs[i] for i in base.user_idx]
    args_list = [(b,) if isinstance(b, torch.Tensor) else tuple(b) for b in batches]
    args_list = [a for a in args_list if len(a) == len(user_ex) and all(
        not isinstance(e, torch.Tensor) or t.shape == e.shape for t, e in zip(a, user_ex))]
    if not args_list:
        raise ValueError("calibration batches do not match the graph's input shapes "
                         f"{[tuple(e.shape) for e in user_ex if isinstance(e, torch.Tensor)]}")
    ref = run(base, args_list)

    def score(recipe: Recipe) -> float:
        res = rewrite(gm, example_inputs, recipe, warn=False)
        out = run(Lifted(res.gm, example_inputs), args_list)
        return torch.nn.functional.cosine_similarity(out, ref, dim=1).mean().item()
    return score
