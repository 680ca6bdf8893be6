"""Run the last block on the token rows the graph's outputs read, where those are protected tokens.

A ViT that returns its class token (``norm(x)[:, 0]``) reads one row of the last block's output. That row
needs every key and value of the block, but only its own query, residual, projection and MLP row. Where every
use of the last block's output reaches only rows ``[0, p)`` of protected tokens (which merging never moves,
so an unmerge passes them through), through per-token ops only, the block's queries and residual input are
sliced to those rows, the block's merge (now of nothing the outputs read) and the unmerge after it are removed,
and the shape walk (``fix_token_literals``) then carries the new row count through the block. Exact: the rows
kept are computed by the same ops on the same inputs.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from ...graph.match import Block
from ... import compat
from ...graph.nodes import inserted, is_call, mark_inserted, record_traced_value, shape, traced_value, unmerged_shape
from ...merge import unmerge

# ops that compute each token row from that row alone (their other operands carry no token axis)
_NORMS = {F.layer_norm, torch.layer_norm, F.rms_norm}
_PER_ELEMENT_FN = {F.gelu, torch.tanh, torch.sigmoid, F.relu, F.silu}
_PER_ELEMENT_METHODS = {"contiguous", "float", "to", "type_as", "clone", "detach"}


def _prefix_rows(n: fx.Node, src: fx.Node, prefix: int) -> Optional[int]:
    """How many leading rows ``n`` reads of ``src`` ([batch, tokens, ...]) when it selects only protected ones:
    ``src[:, k]`` or ``src[:, a:b]`` with b <= prefix; None otherwise."""
    if n.op == "call_function" and n.target is operator.getitem and n.args[0] is src:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if len(idx) < 2 or idx[0] != slice(None):
            return None
        sel = idx[1]
    elif is_call(n, {torch.select}, {"select"}) and n.args[0] is src and n.args[1:3] and n.args[1] in (1, -2) \
            and len(shape(src) or ()) == 3:
        sel = n.args[2]
    else:
        return None
    if isinstance(sel, int) and not isinstance(sel, bool):
        return sel + 1 if 0 <= sel < prefix else None
    if isinstance(sel, slice) and sel.step in (None, 1) and (sel.start or 0) >= 0 and isinstance(sel.stop, int):
        return sel.stop if 0 < sel.stop <= prefix else None
    return None


def _per_token(n: fx.Node, src: fx.Node) -> bool:
    """Whether ``n`` maps each token row of ``src`` (its first operand) to the same row, from that row alone."""
    if not n.args or n.args[0] is not src or any(a is src for a in n.args[1:]) or src in n.kwargs.values():
        return False
    if is_call(n, _NORMS):
        ns = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
        return isinstance(ns, (tuple, list)) and len(ns) == 1
    if is_call(n, _PER_ELEMENT_FN, _PER_ELEMENT_METHODS):
        return all(not isinstance(a, fx.Node) for a in n.args[1:])
    return False


def rows_read(x_out: fx.Node, prefix: int) -> Optional[int]:
    """``p`` when every use of ``x_out`` reads only its rows ``[0, p)``, all protected; None otherwise."""
    if prefix < 1:
        return None
    rows, frontier = 0, [x_out]
    while frontier:
        src = frontier.pop()
        if not src.users:
            return None
        for u in src.users:
            if u.op == "call_function" and u.target is unmerge and u.args[0] is src:
                frontier.append(u)  # protected rows come back from where they are: first
                continue
            k = _prefix_rows(u, src, prefix)
            if k is not None:
                rows = max(rows, k)
            elif _per_token(u, src):
                frontier.append(u)
            else:
                return None
    return rows or None


def _add(graph: fx.Graph, before: fx.Node, x: fx.Node, fn, op: str, target, args: tuple) -> fx.Node:
    """A node ``op``/``target``/``(x, *args)`` inserted before ``before``, with the traced value ``fn`` gives ``x``'s
    (the later passes read shapes from it)."""
    with graph.inserting_before(before):
        out = graph.create_node(op, target, (x,) + args)
    mark_inserted(out)
    value = traced_value(x)
    mode = compat.fake_mode_of(value)
    if mode is not None:
        try:
            with mode:
                record_traced_value(out, fn(value))
        except Exception:  # noqa: BLE001 - a value later passes read only where it exists
            pass
    return out


def _slice_rows(graph: fx.Graph, x: fx.Node, p: int, dim: int, before: fx.Node) -> fx.Node:
    """``x`` sliced to its first ``p`` entries along ``dim`` (negative: from the end), inserted before ``before``."""
    rank = len(shape(x) or ())
    if dim < 0 and rank:  # every axis before the token axis spelled out: the shape walk sees a prefix selection
        dim += rank
    idx = (Ellipsis, slice(None, p)) + (slice(None),) * (-dim - 1) if dim < 0 else (slice(None),) * dim + (slice(None, p),)
    return _add(graph, before, x, lambda t: t[idx], "call_function", operator.getitem, (idx,))


def _query_rows(graph: fx.Graph, block: Block, p: int) -> bool:
    """Slice the block's queries to ``p`` rows (and a mask that has a query axis); False where it cannot."""
    core = block.attn
    if block.attn_kind == "sdpa":
        q = core.args[0] if core.args else core.kwargs.get("query")
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            ms = unmerged_shape(mask) or shape(mask)
            if ms is None or len(ms) < 2:
                return False
            if ms[-2] != 1:  # a mask per query row keeps only the rows kept
                m = _slice_rows(graph, mask, p, -2, core)
                core.args, core.kwargs = _replace(core, mask, m, 3, "attn_mask")
        core.args, core.kwargs = _replace(core, q, _slice_rows(graph, q, p, -2, core), 0, "query")
        return True
    logits = core.args[0]  # softmax over the keys of every query row: keep the rows kept
    core.args = (_slice_rows(graph, logits, p, -2, core),) + core.args[1:]
    return True


