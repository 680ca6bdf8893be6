"""A model's first matched graph: where the offline searches start."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .capture import capture_graphs, copy_graph_module, prepare
from ..graph.match import MatchResult, find_blocks


@dataclass
class Matched:
    """One of dynamo's graphs of a model whose blocks match."""

    base: fx.GraphModule      # prepared, unmerged: what fidelity is scored against
    graph: fx.GraphModule     # a copy of ``base``, the graph whose nodes ``match`` refers to
    inputs: list              # dynamo's example inputs
    match: MatchResult


def first_match(model: torch.nn.Module, example_input: torch.Tensor) -> Matched:
    """Capture ``model`` and match the blocks of the first graph that has any (the searches' start). Raises
    ValueError when none does."""
    for gm, ex in capture_graphs(model, example_input):
        base = prepare(gm, ex)
        graph = copy_graph_module(base)
        match = find_blocks(graph)
        if match.ok:
            return Matched(base, graph, ex, match)
    raise ValueError(f"no transformer blocks matched in {type(model).__name__}")
