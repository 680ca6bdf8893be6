"""int8 post-training quantization of the merged graph, then lowering.

One engine per target, chosen by ``quantize.engine`` (``auto`` picks by lowering and device):

* ``pt2e`` (x86 CPU, :mod:`.pt2e`): torchao's ``X86InductorQuantizer``, static activation scales,
  inductor freezing → oneDNN ``qlinear``.
* ``torchao`` (CUDA, :mod:`.torchao_dynamic`): torchao ``quantize_`` → ``torch._int_mm``.
* ``modelopt`` (TensorRT, :mod:`.modelopt_qdq`): explicit Q/DQ nodes Torch-TensorRT converts.

Calibration always runs on the *merged* graph, so scales see the token statistics the int8
kernels see. Linears whose activations carry outliers can be kept in fp32, by name or found
automatically from calibration statistics (``quantize.sensitivity``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import fx

from ..recipe import Recipe
from .calibration import calibration_batches, outlier_linears
from .graphs import Lifted, linear_modules_graph, module_names
from .pt2e import quantize_graph
from .result import QuantizedGraph

__all__ = ["quantize_and_lower", "Lifted", "QuantizedGraph", "calibration_batches", "linear_modules_graph",
           "module_names", "outlier_linears", "quantize_graph"]


def _on_cuda(example_inputs: Sequence) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def resolve_engine(recipe: Recipe, example_inputs: Sequence) -> str:
    """``quantize.engine = "auto"``: ModelOpt Q/DQ for TensorRT, torchao on CUDA, pt2e on CPU."""
    engine = recipe.quantize.engine
    if engine != "auto":
        return engine
    if recipe.lower == "tensorrt":
        return "modelopt"
    return "torchao" if _on_cuda(example_inputs) else "pt2e"


def quantize_and_lower(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, calibration=None,
                       info: Optional[list] = None):
    """Quantize the (merged) graph and compile it; returns a callable taking dynamo's inputs."""
    if recipe.lower == "tensorrt":
        from ..lower import require_tensorrt
        require_tensorrt()  # before calibrating, which takes a while
    engine = resolve_engine(recipe, example_inputs)
    qdq = False
    if engine == "torchao":
        from .torchao_dynamic import torchao_quantize
        m, user_idx, qinfo = torchao_quantize(gm, example_inputs, recipe)
    elif engine == "modelopt":
        from .modelopt_qdq import modelopt_quantize
        m, user_idx, qinfo = modelopt_quantize(gm, example_inputs, recipe, calibration)
        qdq = True
    else:
        m, user_idx, _, qinfo = quantize_graph(gm, example_inputs, recipe, calibration)
    user_ex = [example_inputs[i] for i in user_idx]
    if info is not None:
        info.append(qinfo)
    if recipe.lower == "tensorrt":
        from ..lower import lower
        compiled = lower(m, list(user_ex), "tensorrt", qdq=qdq)
    elif recipe.lower == "eager":
        compiled = m
    else:
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        with torch.no_grad(), inductor_config.patch(freezing=True):
            compiled = compile_fx(m, list(user_ex))

    def run(*args):
        return compiled(*[args[i] for i in user_idx])
    return run
