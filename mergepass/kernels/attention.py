"""``torch.ops.mergepass.bf16_attention``: attention with bf16 dot products and an fp32 softmax, for x86
CPUs that have AVX512-BF16 but no AMX (``csrc/bf16_attention.cpp``).

There torch's SDPA runs fp32 flash attention, and its bf16 variant is no faster (its GEMMs need AMX).
The op is opaque to inductor (a custom op with a fake implementation), so inductor cannot fuse it
back into SDPA. It takes SDPA's float ``attn_mask`` (proportional attention's log-size bias, masks)
as ``bias``; dropout, causal and boolean masks are left to SDPA by the pass that inserts it
(:mod:`mergepass.graph.passes.replace_attention`).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import torch

from ..cpu import bf16_isa, cpu_flags, vendor
from .build import build_extension

_SRC = Path(__file__).with_name("csrc") / "bf16_attention.cpp"

_LIB = torch.library.Library("mergepass", "FRAGMENT")
_LIB.define("bf16_attention(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> Tensor")


@torch.library.register_fake("mergepass::bf16_attention")
def _shape(q, k, v, bias, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@functools.cache
def unavailable() -> Optional[str]:
    """None when the op runs here, else why it does not."""
    if "avx512_bf16" not in cpu_flags():
        return f"the CPU has no AVX512-BF16 (bf16: {bf16_isa()})"
    err = build_extension("mergepass_attention", [_SRC])
    return f"its build failed ({err})" if err else None


def preferred() -> bool:
    """Whether ``attention_kernel = "auto"`` picks the op on this CPU: an AMD CPU with AVX512-BF16 (Zen 4,
    Zen 5). There a bf16 dot product (vdpbf16ps) does twice the multiply-adds of an fp32 FMA per
    instruction at the same rate. Intel cores issue vdpbf16ps on one port and FMAs on two, so the op only
    draws level with fp32 there (measured 0.7-0.8x torch's SDPA on a Xeon with AVX512-BF16 and no AMX);
    with AMX, torch's own bf16 kernels are the fast ones; without AVX512-BF16, bf16 is emulated."""
    return vendor() == "AuthenticAMD" and "amx_bf16" not in cpu_flags() and unavailable() is None


def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """SDPA's result for 4-D ``q, k, v`` and a float ``bias`` (``attn_mask``), through the op."""
    why = unavailable()  # loads the kernel on first use
    if why:
        raise RuntimeError(f"mergepass bf16 attention cannot run here: {why}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.mergepass.bf16_attention(q, k, v, bias, scale)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """What the kernel computes, written plainly: q, k, v and the probabilities rounded to bf16, every
    product and sum in fp32, normalised after the probabilities times v."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    s = bf(q) @ bf(k).transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias.float()
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return ((bf(e) @ bf(v)) / e.sum(-1, keepdim=True)).to(q.dtype)


__all__ = ["bf16_attention", "reference", "unavailable", "preferred"]
