"""Getting dynamo's graphs, and the copy every rewrite starts from."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx

from .. import compat
from ..graph.lift import keep_state_marks
from ..graph.nodes import copy_meta
from . import passes
from .passes import expand_mha, fold_scalars, strip_noops


def capture_graphs(model: torch.nn.Module, example_input: torch.Tensor, *, dynamic_batch: bool = False) -> list:
    """The FX graphs dynamo hands a backend for ``model(example_input)`` (static shapes, or a symbolic
    batch size with ``dynamic_batch``), as ``(graph module, example inputs)`` pairs."""
    graphs = []

    def capture(gm, example_inputs):
        keep_state_marks(gm, example_inputs)
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    if dynamic_batch:
        example_input = example_input.detach().clone()  # the mark stays on the tensor: not on the user's
        torch._dynamo.mark_dynamic(example_input, 0)
    with torch.no_grad(), compat.recompile_limit_patch(64):
        torch.compile(model, backend=capture, dynamic=False)(example_input)
    return graphs


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph (shared parameters, shallow-copied node meta)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    copy_meta(new, gm)
    return new


def prepare(gm: fx.GraphModule, example_inputs: Sequence) -> fx.GraphModule:
    """A copy of dynamo's graph in the form matching expects: no inference no-ops, scalar module
    state as constants, and ``nn.MultiheadAttention`` written out. The user's graph module is never
    modified."""
    base = copy_graph_module(gm)
    passes.run(strip_noops, base)
    passes.run(fold_scalars, base, example_inputs)
    passes.run(expand_mha, base, example_inputs)
    return base
