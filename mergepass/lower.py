"""Lowering: the one place graphs are compiled, with TorchInductor (default, optionally with
freezing, or ahead of time with AOTInductor) or Torch-TensorRT (lazy, optional)."""
from __future__ import annotations

import contextlib
import json
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import compat
from .graph.lift import cast_outputs
from .graph.nodes import exported_value

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
        ctx = contextlib.ExitStack()
        ctx.enter_context(inductor_config.patch({**({"freezing": True} if freezing else {}),
                                                 **(inductor_config_overrides or {})}))
        if freezing:
            ctx.enter_context(torch.no_grad())
        if autocast is not None:
            if isinstance(gm, torch.fx.GraphModule):
                _drop_dtype_asserts(gm)  # our own quantized graph: its export-time FP32 checks break under autocast
            ctx.enter_context(torch.autocast("cpu", dtype=autocast))
        with ctx:
            return compat.compile_fx(gm, list(example_inputs))
    if how == "tensorrt":
        require_tensorrt()
        from torch_tensorrt.dynamo.backend import torch_tensorrt_backend
        if trace_context is None:
            return torch_tensorrt_backend(gm, list(example_inputs))
        with torch.no_grad(), trace_context():  # tracing happens inside this call
            return torch_tensorrt_backend(gm, list(example_inputs), options={"min_block_size": 1})
    raise ValueError(f"lower must be one of {LOWERINGS}, got {how!r}")


class _Entry(torch.nn.Module):
    """``forward(*inputs)`` of ``module``, under CPU autocast to ``dtype`` if given (``torch.export``
    then records the casts in the graph), its outputs cast back to ``out_dtypes`` where given."""

    def __init__(self, module: torch.nn.Module, dtype: Optional[torch.dtype], out_dtypes: Optional[Sequence] = None):
        super().__init__()
        self.module, self.dtype, self.out_dtypes = module, dtype, list(out_dtypes or [])

    def forward(self, *args):
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            outs = self.module(*args)
        return outs if self.dtype is None else cast_outputs(outs, self.out_dtypes)


def compile_package(module: torch.nn.Module, example_inputs: Sequence, path: str | os.PathLike, *,
                    dynamic_shapes: Optional[Sequence[Optional[dict]]] = None, freezing: bool = False,
                    autocast: Optional[torch.dtype] = None, output_dtypes: Optional[Sequence] = None,
                    inductor_config_overrides: Optional[dict] = None) -> tuple[Path, list[dict]]:
    """AOTInductor: export ``module`` (``forward(*example_inputs)``) and compile it into a ``.pt2`` package
    that loads without mergepass. ``dynamic_shapes``: per input, ``{dim: Dim}`` or None (a dynamic
    batch: one package serves every batch size); ``output_dtypes``: what the outputs are cast back to after
    ``autocast``; the other arguments as for :func:`compile_graph`."""
    from torch._inductor import config as inductor_config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if autocast is not None and isinstance(module, torch.fx.GraphModule):
        _drop_dtype_asserts(module)
    dynamic = (tuple(dynamic_shapes),) if dynamic_shapes is not None and any(dynamic_shapes) else None
    # export and AOTInductor trace on their own, outside the dynamo frame this may be called from
    with torch.no_grad(), compat.outside_tracing():
        exported = torch.export.export(_Entry(module, autocast, output_dtypes), tuple(example_inputs),
                                       dynamic_shapes=dynamic, strict=False)
        spec = input_spec(exported)
        # a copy for AOTInductor to fill in (it writes the build's metadata into inductor's global settings),
        # holding the inputs' record that mergepass.load checks a manifest against
        metadata = {**inductor_config.aot_inductor.metadata, INPUTS_KEY: json.dumps(spec)}
        # check_lowerbound off: the package's own input guard (AOTI_RUNTIME_CHECK_INPUTS=1) would refuse a batch
        # of 1, which a dynamic batch serves (dynamo only specialises that size, so the bound reads 2)
        with inductor_config.patch({"freezing": freezing, "aot_inductor.metadata": metadata,
                                    "aot_inductor.check_lowerbound": False, **(inductor_config_overrides or {})}):
            out = Path(compat.aoti_compile_and_package(exported, package_path=str(path)))
    return out, spec


def _drop_dtype_asserts(gm: torch.fx.GraphModule) -> None:
    """Remove the dtype checks an earlier ``torch.export`` left in ``gm``: they state FP32, which autocast
    changes on purpose."""
    op = compat.assert_tensor_metadata_op()
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]
    for n in asserts:
        gm.graph.erase_node(n)
    if asserts:
        gm.recompile()


# the key of a package's AOTInductor metadata that holds its inputs' record (input_spec)
INPUTS_KEY = "mergepass_inputs"


def input_spec(exported: "torch.export.ExportedProgram") -> list[dict]:
    """The user inputs of an exported program: shape and strides (``None`` where symbolic), dtype, device.
    The compiled kernels index an input by these strides, whatever the strides of the tensor passed."""
    names = set(exported.graph_signature.user_inputs)
    spec = []
    for n in exported.graph.nodes:
        if n.op == "placeholder" and n.name in names:
            v = exported_value(n)
            spec.append({"shape": [d if isinstance(d, int) else None for d in v.shape],
                         "stride": [s if isinstance(s, int) else None for s in v.stride()],
                         "dtype": str(v.dtype).removeprefix("torch."), "device": v.device.type})
    return spec


def require_tensorrt() -> None:
    """Raise a clear error unless Torch-TensorRT and a CUDA GPU are present."""
    try:
        import torch_tensorrt  # noqa: F401  (registers the "torch_tensorrt" dynamo backend)
    except ImportError as e:
        raise RuntimeError("lower='tensorrt' needs the torch-tensorrt package "
                           "(pip install 'mergepass[tensorrt]') and a CUDA GPU") from e
    if not torch.cuda.is_available():
        raise RuntimeError("lower='tensorrt' needs a CUDA GPU; none is available")
