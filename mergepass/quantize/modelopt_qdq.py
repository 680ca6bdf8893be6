"""int8 for TensorRT as explicit Q/DQ: NVIDIA ModelOpt's quantizers on the merged graph's linears.

Weights int8 per output channel, activations int8 per tensor with static scales ("max"
calibration on the *merged* graph). Traced under ModelOpt's ``export_torch_mode`` the quantizers
become ``torch.ops.tensorrt.quantize_op`` nodes, which Torch-TensorRT converts into TensorRT
``IQuantizeLayer``/``IDequantizeLayer`` pairs and fuses into int8 GEMMs. torchao's q/dq ops are not
used here: Torch-TensorRT has no converter for them, so they would run as fp32 arithmetic.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import fx

from ..errors import MergepassWarning
from ..graph.lift import linear_modules_graph, path_matches
from .base import EngineConfig, QuantEngine, Quantized, check_keep_fp32, check_sensitivity, register_engine
from .calibration import fit_batches, tail_ratio_tracker

if TYPE_CHECKING:
    from .config import Quantize


def _modelopt():
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.utils import export_torch_mode
    except ImportError as e:
        raise RuntimeError("int8 through TensorRT (quantize.engine='modelopt') needs NVIDIA ModelOpt "
                           "for its explicit Q/DQ nodes: pip install nvidia-modelopt") from e
    return mtq, export_torch_mode


def qdq_export_mode():
    """Context in which ModelOpt quantizers trace to ``tensorrt.quantize_op``."""
    return _modelopt()[1]()


def _outlier_modules(module: fx.GraphModule, linears: list[str], batches, ratio: float) -> list[str]:
    record, flagged = tail_ratio_tracker()
    hooks = [getattr(module, k).register_forward_pre_hook(lambda mod, args, k=k: record(k, args[0]))
             for k in linears]
    try:
        with torch.no_grad():
            for b in batches:
                module(*b)
    finally:
        for h in hooks:
            h.remove()
    return flagged(ratio)


@dataclass(frozen=True)
class ModelOptConfig(EngineConfig):
    """The ModelOpt (TensorRT) engine's fields."""

    keep_fp32: tuple[str, ...] = ()  # linears kept in floating point, by module path glob
    sensitivity: float = 0.0         # >0: also keep linears whose input max/p99.9 ratio exceeds this

    def validate(self) -> None:
        check_keep_fp32(self.keep_fp32, "modelopt")
        check_sensitivity(self.sensitivity, "modelopt")


class ModelOptQDQ(QuantEngine):
    """TensorRT's default: explicit Q/DQ with static scales, calibrated on the merged graph."""

    name = "modelopt"
    config = ModelOptConfig
    priority = 10  # built in: a registered engine needs a higher priority to take "auto" over

    def is_default(self, lower: str, on_cuda: bool) -> bool:
        return lower == "tensorrt"

    def check(self, q: "Quantize", lower: str) -> None:
        if lower == "inductor":
            raise ValueError("recipe field 'quantize.engine' = 'modelopt' makes Q/DQ nodes for TensorRT: "
                             "use lower='tensorrt' (or lower='eager' to run them in PyTorch)")

    def quantize(self, gm: fx.GraphModule, example_inputs: Sequence, q: "Quantize",
                 batches: Optional[list[tuple]]) -> Quantized:
        mtq, _ = _modelopt()
        if q.mode != "static":
            raise ValueError("quantize.engine='modelopt' (TensorRT explicit Q/DQ) needs static activation "
                             f"scales: set quantize.mode='static', got {q.mode!r}")
        module, user_idx, names = linear_modules_graph(gm, example_inputs)
        user_ex = tuple(example_inputs[i] for i in user_idx)
        batches = fit_batches(batches, user_ex)
        if not batches:
            warnings.warn("mergepass: TensorRT int8 needs calibration data, but none fits the graph; "
                          "calibrating on the batch the model was compiled with (scales fit that batch only, "
                          "less accurate on others). Pass calibration=... to mergepass.backend.",
                          MergepassWarning, stacklevel=3)
            batches = [user_ex]
        linears = [k for k, mod in module.named_children() if isinstance(mod, torch.nn.Linear)]
        own = q.options(self.name)
        kept = [k for k in linears if path_matches(names.get(k, k), own.keep_fp32)]
        if own.sensitivity > 0:
            kept += [k for k in _outlier_modules(module, linears, batches, own.sensitivity) if k not in kept]

        def forward_loop(mod):
            for b in batches:
                mod(*b)
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints a summary
            mtq.quantize(module, copy.deepcopy(mtq.INT8_DEFAULT_CFG), forward_loop=forward_loop)
        if kept:
            mtq.disable_quantizer(module, lambda name: name.split(".")[0] in kept)
        return Quantized(module, user_idx, user_ex, self.name, "static-modelopt", [names.get(k, k) for k in kept],
                         freezing=False, trace_context=qdq_export_mode)


register_engine(ModelOptQDQ())
