"""Soft many-to-many merging (after Token Transforming, Zeng et al., 2025, arXiv 2506.05709): token
reduction as one transformation matrix ``W`` [kept, tokens], ``x' = W x``, in which a merged token need
not go to one destination but is shared among its ``k`` most similar kept tokens.

Per block, as ToMe: ``r`` tokens leave, the ``r`` A tokens whose best B partner is the most similar
(bipartite soft matching), so the schedule and MACs are ToMe's. Unlike ToMe, each leaving token ``s``
joins its ``k`` most similar kept tokens ``j`` (unmerged A tokens as well as B) with weights
``w_sj = softmax_j(cos(s, j) / tau)`` over those ``k``, and every kept token becomes the size-weighted
mean of itself and the shares it receives::

    x'_j = (size_j x_j + sum_s size_s w_sj x_s) / size'_j,   size'_j = size_j + sum_s size_s w_sj

Rows of ``W`` are convex, so sizes (fractional when ``k > 1``) still sum to the token count and
proportional attention reads them as before. ``k = 1`` is a hard merge into the most similar kept
token. Similarity is the cosine of the block's post-attention tokens (``compare = "tokens"``, the
tensor that is averaged) or of ToMe's head-mean keys (``"keys"``). ``W``'s ``k`` nonzeros per leaving
token are applied as a gather and a scatter-add over ``r * k`` rows: cheaper than the dense matmul, with
the same static shape; ``k = 1`` runs as the fused merge kernel's ``nearest`` mode.
The source map (unmerge, positions) follows each leaving token's largest share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import check_choice, finite_number
from ..merge.bipartite import match, normalize
from ..merge.fused import fused_nearest_merge
from ..merge.ops import _interleave, largest_norms
from ..merge.tokens import init_state, update_source
from .base import MergeOp, register_method, register_op
from .tome import ToMe, ToMeConfig, global_step, partition_offset, protect_count


def soft_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor], source: Optional[torch.Tensor],
               *, r: int, prefix: int, k: int = 1, tau: float = 0.01, compare: str = "tokens", offset: int = 0,
               protect: int = 0):
    """Soft many-to-many merge of ``r`` tokens: ToMe's choice of who leaves, each leaving token's size
    shared among its ``k`` most similar kept tokens (softmax of cosine / ``tau``). Returns the prefix, the
    unmerged A tokens and the B tokens, in that order (ToMe's). ``compare``: ``"tokens"`` compares
    ``x`` itself, ``"keys"`` compares ``metric``. ``offset``/``protect``: as ToMe's."""
    size, source = init_state(x, size, source)
    bsz, n, c = x.shape
    m_tok = n - prefix
    feats = (x if compare == "tokens" else metric)[:, prefix:]
    a, b = slice(offset, None, 2), slice(1 - offset, None, 2)
    free = None
    if protect:  # by key norm whatever the similarity, as ToMe's protection
        free = ~largest_norms(metric[:, prefix:], protect)
        mm = match(feats[:, a], feats[:, b], r, allowed=free[:, None, b], a_valid=free[:, a])
    else:
        mm = match(feats[:, a], feats[:, b], r)
    pos = torch.arange(m_tok, device=x.device)
    a_pos, b_pos = pos[a].expand(bsz, -1), pos[b].expand(bsz, -1)
    kept = torch.cat([a_pos.gather(1, mm.unm_idx), b_pos], dim=1)           # [B, K] kept tokens, output order
    src = a_pos.gather(1, mm.src_idx)                                        # [B, r] leaving tokens

    def rows(t, idx):
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    unit = normalize(feats.detach())
    sim = rows(unit, src) @ rows(unit, kept).transpose(-1, -2)               # [B, r, K]
    if free is not None:  # protected tokens absorb nothing
        sim = sim.masked_fill(~free.gather(1, kept)[:, None, :], float("-inf"))
    top, dest = sim.float().topk(k, dim=-1)                                  # [B, r, k]; dest indexes ``kept``
    xm, sm = x[:, prefix:], size[:, prefix:]
    share = (top / tau).softmax(dim=-1).to(x.dtype) * rows(sm, src)         # size_s * w_sj
    # numerator and denominator of the size-weighted means, scattered together as [x * size, size]
    s_kept = rows(sm, kept)
    num = torch.cat([rows(xm, kept) * s_kept, s_kept], dim=-1)
    add = torch.cat([share[..., None] * rows(xm, src)[:, :, None], share[..., None]], dim=-1)
    num = num.scatter_add(1, dest.reshape(bsz, r * k, 1).expand(-1, -1, c + 1), add.reshape(bsz, r * k, c + 1))
    x_out = torch.cat([x[:, :prefix], num[..., :c] / num[..., c:]], dim=1)
    s_out = torch.cat([size[:, :prefix], num[..., c:]], dim=1)
    keep_n = mm.unm_idx.shape[1]
    ar = torch.arange(max(a_pos.shape[1], b_pos.shape[1]), device=x.device).expand(bsz, -1)
    slot_a = torch.empty_like(a_pos).scatter(1, mm.unm_idx, ar[:, :keep_n]).scatter(1, mm.src_idx, dest[..., 0])
    slot_b = keep_n + ar[:, :b_pos.shape[1]]
    slot = _interleave(slot_a, slot_b, m_tok) if offset == 0 else _interleave(slot_b, slot_a, m_tok)
    return x_out, s_out, update_source(source, slot, prefix)


def fused_soft_merge(x, metric, size, source, *, r: int, prefix: int, k: int = 1, tau: float = 0.01,
                     compare: str = "tokens", offset: int = 0, protect: int = 0, screen: bool = False):
    """:func:`soft_merge` with the fused kernel where it has one (``k = 1``: a hard merge into the nearest kept
    token, where ``tau`` plays no part; ``screen`` as there), else the reference ops."""
    if k == 1:
        guard = largest_norms(metric[:, prefix:], protect) if protect else None  # as soft_merge's protection
        return fused_nearest_merge(x, x if compare == "tokens" else metric, size, source, r=r, prefix=prefix,
                                   offset=offset, protect=guard, screen=screen)
    return soft_merge(x, metric, size, source, r=r, prefix=prefix, k=k, tau=tau, compare=compare, offset=offset,
                      protect=protect)


# the fused kernel compares the tokens themselves under compare = "tokens"
register_op(MergeOp("soft", soft_merge, fused_soft_merge, lambda kw: 0 if kw.get("compare", "tokens") == "tokens" else 1))

COMPARE = ("tokens", "keys")  # not "similarity": that plan arg is ToMato's (insert_merges reads it)
PROTECT_BY = ("keys", "class_attention")


@dataclass(frozen=True)
class SoftConfig(ToMeConfig):
    """ToMe's fields, and how widely a leaving token is shared."""

    k: int = 1                  # kept tokens each leaving token is shared among (1: a hard merge into the nearest)
    tau: float = 0.01           # softmax temperature on the cosine similarity (small: the nearest takes most)
    compare: str = "tokens"     # what the cosine compares: "tokens" (post-attention, what is averaged) | "keys"
    protect_by: str = "keys"    # which tokens `protect` keeps: the largest key norms | the class token's most attended
                                # (its attention in the block, mean over heads; needs compare = "tokens")
    protect_from: int = 0       # the first block that protects (earlier merging blocks protect none)

    def validate(self) -> None:
        super().validate()
        check_choice("protect_by", self.protect_by, PROTECT_BY)
        if self.protect_by == "class_attention" and self.compare != "tokens":
            raise ValueError("recipe field 'protect_by' is 'class_attention', which needs compare = 'tokens' (the "
                             f"metric argument then carries the class attention), got compare = {self.compare!r}")
        if isinstance(self.protect_from, bool) or not isinstance(self.protect_from, int) or self.protect_from < 0:
            raise ValueError(f"recipe field 'protect_from' must be an integer >= 0, got {self.protect_from!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"recipe field 'k' must be an integer >= 1, got {self.k!r}")
        if not finite_number(self.tau) or self.tau <= 0:
            raise ValueError(f"recipe field 'tau' must be a number > 0, got {self.tau!r}")
        check_choice("compare", self.compare, COMPARE)


class Soft(ToMe):
    """ToMe's schedule (``r``, ``skip``, ``protect``, ``r = "auto"``), every merge soft."""

    name = "soft"
    config = SoftConfig
    fields = ("r", "skip", "partition", "protect", "k", "tau", "compare", "protect_by", "protect_from")
    auto_rank = None
    kernel_op = "soft"

    def decide(self, cfg, block, tokens, match, state):
        protect = protect_count(cfg.protect, match) if block.index >= cfg.protect_from else 0
        m = global_step(block, tokens, match.prefix, cfg.r, cfg.skip, partition_offset(cfg, match), protect)
        if m is None:
            return None
        if m.args.get("protect") and cfg.protect_by == "class_attention":
            m.args["protect_by"] = "class_attention"  # insert_merges hands the merge the class attention as metric
        # a leaving token can be shared among at most the kept tokens free to absorb it
        free = tokens - match.prefix - m.r - m.args.get("protect", 0)
        m.op, m.label = "soft", "soft"
        m.args.update(k=max(1, min(cfg.k, free)), tau=float(cfg.tau), compare=cfg.compare)
        return m

    def candidate(self, r):
        return self.config(method=self.name, r=r, skip=0)


register_method(Soft())
