"""``mergepass.export(model, example_input, recipe, path)``: a self-contained artifact for serving.

The merged (and int8) graph is exported with ``torch.export`` and compiled ahead of time with
AOTInductor into a ``.pt2`` package. It loads with ``torch._inductor.aoti_load_package(path)`` in a
process that never imports mergepass, for exactly the input shape it was exported with.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .planning import capture_graphs
from .recipe import load


def export(model: torch.nn.Module, example_input: torch.Tensor, recipe: Any = "tome",
           path: str | os.PathLike = "model.pt2", calibration=None, **overrides: Any) -> Path:
    """Write an AOTInductor package of the merged (and, for int8 recipes, quantized) model."""
    from .quantize import Lifted, quantize_graph
    from .rewrite import rewrite
    r = load(recipe, **overrides)
    graphs = capture_graphs(model, example_input)
    if len(graphs) != 1:
        raise ValueError(f"export needs one graph without breaks; dynamo produced {len(graphs)}")
    gm, example_inputs = graphs[0]
    res = rewrite(gm, example_inputs, r, model=type(model).__name__, calibration=calibration) if r.merges else None
    graph = res.gm if res is not None else gm
    if res is not None and res.schedule is not None:
        r = res.schedule.recipe
    lifted = Lifted(graph, example_inputs).eval()
    user_ex = tuple(example_inputs[i] for i in lifted.user_idx)
    with torch.no_grad():
        if r.quantize.enabled:
            module, _, user_ex, _ = quantize_graph(graph, example_inputs, r, calibration)
            ep = torch.export.export(module, user_ex, strict=False)
        else:
            ep = torch.export.export(lifted, user_ex, strict=False)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from torch._inductor import config as inductor_config
        with inductor_config.patch(freezing=r.quantize.enabled):
            out = torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    return Path(out)
