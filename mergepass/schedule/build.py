"""From a recipe and a matched graph to a static :class:`Schedule`, through the recipe's merge method."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..methods import get_method
from ..methods.base import total_macs
from .schedule import Schedule

if TYPE_CHECKING:
    from ..graph.match import MatchResult
    from ..methods import MergeSpec


def make_schedule(match: "MatchResult", recipe: "MergeSpec", limit: Optional[int] = None, model: str = "") -> Schedule:
    """Resolve the method config's model-dependent fields and plan every block (``recipe``: the method's config
    and the plan table's labels, a :class:`mergepass.recipe.Recipe` for one; the schedule keeps the config).

    ``limit``: blocks from this index on are not merged (used when a block cannot be rewritten).
    """
    if not match.ok:
        raise ValueError("cannot schedule: no transformer blocks matched")
    limit = len(match.blocks) if limit is None else limit
    asked = recipe.merge
    method = get_method(asked.method)
    if method.needs_grid and match.grid is None:
        raise ValueError(f"recipe method {asked.method!r} needs the patch grid, which was not found in the graph")
    resolved, plans, adjusted = method.plan(asked, match, limit)
    base = match.dense_macs()
    return Schedule(resolved, plans, match.batch, match.tokens, match.prefix, match.grid, match.width, base,
                    total_macs(match, plans), list(match.problems) + adjusted, model,
                    {k: getattr(resolved, k) for k in method.fields}, adjusted,
                    recipe_name=recipe.name, quantize=recipe.quantize.label)
