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
from .passes import RewriteError, fix_token_literals, insert_merges, prune_unread_rows
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


def _tail(graph: fx.Graph, block) -> set:
    """The last block's nodes and every node after its input: where pruning rows changes token counts."""
    seen, out = False, set()
    for n in graph.nodes:
        seen = seen or n is block.x_in
        if seen and n.op != "output":
            out.add(n)
    return out


def _walk(work: fx.GraphModule, match: MatchResult, example_inputs: Sequence, allowed: set, source_of: dict,
          prefix: int, prune: bool) -> int:
    """With ``prune``, prune the last block's unread rows (:func:`~.passes.prune_unread_rows`); then walk the shapes
    (``allowed``: the nodes whose token count may change). The rows kept, 0 where none were pruned. Raises
    RewriteError from the walk."""
    last = match.blocks[-1]
    rows = passes.run(prune_unread_rows, work, last, prefix) if prune else 0
    allowed = allowed | (_tail(work.graph, last) if rows else set())
    passes.run(fix_token_literals, work, example_inputs, allowed, source_of, match.tokens, prefix)
    return rows


def _rows_note(match: MatchResult, rows: int) -> list[str]:
    return [f"{match.blocks[-1].name}: computes {rows} token row(s) after attention, the only ones the outputs "
            "read"] if rows else []


def _price_rows(sched: Schedule, match: MatchResult, rows: int) -> None:
    """Give the schedule's last block the MACs of computing ``rows`` rows after its keys and values."""
    last = sched.blocks[-1] if sched.blocks else None
    if not rows or last is None or last.index != len(match.blocks) - 1:
        return
    macs = match.blocks[-1].rows_macs(last.tokens_in, rows)
    sched.macs += macs - last.macs
    last.macs = macs
    what = f"{rows} row(s) after attention, all the outputs read" + ("; its merge dropped" if last.merged else "")
    last.note = "; ".join(filter(None, [last.note, what]))


def prune_rows(base: fx.GraphModule, example_inputs: Sequence) -> RewriteResult:
    """``base`` (a :func:`~.capture.prepare`-d graph) with its last block on the rows its outputs read, where it can
    prove those are protected tokens; else ``base`` as it is. For graphs without merges."""
    work = copy_graph_module(base)
    return _pruned(base, work, find_blocks(work), example_inputs, None)


def _pruned(base: fx.GraphModule, work: fx.GraphModule, match: MatchResult, example_inputs: Sequence,
            sched: Optional[Schedule]) -> RewriteResult:
    """:func:`prune_rows` on ``work``, a fresh copy of ``base`` that ``match`` was found in; ``sched``: the schedule
    (without merges) whose last block is priced at the rows kept."""
    if not match.ok:
        return RewriteResult(base, None, match)
    try:
        rows = _walk(work, match, example_inputs, set(), {}, match.prefix, prune=True)
    except RewriteError as e:
        return RewriteResult(base, None, match, [f"{match.blocks[-1].name}: all rows computed because {e}"])
    if sched is not None:
        _price_rows(sched, match, rows)
    return RewriteResult(work if rows else base, None, match, _rows_note(match, rows))


def rewrite(base: fx.GraphModule, example_inputs: Sequence, recipe: "MergeSpec", *, schedule: Optional[Schedule] = None,
            notes: Sequence[str] = (), model: str = "", warn: Union[bool, Callable[[str], None]] = True,
            fused: bool = False, prune: bool = False) -> RewriteResult:
    """Insert the recipe's merges into a copy of ``base`` (a :func:`~.capture.prepare`-d graph).

    Never raises for graphs it cannot handle: those come back unchanged with a
    :class:`MergepassWarning`. A block whose token count cannot be followed is left unmerged with every
    block after it: the rewrite starts again on a fresh copy with fewer blocks (at most once per block).
    ``schedule``: the full schedule when the caller already computed it. ``fused``: merges call the fused
    CPU kernel (:mod:`mergepass.merge.fused`). ``warn``: whether to warn, or the function that does (the
    backend's says each thing once). ``prune``: the last block computes only the rows the outputs read, where
    those are protected tokens (:func:`~.passes.prune_unread_rows`); where its shape walk fails, all of them."""
    notes = list(notes)
    say = warn if callable(warn) else (lambda m: warnings.warn(m, MergepassWarning, stacklevel=3)) if warn else None
    limit: Optional[int] = None
    said = False
    while limit is None or limit > 0:  # each failed attempt lowers the limit: at most one per block
        work = copy_graph_module(base)
        match = find_blocks(work)
        if not match.ok:
            return _no_blocks(base, match, notes, say)
        sched = schedule if (schedule is not None and limit is None) else make_schedule(match, recipe, limit, model)
        sched.notes.extend(n for n in notes if n not in sched.notes)
        if say and limit is None and not said:
            said = True
            for note in sched.adjusted:
                say(f"mergepass: {note}")
        if not sched.merging:
            pruned = _pruned(base, work, match, example_inputs, sched) if prune else RewriteResult(base, None, match)
            return RewriteResult(pruned.gm, sched, match, notes + pruned.notes)
        inserted = passes.run(insert_merges, work, match, sched, fused=fused)
        try:
            rows = _walk(work, match, example_inputs, inserted.allowed(match), inserted.source_of(match),
                         sched.prefix, prune)
            notes.extend(_rows_note(match, rows))
            _price_rows(sched, match, rows)
        except RewriteError as e:
            if prune and e.node in _tail(work.graph, match.blocks[-1]):
                prune = False  # the merges stay: only the rows are all computed again
                notes.append(f"{match.blocks[-1].name}: all rows computed because {e}")
                continue
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
