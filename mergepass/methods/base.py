"""The merge-method registry.

A :class:`MergeOp` merges one block's tokens: a reference tensor function and, optionally, a fused
CPU kernel with the same signature ``(x, metric, size, source, *, r, prefix, **args) -> (x, size,
source)``. A :class:`MergeMethod` decides, offline, which blocks merge with which op and how much:
it resolves its recipe fields against the matched graph and plans every block.

Adding a method is one file that subclasses :class:`MergeMethod` and calls :func:`register_method`
(and :func:`register_op` for a new op), plus a recipe TOML naming it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Optional


if TYPE_CHECKING:
    from ..graph.match import Block, MatchResult
    from ..recipe import Recipe


AUTO = "auto"  # a recipe field resolved against the matched graph


@dataclass(frozen=True)
class MergeOp:
    """How one block's tokens merge: ``reference`` (pure tensor ops, any device, differentiable)
    and ``fused`` (one CPU kernel call, or None)."""

    name: str
    reference: Callable
    fused: Optional[Callable] = None

    def function(self, fused: bool) -> Callable:
        return self.fused if fused and self.fused is not None else self.reference


@dataclass
class BlockSchedule:
    """One block's part of a :class:`Schedule`. ``kind`` is the merge op's name, or ``dense``
    (runs unmerged) or ``off`` (left out of the rewrite)."""

    index: int
    name: str
    kind: str
    tokens_in: int
    tokens_out: int
    r: int = 0                     # merges asked for (the op's unit: per window for LGTM)
    args: dict = field(default_factory=dict)    # the op's extra keyword arguments
    macs: int = 0                  # per image
    note: str = ""
    label: str = ""                # the method column of the plan table
    detail: dict = field(default_factory=dict)  # method-specific facts

    @property
    def merged(self) -> int:
        return self.tokens_in - self.tokens_out


@dataclass
class Merge:
    """A method's decision for one block: merge with ``op``, ``r`` asked for, ``removed`` tokens gone."""

    op: str
    r: int
    removed: int
    args: dict = field(default_factory=dict)   # extra keyword arguments of the op (grid, windows)
    note: str = ""
    label: str = ""                            # what the plan table prints (default: the op name)
    detail: dict = field(default_factory=dict)  # method-specific facts (e.g. LGTM's window side)


class MergeMethod:
    """A merge method: subclasses set ``name`` and implement :meth:`decide` (or :meth:`plan_blocks`)."""

    name: ClassVar[str]
    needs_grid: ClassVar[bool] = False
    fields: ClassVar[tuple[str, ...]] = ("r",)   # recipe fields the plan table reports as resolved
    auto_rank: ClassVar[Optional[int]] = None     # order among recipe 'auto' candidates; None: not one
    per_block_r: ClassVar[bool] = False           # takes one r per block (what mergepass.search tunes)

    def resolve(self, recipe: "Recipe", match: "MatchResult", limit: int) -> "Recipe":
        """``recipe`` with this method's ``"auto"`` fields made concrete for ``match``."""
        return recipe

    def decide(self, recipe: "Recipe", block: "Block", tokens: int, match: "MatchResult",
               state: dict) -> Optional[Merge]:
        """The merge for ``block`` entered by ``tokens`` tokens, or None to leave it dense.
        ``state`` persists across the blocks of one plan."""
        raise NotImplementedError

    def plan_blocks(self, recipe: "Recipe", match: "MatchResult", limit: int) -> list[BlockSchedule]:
        """Every block's schedule; blocks from ``limit`` on are left off."""
        state: dict = {}
        return chain(match, limit, lambda b, n: self.decide(recipe, b, n, match, state))

    def notes(self, asked: "Recipe", recipe: "Recipe", match: "MatchResult", plans: list[BlockSchedule]) -> list[str]:
        """Where the plan (from ``recipe``, resolved) departs from what ``asked`` asked for (clamps, a
        changed merge); each is shown in the plan and given once as a warning."""
        clamped = [p for p in plans if "clamped" in p.detail]
        if not clamped:
            return []
        what = clamped[0].detail.get("field", "r")
        return [f"{what} clamped to what the tokens allow in " + ", ".join(
            f"{p.name} ({p.detail['clamped'][0]}->{p.detail['clamped'][1]})" for p in clamped)]

    def candidate(self, recipe: "Recipe", r: int) -> "Recipe":
        """This method at strength ``r``, its other fields at their defaults (for recipe 'auto')."""
        return recipe.replace(method=self.name, r=r, match_tome_r=0)


def chain(match: "MatchResult", limit: int, decide: Callable[["Block", int], Optional[Merge]]) -> list[BlockSchedule]:
    """Walk the blocks in order, feeding each the token count the previous one left."""
    plans, n = [], match.tokens
    for b in match.blocks:
        if b.index >= limit:
            plan = BlockSchedule(b.index, b.name, "off", n, n, note="not merged (see notes)")
        else:
            m = decide(b, n)
            if m is None or m.removed <= 0:
                plan = BlockSchedule(b.index, b.name, "dense", n, n, note=m.note if m else "")
            else:
                plan = BlockSchedule(b.index, b.name, m.op, n, n - m.removed, r=m.r, args=dict(m.args),
                                     note=m.note, label=m.label or m.op, detail=dict(m.detail))
        plan.macs = b.macs(plan.tokens_in, plan.tokens_out)
        plans.append(plan)
        n = plan.tokens_out
    return plans


def total_macs(match: "MatchResult", plans: list[BlockSchedule]) -> int:
    return sum(p.macs for p in plans) + match.other_macs


def closest(candidates, macs_of: Callable[[int], int], goal: int) -> int:
    """The candidate strength whose total MACs are closest to ``goal`` (the smallest on ties)."""
    return min(candidates, key=lambda c: abs(macs_of(c) - goal))


_METHODS: dict[str, MergeMethod] = {}
_OPS: dict[str, MergeOp] = {}
RESERVED = ("none", "auto")  # recipe methods that are not merge methods: no merging, and search


def register_method(method: MergeMethod) -> MergeMethod:
    """Make ``method`` available to recipes as ``method = "<name>"``; returns it."""
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name or name in RESERVED:
        raise ValueError(f"a merge method needs a name other than {RESERVED}, got {name!r}")
    _METHODS[name] = method
    return method


def register_op(op: MergeOp) -> MergeOp:
    if op.name in ("dense", "off"):
        raise ValueError(f"merge op name {op.name!r} is reserved for unmerged blocks")
    _OPS[op.name] = op
    return op


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        close = difflib.get_close_matches(name, sorted(table), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown {what} {name!r}{hint} (registered: {', '.join(sorted(table))})")
    return table[name]


def get_method(name: str) -> MergeMethod:
    return _lookup(_METHODS, name, "merge method")


def get_op(name: str) -> MergeOp:
    return _lookup(_OPS, name, "merge op")


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def all_ops() -> tuple[MergeOp, ...]:
    return tuple(_OPS.values())
