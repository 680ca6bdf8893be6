"""The merge-method registry.

A :class:`MergeOp` merges one block's tokens: a reference tensor function and, optionally, a fused
CPU kernel with the same signature ``(x, metric, size, source, *, r, prefix, **args) -> (x, size,
source)``. A :class:`MergeMethod` decides, offline, which blocks merge with which op and how much:
it resolves its recipe fields against the matched graph and plans every block.

A method takes only its own config: a frozen :class:`MethodConfig` dataclass in the method's file (torchao's
``quantize_(model, Config())`` pattern), which a recipe's ``[merge]`` table fills. Every config also holds the
fields all methods share: the method's name, proportional attention and the merge kernel.

Adding a method is one file with its config, a :class:`MergeMethod` subclass naming it, and calls to
:func:`register_method` (and :func:`register_op` for a new op), plus a recipe TOML naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Protocol, Union

from ..config import Config, check_bool, check_choice, did_you_mean, finite_number, unknown_field  # noqa: F401  (re-exported)


if TYPE_CHECKING:
    from ..graph.match import Block, MatchResult


AUTO = "auto"  # a recipe field resolved against the matched graph


def check_int_or_auto(name: str, value: Any, minimum: int = 0) -> None:
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"recipe field {name!r} must be an integer >= {minimum} or 'auto', got {value!r}")


def is_inflected(r) -> bool:
    """Whether a recipe's ``r`` is ToMe's ``(r, inflect)`` shorthand (the second item a float)."""
    return isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[1], float) and not isinstance(r[0], float)


def check_r(r: Any) -> None:
    """``r``: one integer for every block, one per block, ToMe's ``[r, inflect]``, or "auto"."""
    if is_inflected(r):
        if isinstance(r[0], bool) or not isinstance(r[0], int) or r[0] < 0 or not -1.0 <= r[1] <= 1.0:
            raise ValueError("recipe field 'r' as ToMe's [r, inflect] needs an integer r >= 0 and a float inflect "
                             f"in [-1, 1], got {list(r)!r}")
    elif isinstance(r, (tuple, list)):
        if not r or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in r):
            raise ValueError(f"recipe field 'r' as a list must hold one integer >= 0 per block, got {list(r)!r}")
    else:
        check_int_or_auto("r", r)


MERGE_KERNELS = ("auto", "fused", "reference")


@dataclass(frozen=True)
class MethodConfig(Config):
    """A merge method's recipe fields (the ``[merge]`` table): the fields every method shares, then the method's own.
    Subclass it (frozen) per method. Left out, ``method`` is the first registered with this config (``none`` for
    :class:`NoConfig`)."""

    renamed: ClassVar[dict[str, str]] = {}  # old field name -> its name now (read only by mergepass.migrate)

    method: str = field(default="", kw_only=True)
    prop_attn: bool = field(default=True, kw_only=True)  # proportional attention: log(size) added to attention logits
    kernel: str = field(default="auto", kw_only=True)    # fused: one C++ op per merge (CPU); reference: tensor ops

    def __post_init__(self):
        if not self.method:
            owner = next((n for n in RESERVED + method_names() if config_of(n) is type(self)), None)
            if owner is None:
                raise ValueError(f"{type(self).__name__} is the config of no registered method")
            object.__setattr__(self, "method", owner)
        check_method(self.method)
        if config_of(self.method) is not type(self):
            raise ValueError(f"recipe field 'merge' must be a {config_of(self.method).__name__} for method "
                             f"{self.method!r}, got {type(self).__name__}")
        check_bool("merge.prop_attn", self.prop_attn)
        check_choice("merge.kernel", self.kernel, MERGE_KERNELS)
        super().__post_init__()

    @classmethod
    def build(cls, values: Mapping[str, Any], method: str) -> "MethodConfig":
        return super().build({**values, "method": method}, f"method {method!r}")


@dataclass(frozen=True)
class NoConfig(MethodConfig):
    """The fields of recipe methods ``none`` and ``auto`` (auto's targets are the recipe's ``[search]`` table)."""


@dataclass(frozen=True)
class RConfig(MethodConfig):
    """The simplest method's fields: ``r`` tokens merged per merging block (one value, or one per block)."""

    r: Union[int, str, tuple] = 16

    def validate(self) -> None:
        check_r(self.r)


class MergeSpec(Protocol):
    """What scheduling reads of a recipe (:class:`mergepass.recipe.Recipe` is one): its name, its method's config
    (all a schedule keeps of it) and the label of its quantization (what the plan table prints)."""

    name: str
    merge: MethodConfig
    quantize: Any   # what the plan table prints of it: its ``label``


