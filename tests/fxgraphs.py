"""Small FX graphs built by hand, node by node, in the form dynamo hands a backend (torch-level
``call_function``/``call_method`` nodes, parameters as ``L_self_*`` placeholders, token counts as
Python int literals, an ``example_value`` on every node). Graph-pass tests run on these without
compiling anything."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx


class GraphBuilder:
    """Adds nodes to a graph and evaluates each on real tensors as it goes (dynamo records fake
    tensors in ``example_value``; the passes read only shapes and dtypes from it)."""

    def __init__(self, seed: int = 0):
        self.graph = fx.Graph()
        self.inputs: list = []
        self.env: dict = {}
        self.gen = torch.Generator().manual_seed(seed)

    def _set(self, node: fx.Node, value):
        self.env[node] = value
        node.meta["example_value"] = value
        return node

    def _val(self, a):
        return fx.node.map_arg(a, lambda n: self.env[n])

    def input(self, name: str, value) -> fx.Node:
        self.inputs.append(value)
        return self._set(self.graph.placeholder(name), value)

    def param(self, name: str, *shape: int, scale: float = 0.2) -> fx.Node:
        return self.input(f"L_self_{name}_", torch.nn.Parameter(torch.randn(*shape, generator=self.gen) * scale))

    def fn(self, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        return self._set(node, target(*self._val(args), **self._val(kwargs)))

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        node = self.graph.call_method(name, args, kwargs)
        this, *rest = self._val(args)
        return self._set(node, getattr(this, name)(*rest, **self._val(kwargs)))

    def output(self, node: fx.Node) -> fx.GraphModule:
        self.graph.output(node)
        gm = fx.GraphModule(torch.nn.Module(), self.graph)
        return gm

    def run(self, gm: fx.GraphModule, *overrides):
        """Run ``gm`` on the example inputs (``overrides`` replace the leading user inputs)."""
        args = list(self.inputs)
        args[:len(overrides)] = overrides
        with torch.no_grad():
            return gm(*args)


def vit_graph(depth: int = 2, batch: int = 2, grid: int = 4, prefix: int = 1, dim: int = 16, heads: int = 2,
              attention: str = "sdpa", patch: int = 4, mlp_extra=None, post_norm: bool = False,
              rel_bias: bool = False, pool: str = "token"):
    """A pre-norm ViT: conv patch embed → [cls] + patches + pos → blocks → norm → head on the first token.

    ``attention``: "sdpa" (timm's fused path) or "softmax" (q@kᵀ*scale → softmax → @v).
    ``mlp_extra(b, h)``: a hook that may add nodes to the MLP input of block 1 (returns the new input).
    ``post_norm``: norm after the residual adds (BERT style), which has no pre-norm residual chain.
    ``rel_bias``: a learned [1, heads, N, N] relative-position bias added to the logits (BEiT style;
    softmax attention only).
    ``pool``: what the head reads of the last tokens: "token" (``x[:, 0]``), "avg" (the mean over tokens) or
    "patch" (``x[:, prefix]``, the first patch token).
    Returns (builder, graph module)."""
    g = GraphBuilder()
    n = prefix + grid * grid
    d = dim // heads
    img = g.input("L_x_", torch.randn(batch, 3, grid * patch, grid * patch, generator=g.gen))
    w, bias = g.param("patch_embed_proj_weight", dim, 3, patch, patch), g.param("patch_embed_proj_bias", dim)
    x = g.fn(torch.conv2d, img, w, bias, (patch, patch), (0, 0), (1, 1), 1)
    x = g.method("flatten", x, 2)
    x = g.method("transpose", x, 1, 2)
    if prefix:
        cls = g.param("cls_token", 1, prefix, dim)
        x = g.fn(torch.cat, [g.method("expand", cls, batch, -1, -1), x], dim=1)
    x = g.fn(operator.add, x, g.param("pos_embed", 1, n, dim))
    for i in range(depth):
        p = f"blocks_{i}_"
        h = x if post_norm else g.fn(F.layer_norm, x, (dim,), g.param(p + "norm1_weight", dim, scale=1.0),
                                     g.param(p + "norm1_bias", dim), 1e-6)
        qkv = g.fn(torch._C._nn.linear, h, g.param(p + "attn_qkv_weight", 3 * dim, dim),
                   g.param(p + "attn_qkv_bias", 3 * dim))
        qkv = g.method("permute", g.method("reshape", qkv, batch, n, 3, heads, d), 2, 0, 3, 1, 4)
        parts = g.method("unbind", qkv, 0)
        q, k, v = (g.fn(operator.getitem, parts, j) for j in range(3))
        if attention == "sdpa":
            a = g.fn(torch._C._nn.scaled_dot_product_attention, q, k, v)
        else:
            logits = g.fn(operator.mul, g.fn(operator.matmul, q, g.method("transpose", k, -2, -1)), d ** -0.5)
            if rel_bias:
                logits = g.fn(operator.add, logits, g.param(p + "attn_rel_pos_bias", 1, heads, n, n))
            a = g.fn(operator.matmul, g.method("softmax", logits, dim=-1), v)
        a = g.method("reshape", g.method("transpose", a, 1, 2), batch, n, dim)
        a = g.fn(torch._C._nn.linear, a, g.param(p + "attn_proj_weight", dim, dim), g.param(p + "attn_proj_bias", dim))
        x = g.fn(operator.add, x, a)
        if post_norm:
            x = g.fn(F.layer_norm, x, (dim,), None, None, 1e-6)
        h = x if post_norm else g.fn(F.layer_norm, x, (dim,), g.param(p + "norm2_weight", dim, scale=1.0),
                                     g.param(p + "norm2_bias", dim), 1e-6)
        if mlp_extra is not None and i == 1:
            h = mlp_extra(g, h)
        h = g.fn(torch._C._nn.linear, h, g.param(p + "mlp_fc1_weight", 2 * dim, dim), g.param(p + "mlp_fc1_bias", 2 * dim))
        h = g.fn(F.gelu, h)
        h = g.fn(torch._C._nn.linear, h, g.param(p + "mlp_fc2_weight", dim, 2 * dim), g.param(p + "mlp_fc2_bias", dim))
        x = g.fn(operator.add, x, h)
        if post_norm:
            x = g.fn(F.layer_norm, x, (dim,), None, None, 1e-6)
    x = g.fn(F.layer_norm, x, (dim,), g.param("norm_weight", dim, scale=1.0), g.param("norm_bias", dim), 1e-6)
    if pool == "avg":
        first = g.method("mean", x, 1)
    else:
        first = g.fn(operator.getitem, x, (slice(None), prefix if pool == "patch" else 0))
    out = g.fn(torch._C._nn.linear, first, g.param("head_weight", 5, dim), g.param("head_bias", 5))
    return g, g.output(out)
