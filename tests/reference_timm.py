"""Eager reference families for timm ViTs whose layout ``reference._Timm`` does not cover.

``reference._family`` tries ``FAMILIES`` first. Each family runs one sample's tokens [N, C] through
a block with the attention written out; ``pos`` (original token index of each, possibly merged, token)
selects rows of the rotary table and pairs of the relative position bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.beit import Beit
from timm.models.cait import Cait
from timm.models.eva import Eva, EvaBlockPostNorm
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer_relpos import ResPostRelPosBlock, VisionTransformerRelPos


def _qkv(attn, y):
    """y [N, C] -> q [H, N, D], k, v [Hkv, N, D]: fused qkv (with or without separate q/k/v biases) or
    separate q/k/v projections."""
    n = y.shape[0]
    h = attn.num_heads
    if getattr(attn, "qkv", None) is None:
        hkv = getattr(attn, "num_kv_heads", h)
        return (attn.q_proj(y).reshape(n, h, -1).transpose(0, 1),
                attn.k_proj(y).reshape(n, hkv, -1).transpose(0, 1),
                attn.v_proj(y).reshape(n, hkv, -1).transpose(0, 1))
    if getattr(attn, "q_bias", None) is not None:  # BEiT / EVA: k has a zero bias
        qkv = F.linear(y, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    else:
        qkv = attn.qkv(y)
    qkv = qkv.reshape(n, 3, h, -1).permute(1, 2, 0, 3)
    return qkv[0], qkv[1], qkv[2]


def _softmax_attend(q, k, v, scale, size, bias=None):
    """q, k, v [H, N, D] -> [N, H*D]; ``bias`` [H, N, N] and log(size) of the key are added to the logits."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    if size is not None:
        logits = logits + torch.tensor(size, dtype=q.dtype).log()[None, None, :]
    out = logits.softmax(-1) @ v
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def _attention(attn, y, size, pos, npt=0, rope=None, bias=None):
    """timm Attention / AttentionRope / EvaAttention / BEiT / RelPos attention on y [N, C].
    ``rope``: the full rotary table (token axis -2, patches only); ``bias``: the full [H, N0, N0] bias."""
    gate = attn.gate(y).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _qkv(attn, y)
    if hasattr(attn, "q_norm"):  # BEiT's attention has no q/k norm
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        # prefix tokens are not rotated; a patch token reads the row of the patch it sits at
        rows = rope[..., [p - npt for p in pos[npt:]], :]
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :npt], apply_rot_embed_cat(q[:, npt:], rows, half=half)], 1)
        k = torch.cat([k[:, :npt], apply_rot_embed_cat(k[:, npt:], rows, half=half)], 1)
    groups = q.shape[0] // k.shape[0]
    if groups > 1:  # grouped-query attention: kv head h // groups serves query head h
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    if bias is not None:
        bias = bias[:, pos][:, :, pos]
    out = _softmax_attend(q, k, v, attn.scale, size, bias)
    if hasattr(attn, "norm"):  # sub-LN (Identity when off); absent in BEiT / RelPos attention
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj(out), k


def _scale(gamma, t):
    return t if gamma is None else gamma * t


class _Eva:
    """timm Eva: EVA / EVA-02 (rotary on patches, SwiGLU, sub-LN), ROPE-ViT (axial and mixed), SBB rope ViTs."""

    @staticmethod
    def accepts(model):
        return isinstance(model, Eva)

    def __init__(self, m):
        self.m, self.blocks = m, list(m.blocks)
        self.rope = None

    def embed(self, images):
        m = self.m
        x, self.rope = m._pos_embed(m.patch_embed(images))
        return m.norm_pre(x)

    def _rope(self, blk):
        if self.rope is None or not self.m.rope_mixed:
            return self.rope
        return self.rope[self.blocks.index(blk)]  # mixed: a [heads, N, 2D] table per depth

    def attention_residual(self, blk, x, size, pos):
        post = isinstance(blk, EvaBlockPostNorm)
        out, k = _attention(blk.attn, x if post else blk.norm1(x), size, pos, self.m.num_prefix_tokens,
                            rope=self._rope(blk))
        return x + (blk.norm1(out) if post else _scale(blk.gamma_1, out)), k

    def mlp_residual(self, blk, x):
        if isinstance(blk, EvaBlockPostNorm):
            return x + blk.norm2(blk.mlp(x))
        return x + _scale(blk.gamma_2, blk.mlp(blk.norm2(x)))

    def finish(self, x, features):
        x = self.m.norm(x)
        return x if features else self.m.forward_head(x)


class _Beit:
    """timm Beit: per-block (and/or shared) relative position bias with a cls row/column, gamma layer-scale."""

    @staticmethod
    def accepts(model):
        return isinstance(model, Beit)

    def __init__(self, m):
        self.m, self.blocks = m, list(m.blocks)

    def embed(self, images):
        m = self.m
        x = m.patch_embed(images)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x if m.pos_embed is None else x + m.pos_embed

    def _bias(self, attn):
        bias = None
        if attn.relative_position_bias_table is not None:
            bias = attn._get_rel_pos_bias()[0]
        if self.m.rel_pos_bias is not None:
            shared = self.m.rel_pos_bias()
            bias = shared if bias is None else bias + shared
        return bias

    def attention_residual(self, blk, x, size, pos):
        out, k = _attention(blk.attn, blk.norm1(x), size, pos, bias=self._bias(blk.attn))
        return x + _scale(blk.gamma_1, out), k

    def mlp_residual(self, blk, x):
        return x + _scale(blk.gamma_2, blk.mlp(blk.norm2(x)))

    def finish(self, x, features):
        x = self.m.norm(x)
        return x if features else self.m.forward_head(x)


