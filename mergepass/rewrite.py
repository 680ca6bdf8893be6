"""match → schedule → insert merges → fix literals, with fallback: a block that cannot be rewritten
safely is left unmerged together with every block after it."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import fx

from .match import MatchResult, find_blocks
from .passes import RewriteError, expand_mha, fix_token_literals, insert_merges, strip_noops
from .recipe import Recipe
from .schedule import Schedule, make_schedule


class MergepassWarning(UserWarning):
    """The pass left (part of) a model unmerged; the model still runs unchanged there."""


@dataclass
class RewriteResult:
    gm: fx.GraphModule
    schedule: Optional[Schedule]
    match: Optional[MatchResult]
    notes: list[str] = field(default_factory=list)

    @property
    def merged(self) -> bool:
        return self.schedule is not None and self.schedule.merging


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph (shared parameters, shallow-copied node meta)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def _blame(match: MatchResult, region: int, err: RewriteError) -> int:
    for b in match.blocks[:region]:
        if err.node in b.nodes:
            return b.index
    return region - 1


def rewrite(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, model: str = "",
            warn: bool = True, calibration=None, fused: bool = False) -> RewriteResult:
    """Insert the recipe's merges into a copy of ``gm``. Never raises for graphs it cannot handle:
    those come back unchanged with a :class:`MergepassWarning`. Recipe method ``auto`` is resolved
    here (see :mod:`mergepass.autoschedule`), scored on ``calibration`` batches when given.
    ``fused``: merges call the fused CPU kernel (:mod:`mergepass.merge.fused`)."""
    base = copy_graph_module(gm)
    strip_noops(base)
    expand_mha(base, example_inputs)
    notes: list[str] = []
    limit: Optional[int] = None
    while True:
        work = copy_graph_module(base)
        match = find_blocks(work)
        if not match.ok:
            msg = "mergepass: no transformer blocks matched (" + "; ".join(match.problems) + "); compiling unchanged"
            if warn:
                warnings.warn(msg, MergepassWarning, stacklevel=2)
            return RewriteResult(base, None, match, [msg])
        if recipe.method == "auto":
            recipe, auto_note = _resolve_auto(base, example_inputs, match, recipe, calibration)
            notes.append(auto_note)
        sched = make_schedule(match, recipe, limit=limit, model=model)
        sched.problems.extend(notes)
        if not sched.merging:
            return RewriteResult(base, sched, match, notes)
        info = insert_merges(work, match, sched, fused=fused)
        region = info["region"]
        allowed = set().union(*(b.nodes for b in match.blocks[:region]))
        try:
            fix_token_literals(work, example_inputs, allowed)
        except RewriteError as e:
            k = _blame(match, region, e)
            limit = min(k, region - 1) if limit is None else min(k, limit - 1, region - 1)
            name = match.blocks[k].name if k < len(match.blocks) else f"block {k}"
            note = f"{name}: not merged because {e}"
            notes.append(note)
            if warn:
                warnings.warn(f"mergepass: {note}; merging only the blocks before it", MergepassWarning, stacklevel=2)
            if limit <= 0:
                sched = make_schedule(match, recipe, limit=0, model=model)
                sched.problems.extend(notes)
                return RewriteResult(base, sched, match, notes)
            continue
        return RewriteResult(work, sched, match, notes)


def _resolve_auto(gm, example_inputs, match, recipe, calibration):
    from .autoschedule import choose, graph_fidelity
    scorer = None
    if calibration is not None:
        from .quantize import Lifted, calibration_batches
        lifted = Lifted(gm, example_inputs)
        user_ex = tuple(example_inputs[i] for i in lifted.user_idx)
        batches = calibration_batches(calibration, user_ex, recipe.quantize.calibration_batches)
        if batches:
            scorer = graph_fidelity(gm, example_inputs, batches)
    chosen, sched, _ = choose(match, recipe, scorer)
    return chosen, sched.problems[-1]
