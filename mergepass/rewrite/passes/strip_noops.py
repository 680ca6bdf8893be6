"""Remove inference no-ops (dropout with p=0 or training=False) so matching sees plain dataflow."""
from __future__ import annotations

import torch.nn.functional as F
from torch import fx

DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}


def _is_noop_dropout(n: fx.Node) -> bool:
    if n.op != "call_function" or n.target not in DROPOUT:
        return False
    p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
    training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", True)
    return p == 0 or training is False


def active_dropouts(gm: fx.GraphModule) -> int:
    """Dropouts that change values (p > 0 in training mode): a model left in ``train()``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in DROPOUT
               and not _is_noop_dropout(n))


def strip_noops(gm: fx.GraphModule) -> int:
    """Drop no-op dropouts in place; returns how many were removed. Training dropout is kept."""
    removed = 0
    for n in list(gm.graph.nodes):
        if _is_noop_dropout(n):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            removed += 1
    if removed:
        gm.recompile()
    return removed
