"""ToMato, "Token Merging at Once": one merge, in block ``skip`` (default the first), of ``budget``
tokens into 4-adjacent neighbours on the patch grid, the pairs chosen by ``similarity`` (the paper's
row-softmax of the post-attention tokens' dot products, or the keys' cosine). The paper's flood fill
is dynamic; a static budget from its thresholds comes from
:func:`mergepass.search.tomato_budget.budget_from_threshold`.

``tomato_tome`` stacks ToMe on it: the same one merge, then ToMe's ``r`` in every later block."""
from __future__ import annotations

from ..merge import adjacent_merge, checkerboard
from ..merge.fused import fused_adjacent_merge
from .base import AUTO, Merge, MergeMethod, MergeOp, closest, register_method, register_op, total_macs
from .tome import auto_r, global_step, tome_macs

register_op(MergeOp("adjacent", adjacent_merge, fused_adjacent_merge))


class ToMato(MergeMethod):
    name = "tomato"
    needs_grid = True
    fields = ("skip", "budget", "similarity")

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
        args = {"grid": match.grid, "similarity": recipe.similarity}
        if take < recipe.budget:
            return Merge("adjacent", take, take, args=args,
                         note=f"budget clamped {recipe.budget}->{take}",
                         detail={"clamped": (recipe.budget, take), "field": "budget"})
        return Merge("adjacent", take, take, args=args)

    def notes(self, asked, recipe, match, plans):
        out = super().notes(asked, recipe, match, plans)
        if asked.budget and recipe.skip >= len(match.blocks):
            out.append(f"skip={asked.skip} is past the last of {len(match.blocks)} blocks: nothing merges")
        return out


class ToMatoToMe(ToMato):
    """ToMato's one merge in block ``skip``, then ToMe with ``r`` in every later block (``r = "auto"``:
    the r whose total MACs are closest to ToMe with ``match_tome_r``)."""

    name = "tomato_tome"
    fields = ("skip", "budget", "similarity", "r")

    def resolve(self, recipe, match, limit):
        if recipe.budget == AUTO:
            raise ValueError("recipe field 'budget' must be a number for method 'tomato_tome' (its r is what "
                             "'auto' matches to ToMe's MACs)")
        if isinstance(recipe.r, tuple):
            raise ValueError("recipe field 'r' must be one integer or 'auto' for method 'tomato_tome'")
        return auto_r(self, super().resolve(recipe, match, limit), match, limit)

    def decide(self, recipe, block, tokens, match, state):
        if block.index <= recipe.skip:
            return super().decide(recipe, block, tokens, match, state)
        return global_step(block, tokens, match.prefix, recipe.r, recipe.skip + 1)


register_method(ToMato())
register_method(ToMatoToMe())
