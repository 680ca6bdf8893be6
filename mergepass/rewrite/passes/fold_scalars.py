"""Fold ``.item()`` of scalar module state into the graph as Python numbers.

Under ``dynamic=True`` dynamo lifts float module attributes (a dropout's ``p``, a norm's ``eps``)
into 0-dim tensor inputs read with ``.item()``. Such a read is data-dependent: fake-tensor shape
propagation and ``torch.export`` cannot trace it. Their values are part of the model, not of the
input, so the rewritten graph uses them as constants (changing them later needs a recompile).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx

from ...graph.lift import is_state


def fold_scalars(gm: fx.GraphModule, example_inputs: Sequence) -> int:
    """Replace in place; returns how many reads were folded."""
    folded = 0
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(phs, example_inputs):
        if not (isinstance(value, torch.Tensor) and value.dim() == 0 and is_state(node, value)):
            continue
        for user in list(node.users):
            if user.op == "call_method" and user.target == "item":
                user.replace_all_uses_with(value.item())
                gm.graph.erase_node(user)
                folded += 1
    if folded:
        gm.recompile()
    return folded
