"""``mergepass.export(model, example_input, recipe, path)``: a self-contained artifact for serving.

The merged (and int8) graph is exported with ``torch.export`` and compiled ahead of time with
AOTInductor into a ``.pt2`` package, with a dynamic batch size where the model allows one. It loads with
``torch._inductor.aoti_load_package(path)`` in a process that never imports mergepass. The manifest beside
it (``<path>.json``) holds its SHA-256 and input shapes: :func:`mergepass.load` checks both, which
``aoti_load_package`` does not.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from . import artifact
from . import cache as compile_cache
from .errors import MergepassWarning, briefly, replay
from .graph.capture import capture_graphs
from .graph.lift import Lifted, output_dtypes
from .pipeline import merge_stage
from .quantize import quantize, read_calibration
from .recipe import Recipe, load


def merged_graph(model: torch.nn.Module, example_input: torch.Tensor, recipe: Recipe,
                 batches: Optional[list[tuple]] = None, *,
                 dynamic_batch: bool = False) -> tuple[torch.fx.GraphModule, list, Recipe, Any]:
    """Dynamo's graph of ``model`` with ``recipe``'s merges inserted (no quantization): the graph, its
    example inputs, the recipe as resolved and the schedule (None without merges). Raises ValueError
    when dynamo breaks the graph."""
    graphs = capture_graphs(model, example_input, dynamic_batch=dynamic_batch)
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


def _capture(model, example_input, r, batches):
    """The merged graph with a symbolic batch size; a static one (with a warning) where the model fixes it."""
    if example_input.dim() and example_input.shape[0] == 1:  # dynamo specialises a size of 1
        example_input = example_input.repeat(2, *[1] * (example_input.dim() - 1))
    try:
        return merged_graph(model, example_input, r, batches, dynamic_batch=True)
    except Exception as e:  # noqa: BLE001 - e.g. a model whose code fixes the batch size
        warnings.warn(f"mergepass: export with a dynamic batch size failed ({briefly(e)}); the package serves "
                      f"batch size {example_input.shape[0]} only", MergepassWarning, stacklevel=3)
        return merged_graph(model, example_input, r, batches)


def export(model: torch.nn.Module, example_input: torch.Tensor, recipe: Any = "tome",
           path: str | os.PathLike = "model.pt2", calibration=None, *, cache: Optional[bool] = None,
           **overrides: Any) -> Path:
    """Write an AOTInductor package of the merged (and, for int8 recipes, quantized) model, with its
    manifest beside it. One package serves every batch size where the model allows it. A package built
    before for the same graph, weights, recipe and calibration comes from the compile cache
    (:mod:`mergepass.cache`; ``cache=False`` or ``MERGEPASS_CACHE=0`` builds it anew)."""
    r = load(recipe, **overrides)
    batches = read_calibration(calibration, r.quantize.calibration_batches)
    gm, example_inputs, r, _ = _capture(model, example_input, r, batches)
    lifted = Lifted(gm, example_inputs)
    dims = lifted.input_dims()

    def build(out: Path) -> Path:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MergepassWarning)
            if r.quantize.enabled:
                q = quantize(gm, example_inputs, r, batches)
                module, inputs = q.module, q.inputs
                options = dict(freezing=q.freezing, autocast=q.autocast, output_dtypes=output_dtypes(gm),
                               inductor_config_overrides=q.inductor_config)
            else:
                module = lifted.eval()
                inputs, options = module.user_inputs(example_inputs), {}
        said = replay(caught)
        return artifact.write(module, inputs, out, dynamic_shapes=dims, meta={"recipe": r.name, "warnings": said},
                              **options)

    key = None
    if compile_cache.serves(example_inputs, cache):
        key = compile_cache.graph_key(gm, example_inputs, r.to_dict(), batches, extra={"export": True})
        try:
            compile_cache.cache_dir().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            warnings.warn(f"mergepass: the compile cache at {compile_cache.cache_dir()} is not usable ({briefly(e)}); "
                          "exporting without it", MergepassWarning, stacklevel=2)
            key = None
    if key is None:
        return build(Path(path))
    hit = compile_cache.verified(key)
    if hit is not None:
        for message in artifact.read_manifest(hit)["meta"].get("warnings", []):  # what the build said, said again
            warnings.warn(message, MergepassWarning, stacklevel=2)
    return artifact.copy(hit or compile_cache.store(key, build), path)

