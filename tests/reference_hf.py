"""Plainly written eager references for Hugging Face transformers (5.x) vision models.

``reference._family`` tries ``FAMILIES`` first. Each family writes attention out by hand from the
layer's Linear / LayerNorm / MLP sub-modules; ``x`` is one sample's tokens [N, C], ``size`` the token
sizes (proportional attention) or None, ``pos`` the original index each token sits at.
"""
from __future__ import annotations

import torch

from reference import _attend


def _is(model, *names):
    """isinstance against transformers classes, importing transformers only for its own models."""
    if not type(model).__module__.startswith("transformers."):
        return False
    import transformers
    return isinstance(model, tuple(getattr(transformers, n) for n in names))


def _heads(t, h):
    """[N, H*D] -> [H, N, D]"""
    return t.reshape(t.shape[0], h, -1).transpose(0, 1)


def _qkv(a, y, h):
    return (_heads(a.q_proj(y), h), _heads(a.k_proj(y), h), _heads(a.v_proj(y), h))


class _Family:
    def hidden_states(self, maps):
        # every model here records the input of layer 0, then each layer's output, without the final norm
        return maps


class ViTLike(_Family):
    """ViTModel / DeiTModel: layers[i].attention.{q,k,v,o}_proj, pooler = act(dense(CLS after layernorm))."""

    @staticmethod
    def accepts(model):
        return _is(model, "ViTModel", "DeiTModel")

    def __init__(self, m):
        self.m, self.blocks, self.h = m, list(m.layers), m.config.num_attention_heads

    def embed(self, images):
        return self.m.embeddings(images)

    def attention_residual(self, blk, x, size, pos):
        a = blk.attention
        q, k, v = _qkv(a, blk.layernorm_before(x), self.h)
        return x + a.o_proj(_attend(q, k, v, size)), k

    def mlp_residual(self, blk, x):
        return x + blk.mlp(blk.layernorm_after(x))

    def finish(self, full, features):
        return self.m.layernorm(full)

    def pooled(self, full):
        p = self.m.pooler
        return None if p is None else p.activation(p.dense(self.m.layernorm(full)[:, 0]))


class Dinov2(_Family):
    """Dinov2Model / Dinov2WithRegistersModel (registers sit after CLS): layer scale on both residuals."""

    @staticmethod
    def accepts(model):
        return _is(model, "Dinov2Model", "Dinov2WithRegistersModel")

    def __init__(self, m):
        self.m, self.blocks, self.h = m, list(m.encoder.layer), m.config.num_attention_heads

    def embed(self, images):
        return self.m.embeddings(images)

    def attention_residual(self, blk, x, size, pos):
        a = blk.attention
        q, k, v = _qkv(a, blk.norm1(x), self.h)
        return x + a.o_proj(_attend(q, k, v, size)) * blk.layer_scale1.lambda1, k

    def mlp_residual(self, blk, x):
        return x + blk.mlp(blk.norm2(x)) * blk.layer_scale2.lambda1

    def finish(self, full, features):
        return self.m.layernorm(full)

    def pooled(self, full):
        return self.m.layernorm(full)[:, 0]


class CLIPVision(_Family):
    """CLIPVisionModel: pre_layrnorm before layer 0; last_hidden_state is *not* normed, the pooled
    output is post_layernorm of token 0."""

    @staticmethod
    def accepts(model):
        return _is(model, "CLIPVisionModel")

    def __init__(self, m):
        self.m, self.blocks, self.h = m, list(m.encoder.layers), m.config.num_attention_heads

    def embed(self, images):
        return self.m.pre_layrnorm(self.m.embeddings(images))

    def attention_residual(self, blk, x, size, pos):
        a = blk.self_attn
        q, k, v = _qkv(a, blk.layer_norm1(x), self.h)
        return x + a.out_proj(_attend(q, k, v, size)), k

    def mlp_residual(self, blk, x):
        return x + blk.mlp(blk.layer_norm2(x))

    def finish(self, full, features):
        return full

    def pooled(self, full):
        return self.m.post_layernorm(full[:, 0])


