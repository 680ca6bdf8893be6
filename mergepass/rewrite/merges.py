"""The merge rewrite: match → schedule → insert merges → fix literals, with fallback. A block that
cannot be rewritten safely is left unmerged together with every block after it."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from torch import fx

from ..errors import MergepassWarning
from ..graph.match import NO_ATTENTION, MatchResult, find_blocks
from ..schedule import Schedule, make_schedule
from . import passes
from .capture import copy_graph_module
from .passes import RewriteError, fix_token_literals, insert_merges
from .passes.insert_merges import Inserted

if TYPE_CHECKING:
    from ..methods import MergeSpec


@dataclass
class RewriteResult:
    gm: fx.GraphModule
    schedule: Optional[Schedule]
    match: Optional[MatchResult]
    notes: list[str] = field(default_factory=list)

    @property
    def merged(self) -> bool:
        return self.schedule is not None and self.schedule.merging


def _blame(match: MatchResult, inserted: Inserted, err: RewriteError) -> int:
    """The block whose rewrite ``err`` is about (the last rewritten one when no block holds its node)."""
    for i in range(inserted.region):
        if err.node in inserted.block_nodes(match, i):
            return i
    return inserted.region - 1


def _no_blocks(base: fx.GraphModule, match: MatchResult, notes: list[str], say) -> RewriteResult:
    msg = f"mergepass: no transformer blocks matched ({match.summary()}); compiling unchanged"
    if match.problems == [NO_ATTENTION]:
        # with graph breaks, other graphs of the same model may hold its attention and merge
        msg += " (where graph breaks split a model, its other graphs are still merged)"
    if say:
        say(msg)
    return RewriteResult(base, None, match, notes + [msg])


def rewrite(base: fx.GraphModule, example_inputs: Sequence, recipe: "MergeSpec", *, schedule: Optional[Schedule] = None,
            notes: Sequence[str] = (), model: str = "", warn: Union[bool, Callable[[str], None]] = True,
            fused: bool = False) -> RewriteResult:
    """Insert the recipe's merges into a copy of ``base`` (a :func:`~.capture.prepare`-d graph).

    Never raises for graphs it cannot handle: those come back unchanged with a
    :class:`MergepassWarning`. A block whose token count cannot be followed is left unmerged with every
    block after it: the rewrite starts again on a fresh copy with fewer blocks (at most once per block).
    ``schedule``: the full schedule when the caller already computed it. ``fused``: merges call the fused
    CPU kernel (:mod:`mergepass.merge.fused`). ``warn``: whether to warn, or the function that does (the
    backend's says each thing once)."""
    notes = list(notes)
    say = warn if callable(warn) else (lambda m: warnings.warn(m, MergepassWarning, stacklevel=3)) if warn else None
    limit: Optional[int] = None
    while limit is None or limit > 0:  # each failed attempt lowers the limit: at most one per block
        work = copy_graph_module(base)
        match = find_blocks(work)
        if not match.ok:
            return _no_blocks(base, match, notes, say)
        sched = schedule if (schedule is not None and limit is None) else make_schedule(match, recipe, limit, model)
        sched.notes.extend(n for n in notes if n not in sched.notes)
        if say and limit is None:
            for note in sched.adjusted:
                say(f"mergepass: {note}")
        if not sched.merging:
            return RewriteResult(base, sched, match, notes)
        inserted = passes.run(insert_merges, work, match, sched, fused=fused)
        try:
            passes.run(fix_token_literals, work, example_inputs, inserted.allowed(match), inserted.source_of(match),
                       match.tokens, sched.prefix)
        except RewriteError as e:
            k = _blame(match, inserted, e)
            limit = min(k, inserted.region - 1, limit - 1 if limit is not None else k)
            note = f"{match.blocks[k].name}: not merged because {e}"
            notes.append(note)
            if say:
                say(f"mergepass: {note}; merging only the blocks before it")
            continue
        return RewriteResult(work, sched, match, notes)
    sched = make_schedule(match, recipe, limit=0, model=model)
    sched.notes.extend(notes)
    return RewriteResult(base, sched, match, notes)
