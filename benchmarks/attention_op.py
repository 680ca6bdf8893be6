"""mergepass's attention ops (bf16, int8) against torch's FP32 SDPA, interleaved in one process.

    python benchmarks/attention_op.py --threads 2

Where the CPU has native bf16 (AVX512-BF16 or AMX), ``sdpa_bf16`` times torch's SDPA on bf16 inputs: what
attention runs in an int8 recipe whose rest is bf16 (``quantize.pt2e.rest``), and on AMX what ``lower.attention_kernel =
"auto"`` leaves it to.

Shapes [batch, heads, tokens, head dim]: ViT-S/14 (DINOv2) and ViT-B/16 at 224 px, batch 8, and
ViT-S/14 at 518 px, batch 1, each with proportional attention's [B, 1, 1, N] bias. Per-call cosine
is against FP32 SDPA. Prints the CPU line (int8 and bf16 instructions) with the table.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from mergepass.cpu import bf16_isa, machine
from mergepass.eval.timing import interleaved, ratios
from mergepass.kernels import attention

SHAPES = {"ViT-S/14 224px b8": (8, 6, 257, 64), "ViT-B/16 224px b8": (8, 12, 197, 64),
          "ViT-S/14 518px b1": (1, 6, 1370, 64)}


def time_shape(shape, kinds, rounds: int, iters: int, bf16_sdpa: bool) -> dict:
    """{contender: (median ms, speedup over SDPA, (min, max) per-round speedup, cosine to SDPA)}."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    bias = torch.rand(shape[0], 1, 1, shape[2]).add(0.5).log()
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, bias)}
    if bf16_sdpa:
        qb, kb, vb, biasb = (t.bfloat16() for t in (q, k, v, bias))
        fns["sdpa_bf16"] = lambda: F.scaled_dot_product_attention(qb, kb, vb, biasb)
    fns.update({kind: (lambda kind=kind: attention.attention(kind, q, k, v, bias)) for kind in kinds})
    want = fns["sdpa"]().flatten().double()
    per = interleaved(fns, rounds, iters)
    r = ratios(per, "sdpa")  # sdpa time / contender time, per round
    return {name: (1e3 * statistics.median(per[name]), statistics.median(r[name]), (min(r[name]), max(r[name])),
                   F.cosine_similarity(fns[name]().flatten().double(), want, 0).item()) for name in fns}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    kinds = [k for k in attention.KINDS if attention.unavailable(k) is None]
    for k in attention.KINDS:
        if k not in kinds:
            print(f"the {k} attention op cannot run here: {attention.unavailable(k)}", file=sys.stderr)
    if not kinds:
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{machine()}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds x {args.iters}")
    print(f"{'shape':<20}{'[B, H, N, D]':<19}{'contender':<11}{'ms':>8}{'x SDPA':>8}{'spread':>13}{'cosine':>11}")
    for name, shape in SHAPES.items():
        bias = (shape[0], 1, 1, shape[2])
        print(f"{name}: attention_kernel='auto' in an int8 graph with an fp32 rest: "
              f"{attention.choose(shape, shape, shape, bias, keep=False).line()}")
        for who, (ms, speedup, spread, cos) in time_shape(shape, kinds, args.rounds, args.iters, bf16_isa() != "none").items():
            print(f"{name:<20}{str(list(shape)):<19}{who:<11}{ms:>8.2f}{speedup:>7.2f}x"
                  f"{spread[0]:>7.2f}-{spread[1]:<5.2f}{cos:>11.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