def _replace(n: fx.Node, old: fx.Node, new: fx.Node, slot: int, key: str) -> tuple:
    if len(n.args) > slot and n.args[slot] is old:
        return n.args[:slot] + (new,) + n.args[slot + 1:], n.kwargs
    return n.args, {**n.kwargs, key: new}


def _drop_merge(graph: fx.Graph, block: Block) -> None:
    """Remove the block's merge: the rows kept are protected, and a merge leaves those as they are."""
    for out in [u for u in block.x_mid.users if inserted(u) and u.args and u.args[0] is block.x_mid]:
        parts = {u.args[1]: u for u in out.users if u.target is operator.getitem}
        if 0 in parts:
            parts[0].replace_all_uses_with(block.x_mid)
        for part in parts.values():
            if not part.users:
                graph.erase_node(part)
        if not out.users:
            metric = out.args[1]
            graph.erase_node(out)
            if isinstance(metric, fx.Node) and inserted(metric) and not metric.users:
                graph.erase_node(metric)


def _drop_unmerges(graph: fx.Graph, x: fx.Node) -> None:
    """Read ``x`` where an unmerge of it was read: its protected rows are where the unmerge puts them."""
    for u in list(x.users):
        if u.op == "call_function" and u.target is unmerge and u.args[0] is x:
            u.replace_all_uses_with(x)
            graph.erase_node(u)


def prune_unread_rows(gm: fx.GraphModule, block: Block, prefix: int) -> int:
    """Rewrite ``gm`` in place so that ``block`` (the last of the chain) computes only the rows its outputs read;
    returns that row count, or 0 with ``gm`` unchanged where the outputs read more than protected rows. The
    token count of the changed nodes is then made consistent by ``fix_token_literals``."""
    p = rows_read(block.x_out, prefix)
    residual = [i for i, a in enumerate(block.x_mid.args[:2]) if a is block.x_in]
    if p is None or len(residual) != 1:
        return 0
    graph = gm.graph
    if not _query_rows(graph, block, p):
        return 0
    _drop_unmerges(graph, block.x_out)
    _drop_merge(graph, block)
    i = residual[0]
    sliced = _slice_rows(graph, block.x_in, p, 1, block.x_mid)
    # a copy of the rows: with the slice itself as the addend of the int8 projection's fused add (inductor, torch
    # 2.14.1, torchao 0.18.0), the outputs were wrong (CLS cosine 0.84 against FP32 where unpruned int8 gave 0.9996)
    sliced = _add(graph, block.x_mid, sliced, lambda t: t.contiguous(), "call_method", "contiguous", ())
    block.x_mid.args = block.x_mid.args[:i] + (sliced,) + block.x_mid.args[i + 1:]
    gm.recompile()
    return p
