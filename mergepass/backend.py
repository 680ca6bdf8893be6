"""The torch.compile backend: match → schedule → merge → quantize → lower."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import fx

from .lower import lower as lower_graph
from .recipe import Recipe, load
from .rewrite import MergepassWarning, RewriteResult, rewrite
from .schedule import Schedule


def _symbolic(example_inputs: Sequence) -> bool:
    return any(isinstance(t, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in t.shape)
               for t in example_inputs)


def _training(example_inputs: Sequence) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def _fused_merges(recipe: Recipe, example_inputs: Sequence) -> bool:
    """Whether merges run as the fused CPU kernel (:mod:`mergepass.merge.fused`) in this graph."""
    if recipe.merge_kernel == "reference" or recipe.lower == "tensorrt":  # TensorRT has no converter for it
        return False
    why = None
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in example_inputs):
        why = "the inputs are not on the CPU"
    elif _training(example_inputs):
        why = "the graph needs gradients and the kernel has no backward"
    else:
        from .merge import fused
        err = fused.kernel_error()
        if err is not None:
            why = f"its build failed ({err})"
            if recipe.merge_kernel == "auto":
                warnings.warn(f"mergepass: fused merge kernel unavailable, {why}; using the reference merge "
                              "ops (same results, slower)", MergepassWarning, stacklevel=3)
    if why is not None and recipe.merge_kernel == "fused":
        raise RuntimeError(f"recipe field 'merge_kernel' is 'fused' but the fused merge kernel is unavailable: "
                           f"{why}; use merge_kernel='auto' or 'reference'")
    return why is None


class Backend:
    """A torch.compile backend applying a recipe. Keeps what it did in ``results`` (one per graph)."""

    def __init__(self, recipe: Any = "tome", *, calibration: Optional[Iterable] = None,
                 lower: Optional[str] = None, model_name: str = "", **overrides: Any):
        if lower is not None:
            overrides["lower"] = lower
        self.recipe: Recipe = load(recipe, **overrides)
        self.calibration = calibration
        self.model_name = model_name
        self.results: list[RewriteResult] = []
        self.quantized: list = []  # QuantizedGraph per int8 graph (mode, linears kept in fp32)
        # Schedules are static: a new input shape must recompile with its own schedule instead of
        # turning the token axis symbolic, and tests/benchmarks compile one model many times.
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    @property
    def schedule(self) -> Optional[Schedule]:
        """The schedule of the most recently compiled graph that matched blocks."""
        for r in reversed(self.results):
            if r.schedule is not None:
                return r.schedule
        return None

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence):
        recipe = self.recipe
        if recipe.quantize.enabled and _training(example_inputs):
            raise RuntimeError(f"recipe {recipe.name!r} quantizes to int8 and is inference-only: "
                               "call the compiled model under torch.no_grad() (or torch.inference_mode()) "
                               "in eval mode, or use a recipe without quantization for training")
        if _symbolic(example_inputs):
            warnings.warn("mergepass: the graph has dynamic shapes; token schedules need static shapes, so "
                          "this graph is compiled without merging. Pass dynamic=False to torch.compile.",
                          MergepassWarning, stacklevel=2)
            return lower_graph(gm, example_inputs, recipe.lower)
        if recipe.merges:
            result = rewrite(gm, example_inputs, recipe, model=self.model_name, calibration=self.calibration,
                             fused=_fused_merges(recipe, example_inputs))
        else:
            result = RewriteResult(gm, None, None)
        self.results.append(result)
        if result.schedule is not None:
            recipe = dataclasses.replace(result.schedule.recipe, lower=recipe.lower)
        if recipe.quantize.enabled:
            from .quantize import quantize_and_lower
            return quantize_and_lower(result.gm, example_inputs, recipe, self.calibration, self.quantized)
        return lower_graph(result.gm, example_inputs, recipe.lower)


def backend(recipe: Any = "tome", **kwargs: Any) -> Backend:
    """``torch.compile(model, backend=mergepass.backend(recipe="tome", r=8))``.

    ``recipe``: a name in ``recipes/``, a path to a TOML file, a dict, or a :class:`Recipe`; keyword
    overrides replace recipe fields (``r=8``, ``skip=2``, ``quantize_mode="dynamic"``).
    ``calibration``: an iterable of input batches for int8 recipes. ``lower``: inductor | tensorrt.
    """
    return Backend(recipe, **kwargs)