class SiglipVision(CLIPVision):
    """SiglipVisionModel: no class token; last_hidden_state is post_layernorm(x); the pooled output is
    the attention-pool head (a learned probe attending over all tokens), or None without a head."""

    @staticmethod
    def accepts(model):
        return _is(model, "SiglipVisionModel")

    def embed(self, images):
        return self.m.embeddings(images)

    def finish(self, full, features):
        return self.m.post_layernorm(full)

    def pooled(self, full):
        if not self.m.use_head:
            return None
        head = self.m.head
        mha = head.attention  # torch.nn.MultiheadAttention, batch_first, packed in_proj
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        probe = head.probe[0]  # [1, C]
        out = []
        for y in self.finish(full, True):
            q = _heads(probe @ wq.T + bq, mha.num_heads)
            k, v = _heads(y @ wk.T + bk, mha.num_heads), _heads(y @ wv.T + bv, mha.num_heads)
            z = mha.out_proj(_attend(q, k, v, None))
            z = z + head.mlp(head.layernorm(z))
            out.append(z[0])
        return torch.stack(out)


def _beit_index(grid):
    """[N0, N0] index into a BEiT relative position table over [CLS] + grid patches: patch pairs by
    (dy, dx); the table's last three rows are CLS->token, token->CLS, CLS->CLS."""
    gh, gw = grid
    span = (2 * gh - 1) * (2 * gw - 1)
    n = gh * gw + 1
    idx = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            if i == 0:
                idx[i, j] = span + 2 if j == 0 else span
            elif j == 0:
                idx[i, j] = span + 1
            else:
                (yi, xi), (yj, xj) = divmod(i - 1, gw), divmod(j - 1, gw)
                idx[i, j] = (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
    return idx


class Beit(_Family):
    """BeitModel: relative position bias (per layer and/or shared) read at the tokens' original
    positions, lambda layer scale, k_proj without bias; pooled = layernorm(mean of patch tokens) or CLS."""

    @staticmethod
    def accepts(model):
        return _is(model, "BeitModel")

    def __init__(self, m):
        self.m, self.blocks, self.h = m, list(m.layers), m.config.num_attention_heads
        c = m.config
        self.idx = _beit_index((c.image_size // c.patch_size,) * 2)  # BEiT's config image_size is an int

    def _bias(self, rpb):
        return rpb.relative_position_bias_table[self.idx].permute(2, 0, 1)  # [H, N0, N0]

    def embed(self, images):
        return self.m.embeddings(images)

    def attention_residual(self, blk, x, size, pos):
        a = blk.attention
        q, k, v = _qkv(a, blk.layernorm_before(x), self.h)
        # the model adds the shared table (if any), then the layer's own (if any); query i and key j
        # read the entry of the original tokens pos[i], pos[j]
        bias = 0
        for rpb in (self.m.shared_position_bias, blk.relative_position_bias):
            if rpb is not None:
                bias = bias + self._bias(rpb)[:, pos][:, :, pos]
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
        if size is not None:
            logits = logits + torch.tensor(size, dtype=q.dtype).log()[None, None, :]
        out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(x.shape[0], -1)
        return x + blk.lambda_1 * a.o_proj(out), k

    def mlp_residual(self, blk, x):
        return x + blk.lambda_2 * blk.mlp(blk.layernorm_after(x))

    def finish(self, full, features):
        return self.m.layernorm(full)  # Identity when the model uses mean pooling

    def pooled(self, full):
        p = self.m.pooler
        if p is None:
            return None
        y = self.finish(full, True)
        return y[:, 0] if p.layernorm is None else p.layernorm(y[:, 1:].mean(1))


FAMILIES = [ViTLike, Dinov2, CLIPVision, SiglipVision, Beit]
