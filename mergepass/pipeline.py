"""The merge stage as one call (prepare → match → resolve ``auto`` → rewrite), and
``mergepass.plan``: the schedule the backend would use, without compiling."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import fx

from .graph.capture import capture_graphs, copy_graph_module, prepare
from .graph.lift import Lifted
from .graph.match import find_blocks, summarize
from .graph.rewrite import RewriteResult, rewrite
from .quantize import fit_batches, read_calibration
from .recipe import Recipe, load
from .schedule import Schedule
from .search.auto import choose
from .search.score import graph_fidelity


def merge_stage(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, *,
                calibration: Optional[list[tuple]] = None, model: str = "", warn: Any = True,
                fused: bool = False) -> RewriteResult:
    """Insert the recipe's merges into a copy of dynamo's graph. Recipe method ``auto`` is resolved
    first (:mod:`mergepass.search.auto`), scored on ``calibration`` (from :func:`read_calibration`)."""
    base = prepare(gm, example_inputs)
    if recipe.method != "auto":
        return rewrite(base, example_inputs, recipe, model=model, warn=warn, fused=fused)
    match = find_blocks(copy_graph_module(base))
    if not match.ok:
        return rewrite(base, example_inputs, recipe, model=model, warn=warn, fused=fused)
    scorer = None
    if calibration is not None:
        batches = fit_batches(calibration, Lifted(base, example_inputs).user_inputs(example_inputs))
        scorer = graph_fidelity(base, example_inputs, batches) if batches else None
    choice = choose(match, recipe, scorer)
    choice.schedule.model = model
    return rewrite(base, example_inputs, choice.recipe, schedule=choice.schedule, notes=[choice.note],
                   model=model, warn=warn, fused=fused)


class Planner:
    """Schedules for one model at one input shape: the model is captured once, then planned under any
    number of recipes (what :func:`plan` does for one)."""

    def __init__(self, model: torch.nn.Module, example_input: torch.Tensor, model_name: str = ""):
        self.graphs = capture_graphs(model, example_input)
        self.model_type = type(model).__name__
        self.model_name = model_name or self.model_type

    def plan(self, recipe: Any = "tome", calibration=None, **overrides: Any) -> Schedule:
        """The schedule the backend would use with ``recipe``. Raises ValueError when no transformer block
        is found (the backend would compile the model unchanged)."""
        r = load(recipe, **overrides)
        batches = read_calibration(calibration, r.quantize.calibration_batches)
        best, problems = None, []
        for gm, ex in self.graphs:
            res = merge_stage(gm, ex, r, calibration=batches, model=self.model_name, warn=False)
            if res.schedule is not None and (best is None or len(res.schedule.blocks) > len(best.blocks)):
                best = res.schedule
            if res.match is not None:
                problems += [p for p in res.match.problems if p not in problems]
        if best is None:
            why = f" ({summarize(problems)})" if problems else ""
            raise ValueError(f"no transformer blocks matched in {self.model_type}{why}; the backend would compile "
                             "it unchanged")
        return best


def plan(model: torch.nn.Module, example_input: torch.Tensor, recipe: Any = "tome",
         model_name: str = "", calibration=None, **overrides: Any) -> Schedule:
    """Match the model's blocks and compute the static schedule for this input shape.

    Raises ValueError when no transformer block is found (the backend would compile it unchanged).
    """
    r = load(recipe, **overrides)  # a bad recipe is said before the model is captured
    return Planner(model, example_input, model_name).plan(r, calibration)
