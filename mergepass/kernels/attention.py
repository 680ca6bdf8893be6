"""Attention ops for x86 CPUs without AMX (``csrc/attention.cpp``), where torch's SDPA runs fp32 flash
attention and its bf16 variant is no faster (its GEMMs need AMX):

- ``torch.ops.mergepass.bf16_attention``: bf16 dot products with fp32 accumulation, fp32 softmax
  (AVX512-BF16);
- ``torch.ops.mergepass.int8_attention``: u8 x s8 dot products (AVX-512 VNNI) with dynamic scales (per
  query row and per key row for q kᵀ; probabilities as u8 of the row max and per-channel v scales for
  p v), fp32 softmax.

Which is faster depends on the core, not only on its instructions (:func:`preferred`). The ops are
opaque to inductor (custom ops with a fake implementation), so inductor cannot fuse them back into
SDPA. They take SDPA's float ``attn_mask`` (proportional attention's log-size bias, masks) as
``bias``; dropout, causal and boolean masks are left to SDPA by the pass that inserts them
(:mod:`mergepass.graph.passes.replace_attention`).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import torch

from ..cpu import bf16_isa, cpu_flags, int8_isa, vendor
from .build import build_extension

_SRC = Path(__file__).with_name("csrc") / "attention.cpp"
KINDS = ("bf16", "int8")
_NEEDS = {"bf16": ("avx512_bf16", "AVX512-BF16"), "int8": ("avx512_vnni", "AVX-512 VNNI")}

_LIB = torch.library.Library("mergepass", "FRAGMENT")
for _kind in KINDS:
    _LIB.define(f"{_kind}_attention(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> Tensor")

    @torch.library.register_fake(f"mergepass::{_kind}_attention")
    def _shape(q, k, v, bias, scale):
        return q.new_empty(*q.shape[:-1], v.shape[-1])


def op(kind: str):
    """The op overload for ``kind`` ("bf16" or "int8")."""
    return getattr(torch.ops.mergepass, f"{kind}_attention").default


@functools.cache
def _build() -> Optional[str]:
    return build_extension("mergepass_attention", [_SRC])


@functools.cache
def unavailable(kind: str = "bf16") -> Optional[str]:
    """None when the ``kind`` op runs here, else why it does not."""
    flag, name = _NEEDS[kind]
    if flag not in cpu_flags():
        return f"the CPU has no {name} (int8 ISA: {int8_isa()}, bf16: {bf16_isa()})"
    err = _build()
    return f"its build failed ({err})" if err else None


def preferred() -> Optional[str]:
    """The op ``attention_kernel = "auto"`` picks on this CPU, or None for torch's SDPA.

    - AMX: None; torch's own bf16 and int8 kernels use the tile units.
    - AMD with AVX512-BF16 (Zen 4, Zen 5): "bf16"; vdpbf16ps does twice the multiply-adds of an fp32
      FMA at the same rate.
    - Intel with AVX-512 VNNI: "int8"; these cores issue vpdpbusd at the FMA rate with four times its
      multiply-adds, and vdpbf16ps at half the FMA rate (``benchmarks/attention_op.py`` measures both).
    - Otherwise None."""
    flags = cpu_flags()
    if "amx_bf16" in flags or "amx_int8" in flags:
        return None
    if vendor() == "AuthenticAMD" and unavailable("bf16") is None:
        return "bf16"
    if vendor() == "GenuineIntel" and unavailable("int8") is None:
        return "int8"
    return None


def attention(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """SDPA's result for 4-D ``q, k, v`` and a float ``bias`` (``attn_mask``), through the ``kind`` op."""
    why = unavailable(kind)  # loads the kernels on first use
    if why:
        raise RuntimeError(f"mergepass {kind} attention cannot run here: {why}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return op(kind)(q, k, v, bias, scale)


def bf16_attention(q, k, v, bias=None, scale=None) -> torch.Tensor:
    return attention("bf16", q, k, v, bias, scale)


def int8_attention(q, k, v, bias=None, scale=None) -> torch.Tensor:
    return attention("int8", q, k, v, bias, scale)


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


def int8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """What the int8 kernel computes, written plainly: symmetric int8 of each q and k row and of each v
    channel (max |x| / 127), probabilities as round(255 * exp(s - max)), normalised by their sum."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def fake_quant(t, dim):
        sc = t.abs().amax(dim, keepdim=True).float() / 127
        sc = torch.where(sc > 0, sc, torch.ones_like(sc))
        return (t.float() / sc).round().clamp(-127, 127) * sc
    s = fake_quant(q, -1) @ fake_quant(k, -1).transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias.float()
    p = (torch.exp(s - s.amax(-1, keepdim=True)) * 255).round()
    return ((p @ fake_quant(v, -2)) / p.sum(-1, keepdim=True)).to(q.dtype)


__all__ = ["KINDS", "attention", "bf16_attention", "int8_attention", "reference", "int8_reference", "unavailable",
           "preferred", "op"]
