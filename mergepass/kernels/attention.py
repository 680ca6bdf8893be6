"""Attention ops for x86 CPUs without AMX (``csrc/attention.cpp``), where torch's SDPA runs fp32 flash
attention and its bf16 variant is no faster (its GEMMs need AMX):

- ``torch.ops.mergepass.bf16_attention``: bf16 dot products with fp32 accumulation, fp32 softmax
  (AVX512-BF16);
- ``torch.ops.mergepass.int8_attention``: u8 x s8 dot products (AVX-512 VNNI) with dynamic scales (k and
  v centred on their means over the keys; per query row and per key row for q kᵀ; probabilities as u8 of
  the row max, normalised by their unrounded sum, and per-channel v scales for p v), fp32 softmax.
- ``torch.ops.mergepass.int16_attention``: int16 pair dot products (AVX2 ``vpmaddwd``, exact int32 sums)
  with the int8 op's dynamic scales and centring, each operand as wide as its int32 sums allow (about 12
  bits at ViT sizes); for CPUs without AVX-512, where the other two cannot run.

Which is faster depends on the core, not only on its instructions: :func:`choose` times them on the
machine that runs them. The ops are opaque to inductor (custom ops with a fake implementation), so inductor cannot fuse them back into
SDPA. They take SDPA's float ``attn_mask`` (proportional attention's log-size bias, masks) as
``bias``; dropout, causal and boolean masks are left to SDPA by the pass that inserts them
(:mod:`mergepass.rewrite.passes.replace_attention`).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import torch

from ..cpu import bf16_isa, cpu_flags, int8_isa
from ..decide import Candidate, Decision, decide
from .build import build_extension, source_digest

_SRC = Path(__file__).with_name("csrc") / "attention.cpp"
KINDS = ("bf16", "int8", "int16")
_NEEDS = {"bf16": (("avx512_bf16",), "AVX512-BF16"), "int8": (("avx512_vnni",), "AVX-512 VNNI"),
          "int16": (("avx2", "fma"), "AVX2 and FMA")}

_LIB = torch.library.Library("mergepass", "FRAGMENT")
for _kind in KINDS:
    _LIB.define(f"{_kind}_attention(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> Tensor")

    @torch.library.register_fake(f"mergepass::{_kind}_attention")
    def _shape(q, k, v, bias, scale):
        # written as [B, N, H, dv] (csrc/attention.cpp): the transpose back to tokens is a view
        b, h, n, _ = q.shape
        return q.new_empty(b, n, h, v.shape[-1]).permute(0, 2, 1, 3)


def op(kind: str):
    """The op overload for ``kind`` ("bf16" or "int8")."""
    return getattr(torch.ops.mergepass, f"{kind}_attention").default


@functools.cache
def _build() -> Optional[str]:
    return build_extension("mergepass_attention", [_SRC])


def missing_instructions(kind: str = "bf16") -> Optional[str]:
    """Why this CPU cannot run the ``kind`` op (it lacks the instructions), else None."""
    flags, name = _NEEDS[kind]
    if set(flags) <= cpu_flags():
        return None
    return f"the CPU has no {name} (int8 ISA: {int8_isa()}, bf16: {bf16_isa()})"


@functools.cache
def unavailable(kind: str = "bf16") -> Optional[str]:
    """None when the ``kind`` op runs here, else why it does not."""
    missing = missing_instructions(kind)
    if missing:
        return missing
    err = _build()
    return f"its build failed ({err})" if err else None


def choose(q_shape, k_shape, v_shape, bias_shape=None, dtype: torch.dtype = torch.float32, tolerance: float = 5e-4,
           timer=None, keep: bool = True) -> Decision:
    """The attention ``lower.attention_kernel = "auto"`` runs in an int8 graph on this CPU, by measurement.

    Times torch's SDPA (at ``dtype``, the precision of the graph's rest) and each op that can run here on
    inputs of the graph's own shapes, and picks the fastest whose per-call error (1 - cosine against FP32
    SDPA) is at most ``tolerance``. The decision is kept on disk (:mod:`mergepass.decide`), so a later
    compile on this machine times nothing."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g) for s in (q_shape, k_shape, v_shape))
    bias = None if bias_shape is None else torch.rand(*bias_shape, generator=g).add(0.5).log()
    low = [t.to(dtype) if t is not None else None for t in (q, k, v, bias)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    candidates = {"sdpa": Candidate(lambda: sdpa(*low[:3], low[3]))}
    for kind in KINDS:
        why = unavailable(kind)
        candidates[kind] = Candidate(None if why else (lambda kind=kind: attention(kind, q, k, v, bias)), why or "")
    facts = {"q": list(q_shape), "k": list(k_shape), "v": list(v_shape), "bias": bias_shape and list(bias_shape),
             "dtype": str(dtype), "tolerance": tolerance, "kernels": source_digest(_SRC)}
    with torch.no_grad():
        return decide("attention kernel", facts, candidates, default="sdpa", reference=lambda: sdpa(q, k, v, bias),
                      budget=tolerance, timer=timer, keep=keep)


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


def int16_attention(q, k, v, bias=None, scale=None) -> torch.Tensor:
    return attention("int16", q, k, v, bias, scale)


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
    """What the int8 kernel computes, written plainly: k and v centred on their means over the keys (exact:
    softmax ignores q . mean(k), and mean(v) is added back); symmetric int8 of each q and k row and of each v
    channel (max |x| / 127); probabilities as round(255 * exp(s - max)), normalised by the sum of the
    unrounded values, so that the mass that rounds to 0 is given mean(v)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def fake_quant(t, dim):
        sc = t.abs().amax(dim, keepdim=True) / 127
        sc = torch.where(sc > 0, sc, torch.ones_like(sc))
        return (t / sc).round().clamp(-127, 127) * sc
    qf, kf, vf = q.float(), k.float(), v.float()
    vm = vf.mean(-2, keepdim=True)
    s = fake_quant(qf, -1) @ fake_quant(kf - kf.mean(-2, keepdim=True), -1).transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias.float()
    e = torch.exp(s - s.amax(-1, keepdim=True)) * 255
    return ((e.round() @ fake_quant(vf - vm, -2)) / e.sum(-1, keepdim=True) + vm).to(q.dtype)


def int16_magnitude(n: int) -> int:
    """The largest m (at most 32767) with m * m * n <= 2**31 - 1: the int16 operand range whose n products
    sum in int32 without overflow."""
    return min(32767, math.isqrt((2**31 - 1) // max(n, 2)))


def int16_pv_magnitudes(n: int) -> tuple[int, int]:
    """(probabilities, v) magnitudes for p v over n keys: mp * mv * n <= 2**31 - 1, with mp about 8 times mv
    (probabilities lose more to rounding: their small values are many)."""
    n = max(n, 2)
    mp = min(32767, math.isqrt(8 * ((2**31 - 1) // n)))
    return mp, min(32767, (2**31 - 1) // (mp * n))


def int16_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None) -> torch.Tensor:
    """What the int16 kernel computes, written plainly: k and v centred on their means over the keys; q and k
    rows symmetric in +-m(d) (:func:`int16_magnitude` of the even-rounded count), v channels in +-mv;
    probabilities as round(mp * 2^(s - max)) (:func:`int16_pv_magnitudes`), normalised by the sum of the
    unrounded values."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mqk = int16_magnitude(2 * ((q.shape[-1] + 1) // 2))
    mp, mv = int16_pv_magnitudes(2 * ((k.shape[-2] + 1) // 2))

    def fake_quant(t, dim, m):
        sc = t.abs().amax(dim, keepdim=True) / m
        sc = torch.where(sc > 0, sc, torch.ones_like(sc))
        return (t / sc).round().clamp(-m, m) * sc
    qf, kf, vf = q.float(), k.float(), v.float()
    vm = vf.mean(-2, keepdim=True)
    s = fake_quant(qf, -1, mqk) @ fake_quant(kf - kf.mean(-2, keepdim=True), -1, mqk).transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias.float()
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (((e * mp).round() / mp @ fake_quant(vf - vm, -2, mv)) / e.sum(-1, keepdim=True) + vm).to(q.dtype)


__all__ = ["KINDS", "attention", "bf16_attention", "int8_attention", "int16_attention", "reference", "int8_reference",
           "int16_reference", "int16_magnitude", "int16_pv_magnitudes", "unavailable",
           "choose", "op"]
