"""int8 with torchao ``quantize_`` on ``nn.Linear`` modules rebuilt from the graph (the CUDA default)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import fx

from ..graph.lift import linear_modules_graph, path_matches
from .base import EngineConfig, QuantEngine, Quantized, check_keep_fp32, register_engine

if TYPE_CHECKING:
    from .config import Quantize


@dataclass(frozen=True)
class TorchaoConfig(EngineConfig):
    """The torchao engine's fields (its activation scales are always dynamic)."""

    keep_fp32: tuple[str, ...] = ()  # linears kept in floating point, by module path glob

    def validate(self) -> None:
        check_keep_fp32(self.keep_fp32, "torchao")


class TorchaoDynamic(QuantEngine):
    """Dynamic per-token activations, int8 weights: ``torch._int_mm`` on CUDA, oneDNN qlinear on CPU."""

    name = "torchao"
    config = TorchaoConfig
    priority = 10  # built in: a registered engine needs a higher priority to take "auto" over

    def is_default(self, lower: str, on_cuda: bool) -> bool:
        return lower != "tensorrt" and on_cuda

    def quantize(self, gm: fx.GraphModule, example_inputs: Sequence, q: "Quantize",
                 batches: Optional[list[tuple]]) -> Quantized:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        module, user_idx, names = linear_modules_graph(gm, example_inputs)
        keep = list(q.options(self.name).keep_fp32)

        def wanted(mod, fqn):
            return isinstance(mod, torch.nn.Linear) and not path_matches(names.get(fqn, fqn), keep)
        quantize_(module, Int8DynamicActivationInt8WeightConfig(), filter_fn=wanted)
        kept = [names[k] for k, mod in module.named_children() if k in names and not wanted(mod, k)]
        user_ex = tuple(example_inputs[i] for i in user_idx)
        return Quantized(module, user_idx, user_ex, self.name, "dynamic-torchao", kept)


register_engine(TorchaoDynamic())
