"""The MACs cost model of a matched graph: what a schedule's MACs ratio and predicted speedup are computed
from. The matcher finds the blocks; this module prices them."""
from __future__ import annotations

import math
from typing import Optional

from torch import fx

from .nodes import is_linear, shape


def block_macs(lin_attn: int, attn_dim: int, lin_mlp: int, n_in: int, n_out: int) -> int:
    """Multiply-adds per image of a block that ``n_in`` tokens enter and ``n_out`` leave (merged after
    attention): its linears before the merge point, attention (2 N² per channel), and the MLP after it."""
    return n_in * lin_attn + 2 * n_in * n_in * attn_dim + n_out * lin_mlp


def rows_macs(lin_qkv: int, lin_attn: int, attn_dim: int, lin_mlp: int, n_in: int, rows: int) -> int:
    """Multiply-adds per image of a block that ``n_in`` tokens enter and that computes only ``rows`` of them after
    its keys and values (:mod:`mergepass.rewrite.passes.prune_unread_rows`): the linears feeding attention on every
    token, attention for ``rows`` queries, the other linears on ``rows`` rows."""
    return n_in * lin_qkv + 2 * rows * n_in * attn_dim + rows * (lin_attn - lin_qkv + lin_mlp)


def block_costs(gm: fx.GraphModule, nodes: set, after_attention: set, keys_shape: Optional[tuple],
                keys_transposed: bool, batch: int, feeding_attention: set = frozenset()) -> tuple[int, int, int, int]:
    """(MACs per token of the linears before the merge point, of those after it, attention channels:
    heads * head_dim, MACs per token of the linears feeding attention) of a block's ``nodes``;
    ``after_attention``: the nodes downstream of its merge point; ``feeding_attention``: the attention's ancestors."""
    lin = [0, 0]
    qkv = 0
    for n in nodes:
        if is_linear(n):
            lin[n in after_attention] += linear_macs(gm, n)
            qkv += linear_macs(gm, n) if n in feeding_attention else 0
    attn_dim = 0
    if keys_shape:
        lead = math.prod(keys_shape[:-2]) // max(batch, 1)
        attn_dim = lead * (keys_shape[-2] if keys_transposed else keys_shape[-1])
    return lin[0], lin[1], attn_dim, qkv


def other_macs(gm: fx.GraphModule, block_nodes: set, batch: int) -> int:
    """MACs per image of the linears outside the blocks (patch embedding, head): merging leaves them alone."""
    return sum(math.prod(shape(n)[:-1]) * linear_macs(gm, n) // max(batch, 1)
               for n in gm.graph.nodes if n not in block_nodes and is_linear(n) and shape(n))


def linear_macs(gm: fx.GraphModule, n: fx.Node) -> int:
    """in_features * out_features of a linear node (per row of its input)."""
    w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    ws = shape(w) if isinstance(w, fx.Node) else None
    if ws is None and isinstance(w, fx.Node) and w.op == "get_attr":
        ws = tuple(_get_attr(gm, w.target).shape)
    return ws[0] * ws[1] if ws and len(ws) == 2 else 0


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
