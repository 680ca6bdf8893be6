"""The merge rewrite: match → schedule → insert merges → fix literals, with fallback. A block that
cannot be rewritten safely is left unmerged together with every block after it."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from torch import fx

from ..errors import MergepassWarning
from ..schedule import Schedule, make_schedule
from .capture import copy_graph_module
from .match import NO_ATTENTION, MatchResult, find_blocks
from .passes import RewriteError, fix_token_literals, insert_merges

if TYPE_CHECKING:
    from ..recipe import Recipe


@dataclass
class RewriteResult:
    gm: fx.GraphModule
    schedule: Optional[Schedule]
    match: Optional[MatchResult]
    notes: list[str] = field(default_factory=list)

    @property
    def merged(self) -> bool:
        return self.schedule is not None and self.schedule.merging


def _blame(match: MatchResult, region: int, err: RewriteError) -> int:
    for b in match.blocks[:region]:
        if err.node in b.nodes:
            return b.index
    return region - 1


def rewrite(base: fx.GraphModule, example_inputs: Sequence, recipe: "Recipe", *, schedule: Optional[Schedule] = None,
            notes: Sequence[str] = (), model: str = "", warn: Union[bool, Callable[[str], None]] = True,
            fused: bool = False) -> RewriteResult:
    """Insert the recipe's merges into a copy of ``base`` (a :func:`~.capture.prepare`-d graph).

    Never raises for graphs it cannot handle: those come back unchanged with a
    :class:`MergepassWarning`. ``schedule``: the full schedule when the caller already computed it.
    ``fused``: merges call the fused CPU kernel (:mod:`mergepass.merge.fused`). ``warn``: whether to
    warn, or the function that does (the backend's says each thing once)."""
    notes = list(notes)
    say = warn if callable(warn) else (lambda m: warnings.warn(m, MergepassWarning, stacklevel=3)) if warn else None
    limit: Optional[int] = None
    while True:
        work = copy_graph_module(base)
        match = find_blocks(work)
        if not match.ok:
            msg = f"mergepass: no transformer blocks matched ({match.summary()}); compiling unchanged"
            if match.problems == [NO_ATTENTION]:
                # with graph breaks, other graphs of the same model may hold its attention and merge
                msg += " (where graph breaks split a model, its other graphs are still merged)"
            if say:
                say(msg)
            return RewriteResult(base, None, match, notes + [msg])
        sched = schedule if (schedule is not None and limit is None) else make_schedule(match, recipe, limit, model)
        sched.notes.extend(n for n in notes if n not in sched.notes)
        if say and limit is None:
            for note in sched.adjusted:
                say(f"mergepass: {note}")
        if not sched.merging:
            return RewriteResult(base, sched, match, notes)
        inserted = insert_merges(work, match, sched, fused=fused)
        region = inserted["region"]
        allowed = set().union(*(b.nodes for b in match.blocks[:region]))
        source_of = {n: src for i, src in inserted["sources"].items() if src is not None for n in match.blocks[i].nodes}
        try:
            fix_token_literals(work, example_inputs, allowed, source_of, match.tokens, sched.prefix)
        except RewriteError as e:
            k = _blame(match, region, e)
            limit = min(k, region - 1) if limit is None else min(k, limit - 1, region - 1)
            name = match.blocks[k].name if k < len(match.blocks) else f"block {k}"
            note = f"{name}: not merged because {e}"
            notes.append(note)
            if say:
                say(f"mergepass: {note}; merging only the blocks before it")
            if limit <= 0:
                sched = make_schedule(match, recipe, limit=0, model=model)
                sched.notes.extend(notes)
                return RewriteResult(base, sched, match, notes)
            continue
        return RewriteResult(work, sched, match, notes)
