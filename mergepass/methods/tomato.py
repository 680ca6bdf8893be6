"""ToMato, "Token Merging at Once": one merge, in block ``skip`` (default the first), of ``budget``
tokens into 4-adjacent neighbours on the patch grid. The paper's flood fill is dynamic; a static
budget from it comes from :func:`mergepass.methods.tomato_budget.budget_from_threshold`."""
from __future__ import annotations

from ..merge import adjacent_merge, checkerboard
from ..merge.fused import fused_adjacent_merge
from .base import AUTO, Merge, MergeMethod, MergeOp, closest, register_method, register_op, total_macs
from .tome import tome_macs

register_op(MergeOp("adjacent", adjacent_merge, fused_adjacent_merge))


class ToMato(MergeMethod):
    name = "tomato"
    needs_grid = True
    fields = ("skip", "budget")

    def resolve(self, recipe, match, limit):
        depth = len(match.blocks)
        skip = 0 if recipe.skip == AUTO else recipe.skip
        recipe = recipe.replace(skip=min(skip, depth))  # past the last block: nothing merges (noted)
        budget = recipe.budget
        if budget == AUTO:
            goal = tome_macs(match, recipe.match_tome_r, limit)
            most = len(checkerboard(match.grid)[0])
            budget = closest(range(most + 1), lambda b: total_macs(
                match, self.plan_blocks(recipe.replace(budget=b), match, limit)), goal)
        elif isinstance(budget, float):
            budget = int(round(budget * (match.tokens - match.prefix)))
        return recipe.replace(budget=budget)

    def decide(self, recipe, block, tokens, match, state):
        if block.index != recipe.skip or recipe.budget <= 0:
            return None
        most = len(checkerboard(match.grid)[0])
        take = min(recipe.budget, most)
        if take < recipe.budget:
            return Merge("adjacent", take, take, args={"grid": match.grid},
                         note=f"budget clamped {recipe.budget}->{take}",
                         detail={"clamped": (recipe.budget, take), "field": "budget"})
        return Merge("adjacent", take, take, args={"grid": match.grid})

    def notes(self, asked, recipe, match, plans):
        out = super().notes(asked, recipe, match, plans)
        if asked.budget and recipe.skip >= len(match.blocks):
            out.append(f"skip={asked.skip} is past the last of {len(match.blocks)} blocks: nothing merges")
        return out


register_method(ToMato())
