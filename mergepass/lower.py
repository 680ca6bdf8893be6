"""Lowering: the one place graphs are compiled, with TorchInductor (default, optionally with
freezing, or ahead of time with AOTInductor) or Torch-TensorRT (lazy, optional)."""
from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

LOWERINGS = ("inductor", "tensorrt", "eager")


def compile_graph(gm: torch.nn.Module, example_inputs: Sequence, how: str = "inductor", *, freezing: bool = False,
                  trace_context: Optional[Callable[[], AbstractContextManager]] = None) -> Callable:
    """Compile ``gm`` for its example inputs. ``freezing``: inductor folds parameters into constants
    (needed to turn int8 q/dq patterns into int8 kernels). ``trace_context``: entered while the
    backend traces (ModelOpt's Q/DQ export mode for TensorRT)."""
    if how == "eager":
        return gm
    if how == "inductor":
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        ctx = contextlib.ExitStack()
        if freezing:
            ctx.enter_context(torch.no_grad())
            ctx.enter_context(inductor_config.patch(freezing=True))
        with ctx:
            return compile_fx(gm, list(example_inputs))
    if how == "tensorrt":
        require_tensorrt()
        from torch_tensorrt.dynamo.backend import torch_tensorrt_backend
        if trace_context is None:
            return torch_tensorrt_backend(gm, list(example_inputs))
        with torch.no_grad(), trace_context():  # tracing happens inside this call
            return torch_tensorrt_backend(gm, list(example_inputs), options={"min_block_size": 1})
    raise ValueError(f"lower must be one of {LOWERINGS}, got {how!r}")


def compile_package(exported: "torch.export.ExportedProgram", path: str | os.PathLike, *, freezing: bool = False) -> Path:
    """AOTInductor: compile an exported program into a ``.pt2`` package that loads without mergepass."""
    from torch._inductor import config as inductor_config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), inductor_config.patch(freezing=freezing):
        return Path(torch._inductor.aoti_compile_and_package(exported, package_path=str(path)))


def require_tensorrt() -> None:
    """Raise a clear error unless Torch-TensorRT and a CUDA GPU are present."""
    try:
        import torch_tensorrt  # noqa: F401  (registers the "torch_tensorrt" dynamo backend)
    except ImportError as e:
        raise RuntimeError("lower='tensorrt' needs the torch-tensorrt package "
                           "(pip install 'mergepass[tensorrt]') and a CUDA GPU") from e
    if not torch.cuda.is_available():
        raise RuntimeError("lower='tensorrt' needs a CUDA GPU; none is available")
