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
                  trace_context: Optional[Callable[[], AbstractContextManager]] = None,
                  autocast: Optional[torch.dtype] = None, inductor_config_overrides: Optional[dict] = None) -> Callable:
    """Compile ``gm`` for its example inputs. ``freezing``: inductor folds parameters into constants
    (needed to turn int8 q/dq patterns into int8 kernels). ``trace_context``: entered while the
    backend traces (ModelOpt's Q/DQ export mode for TensorRT). ``autocast``: trace under CPU
    autocast to that dtype (int8 kernels then emit it and the ops between them run in it); the
    casts are part of the compiled graph, so calls need no autocast. ``inductor_config_overrides``:
    inductor settings for this compile only."""
    if how == "eager":
        return gm
    if how == "inductor":
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        ctx = contextlib.ExitStack()
        ctx.enter_context(inductor_config.patch({**({"freezing": True} if freezing else {}),
                                                 **(inductor_config_overrides or {})}))
        if freezing:
            ctx.enter_context(torch.no_grad())
        if autocast is not None:
            ctx.enter_context(torch.autocast("cpu", dtype=autocast))
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


def compile_package(exported: "torch.export.ExportedProgram", path: str | os.PathLike, *, freezing: bool = False,
                    inductor_config_overrides: Optional[dict] = None) -> Path:
    """AOTInductor: compile an exported program into a ``.pt2`` package that loads without mergepass."""
    from torch._inductor import config as inductor_config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), inductor_config.patch({"freezing": freezing, **(inductor_config_overrides or {})}):
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
