"""Swap ``scaled_dot_product_attention`` for one of mergepass's attention ops
(:mod:`mergepass.kernels.attention`: bf16 or int8) where the op computes the same thing: 4-D q, k, v,
no dropout, not causal, no grouped-query heads, and a float mask or none (proportional attention's
bias is one). Everything else keeps SDPA."""
from __future__ import annotations

import inspect
import operator
from typing import Optional

import torch
from torch import fx

from ...kernels import attention
from ...merge import attn_bias
from ...graph.nodes import SDPA, copy_meta, fake_value, inserted

_SIG = inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False: None)


def _value(n):
    return fake_value(n) if isinstance(n, fx.Node) else n


def _replaceable(a: dict) -> bool:
    q, k, v = (_value(a[x]) for x in ("query", "key", "value"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return False
    if a["dropout_p"] != 0.0 or a["is_causal"] is not False or a["enable_gqa"] is not False:
        return False
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return False
    if a["attn_mask"] is not None and not _float_mask(a["attn_mask"]):
        return False
    return isinstance(a["scale"], (float, int, type(None)))


def _float_mask(node) -> bool:
    """A float mask: by its recorded value, or built by mergepass (proportional attention's log-size bias,
    possibly added to the model's own mask), whose nodes carry no recorded value."""
    value = _value(node)
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    if inserted(node):
        return node.target is attn_bias or (node.target is operator.add and all(_float_mask(a) for a in node.args))
    return False


def _bound(n: fx.Node) -> Optional[dict]:
    """An SDPA call's arguments by name, defaults filled in (None for any other node)."""
    if n.op != "call_function" or n.target not in SDPA:
        return None
    try:
        a = _SIG.bind(*n.args, **n.kwargs)
    except TypeError:
        return None
    a.apply_defaults()
    return dict(a.arguments)


def replace_attention(gm: fx.GraphModule, kind: str = "bf16") -> int:
    """Rewrite in place; returns how many attentions now call the ``kind`` op."""
    count = 0
    for n in list(gm.graph.nodes):
        a = _bound(n)
        if a is None or not _replaceable(a):
            continue
        q = _value(a["query"])
        scale = float(a["scale"]) if a["scale"] is not None else q.shape[-1] ** -0.5
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(attention.op(kind),
                                         (a["query"], a["key"], a["value"], a["attn_mask"], scale))
        copy_meta(new, n)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


def _concrete(shape) -> tuple[int, ...]:
    """A shape to time on: a symbolic size (a dynamic batch) at the size dynamo saw, else 8."""
    def size(d):
        if isinstance(d, int):
            return d
        hint = getattr(getattr(d, "node", None), "hint", None)
        return int(hint) if isinstance(hint, int) else 8
    return tuple(size(d) for d in shape)


def shapes(gm: fx.GraphModule) -> Optional[tuple]:
    """(q, k, v, mask or None) shapes of the first attention :func:`replace_attention` would rewrite (the
    largest in a merged graph: token counts only fall with depth), or None where there is none."""
    for n in gm.graph.nodes:
        a = _bound(n)
        if a is None or not _replaceable(a):
            continue
        mask = _value(a["attn_mask"])
        q, k, v = (_concrete(_value(a[x]).shape) for x in ("query", "key", "value"))
        if a["attn_mask"] is None:
            return q, k, v, None
        # mergepass's log-size bias carries no recorded value: one value per key, broadcast over heads and rows
        return q, k, v, _concrete(mask.shape) if isinstance(mask, torch.Tensor) else (q[0], 1, 1, k[2])
    return None


def wanted(choice: str, quantizes: bool, int8_attention: bool, training: bool, on_cpu: bool) -> tuple[Optional[str], str]:
    """(the op to use, None, or "measure"; why none) for recipe field ``lower.attention_kernel`` = ``choice``.

    ``auto`` keeps SDPA in floating-point graphs (an FP32 recipe keeps FP32 numerics; the ops are asked
    for by name) and, in int8 graphs, asks for a measurement (:func:`mergepass.kernels.attention.choose`)."""
    if choice == "sdpa":
        return None, ""
    why = ("the graph needs gradients and the op has no backward" if training else
           "the inputs are not on the CPU" if not on_cpu else
           "quantize.pt2e.attention = 'int8' runs attention" if int8_attention else "")
    if why:
        return None, why
    if choice != "auto":
        why = attention.unavailable(choice) or ""
        return (None, why) if why else (choice, "")
    return ("measure" if quantizes else None), ""


__all__ = ["replace_attention", "shapes", "wanted"]
