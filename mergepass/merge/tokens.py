"""Token state carried through a merged model: sizes, source maps, and what follows from them.

* ``size``   [B, N, 1]  how many original tokens each current token stands for
* ``source`` [B, N0]    for every original token, the index of the current token that holds it
"""
from __future__ import annotations

from typing import Optional

import torch


def init_state(x: torch.Tensor, size: Optional[torch.Tensor], source: Optional[torch.Tensor]):
    b, n, _ = x.shape
    if size is None:
        size = x.new_ones(b, n, 1)
    if source is None:
        source = torch.arange(n, device=x.device).expand(b, n)
    return size, source


def update_source(source: torch.Tensor, slot: torch.Tensor, prefix: int) -> torch.Tensor:
    """Compose the source map with ``slot`` ([B, M] new position of each mergeable token)."""
    b = slot.shape[0]
    head = torch.arange(prefix, device=slot.device).expand(b, prefix)
    return torch.cat([head, slot + prefix], dim=1).gather(1, source)


def attn_bias(size: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Proportional attention: log(size) as an additive bias over keys, shaped to broadcast
    against attention logits / queries ``like`` ([B, H, N, .] or heads folded into batch [B*H, N, .])."""
    b, n = size.shape[0], size.shape[1]
    bias = size.log().to(like.dtype).reshape(b, 1, 1, n)
    if like.dim() == 3:
        heads = like.shape[0] // b
        bias = bias.expand(b, heads, 1, n).reshape(b * heads, 1, n)
    return bias


def key_metric(keys: torch.Tensor, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """ToMe's similarity metric: attention keys averaged over heads, [B, N, D]. ``x`` is the block's
    token stream [B, N, C]; its batch size separates the batch from heads folded into it."""
    if transposed:
        keys = keys.transpose(-2, -1)
    n, d = keys.shape[-2:]
    return keys.reshape(x.shape[0], -1, n, d).mean(1)


def class_logits(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 scale: Optional[float] = None) -> torch.Tensor:
    """The class token's attention logits over every token, [.., 1, N], as SDPA forms them from ``q`` and ``k``
    ([.., N, D]), its ``mask`` (additive, or boolean: True attends) and ``scale`` (None: 1/sqrt(D))."""
    logits = (q[..., :1, :] @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is None:
        return logits
    row = mask[..., :1, :]
    return logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row


def class_attention(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """How much the class token (token 0) attends to each token, mean over heads, [B, N, 1], from attention logits
    [B, H, R, N] or with heads folded into the batch [B*H, R, N] (its row 0 is read). A protection score: its norm
    orders the tokens as the class token reads them. ``x``: the block's tokens [B, N, C], for the batch size."""
    p = logits[..., 0, :].float().softmax(-1)
    return p.reshape(x.shape[0], -1, p.shape[-1]).mean(1)[..., None]


def unmerge(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Give every original token the value of the token that holds it (restores N0 tokens)."""
    return x.gather(1, source[..., None].expand(-1, -1, x.shape[-1]))


def positions(source: torch.Tensor, grid: tuple[int, int], prefix: int, n: int) -> torch.Tensor:
    """Size-weighted mean (row, col) on the patch grid of each of the ``n`` current tokens, [B, n, 2].

    Protected (prefix) tokens get position 0; callers ignore them.
    """
    h, w = grid
    b = source.shape[0]
    idx = torch.arange(h * w, device=source.device)
    rc = torch.stack([idx // w, idx % w], dim=-1).to(torch.float32)  # [HW, 2]
    rc = torch.cat([rc.new_zeros(prefix, 2), rc], dim=0).expand(b, -1, -1)
    ones = torch.ones_like(rc[..., :1])
    tot = rc.new_zeros(b, n, 3).scatter_add(1, source[..., None].expand(-1, -1, 3), torch.cat([rc, ones], -1))
    return tot[..., :2] / tot[..., 2:].clamp_min(1.0)


def representatives(source: torch.Tensor, n: int) -> torch.Tensor:
    """The first original token each of the ``n`` current tokens holds, [B, n]: the position at
    which a merged token reads rotary and relative-position tables."""
    b, n0 = source.shape
    idx = torch.arange(n0, device=source.device).expand(b, n0)
    return idx.new_full((b, n), n0).scatter_reduce(1, source, idx, "amin")


def gather_positions(table: torch.Tensor, source: torch.Tensor, dims: tuple[int, ...], offset: int, n: int,
                     ndim: int) -> torch.Tensor:
    """Rows of a per-position ``table`` (rotary sin/cos, relative-position bias) for the current tokens.

    ``table`` broadcasts against an ``ndim``-D batch-first tensor whose axes ``dims`` index original
    tokens ``offset``, ``offset + 1``, ...; the result has a batch axis and ``n - offset`` entries on
    each of ``dims``, read at each current token's representative position."""
    pos = representatives(source, n)[:, offset:] - offset
    b, m = pos.shape
    t = table.reshape((1,) * (ndim - table.dim()) + tuple(table.shape))
    if t.shape[0] not in (1, b):
        raise ValueError(f"gather_positions: table {tuple(table.shape)} has a batch axis of {t.shape[0]}, not {b}")
    t = t.expand(b, *t.shape[1:])
    for d in dims:
        view = [b] + [1] * (ndim - 1)
        view[d] = m
        size = list(t.shape)
        size[d] = m
        t = t.gather(d, pos.reshape(view).expand(size))
    return t
