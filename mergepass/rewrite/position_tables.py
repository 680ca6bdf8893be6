"""Position tables that meet merged tokens: rotary sin/cos rows and relative-position bias.

A table such as EVA's RoPE ``[N0 - prefix, D]`` or BEiT's bias ``[1, H, N0, N0]`` is computed from
module state and indexed by original token position. Once tokens merge, the op that combines it
with the token stream no longer broadcasts. Each such table is read at the merged tokens'
representative positions (:func:`~mergepass.merge.gather_positions`), so every merged token uses the
position of the first original token it holds. Used by :mod:`.passes.fix_token_literals` while it
propagates shapes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Collection, Mapping, Optional

import torch
from torch import fx

from ..graph.nodes import SDPA

BINARY_FN = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
             torch.add, torch.sub, torch.mul, torch.div}
BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_", "__add__", "__sub__", "__mul__", "__truediv__",
                  "__radd__", "__rmul__"}


@dataclass
class TableRead:
    """Replace input ``slot`` (positional index or kwarg name) of a node with the table's rows."""
    slot: object
    table: fx.Node
    dims: tuple[int, ...]
    offset: int
    n: int
    ndim: int


def _token_axes(old: tuple, new: tuple, table: tuple, n0: int, prefix: int) -> Optional[tuple[tuple, int, int]]:
    """(axes of the ``ndim``-D result to gather, offset, current count) when ``table`` indexes the
    token axes on which a stream of shape ``old`` became ``new``; None when it does not."""
    ndim = max(len(old), len(table))
    old = (1,) * (ndim - len(old)) + tuple(old)
    new = (1,) * (ndim - len(new)) + tuple(new)
    tab = (1,) * (ndim - len(table)) + tuple(table)
    axes = [d for d in range(1, ndim) if tab[d] != 1 and tab[d] == old[d] and new[d] != old[d]]
    if not axes:
        return None
    m0 = tab[axes[0]]
    offset = n0 - m0
    if not 0 <= offset <= prefix or any(tab[d] != m0 for d in axes):
        return None
    n = new[axes[0]] + offset
    pair = {ndim - 1, ndim - 2}
    if tab[-1] == tab[-2] == m0 and pair & set(axes) and all(old[d] == 1 for d in pair - set(axes)):
        # a token-pair table (query x key) added to a per-key bias: both of its axes follow
        axes = sorted(set(axes) | pair)
    return tuple(axes), offset, n


def table_reads(n: fx.Node, shapes: Mapping[fx.Node, tuple], data: Collection[fx.Node], n0: int,
                prefix: int) -> list[TableRead]:
    """The tables among ``n``'s inputs that must be read at merged positions.

    ``shapes``: each input node's (shape before the merges, shape now), None where it has none; ``data``: the
    nodes computed from the user's tensors (those are merged, never gathered)."""
    def old_shape_of(a):
        return shapes[a][0]

    def shape_of(a):
        return shapes[a][1]

    def is_data(a):
        return a in data

    def changed(a):
        return isinstance(a, fx.Node) and old_shape_of(a) is not None and shape_of(a) != old_shape_of(a)

    def table(a):
        return (isinstance(a, fx.Node) and not is_data(a) and old_shape_of(a) is not None
                and shape_of(a) == old_shape_of(a))

    reads = []
    if (n.op == "call_function" and n.target in BINARY_FN) or (n.op == "call_method" and n.target in BINARY_METHODS):
        if len(n.args) < 2:
            return reads
        a, b = n.args[0], n.args[1]
        for slot, tab, other in ((0, a, b), (1, b, a)):
            if table(tab) and changed(other):
                hit = _token_axes(old_shape_of(other), shape_of(other), shape_of(tab), n0, prefix)
                if hit:
                    reads.append(TableRead(slot, tab, hit[0], hit[1], hit[2], max(len(shape_of(other)), len(shape_of(tab)))))
    elif n.op == "call_function" and n.target in SDPA:
        q = n.args[0] if n.args else n.kwargs.get("query")
        k = n.args[1] if len(n.args) > 1 else n.kwargs.get("key")
        slot = 3 if len(n.args) > 3 else "attn_mask"
        mask = n.args[3] if slot == 3 else n.kwargs.get("attn_mask")
        if table(mask) and (changed(q) or changed(k)):
            old = old_shape_of(q)[:-1] + old_shape_of(k)[-2:-1]  # the logits' shape [.., Nq, Nk]
            new = shape_of(q)[:-1] + shape_of(k)[-2:-1]
            hit = _token_axes(old, new, shape_of(mask), n0, prefix)
            if hit:
                reads.append(TableRead(slot, mask, hit[0], hit[1], hit[2], max(len(old), len(shape_of(mask)))))
    return reads