@dataclass(frozen=True)
class MergeOp:
    """How one block's tokens merge: ``reference`` (pure tensor ops, any device, differentiable)
    and ``fused`` (one CPU kernel call, or None)."""

    name: str
    reference: Callable
    fused: Optional[Callable] = None
    compares: Callable[[dict], int] = lambda kwargs: 1  # which positional argument the fused kernel's similarity
                                                        # reads, given the call's keyword arguments (1: the metric)

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
    """A merge method: subclasses set ``name`` and ``config`` and implement :meth:`decide` (or :meth:`plan_blocks`).
    Every hook takes the method's config (``cfg``), never the recipe."""

    name: ClassVar[str]
    config: ClassVar[type[MethodConfig]] = RConfig   # the method's recipe fields
    needs_grid: ClassVar[bool] = False
    fields: ClassVar[tuple[str, ...]] = ("r",)   # config fields the plan table reports as resolved
    auto_rank: ClassVar[Optional[int]] = None     # order among recipe 'auto' candidates; None: not one
    per_block_r: ClassVar[bool] = False           # takes one r per block (what mergepass.search tunes)
    search_keeps: ClassVar[tuple[str, ...]] = ()  # fields a per-block search keeps as asked (they follow r)
    kernel_op: ClassVar[str] = "global"           # the merge op that merge.kernel = "auto" times for this method

    def resolve(self, cfg: MethodConfig, match: "MatchResult", limit: int) -> MethodConfig:
        """``cfg`` with its ``"auto"`` fields made concrete for ``match``."""
        return cfg

    def decide(self, cfg: MethodConfig, block: "Block", tokens: int, match: "MatchResult",
               state: dict) -> Optional[Merge]:
        """The merge for ``block`` entered by ``tokens`` tokens, or None to leave it dense.
        ``state`` persists across the blocks of one plan."""
        raise NotImplementedError

    def plan_blocks(self, cfg: MethodConfig, match: "MatchResult", limit: int) -> list[BlockSchedule]:
        """Every block's schedule; blocks from ``limit`` on are left off."""
        state: dict = {}
        plans, n = [], match.tokens
        for b in match.blocks:  # each block entered by the token count the one before it left
            plans.append(block_plan(b, n, self.decide(cfg, b, n, match, state) if b.index < limit else OFF))
            n = plans[-1].tokens_out
        return match.price(plans)

    def plan(self, asked: MethodConfig, match: "MatchResult", limit: int
             ) -> tuple[MethodConfig, list[BlockSchedule], list[str]]:
        """(``asked`` resolved, every block's schedule, the notes): what a schedule is made of."""
        cfg = self.resolve(asked, match, limit)
        plans = self.plan_blocks(cfg, match, limit)
        return cfg, plans, self.notes(asked, cfg, match, plans)

    def notes(self, asked: MethodConfig, cfg: MethodConfig, match: "MatchResult",
              plans: list[BlockSchedule]) -> list[str]:
        """Where the plan (from ``cfg``, resolved) departs from what ``asked`` asked for (clamps, a
        changed merge); each is shown in the plan and given once as a warning."""
        clamped = [p for p in plans if "clamped" in p.detail]
        if not clamped:
            return []
        what = clamped[0].detail.get("field", "r")
        return [f"{what} clamped to what the tokens allow in " + ", ".join(
            f"{p.name} ({p.detail['clamped'][0]}->{p.detail['clamped'][1]})" for p in clamped)]

    def candidate(self, r: int) -> MethodConfig:
        """This method's config at strength ``r``, its other fields at their defaults (for recipe 'auto')."""
        return self.config(method=self.name, r=r)


OFF = "off"  # a block past a plan's limit: not merged (a block that cannot be rewritten, or one after it)


def block_plan(b: "Block", n: int, m: Union[Merge, None, str]) -> BlockSchedule:
    """Block ``b``'s schedule, entered by ``n`` tokens, under merge ``m`` (None: dense; :data:`OFF`), not yet
    priced (:meth:`~mergepass.graph.match.MatchResult.price`)."""
    if m == OFF:
        return BlockSchedule(b.index, b.name, "off", n, n, note="not merged (see notes)")
    if m is None or m.removed <= 0:
        return BlockSchedule(b.index, b.name, "dense", n, n, note=m.note if m else "")
    return BlockSchedule(b.index, b.name, m.op, n, n - m.removed, r=m.r, args=dict(m.args),
                         note=m.note, label=m.label or m.op, detail=dict(m.detail))


def total_macs(match: "MatchResult", plans: list[BlockSchedule]) -> int:
    return sum(p.macs for p in plans) + match.other_macs


def closest(candidates, macs_of: Callable[[int], int], goal: int) -> int:
    """The candidate strength whose total MACs are closest to ``goal`` (the smallest on ties)."""
    return min(candidates, key=lambda c: abs(macs_of(c) - goal))


_METHODS: dict[str, MergeMethod] = {}
_OPS: dict[str, MergeOp] = {}
RESERVED = ("none", "auto")  # recipe methods that are not merge methods: no merging, and search


def config_of(method: str) -> type[MethodConfig]:
    """The config dataclass of recipe method ``method`` (the reserved ones have no fields)."""
    return NoConfig if method in RESERVED else get_method(method).config


def check_method(method: Any) -> None:
    """ValueError naming recipe field ``merge.method`` unless ``method`` is a registered or reserved method."""
    methods = RESERVED + method_names()
    if method not in methods:
        raise ValueError(f"recipe field 'merge.method' must be one of {methods}, got {method!r}"
                         + did_you_mean(str(method), methods))


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
        raise ValueError(f"unknown {what} {name!r}{did_you_mean(name, table, aside=False)} "
                         f"(registered: {', '.join(sorted(table))})")
    return table[name]


def get_method(name: str) -> MergeMethod:
    return _lookup(_METHODS, name, "merge method")


def get_op(name: str) -> MergeOp:
    return _lookup(_OPS, name, "merge op")


def search_method(name: str) -> str:
    """The method a per-block r search runs for recipe method ``name``: itself where it takes per-block r,
    else the first registered method that does (ToMe, among the built-in ones)."""
    if name in _METHODS and _METHODS[name].per_block_r:
        return name
    return next(n for n, m in _METHODS.items() if m.per_block_r)


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def all_ops() -> tuple[MergeOp, ...]:
    return tuple(_OPS.values())
