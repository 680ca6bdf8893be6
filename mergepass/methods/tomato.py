"""ToMato, "Token Merging at Once": one merge, in block ``merge_block`` (default the first), of ``budget``
tokens into 4-adjacent neighbours on the patch grid, the pairs chosen by ``similarity`` (the paper's
row-softmax of the post-attention tokens' dot products, or the keys' cosine). The paper's flood fill
is dynamic; a static budget from its thresholds comes from
:func:`mergepass.search.tomato_budget.budget_from_threshold`.

``tomato_tome`` stacks ToMe on it: the same one merge, then ToMe's ``r`` in every later block."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..config import check_choice
from ..merge import SIMILARITIES, adjacent_merge, checkerboard
from ..merge.fused import fused_adjacent_merge
from .base import (AUTO, Merge, MergeMethod, MergeOp, MethodConfig, check_int_or_auto, check_r, closest,
                   register_method, register_op, total_macs)
from .tome import auto_r, check_match_tome_r, global_step, tome_macs

register_op(MergeOp("adjacent", adjacent_merge, fused_adjacent_merge))


@dataclass(frozen=True)
class ToMatoConfig(MethodConfig):
    """ToMato's fields."""

    renamed = {"skip": "merge_block"}  # ToMe's skip counts dense blocks; this is the one block that merges

    merge_block: Union[int, str] = 0      # the one merging block
    budget: Union[int, float, str] = 0.2  # tokens removed (int), fraction of patch tokens, or "auto" (ToMe
                                          # r=match_tome_r's MACs)
    similarity: str = "softmax"           # which 4-adjacent pairs merge: "softmax" (the paper's: row-softmax of the
                                          # post-attention tokens' dot products) | "cosine" (of the keys, as ToMe)
    match_tome_r: int = 0                 # budget = "auto": the ToMe r whose MACs to match

    def validate(self) -> None:
        check_int_or_auto("merge_block", self.merge_block)
        check_match_tome_r(self)
        b = self.budget
        if b == AUTO:
            if self.match_tome_r <= 0:
                raise ValueError("recipe field 'budget' is 'auto' but 'match_tome_r' is not set (> 0)")
            b = 0
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"recipe field 'budget' must be an int (tokens), a float in [0, 1) or 'auto', got {b!r}")
        if isinstance(b, float) and not 0.0 <= b < 1.0:
            raise ValueError(f"recipe field 'budget' as a fraction must be in [0, 1), got {b!r}")
        if isinstance(b, int) and b < 0:
            raise ValueError(f"recipe field 'budget' must be >= 0, got {b!r}")
        check_choice("similarity", self.similarity, SIMILARITIES)


@dataclass(frozen=True)
class ToMatoToMeConfig(ToMatoConfig):
    """ToMato's fields, and ToMe's ``r`` in every later block."""

    r: Union[int, str] = 16

    def validate(self) -> None:
        super().validate()
        check_r(self.r)
        if self.r == AUTO and self.match_tome_r <= 0:
            raise ValueError("recipe field 'r' is 'auto' but 'match_tome_r' is not set (> 0)")


class ToMato(MergeMethod):
    name = "tomato"
    config = ToMatoConfig
    needs_grid = True
    fields = ("merge_block", "budget", "similarity")

    def resolve(self, cfg, match, limit):
        depth = len(match.blocks)
        block = 0 if cfg.merge_block == AUTO else cfg.merge_block
        cfg = cfg.replace(merge_block=min(block, depth))  # past the last block: nothing merges (noted)
        budget = cfg.budget
        if budget == AUTO:
            goal = tome_macs(match, cfg.match_tome_r, limit)
            most = len(checkerboard(match.grid)[0])
            budget = closest(range(most + 1), lambda b: total_macs(
                match, self.plan_blocks(cfg.replace(budget=b), match, limit)), goal)
        elif isinstance(budget, float):
            budget = int(round(budget * (match.tokens - match.prefix)))
        return cfg.replace(budget=budget)

    def decide(self, cfg, block, tokens, match, state):
        if block.index != cfg.merge_block or cfg.budget <= 0:
            return None
        most = len(checkerboard(match.grid)[0])
        take = min(cfg.budget, most)
        args = {"grid": match.grid, "similarity": cfg.similarity}
        if take < cfg.budget:
            return Merge("adjacent", take, take, args=args,
                         note=f"budget clamped {cfg.budget}->{take}",
                         detail={"clamped": (cfg.budget, take), "field": "budget"})
        return Merge("adjacent", take, take, args=args)

    def notes(self, asked, cfg, match, plans):
        out = super().notes(asked, cfg, match, plans)
        if asked.budget and cfg.merge_block >= len(match.blocks):
            out.append(f"merge_block={asked.merge_block} is past the last of {len(match.blocks)} blocks: "
                       "nothing merges")
        return out


class ToMatoToMe(ToMato):
    """ToMato's one merge in block ``merge_block``, then ToMe with ``r`` in every later block (``r = "auto"``:
    the r whose total MACs are closest to ToMe with ``match_tome_r``)."""

    name = "tomato_tome"
    config = ToMatoToMeConfig
    fields = ("merge_block", "budget", "similarity", "r")

    def resolve(self, cfg, match, limit):
        if cfg.budget == AUTO:
            raise ValueError("recipe field 'budget' must be a number for method 'tomato_tome' (its r is what "
                             "'auto' matches to ToMe's MACs)")
        if isinstance(cfg.r, tuple):
            raise ValueError("recipe field 'r' must be one integer or 'auto' for method 'tomato_tome'")
        return auto_r(self, super().resolve(cfg, match, limit), match, limit)

    def decide(self, cfg, block, tokens, match, state):
        if block.index <= cfg.merge_block:
            return super().decide(cfg, block, tokens, match, state)
        return global_step(block, tokens, match.prefix, cfg.r, cfg.merge_block + 1)


register_method(ToMato())
register_method(ToMatoToMe())
