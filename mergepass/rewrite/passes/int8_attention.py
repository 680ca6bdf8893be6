"""int8 attention for the pt2e engine, by torchao's x86 quantized-SDPA fusion.

Each ``scaled_dot_product_attention`` is rewritten as :func:`fusable_sdpa`: the decomposed form
(q @ kᵀ · scale + mask → softmax → @ v) that torchao's pattern matches. The quantizer then
annotates its two matmuls, so q, k, v, the probabilities and the output get static uint8 scales,
and inductor's post-grad pass replaces the whole attention with one ``torchao.qscaled_dot_product``:
inductor's C++ template where the CPU has AMX, torchao's compiled CPU kernel elsewhere.
Proportional attention's log-size bias is the additive mask the kernel accepts.
"""
from __future__ import annotations

import operator
import warnings
from typing import Optional

import torch
from torch import fx

from ... import compat
from ...errors import MergepassWarning
from ...graph.nodes import SDPA, copy_meta, exported_value, set_exported_value, traced_value
from ...merge import attn_bias

OP = "torchao::qscaled_dot_product"


def fusable_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
    """``scaled_dot_product_attention`` (no dropout, not causal, float mask) in the form torchao fuses."""
    def heads_last(x):  # a [B, N, H, D] copy: its quantize fuses into the copy, where the pattern looks
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    q, k, v = heads_last(query), heads_last(key), heads_last(value)
    s = q @ k.transpose(-2, -1)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    if attn_mask is not None:
        p = (s * scale + attn_mask).softmax(-1)
    else:  # spelled out: torch's own decomposition of softmax(s * scale) no longer matches torchao's pattern
        e = ((s - s.amax(-1, keepdim=True)) * scale).exp()
        p = e / e.sum(-1, keepdim=True)
    return heads_last(p @ v)


def _arg(n: fx.Node, pos: int, name: str, default):
    return n.args[pos] if len(n.args) > pos else n.kwargs.get(name, default)


def _mask_ok(mask) -> bool:
    """A mask the kernel takes: none, or floating point with 2 or 4 dims."""
    if mask is None:
        return True
    if not isinstance(mask, fx.Node):
        return False
    val = traced_value(mask)
    if isinstance(val, torch.Tensor):
        return val.is_floating_point() and val.dim() in (2, 4)
    # proportional attention's bias (4-D by construction), possibly added to the model's own mask
    return mask.target is attn_bias or (mask.target is operator.add and all(_mask_ok(a) for a in mask.args))


def _fusable(n: fx.Node) -> bool:
    qkv = [traced_value(a) for a in n.args[:3]]
    return (_arg(n, 4, "dropout_p", 0.0) == 0 and not _arg(n, 5, "is_causal", False)
            and not n.kwargs.get("enable_gqa", False)
            and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in qkv)
            # fewer queries than keys (prune_unread_rows' last block) did not fuse under torchao 0.18.0's pattern;
            # that attention of a few rows stays SDPA
            and qkv[0].shape[-2] == qkv[1].shape[-2]
            and _mask_ok(_arg(n, 3, "attn_mask", None)))


