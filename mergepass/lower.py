"""Lowering: hand the rewritten graph to TorchInductor (default) or Torch-TensorRT (lazy, optional)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import fx

LOWERINGS = ("inductor", "tensorrt", "eager")


def lower(gm: fx.GraphModule, example_inputs: Sequence, how: str = "inductor", qdq: bool = False) -> Callable:
    """Compile ``gm`` for its example inputs with the chosen backend. ``qdq``: ``gm`` holds ModelOpt
    quantizers, traced as explicit Q/DQ nodes for TensorRT."""
    if how == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, list(example_inputs))
    if how == "eager":
        return gm.forward
    if how == "tensorrt":
        return _tensorrt(gm, example_inputs, qdq)
    raise ValueError(f"lower must be one of {LOWERINGS}, got {how!r}")


def require_tensorrt() -> None:
    """Raise a clear error unless Torch-TensorRT and a CUDA GPU are present."""
    try:
        import torch_tensorrt  # noqa: F401  (registers the "torch_tensorrt" dynamo backend)
    except ImportError as e:
        raise RuntimeError("lower='tensorrt' needs the torch-tensorrt package "
                           "(pip install 'mergepass[tensorrt]') and a CUDA GPU") from e
    if not torch.cuda.is_available():
        raise RuntimeError("lower='tensorrt' needs a CUDA GPU; none is available")


def _tensorrt(gm: fx.GraphModule, example_inputs: Sequence, qdq: bool = False) -> Callable:
    require_tensorrt()
    from torch_tensorrt.dynamo.backend import torch_tensorrt_backend
    if not qdq:
        return torch_tensorrt_backend(gm, list(example_inputs))
    from .quantize.modelopt_qdq import qdq_export_mode
    # tracing happens inside this call, so the quantizers become tensorrt.quantize_op here
    with torch.no_grad(), qdq_export_mode():
        return torch_tensorrt_backend(gm, list(example_inputs), options={"min_block_size": 1})
