"""``mergepass.plan(model, example_input, recipe)``: the schedule the backend would use, without compiling."""
from __future__ import annotations

from typing import Any

import torch

from .recipe import load
from .rewrite import rewrite
from .schedule import Schedule


def capture_graphs(model: torch.nn.Module, example_input: torch.Tensor) -> list:
    """The FX graphs dynamo hands a backend for ``model(example_input)`` (static shapes)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(example_input)
    return graphs


def plan(model: torch.nn.Module, example_input: torch.Tensor, recipe: Any = "tome",
         model_name: str = "", calibration=None, **overrides: Any) -> Schedule:
    """Match the model's blocks and compute the static schedule for this input shape.

    Raises ValueError when no transformer block is found (the backend would compile unchanged).
    """
    r = load(recipe, **overrides)
    graphs = capture_graphs(model, example_input)
    best = None
    for gm, ex in graphs:
        res = rewrite(gm, ex, r, model=model_name or type(model).__name__, warn=False, calibration=calibration)
        if res.schedule is not None and (best is None or len(res.schedule.blocks) > len(best.blocks)):
            best = res.schedule
    if best is None:
        raise ValueError(f"no transformer blocks matched in {type(model).__name__}; the backend would compile it unchanged")
    return best
