"""The merge methods as pure tensor functions: ``(x, metric, size, source, ...) -> (x, size, source)``.

Each keeps the first ``prefix`` (protected) tokens in place, merges the rest with a size-weighted
average, and returns a static number of tokens. These functions are what the graph rewrite inserts.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .bipartite import Matching, joined_only, match, match_scores, merge_sum, slots
from .tokens import init_state, positions, update_source


def _interleave(slot_even: torch.Tensor, slot_odd: torch.Tensor, m: int) -> torch.Tensor:
    """Slots in token order for an alternating split (one set at even, the other at odd positions)."""
    if slot_odd.shape[1] < slot_even.shape[1]:
        slot_odd = torch.cat([slot_odd, slot_odd[:, :1]], dim=1)
    return torch.stack([slot_even, slot_odd], dim=-1).flatten(1)[:, :m]


def _weighted(x: torch.Tensor, size: torch.Tensor, prefix: int) -> torch.Tensor:
    """[x*size, size] of the mergeable tokens, merged together in one pass."""
    s = size[:, prefix:]
    return torch.cat([x[:, prefix:] * s, s], dim=-1)


def _finish(x, size, prefix, merged, source, slot):
    xs, s = merged[..., :-1], merged[..., -1:]
    x_out = torch.cat([x[:, :prefix], xs / s], dim=1)
    size_out = torch.cat([size[:, :prefix], s], dim=1)
    return x_out, size_out, update_source(source, slot, prefix)


def _gather_merge(x, size, source, mm: Matching, a_pos, b_pos, prefix, slot):
    """Merge by index: gather the kept tokens ([prefix, unmerged A, B]) and move each merged B token
    to its size-weighted mean by adding ``s_a (x_a - x_b) / s_new`` for each of its A partners.

    Only the r merged rows are touched after the gather, so the full token tensor is written once
    and no division pass over it remains. ``a_pos``/``b_pos`` are the token-axis positions of the
    A and B sets ([Ma], [Mb] or batched)."""
    bsz, _, c = x.shape
    keep_n = a_pos.shape[-1] - mm.src_idx.shape[1]
    a_pos, b_pos = a_pos.expand(bsz, -1), b_pos.expand(bsz, -1)
    head = torch.arange(prefix, device=x.device).expand(bsz, -1)
    keep = torch.cat([head, a_pos.gather(1, mm.unm_idx), b_pos], dim=1)
    src = a_pos.gather(1, mm.src_idx)[..., None]
    dst = (prefix + keep_n + mm.dst_idx)[..., None]
    s_src = joined_only(mm, size.gather(1, src))
    s_out = size.gather(1, keep[..., None]).scatter_add(1, dst, s_src)
    x_out = x.gather(1, keep[..., None].expand(-1, -1, c))
    rows = dst.expand(-1, -1, c)
    delta = (x.gather(1, src.expand(-1, -1, c)) - x_out.gather(1, rows)) * (s_src / s_out.gather(1, dst))
    delta = joined_only(mm, delta)  # a dropped NaN token must not reach its B token through 0 * NaN
    return x_out.scatter_add(1, rows, delta), s_out, update_source(source, slot, prefix)


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """[B, M] mask of the ``k`` tokens with the largest ``score`` [B, M]."""
    top = score.topk(k, dim=-1).indices
    return torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter(1, top, True)


def largest_norms(metric: torch.Tensor, k: int) -> torch.Tensor:
    """[B, M] mask of the ``k`` tokens with the largest metric (key) norm."""
    return top_k_mask(metric.norm(dim=-1), k)


def global_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                 source: Optional[torch.Tensor], *, r: int, prefix: int, offset: int = 0,
                 protect: Union[int, torch.Tensor] = 0):
    """ToMe: bipartite soft matching over all mergeable tokens. A holds the mergeable tokens at
    positions ``offset``, ``offset + 2``, ... after the prefix and B the others: ``offset = 0`` splits
    over patch positions, ``offset = prefix % 2`` over sequence positions as official ToMe does.
    ``protect``: the tokens with the largest key norms (a count), or those a [B, M] bool mask over the
    mergeable tokens marks, neither merge away nor absorb others (the caller keeps ``r`` at most the A
    tokens left)."""
    size, source = init_state(x, size, source)
    mt = metric[:, prefix:]
    m_tok = mt.shape[1]
    a, b = slice(offset, None, 2), slice(1 - offset, None, 2)
    kept = protect if isinstance(protect, torch.Tensor) else largest_norms(mt, protect) if protect else None
    if kept is not None:
        mm = match(mt[:, a], mt[:, b], r, allowed=~kept[:, None, b], a_valid=~kept[:, a])
    else:
        mm = match(mt[:, a], mt[:, b], r)
    pos = torch.arange(prefix, prefix + m_tok, device=x.device)
    slot_a, slot_b = slots(mm, len(pos[a]), len(pos[b]))
    slot = _interleave(slot_a, slot_b, m_tok) if offset == 0 else _interleave(slot_b, slot_a, m_tok)
    return _gather_merge(x, size, source, mm, pos[a], pos[b], prefix, slot)


def window_layout(m_tok: int, windows: int) -> tuple[int, int]:
    """Tokens per window and padding for ``m_tok`` tokens in ``windows`` equal windows."""
    per = math.ceil(m_tok / windows)
    return per, per * windows - m_tok


def window_order(pos: torch.Tensor, nh: int, nw: int, per: int) -> torch.Tensor:
    """Permutation that groups tokens into ``nh x nw`` windows of ``per`` tokens by location.

    Sort by row into ``nh`` bands of equal count, then each band by column into ``nw`` windows:
    on an untouched grid with ``w`` dividing it this gives exactly the w x w windows, and after
    merging it re-forms windows from the tracked locations with static shapes.
    """
    b, length, _ = pos.shape
    oy = pos[..., 0].argsort(dim=-1, stable=True)
    px = pos[..., 1].gather(1, oy).reshape(b, nh, nw * per)
    ox = px.argsort(dim=-1, stable=True)
    return oy.reshape(b, nh, nw * per).gather(2, ox).reshape(b, length)


def window_perm(source: torch.Tensor, n: int, prefix: int, grid: tuple[int, int],
                windows: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """The mergeable tokens listed window by window ([B, windows * per]; values >= n - prefix are
    padding), with ``per`` (tokens per window) and ``pad`` (pad slots, all in the last window)."""
    b = source.shape[0]
    nh, nw = windows
    per, pad = window_layout(n - prefix, nh * nw)
    pos = positions(source, grid, prefix, n)[:, prefix:]
    if pad:
        pos = torch.cat([pos, pos.new_full((b, pad, 2), float("inf"))], dim=1)
    return window_order(pos, nh, nw, per), per, pad


def _kept_after_padding(per: int, pad: int, r: int, windows: int) -> list[int]:
    """Output positions (window-major) that hold real tokens: pads sit last in A and in B."""
    ta, tb = (per + 1) // 2, per // 2
    pad_idx = range(per - pad, per)
    pad_a = sum(1 for j in pad_idx if j % 2 == 0)
    pad_b = pad - pad_a
    out_per = per - r
    last = list(range(ta - r - pad_a)) + list(range(ta - r, ta - r + tb - pad_b))
    kept = [w * out_per + j for w in range(windows - 1) for j in range(out_per)]
    return kept + [(windows - 1) * out_per + j for j in last]


def window_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                 source: Optional[torch.Tensor], *, r: int, prefix: int,
                 grid: tuple[int, int], windows: tuple[int, int]):
    """LGTM local merging: bipartite matching restricted to windows, ``r`` merges per window.

    Windows are folded into the batch dimension. When the tokens do not fill the windows evenly,
    size-0 pad tokens fill the last window; they never match and are dropped afterwards.
    """
    size, source = init_state(x, size, source)
    b, n, _ = x.shape
    nh, nw = windows
    nwin = nh * nw
    m_tok = n - prefix
    perm, per, pad = window_perm(source, n, prefix, grid, windows)
    feats, mt = _weighted(x, size, prefix), metric[:, prefix:]
    if pad:
        feats = torch.cat([feats, feats.new_zeros(b, pad, feats.shape[-1])], dim=1)
        mt = torch.cat([mt, mt.new_zeros(b, pad, mt.shape[-1])], dim=1)
    f = feats.gather(1, perm[..., None].expand(-1, -1, feats.shape[-1])).reshape(b * nwin, per, -1)
    mt = mt.gather(1, perm[..., None].expand(-1, -1, mt.shape[-1])).reshape(b * nwin, per, -1)
    allowed = a_valid = None
    if pad:
        valid = (perm < m_tok).reshape(b * nwin, per)
        a_valid, allowed = valid[:, ::2], valid[:, None, 1::2]
    mm = match(mt[:, ::2], mt[:, 1::2], r, allowed=allowed, a_valid=a_valid)
    merged = merge_sum(f[:, ::2], f[:, 1::2], mm).reshape(b, nwin * (per - r), -1)
    slot_a, slot_b = slots(mm, (per + 1) // 2, per // 2)
    offsets = torch.arange(nwin, device=x.device).repeat(b)[:, None] * (per - r)
    slot = (_interleave(slot_a, slot_b, per) + offsets).reshape(b, nwin * per)
    if pad:
        kept = _kept_after_padding(per, pad, r, nwin)
        remap = torch.full((nwin * (per - r),), -1, dtype=torch.long, device=x.device)
        remap[kept] = torch.arange(len(kept), device=x.device)
        merged = merged[:, kept]
        slot = remap[slot]
    slot = torch.empty_like(perm).scatter(1, perm, slot)[:, :m_tok]
    return _finish(x, size, prefix, merged, source, slot)


def checkerboard(grid: tuple[int, int]) -> tuple[list[int], list[int], torch.Tensor]:
    """A/B split of a grid into black/white squares and the 4-neighbour adjacency between them."""
    h, w = grid
    a_ids = [i for i in range(h * w) if (i // w + i % w) % 2 == 0]
    b_ids = [i for i in range(h * w) if (i // w + i % w) % 2 == 1]
    b_pos = {t: j for j, t in enumerate(b_ids)}
    adj = [[False] * len(b_ids) for _ in a_ids]
    for i, t in enumerate(a_ids):
        y, x = divmod(t, w)
        for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= yy < h and 0 <= xx < w:
                adj[i][b_pos[yy * w + xx]] = True
    # one tensor from Python data: in a compiled graph one constant, where a write per edge became a kernel of
    # hundreds of comparisons that took inductor longer to generate than the rest of the model
    return a_ids, b_ids, torch.tensor(adj, dtype=torch.bool).reshape(len(a_ids), len(b_ids))


SIMILARITIES = ("softmax", "cosine")  # ToMato's: the paper's (default in recipes), ToMe's key cosine


def similarity_metric(similarity: str) -> str:
    """Which tensor a ToMato similarity reads as its metric: ``"tokens"`` (the block's post-attention
    tokens, where the merge happens: the paper's softmax) or ``"keys"`` (ToMe's head-mean keys)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"ToMato similarity must be one of {SIMILARITIES}, got {similarity!r}")
    return "tokens" if similarity == "softmax" else "keys"