class _RelPos:
    """timm VisionTransformerRelPos: per-block or shared rel-pos (table or log-coord MLP, zero rows for the
    cls token); pre-norm RelPosBlock or post-norm ResPostRelPosBlock."""

    @staticmethod
    def accepts(model):
        return isinstance(model, VisionTransformerRelPos)

    def __init__(self, m):
        self.m, self.blocks = m, list(m.blocks)

    def embed(self, images):
        m = self.m
        x = m.patch_embed(images)
        if m.cls_token is not None:
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x

    def attention_residual(self, blk, x, size, pos):
        attn = blk.attn
        # RelPosAttention uses its own rel_pos when it has one, else the model's shared one
        rel = attn.rel_pos if attn.rel_pos is not None else self.m.shared_rel_pos
        bias = rel.get_bias()[0] if rel is not None else None
        if isinstance(blk, ResPostRelPosBlock):
            out, k = _attention(attn, x, size, pos, bias=bias)
            return x + blk.norm1(out), k
        out, k = _attention(attn, blk.norm1(x), size, pos, bias=bias)
        return x + blk.ls1(out), k

    def mlp_residual(self, blk, x):
        if isinstance(blk, ResPostRelPosBlock):
            return x + blk.norm2(blk.mlp(x))
        return x + blk.ls2(blk.mlp(blk.norm2(x)))

    def finish(self, x, features):
        x = self.m.norm(x)
        return x if features else self.m.forward_head(x)


class _Cait:
    """timm Cait: talking-heads self-attention over the patches only (no prefix token, no position
    table), then class-attention blocks where the class token attends over [cls, patches]."""

    @staticmethod
    def accepts(model):
        return isinstance(model, Cait)

    def __init__(self, m):
        self.m, self.blocks = m, list(m.blocks)

    def embed(self, images):
        return self.m.patch_embed(images) + self.m.pos_embed

    def attention_residual(self, blk, x, size, pos):
        attn = blk.attn
        q, k, v = _qkv(attn, blk.norm1(x))
        logits = (q * attn.scale) @ k.transpose(-2, -1)                      # [H, N, N]
        logits = attn.proj_l(logits.permute(1, 2, 0)).permute(2, 0, 1)       # mix heads before softmax
        if size is not None:
            logits = logits + torch.tensor(size, dtype=q.dtype).log()[None, None, :]
        # proj_w mixes heads after the softmax; its bias meets a merged token once, not size times
        w = attn.proj_w(logits.softmax(-1).permute(1, 2, 0)).permute(2, 0, 1)
        out = (w @ v).transpose(0, 1).reshape(x.shape[0], -1)
        return x + blk.gamma_1 * attn.proj(out), k

    def mlp_residual(self, blk, x):
        return x + blk.gamma_2 * blk.mlp(blk.norm2(x))

    def finish(self, x, features):
        m = self.m
        cls = m.cls_token.expand(x.shape[0], -1, -1)
        for blk in m.blocks_token_only:
            a = blk.attn
            b, n, c = x.shape
            h = a.num_heads
            u = blk.norm1(torch.cat((cls, x), dim=1))
            q = a.q(u[:, :1]).reshape(b, 1, h, -1).transpose(1, 2)
            k = a.k(u).reshape(b, n + 1, h, -1).transpose(1, 2)
            v = a.v(u).reshape(b, n + 1, h, -1).transpose(1, 2)
            o = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
            cls = cls + blk.gamma_1 * a.proj(o.transpose(1, 2).reshape(b, 1, c))
            cls = cls + blk.gamma_2 * blk.mlp(blk.norm2(cls))
        x = m.norm(torch.cat((cls, x), dim=1))
        return x if features else m.forward_head(x)


class _NaFlex:
    """timm NaFlexVit fed plain NCHW images: ``embeds`` module (patches, pos embed, cls/reg tokens), no
    ``patch_embed`` attribute; blocks are timm vision_transformer Blocks, or EvaBlocks when rotary is on."""

    @staticmethod
    def accepts(model):
        return isinstance(model, NaFlexVit)

    def __init__(self, m):
        self.m, self.blocks = m, list(m.blocks)
        self.rope = None

    def embed(self, images):
        m = self.m
        x, grid = m.embeds(images)
        if m.rope is not None:
            self.rope = m.rope.get_embed(shape=grid)
        return m.norm_pre(x)

    def attention_residual(self, blk, x, size, pos):
        rope = self.rope[self.blocks.index(blk)] if self.rope is not None and self.m.rope_is_mixed else self.rope
        out, k = _attention(blk.attn, blk.norm1(x), size, pos, self.m.num_prefix_tokens, rope=rope)
        return x + (_scale(blk.gamma_1, out) if hasattr(blk, "gamma_1") else blk.ls1(out)), k

    def mlp_residual(self, blk, x):
        y = blk.mlp(blk.norm2(x))
        return x + (_scale(blk.gamma_2, y) if hasattr(blk, "gamma_2") else blk.ls2(y))

    def finish(self, x, features):
        x = self.m.norm(x)
        return x if features else self.m.forward_head(x)


FAMILIES = [_Eva, _Beit, _RelPos, _Cait, _NaFlex]
