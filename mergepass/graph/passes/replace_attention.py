"""Swap ``scaled_dot_product_attention`` for mergepass's bf16 attention op
(:mod:`mergepass.kernels.attention`) where the op computes the same thing: 4-D q, k, v, no dropout,
not causal, no grouped-query heads, and a float mask or none (proportional attention's bias is one).
Everything else keeps SDPA."""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import fx

from ...kernels import attention
from ..match import SDPA
from .expand_mha import annotate_shapes

_SIG = inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False: None)


def _value(n):
    v = n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else n
    return v


def _replaceable(a: dict) -> bool:
    q, k, v, mask = (_value(a[x]) for x in ("query", "key", "value", "attn_mask"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return False
    if a["dropout_p"] != 0.0 or a["is_causal"] is not False or a["enable_gqa"] is not False:
        return False
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return False
    if a["attn_mask"] is not None and not (isinstance(mask, torch.Tensor) and mask.is_floating_point()):
        return False
    return isinstance(a["scale"], (float, int, type(None)))


def replace_attention(gm: fx.GraphModule, example_inputs: Sequence = ()) -> int:
    """Rewrite in place; returns how many attentions now call the op. ``example_inputs``: to find the
    shapes of nodes earlier passes added without them (proportional attention's bias)."""
    if example_inputs and any(_value(a) is None for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA
                              for a in n.all_input_nodes):
        annotate_shapes(gm, example_inputs)
    count = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in SDPA:
            continue
        try:
            a = _SIG.bind(*n.args, **n.kwargs)
        except TypeError:
            continue
        a.apply_defaults()
        a = dict(a.arguments)
        if not _replaceable(a):
            continue
        q = _value(a["query"])
        scale = float(a["scale"]) if a["scale"] is not None else q.shape[-1] ** -0.5
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(torch.ops.mergepass.bf16_attention.default,
                                         (a["query"], a["key"], a["value"], a["attn_mask"], scale))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


def wanted(choice: str, merges: bool, quantizes: bool, int8_attention: bool, training: bool,
           on_cpu: bool) -> tuple[bool, str]:
    """(use the op, why not) for recipe field ``attention_kernel`` = ``choice`` in this graph."""
    if choice == "sdpa":
        return False, ""
    why = ("the graph needs gradients and the op has no backward" if training else
           "the inputs are not on the CPU" if not on_cpu else
           "quantize.attention = 'int8' runs attention" if int8_attention else
           attention.unavailable() or "")
    if why:
        return False, why
    if choice == "bf16":
        return True, ""
    return (merges or quantizes) and attention.preferred(), ""


__all__ = ["replace_attention", "wanted"]
