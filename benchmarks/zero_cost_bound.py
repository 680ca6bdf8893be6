"""Upper bound for merged int8: what a merge that cost nothing would give over int8 alone.

    python benchmarks/zero_cost_bound.py --model vit_base_patch16_224 --batch 8 --r 16

Times three contenders interleaved in one process: ``int8`` (no merging), ``tome_int8`` at ``r``,
and the same timm ViT whose blocks see exactly ToMe's token counts by *slicing* (drop the last r
tokens between attention and MLP: no matching, no size tracking, no proportional attention),
quantized with the ``int8`` recipe. The sliced model computes nonsense; only its speed matters:
int8 / sliced is the ratio any merge implementation could reach at these token counts here.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse
import functools
import statistics

import torch

import mergepass
from mergepass.cpu import machine
from mergepass.eval import models
from mergepass.eval.timing import interleaved


class SlicedViT(torch.nn.Module):
    """A timm ViT whose blocks drop ``r`` tokens between attention and MLP, as ToMe's schedule does."""

    def __init__(self, vit: torch.nn.Module, r: int):
        super().__init__()
        self.vit, self.r = vit, r

    def forward(self, x):
        v = self.vit
        x = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        for blk in v.blocks:
            x = x + blk.ls1(blk.attn(blk.norm1(x)))
            x = x[:, : x.shape[1] - self.r]
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return v.head(v.norm(x)[:, 0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--iters", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    vit = models.create(args.model).eval()
    size = models.input_size(vit)
    x = torch.randn(args.batch, 3, size, size)
    cal = [torch.randn(args.batch, 3, size, size) for _ in range(2)]
    contenders = {"int8": (vit, mergepass.load_recipe("int8")),
                  f"tome_int8:merge.r={args.r}": (vit, mergepass.load_recipe("tome_int8", merge={"r": args.r})),
                  f"sliced_int8:r={args.r}": (SlicedViT(vit, args.r).eval(), mergepass.load_recipe("int8"))}
    fns = {}
    with torch.no_grad():
        for name, (model, recipe) in contenders.items():
            fns[name] = torch.compile(model, backend=mergepass.backend(recipe, calibration=cal), dynamic=False)
            fns[name](x)
            print(f"  compiled {name}", flush=True)
        times = interleaved({name: functools.partial(fn, x) for name, fn in fns.items()}, args.rounds, args.iters)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds x {args.iters} iters, {machine()}")
    print(f"{'contender':<22}{'median ms':>10}{'int8 / this':>13}")
    for k, v in med.items():
        print(f"{k:<22}{v:>10.1f}{med['int8'] / v:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
