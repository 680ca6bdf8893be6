"""Lowering: hand the rewritten graph to TorchInductor (default) or Torch-TensorRT (lazy, optional)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import fx

LOWERINGS = ("inductor", "tensorrt", "eager")


def lower(gm: fx.GraphModule, example_inputs: Sequence, how: str = "inductor") -> Callable:
    """Compile ``gm`` for its example inputs with the chosen backend."""
    if how == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, list(example_inputs))
    if how == "eager":
        return gm.forward
    if how == "tensorrt":
        return _tensorrt(gm, example_inputs)
    raise ValueError(f"lower must be one of {LOWERINGS}, got {how!r}")


def _tensorrt(gm: fx.GraphModule, example_inputs: Sequence) -> Callable:
    try:
        import torch_tensorrt  # noqa: F401  (registers the "torch_tensorrt" dynamo backend)
    except ImportError as e:
        raise RuntimeError("lower='tensorrt' needs the torch-tensorrt package "
                           "(pip install 'mergepass[tensorrt]') and a CUDA GPU") from e
    if not torch.cuda.is_available():
        raise RuntimeError("lower='tensorrt' needs a CUDA GPU; none is available")
    from torch_tensorrt.dynamo.backend import torch_tensorrt_backend
    return torch_tensorrt_backend(gm, list(example_inputs))
