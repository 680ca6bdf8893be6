"""``mergepass.export(model, example_input, recipe, path)``: a self-contained artifact for serving.

The merged (and int8) graph is exported with ``torch.export`` and compiled ahead of time with
AOTInductor into a ``.pt2`` package, with a dynamic batch size where the model allows one. It loads with
``torch._inductor.aoti_load_package(path)`` in a process that never imports mergepass. The manifest beside
it (``<path>.json``) holds its SHA-256 and input shapes: :func:`mergepass.load` checks both, which
``aoti_load_package`` does not. Nor does ``aoti_load_package`` look at an input's strides: it reads a slice
or a ``channels_last`` tensor as if it were contiguous (as the package was compiled), so pass contiguous
inputs, or set ``AOTI_RUNTIME_CHECK_INPUTS=1`` to have the package refuse other strides (and shapes);
:func:`mergepass.load` copies such an input into the compiled layout.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from . import artifact
from . import cache as compile_cache
from .errors import MergepassWarning, Say, briefly
from .graph.lift import Inputs
from .graph.nodes import output_dtypes
from .pipeline import Int8Declined, Staged, graph_stages, lower_stage
from .quantize import read_calibration
from .recipe import Recipe, load
from .rewrite.capture import capture_graphs
from .targets import PackageTarget


def merged_graph(model: torch.nn.Module, example_input: torch.Tensor, recipe: Recipe,
                 batches: Optional[list[tuple]] = None, *,
                 dynamic_batch: bool = False) -> tuple[torch.fx.GraphModule, list, Recipe, Any]:
    """Dynamo's graph of ``model`` with ``recipe``'s merges inserted (no quantization): the graph, its
    example inputs, the recipe as resolved and the schedule (None without merges). Raises ValueError
    when dynamo breaks the graph."""
    gm, example_inputs, staged = _staged(model, example_input, recipe, batches, dynamic_batch=dynamic_batch)
    return staged.graph, example_inputs, staged.recipe, staged.schedule


def _staged(model, example_input, recipe, batches, *, dynamic_batch) -> tuple[torch.fx.GraphModule, list, Staged]:
    graphs = capture_graphs(model, example_input, dynamic_batch=dynamic_batch)
    if len(graphs) != 1:
        raise ValueError(f"export needs one graph without breaks; dynamo produced {len(graphs)}")
    gm, example_inputs = graphs[0]
    # torch's SDPA and the reference merge ops: a package must load where mergepass's own ops are not registered
    return gm, example_inputs, graph_stages(gm, example_inputs, recipe, calibration=batches,
                                            model=type(model).__name__, kernels=False)


def _capture(model, example_input, r, batches):
    """The staged graph with a symbolic batch size; a static one (with a warning) where the model fixes it."""
    if example_input.dim() and example_input.shape[0] == 1:  # dynamo specialises a size of 1
        example_input = example_input.repeat(2, *[1] * (example_input.dim() - 1))
    try:
        return _staged(model, example_input, r, batches, dynamic_batch=True)
    except Exception as e:  # noqa: BLE001 - e.g. a model whose code fixes the batch size
        warnings.warn(f"mergepass: export with a dynamic batch size failed ({briefly(e)}); the package serves "
                      f"batch size {example_input.shape[0]} only", MergepassWarning, stacklevel=3)
        return _staged(model, example_input, r, batches, dynamic_batch=False)


def _check_example(example_input: Any) -> None:
    """ValueError, in one line, for an example input no package can be built from."""
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(f"mergepass.export: example_input must be a tensor (a batch of images), got "
                         f"{type(example_input).__name__}")
    if example_input.dim() == 0 or 0 in example_input.shape:
        what = "batch size 0" if example_input.dim() and example_input.shape[0] == 0 else "no elements"
        raise ValueError(f"mergepass.export: example_input has {what} (shape {tuple(example_input.shape)}); "
                         "export traces the model on it, so give it at least one image")


def export(model: torch.nn.Module, example_input: torch.Tensor, recipe: Any = "tome",
           path: str | os.PathLike = "model.pt2", calibration=None, *, cache: Optional[bool] = None,
           **overrides: Any) -> Path:
    """Write an AOTInductor package of the merged (and, for int8 recipes, quantized) model, with its
    manifest beside it. One package serves every batch size where the model allows it. A package built
    before for the same graph, weights, recipe and calibration comes from the compile cache
    (:mod:`mergepass.cache`; ``cache=False`` or ``MERGEPASS_CACHE=0`` builds it anew). The stages are the
    backend's (:mod:`mergepass.pipeline`), so the package runs the graph the backend runs with
    ``lower.attention_kernel = "sdpa"``."""
    _check_example(example_input)
    r = load(recipe, **overrides)
    batches = read_calibration(calibration, r.quantize.calibration_batches)
    gm, example_inputs, staged = _capture(model, example_input, r, batches)
    target = PackageTarget(Path(path), cached=compile_cache.serves(example_inputs, cache), extra={"export": True})
    try:
        package = lower_stage(target, staged, example_inputs, batches, inputs=Inputs(gm, example_inputs),
                              out_dtypes=output_dtypes(gm), warn=Say(once=False, stacklevel=4)).package
    except Int8Declined as e:
        raise RuntimeError(f"mergepass: int8 quantization failed for this graph ({e}); export it with a "
                           "recipe without quantization") from e
    return package if Path(package) == Path(path) else artifact.copy(package, path)
