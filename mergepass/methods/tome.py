"""ToMe (Bolya et al., 2022): bipartite soft matching over all mergeable tokens, ``r`` per block."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..config import check_choice, finite_number
from ..merge import global_merge
from ..merge.fused import fused_global_merge
from .base import (AUTO, Merge, MergeMethod, MergeOp, MethodConfig, check_int_or_auto, check_r, closest,
                   is_inflected, register_method, register_op, total_macs)

register_op(MergeOp("global", global_merge, fused_global_merge))

PARTITIONS = ("patches", "sequence")


def check_match_tome_r(cfg) -> None:
    m = cfg.match_tome_r
    if not isinstance(m, int) or isinstance(m, bool) or m < 0:
        raise ValueError(f"recipe field 'match_tome_r' must be an integer >= 0, got {m!r}")


@dataclass(frozen=True)
class ToMeConfig(MethodConfig):
    """ToMe's fields (also DFE's, whose config subclasses this)."""

    r: Union[int, str, tuple] = 16     # tokens merged per merging block: one value, one per block, ToMe's
                                       # [r, inflect] (inflect in [-1, 1]: r falls or rises linearly with
                                       # depth), or "auto" (the r whose MACs match ToMe r=match_tome_r's)
    skip: Union[int, str] = 0          # blocks left dense at the start ("auto": depth/6, DFE's rule)
    partition: str = "patches"         # ToMe's A/B split: alternate over patch positions, or over
                                       # sequence positions as official ToMe (differs for an odd prefix)
    protect: Union[int, float] = 0     # the mergeable tokens with the largest key norms never merge,
                                       # this many per block (int) or this fraction of the patch tokens (float < 1)
    match_tome_r: int = 0              # r = "auto": the ToMe r whose MACs to match
    macs_ratio: float = 0.0            # r = "auto" instead: the least merging, spread evenly over the blocks from
                                       # skip on, whose MACs are at most this fraction of the unmerged model's

    def validate(self) -> None:
        check_r(self.r)
        check_int_or_auto("skip", self.skip)
        check_choice("partition", self.partition, PARTITIONS)
        p = self.protect
        if isinstance(p, bool) or not ((isinstance(p, int) and p >= 0) or (isinstance(p, float) and 0.0 <= p < 1.0)):
            raise ValueError("recipe field 'protect' must be an integer >= 0 (tokens) or a fraction in [0, 1) of the "
                             f"patch tokens, got {p!r}")
        check_match_tome_r(self)
        m = self.macs_ratio
        if not finite_number(m) or not 0.0 <= m <= 1.0:  # finite_number refuses bools too
            raise ValueError(f"recipe field 'macs_ratio' must be a number in [0, 1], got {m!r}")
        if self.r == AUTO and (self.match_tome_r > 0) == (m > 0):
            raise ValueError("recipe field 'r' is 'auto', which needs one of 'match_tome_r' (> 0) and 'macs_ratio' "
                             f"(> 0), got match_tome_r = {self.match_tome_r!r} and macs_ratio = {m!r}")


def inflected(r: int, inflect: float, depth: int) -> tuple[int, ...]:
    """One r per block from ToMe's ``(r, inflect)``: a line through ``r`` at mid-depth, from ``r * (1 - inflect)``
    in the first block to ``r * (1 + inflect)`` in the last (inflect in [-1, 1]; 0: ``r`` everywhere)."""
    first = int(r * (1.0 - inflect))
    step = (2 * r - 2 * first) / (depth - 1) if depth > 1 else 0.0
    return tuple(int(first + step * i) for i in range(depth))


def block_r(r, index: int) -> int:
    """A block's r from a recipe's r: one value for every block, or one per block."""
    return r[index] if isinstance(r, tuple) else r


def protect_count(protect, match) -> int:
    """Tokens a ToMe step protects: ``protect`` itself, or that fraction of the model's patch tokens."""
    return protect if isinstance(protect, int) else round(protect * (match.tokens - match.prefix))


