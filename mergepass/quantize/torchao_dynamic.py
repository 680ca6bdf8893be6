"""int8 with torchao ``quantize_`` on ``nn.Linear`` modules rebuilt from the graph (the CUDA default)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx

from ..recipe import Recipe
from .graphs import linear_modules_graph, path_matches
from .result import QuantizedGraph


def torchao_quantize(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe):
    """int8 with torchao ``quantize_`` (dynamic per-token activations, int8 weights): on CUDA it
    lowers to ``torch._int_mm``; on CPU with freezing to oneDNN qlinear."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    module, user_idx, names = linear_modules_graph(gm, example_inputs)
    keep = list(recipe.quantize.keep_fp32)

    def wanted(mod, fqn):
        path = names.get(fqn, fqn)
        return isinstance(mod, torch.nn.Linear) and not path_matches(path, keep)
    quantize_(module, Int8DynamicActivationInt8WeightConfig(), filter_fn=wanted)
    kept = [names[k] for k, mod in module.named_children() if k in names and not wanted(mod, k)]
    return module, user_idx, QuantizedGraph(module, kept, "dynamic-torchao")
