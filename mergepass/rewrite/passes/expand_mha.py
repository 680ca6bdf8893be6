"""Expand ``F.multi_head_attention_forward`` (torchvision's ViT, any ``nn.MultiheadAttention``) into
plain linear → reshape → scaled_dot_product_attention → linear nodes, so the matcher sees the keys.

Only plain self-attention is expanded (same tensor for query/key/value, packed in-projection, no
masks, no bias_k/bias_v, no zero-attention, attention weights unused); anything else is left alone
and later reported as unmatched.
"""
from __future__ import annotations

import inspect
import operator
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx

from ... import compat
from ...graph.nodes import copy_module_stack, record_traced_value, traced_value

_SIG = inspect.signature(F.multi_head_attention_forward)


def _bound(n: fx.Node) -> dict:
    b = _SIG.bind(*n.args, **n.kwargs)
    b.apply_defaults()
    return dict(b.arguments)


def _expandable(n: fx.Node, a: dict) -> bool:
    if not (a["query"] is a["key"] is a["value"]):
        return False
    if a["use_separate_proj_weight"] or a["in_proj_weight"] is None:
        return False
    if any(a[k] is not None for k in ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v")):
        return False
    if a["add_zero_attn"] or a["is_causal"] or (a["training"] and a["dropout_p"] > 0):
        return False
    users = list(n.users)
    return all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users)


def expand_mha(gm: fx.GraphModule, example_inputs: Sequence) -> int:
    """Rewrite in place; returns how many attention calls were expanded."""
    g = gm.graph
    count = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not F.multi_head_attention_forward:
            continue
        a = _bound(n)
        if not _expandable(n, a):
            continue
        shape = traced_value(a["query"])
        if shape is None or shape.dim() != 3:
            continue
        seq, bsz, dim = (int(d) for d in shape.shape)
        heads = int(a["num_heads"])
        with g.inserting_before(n):
            qkv = g.call_function(F.linear, (a["query"], a["in_proj_weight"], a["in_proj_bias"]))
            qkv = g.call_method("reshape", (qkv, seq, bsz, 3, heads, dim // heads))
            qkv = g.call_method("permute", (qkv, 2, 1, 3, 0, 4))  # [3, B, H, N, D]
            parts = g.call_method("unbind", (qkv, 0))
            q, k, v = (g.call_function(operator.getitem, (parts, i)) for i in range(3))
            o = g.call_function(F.scaled_dot_product_attention, (q, k, v))
            o = g.call_method("permute", (o, 2, 0, 1, 3))  # [N, B, H, D]
            o = g.call_method("reshape", (o, seq, bsz, dim))
            o = g.call_function(F.linear, (o, a["out_proj_weight"], a["out_proj_bias"]))
        for new in (qkv, o):
            copy_module_stack(new, n)
        for u in list(n.users):
            u.replace_all_uses_with(o)
            g.erase_node(u)
        g.erase_node(n)
        count += 1
    if count:
        gm.recompile()
        annotate_shapes(gm, example_inputs)
    return count


def annotate_shapes(gm: fx.GraphModule, example_inputs: Sequence) -> None:
    """Fill ``meta['example_value']`` (fake tensors) for nodes that lack it."""
    mode = compat.fake_mode()

    class Prop(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            record_traced_value(node, out)
            return out

    with mode:
        Prop(gm).run(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs])
