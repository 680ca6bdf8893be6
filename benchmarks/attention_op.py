"""mergepass's bf16 attention op against torch's FP32 SDPA, interleaved in one process.

    python benchmarks/attention_op.py --threads 2

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

from mergepass.cpu import machine
from mergepass.eval.timing import interleaved, ratios
from mergepass.kernels import attention

SHAPES = {"ViT-S/14 224px b8": (8, 6, 257, 64), "ViT-B/16 224px b8": (8, 12, 197, 64),
          "ViT-S/14 518px b1": (1, 6, 1370, 64)}


def time_shape(shape, rounds: int, iters: int) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    bias = torch.rand(shape[0], 1, 1, shape[2]).add(0.5).log()
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, bias),
           "bf16_op": lambda: attention.bf16_attention(q, k, v, bias)}
    cos = F.cosine_similarity(fns["bf16_op"]().flatten().double(), fns["sdpa"]().flatten().double(), 0).item()
    per = interleaved(fns, rounds, iters)
    r = ratios(per, "bf16_op")["sdpa"]
    return dict(sdpa_ms=1e3 * statistics.median(per["sdpa"]), op_ms=1e3 * statistics.median(per["bf16_op"]),
                speedup=statistics.median(r), spread=(min(r), max(r)), cosine=cos)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    why = attention.unavailable()
    if why:
        print(f"the bf16 attention op cannot run here: {why}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{machine()}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds x {args.iters}")
    print(f"{'shape':<20}{'[B, H, N, D]':<20}{'SDPA ms':>9}{'op ms':>9}{'op speedup':>12}{'spread':>13}{'cosine':>11}")
    for name, shape in SHAPES.items():
        r = time_shape(shape, args.rounds, args.iters)
        print(f"{name:<20}{str(list(shape)):<20}{r['sdpa_ms']:>9.2f}{r['op_ms']:>9.2f}{r['speedup']:>11.2f}x"
              f"{r['spread'][0]:>7.2f}-{r['spread'][1]:<5.2f}{r['cosine']:>11.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
