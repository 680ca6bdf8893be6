"""Bipartite soft matching (ToMe): the building block of every merge method here.

Tokens are split into two sets A and B; every A token proposes its most similar B token and the
r best proposals are merged into their B partner. Pure tensor functions, no FX.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Matching(NamedTuple):
    unm_idx: torch.Tensor  # [B, Ma - r] A tokens kept, ascending
    src_idx: torch.Tensor  # [B, r] A tokens merged away
    dst_idx: torch.Tensor  # [B, r] B token each of them joins
    joins: Optional[torch.Tensor] = None  # [B, r] False: no permitted partner, the token is dropped (see match)


def normalize(metric: torch.Tensor) -> torch.Tensor:
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def match(a: torch.Tensor, b: torch.Tensor, r: int,
          allowed: Optional[torch.Tensor] = None,
          a_valid: Optional[torch.Tensor] = None) -> Matching:
    """Match A tokens ``a`` [B, Ma, C] to B tokens ``b`` [B, Mb, C] by cosine similarity.

    ``allowed`` ([Ma, Mb] or [B, Ma, Mb] bool) restricts which pairs may merge; ``a_valid`` ([B, Ma]
    bool) marks A tokens that may be merged at all. Similarity never carries gradients, as in ToMe.
    The rest is :func:`match_scores`'s."""
    return match_scores(normalize(a.detach()) @ normalize(b.detach()).transpose(-1, -2), r, allowed, a_valid)


def match_scores(scores: torch.Tensor, r: int,
                 allowed: Optional[torch.Tensor] = None,
                 a_valid: Optional[torch.Tensor] = None) -> Matching:
    """Match by given A-to-B ``scores`` [B, Ma, Mb] (higher: more similar): every A token proposes
    its best permitted B token and the ``r`` A tokens with the best proposals leave.

    A NaN score forbids its pair too. A tokens with no permitted partner rank below every A token
    with one (ties keep A order); exactly ``r`` tokens leave all the same (static shapes), and one that
    leaves without a partner is dropped (``joins`` False): it joins no average, and its ``dst_idx`` is
    B token 0, where its source entries point.
    """
    forbid = scores.isnan() if allowed is None else scores.isnan() | ~allowed
    node_max, node_idx = scores.masked_fill(forbid, float("-inf")).max(dim=-1)  # all -inf: index 0
    if a_valid is not None:
        node_max = node_max.masked_fill(~a_valid, float("-inf"))
    has = node_max > float("-inf")
    # no partner: below every score, in A order; ties broken without a stable sort, which ONNX export lacks
    best = node_max.float()
    low = best.masked_fill(~has, float("inf")).amin(dim=-1, keepdim=True)
    low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
    order = torch.arange(best.shape[-1], device=best.device, dtype=torch.float32) / best.shape[-1]
    rank = torch.where(has, best, low - 1.0 - order)
    edge_idx = rank.argsort(dim=-1, descending=True)
    unm_idx = edge_idx[:, r:].sort(dim=-1).values
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx.gather(1, src_idx)
    return Matching(unm_idx, src_idx, dst_idx, has.gather(1, src_idx))


def joined_only(m: Matching, t: torch.Tensor) -> torch.Tensor:
    """``t`` ([B, r, C], one row per token leaving) with the rows of dropped tokens zeroed (NaN too)."""
    return t if m.joins is None else torch.where(m.joins[..., None], t, torch.zeros_like(t))


def merge_sum(xa: torch.Tensor, xb: torch.Tensor, m: Matching) -> torch.Tensor:
    """Sum merged A tokens into their B partners (dropped ones into none); returns [unmerged A..., B...]."""
    c = xa.shape[-1]
    unm = xa.gather(1, m.unm_idx[..., None].expand(-1, -1, c))
    src = joined_only(m, xa.gather(1, m.src_idx[..., None].expand(-1, -1, c)))
    dst = xb.scatter_add(1, m.dst_idx[..., None].expand(-1, -1, c), src)
    return torch.cat([unm, dst], dim=1)


def slots(m: Matching, ma: int, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output position of every A token and every B token after :func:`merge_sum`."""
    bsz, keep = m.unm_idx.shape
    ar = torch.arange(max(ma, mb), device=m.unm_idx.device).expand(bsz, -1)
    slot_a = torch.empty(bsz, ma, dtype=torch.long, device=m.unm_idx.device)
    slot_a = slot_a.scatter(1, m.unm_idx, ar[:, :keep]).scatter(1, m.src_idx, keep + m.dst_idx)
    slot_b = keep + ar[:, :mb]
    return slot_a, slot_b