def softmax_similarity(metric: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """ToMato's similarity (Kwon et al., 2023, and its published code): the row-softmax of ``metric @
    metric^T`` over the mergeable tokens ``metric`` [B, M, D], directed (row: the token that looks).
    Returned as log-probabilities [B, len(rows), len(cols)] (same order, no underflow) for rows
    ``rows`` and columns ``cols``; the normaliser runs over all M tokens."""
    m = metric.detach().float()
    return (m[:, rows] @ m.transpose(-1, -2)).log_softmax(dim=-1)[:, :, cols]


def adjacent_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                   source: Optional[torch.Tensor], *, r: int, prefix: int, grid: tuple[int, int],
                   similarity: str = "cosine"):
    """ToMato with a static budget: merge ``r`` tokens, each into a 4-neighbour on the patch grid.

    The grid is split like a checkerboard, so every token's 4 neighbours lie in the other set and
    each merged group is a 4-connected star (a B token and up to four adjacent A tokens). Every A
    token proposes its most similar 4-neighbour and the ``r`` best proposals merge.
    ``similarity``: ``"softmax"``, the paper's: A token ``a``'s score for neighbour ``b`` is
    ``softmax_b(m_a . m_j over all mergeable j)`` with ``metric`` the block's post-attention tokens
    (see :func:`similarity_metric`); ``"cosine"``: cosine of the metric (the keys).
    Expects tokens still on the grid (the first merge of the model).
    """
    size, source = init_state(x, size, source)
    a_ids, b_ids, adj = checkerboard(grid)
    dev = x.device
    ia, ib = torch.tensor(a_ids, device=dev), torch.tensor(b_ids, device=dev)
    mt = metric[:, prefix:]
    if similarity_metric(similarity) == "tokens":
        mm = match_scores(softmax_similarity(mt, ia, ib), r, allowed=adj.to(dev))
    else:
        mm = match(mt[:, ia], mt[:, ib], r, allowed=adj.to(dev))
    slot_a, slot_b = slots(mm, len(a_ids), len(b_ids))
    order = torch.cat([ia, ib]).expand(x.shape[0], -1)
    slot = torch.empty_like(order).scatter(1, order, torch.cat([slot_a, slot_b], dim=1))
    return _gather_merge(x, size, source, mm, prefix + ia, prefix + ib, prefix, slot)


__all__ = ["Matching", "global_merge", "window_merge", "adjacent_merge", "window_order", "window_perm",
           "window_layout", "checkerboard", "SIMILARITIES", "similarity_metric", "softmax_similarity"]
