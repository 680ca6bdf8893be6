"""``mergepass.export(model, example_input, recipe, path)``: a self-contained artifact for serving.

The merged (and int8) graph is exported with ``torch.export`` and compiled ahead of time with
AOTInductor into a ``.pt2`` package. It loads with ``torch._inductor.aoti_load_package(path)`` in a
process that never imports mergepass, for exactly the input shape it was exported with.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from .graph.capture import capture_graphs
from .graph.lift import Lifted
from .lower import compile_package
from .pipeline import merge_stage
from .quantize import quantize, read_calibration
from .recipe import Recipe, load


def merged_graph(model: torch.nn.Module, example_input: torch.Tensor, recipe: Recipe,
                 batches: Optional[list[tuple]] = None) -> tuple[torch.fx.GraphModule, list, Recipe, Any]:
    """Dynamo's graph of ``model`` with ``recipe``'s merges inserted (no quantization): the graph, its
    example inputs, the recipe as resolved and the schedule (None without merges). Raises ValueError
    when dynamo breaks the graph."""
    graphs = capture_graphs(model, example_input)
    if len(graphs) != 1:
        raise ValueError(f"export needs one graph without breaks; dynamo produced {len(graphs)}")
    gm, example_inputs = graphs[0]
    schedule = None
    if recipe.merges:
        res = merge_stage(gm, example_inputs, recipe, calibration=batches, model=type(model).__name__)
        gm, schedule = res.gm, res.schedule
        if schedule is not None:
            recipe = schedule.recipe
    return gm, example_inputs, recipe, schedule


def export(model: torch.nn.Module, example_input: torch.Tensor, recipe: Any = "tome",
           path: str | os.PathLike = "model.pt2", calibration=None, **overrides: Any) -> Path:
    """Write an AOTInductor package of the merged (and, for int8 recipes, quantized) model."""
    r = load(recipe, **overrides)
    batches = read_calibration(calibration, r.quantize.calibration_batches)
    gm, example_inputs, r, _ = merged_graph(model, example_input, r, batches)
    overrides: dict = {}
    if r.quantize.enabled:
        q = quantize(gm, example_inputs, r, batches)
        module, user_ex, overrides = q.module, q.inputs, q.inductor_config
    else:
        lifted = Lifted(gm, example_inputs).eval()
        module, user_ex = lifted, lifted.user_inputs(example_inputs)
    with torch.no_grad():
        exported = torch.export.export(module, tuple(user_ex), strict=False)
    return compile_package(exported, path, freezing=r.quantize.enabled, inductor_config_overrides=overrides)
