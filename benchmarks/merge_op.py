"""The fused merge kernel per block: ToMe's matching on head-mean keys against soft merging's on the tokens.

    python benchmarks/merge_op.py --threads 2

Per merging block of ``soft_delayed_int8``'s schedule on DINOv2 ViT-S/14 at 224 px, batch 8 (tokens in, r), with
random inputs: ``tome`` (``fused_global_merge``, 64-channel keys: what ``tome_int8`` runs), ``tome_tokens`` (the same
matching on the 384-channel tokens) and ``soft`` (``fused_nearest_merge`` on the tokens: soft merging at k = 1, which
also finds each leaving token's nearest kept token). ``soft`` minus ``tome_tokens`` is the nearest step; ``tome_tokens``
minus ``tome`` the wider similarity. ``tome_screen`` and ``soft_screen`` are ``tome`` and ``soft`` with the pairs screened
by a bf16 matmul (``screen=True``: the same matches; what ``merge similarity`` chooses where it measures faster). The last
row sums the blocks: merge time per forward. Prints the CPU line.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from mergepass.cpu import machine
from mergepass.eval.timing import interleaved
from mergepass.merge.fused import fused_global_merge, fused_nearest_merge, kernel_error

# soft_delayed_int8's merging blocks (tokens in, r) at 257 tokens; the last block's merge is dropped (prune_rows)
BLOCKS = [(257, 18), (239, 18), (221, 19), (202, 19), (183, 19), (164, 19), (145, 19), (126, 19), (107, 19),
          (88, 19)]


def time_block(batch: int, tokens: int, r: int, width: int, heads_dim: int, rounds: int, iters: int) -> dict:
    """{contender: median ms per call} at one block's shape."""
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(batch, tokens, width, generator=g)
    keys = torch.randn(batch, tokens, heads_dim, generator=g)
    kw = {"r": r, "prefix": 1}
    fns = {"tome": lambda: fused_global_merge(x, keys, None, None, **kw),
           "tome_tokens": lambda: fused_global_merge(x, x, None, None, **kw),
           "soft": lambda: fused_nearest_merge(x, x, None, None, **kw),
           "tome_screen": lambda: fused_global_merge(x, keys, None, None, screen=True, **kw),
           "soft_screen": lambda: fused_nearest_merge(x, x, None, None, screen=True, **kw)}
    for fn in fns.values():  # warm-up: first-call allocation and page faults
        fn()
    per = interleaved(fns, rounds, iters)
    return {k: 1e3 * statistics.median(v) for k, v in per.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--blocks", type=int, default=len(BLOCKS), help="time only the first N blocks")
    args = p.parse_args(argv)
    why = kernel_error()
    if why:
        print(f"the fused merge kernel cannot run here: {why}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{machine()}, {torch.get_num_threads()} threads, batch {args.batch}, {args.rounds} interleaved rounds x "
          f"{args.iters}; ms per call")
    names = ("tome", "tome_tokens", "soft", "tome_screen", "soft_screen")
    print(f"{'tokens':>7}{'r':>4}" + "".join(f"{n:>13}" for n in names))
    total = dict.fromkeys(names, 0.0)
    for tokens, r in BLOCKS[:args.blocks]:
        ms = time_block(args.batch, tokens, r, 384, 64, args.rounds, args.iters)
        print(f"{tokens:>7}{r:>4}" + "".join(f"{ms[n]:>13.3f}" for n in names), flush=True)
        for n in names:
            total[n] += ms[n]
    print(f"{'sum':>11}" + "".join(f"{total[n]:>13.2f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