def decompose_attention(gm: fx.GraphModule) -> tuple[int, int]:
    """Point every fusable SDPA node of ``gm`` at :func:`fusable_sdpa`; (rewritten, SDPA nodes)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA]
    done = 0
    for n in nodes:
        if _fusable(n):
            n.target = fusable_sdpa
            done += 1
    if done:
        gm.recompile()
    return done, len(nodes)


def unavailable() -> Optional[str]:
    """Why int8 attention cannot run on this machine, or None where it can."""
    try:
        import torchao.ops  # noqa: F401  (defines the op)
        compat.torchao_qsdpa_fusion()
    except Exception as e:  # noqa: BLE001 - an old or partial torchao
        return f"torchao's quantized-SDPA fusion is not importable ({type(e).__name__}: {e})"
    # the question torchao's lowering asks (the OS must enable AMX tiles too), not cpu.int8_isa()'s flags
    if compat.amx_tiles():
        return None  # inductor's template generates the kernel
    if compat.has_cpu_kernel(OP):
        return None
    return (f"this CPU has no AMX (inductor's int8 attention template needs it) and the installed torchao "
            f"has no compiled CPU kernel for {OP}")


def _sign_muls(graph: fx.Graph) -> None:
    """Put back what torchao's mask-free pattern starts with and inductor folds away: ``amax(X)`` and
    ``X - amax(X)`` over the scores ``X`` of a batched matmul read ``X * 1``; under bf16 autocast the
    pattern also wants the scores, and the probabilities before they are quantized, cast explicitly."""
    aten, prims = torch.ops.aten, torch.ops.prims
    for amax in graph.find_nodes(op="call_function", target=aten.amax.default):
        x = amax.args[0]
        if not (isinstance(x, fx.Node) and x.target in (aten.reshape.default, aten.view.default)
                and getattr(x.args[0], "target", None) == aten.bmm.default):
            continue
        subs = [u for u in x.users if u.target == aten.sub.Tensor and u.args == (x, amax)]
        if len(x.users) != 2 or len(subs) != 1:
            continue
        val = exported_value(x)
        reduced = isinstance(val, torch.Tensor) and val.dtype != torch.float32
        src = x
        with graph.inserting_after(x):
            if reduced:
                src = graph.call_function(prims.convert_element_type.default, (x, torch.float32))
                copy_meta(src, x)
                set_exported_value(src, val.float())
        with graph.inserting_after(src):
            one = graph.call_function(aten.mul.Tensor, (src, 1))
        copy_meta(one, src)
        amax.replace_input_with(x, one)
        subs[0].replace_input_with(x, one)
        if reduced:
            _cast_probabilities(graph, subs[0], val.dtype)


def _cast_probabilities(graph: fx.Graph, sub: fx.Node, dtype: torch.dtype) -> None:
    """Insert a cast to ``dtype`` between softmax's final division and the quantize that reads it."""
    aten = torch.ops.aten
    exp = next((u for u in _through(sub, aten.mul.Tensor).users if u.target == aten.exp.default), None)
    div = next((u for u in (exp.users if exp else ()) if u.target == aten.div.Tensor), None)
    if div is None:
        return
    with graph.inserting_after(div):
        cast = graph.call_function(torch.ops.prims.convert_element_type.default, (div, dtype))
    copy_meta(cast, div)
    div.replace_all_uses_with(cast, delete_user_cb=lambda u: u is not cast)


def _through(n: fx.Node, target) -> fx.Node:
    users = list(n.users)
    return users[0] if len(users) == 1 and users[0].target == target else n


class FusionPass:
    """torchao's post-grad fusion, warning when fewer attentions fuse than were rewritten (those would
    run as FP32 matmuls on dequantized values: slower and less faithful than plain FP32 attention)."""

    def __init__(self, expected: int):
        self.expected = expected

    def __call__(self, graph: fx.Graph) -> None:
        before = compat.pattern_matcher_count()  # inductor counts each match as the pass applies it
        _sign_muls(graph)
        compat.torchao_qsdpa_fusion()(graph)  # a pass holding only the int8 attention patterns
        fused = compat.pattern_matcher_count() - before
        if fused < self.expected:
            warnings.warn(f"mergepass: int8 attention fused in {fused} of {self.expected} attention blocks; "
                          "the others run as matmuls on dequantized values", MergepassWarning, stacklevel=2)

    def uuid(self) -> bytes:
        return compat.torchao_qsdpa_fusion().uuid() + f"mergepass-{self.expected}".encode()


def inductor_passes(expected: int) -> dict:
    """Inductor settings that run the fusion for this compile only."""
    class Pass(FusionPass, compat.custom_graph_pass()):  # CustomGraphPass lets inductor's cache key on uuid()
        pass
    return {"post_grad_custom_pre_pass": Pass(expected)}
