"""A plain eager CPU kernel for ``torchao::qscaled_dot_product``, transcribing the math of torchao's
reference kernel. It lets int8 attention be checked, and its fidelity measured, on machines whose
torchao has no compiled CPU kernel. It is slow and never registered implicitly."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .. import compat
from ..rewrite.passes.int8_attention import OP


def qscaled_dot_product(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        q_scale=1.0, q_zp=0, k_scale=1.0, k_zp=0, v_scale=1.0, v_zp=0,
                        a_scale=1.0, a_zp=0, o_scale=1.0, o_zp=0):
    """uint8 q, k, v [B, H, N, D] → uint8 output [B, H, N, D] (laid out [B, N, H, D])."""
    if query.dtype != torch.uint8 or dropout_p or is_causal:
        raise NotImplementedError("the reference kernel takes uint8 inputs, no dropout, not causal")
    q = (query.float() - q_zp) * q_scale
    k = (key.float() - k_zp) * k_scale
    v = (value.float() - v_zp) * v_scale
    s = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        s = s + attn_mask.float()
    p = s.softmax(-1)
    p = ((torch.round(p / a_scale) + a_zp).clamp(0, 255) - a_zp) * a_scale
    out = (torch.round(p @ v / o_scale) + o_zp).clamp(0, 255).to(torch.uint8)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@contextlib.contextmanager
def reference_kernel() -> Iterator[None]:
    """Register :func:`qscaled_dot_product` as the op's CPU kernel while the block runs (compile and call)."""
    import torchao.ops  # noqa: F401  (defines the op)
    if compat.has_cpu_kernel(OP):
        raise RuntimeError(f"{OP} already has a CPU kernel here; use that one")
    namespace, name = OP.split("::")
    lib = torch.library.Library(namespace, "IMPL")
    lib.impl(name, qscaled_dot_product, "CPU")
    try:
        yield
    finally:
        compat.destroy_library(lib)