def global_step(block, tokens: int, prefix: int, r, skip: int, offset: int = 0, protect: int = 0) -> Optional[Merge]:
    """Merge ``r`` tokens (at most half the mergeable ones) in every block from ``skip`` on, ``protect``
    of them kept out of the matching where enough tokens remain."""
    r = block_r(r, block.index)
    if block.index < skip or r <= 0:
        return None
    take = max(min(r, (tokens - prefix) // 2), 0)
    # protection yields to r: a schedule's MACs do not depend on it, and each set keeps take free tokens
    protect = min(protect, max((tokens - prefix) // 2 - take, 0))
    args = {"offset": offset} if offset else {}
    if protect:
        args["protect"] = protect
    if take < r:
        return Merge("global", take, take, args=args, note=f"r clamped {r}->{take}", detail={"clamped": (r, take)})
    return Merge("global", take, take, args=args)


def partition_offset(cfg, match) -> int:
    """Where ToMe's A set starts among the mergeable tokens (see ``global_merge``)."""
    return match.prefix % 2 if cfg.partition == "sequence" else 0


def tome_macs(match, r: int, limit: int) -> int:
    """Total MACs of ToMe with ``r`` on ``match``: what ``r = "auto"`` strengths are matched to."""
    return total_macs(match, TOME.plan_blocks(ToMeConfig(r=r), match, limit))


def even_r(total: int, first: int, depth: int) -> tuple[int, ...]:
    """``total`` tokens to merge spread as evenly as integers allow over blocks ``first`` to ``depth - 1``, the
    later blocks taking the remainder (blocks before ``first`` merge none)."""
    q, extra = divmod(total, depth - first)
    return (0,) * first + (q,) * (depth - first - extra) + (q + 1,) * extra


def budget_r(method, cfg, match, limit) -> tuple[int, ...]:
    """The :func:`even_r` schedule with the fewest tokens merged whose MACs under ``method`` are at most
    ``cfg.macs_ratio`` of the unmerged model's (every row computed); the most merging where none is."""
    depth, first = len(match.blocks), min(cfg.skip, len(match.blocks))
    if first >= depth:
        return (0,) * depth

    def macs(total: int) -> int:
        return total_macs(match, method.plan_blocks(cfg.replace(r=even_r(total, first, depth)), match, limit))

    most = (match.tokens - match.prefix) * (depth - first)
    goal = max(cfg.macs_ratio * match.dense_macs(), macs(most))  # out of reach: the least merging at the floor
    lo, hi = 0, most  # MACs never rise as the total grows
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if macs(mid) <= goal else (mid + 1, hi)
    return even_r(lo, first, depth)


def auto_r(method, cfg, match, limit):
    """``cfg`` with ``r = "auto"`` resolved: with ``macs_ratio``, :func:`budget_r`; else the r whose schedule under
    ``method`` comes closest to ToMe r=``match_tome_r``'s MACs."""
    if cfg.r != AUTO:
        return cfg
    if getattr(cfg, "macs_ratio", 0):
        return cfg.replace(r=budget_r(method, cfg, match, limit))
    goal = tome_macs(match, cfg.match_tome_r, limit)
    r = closest(range((match.tokens - match.prefix) // 2 + 1),
                lambda x: total_macs(match, method.plan_blocks(cfg.replace(r=x), match, limit)), goal)
    return cfg.replace(r=r)


class ToMe(MergeMethod):
    name = "tome"
    config = ToMeConfig
    fields = ("r", "skip", "partition", "protect")
    auto_rank = 2
    per_block_r = True

    def default_skip(self, depth: int) -> int:
        return 0

    def resolve(self, cfg, match, limit):
        depth = len(match.blocks)
        skip = self.default_skip(depth) if cfg.skip == AUTO else cfg.skip
        cfg = cfg.replace(skip=min(skip, depth))  # past the last block: nothing merges (noted)
        if is_inflected(cfg.r):
            cfg = cfg.replace(r=inflected(*cfg.r, depth))
        if isinstance(cfg.r, tuple) and len(cfg.r) != depth:
            raise ValueError(f"recipe field 'r' lists {len(cfg.r)} values but the model has {depth} blocks")
        return auto_r(self, cfg, match, limit)

    def decide(self, cfg, block, tokens, match, state):
        return global_step(block, tokens, match.prefix, cfg.r, cfg.skip, partition_offset(cfg, match),
                           protect_count(cfg.protect, match))

    def notes(self, asked, cfg, match, plans):
        out = super().notes(asked, cfg, match, plans)
        if asked.r not in (0, AUTO) and cfg.skip >= len(match.blocks):
            out.append(f"skip={asked.skip} leaves all {len(match.blocks)} blocks dense: nothing merges")
        if asked.r == AUTO and asked.macs_ratio:
            ratio = total_macs(match, plans) / match.dense_macs()
            if ratio > asked.macs_ratio:
                out.append(f"macs_ratio={asked.macs_ratio} is out of reach: {ratio:.3f} at the most merging (every row "
                           "computed)")
        return out

    def candidate(self, r):
        return self.config(method=self.name, r=r, skip=0)


TOME = register_method(ToMe())
