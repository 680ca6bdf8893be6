"""Find transformer blocks in a dynamo FX graph by dataflow structure, not by module names.

A block is: attention (SDPA, or q@kᵀ → softmax → @v) → output projection → residual add
(``x_mid``) → norm → MLP → residual add (``x_out``). Blocks are chained when one's ``x_out`` is the
next one's residual input. The patch grid and the number of protected (prefix) tokens come from the
patch-embedding convolution and the concatenation that prepends class/distillation/register tokens.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx

from . import cost
from .nodes import MATMUL_FN, SDPA, SOFTMAX_FN, is_add, is_call, is_linear, module_path, shape, symbolic_dims

NO_ATTENTION = "no attention (scaled_dot_product_attention or q@kᵀ→softmax→@v) found"


@dataclass
class Block:
    index: int
    name: str
    x_in: fx.Node
    attn: fx.Node              # SDPA node, or the softmax node
    attn_kind: str             # "sdpa" | "softmax"
    keys: fx.Node              # [.., N, D] keys (SDPA) or kᵀ [.., D, N] (softmax)
    keys_transposed: bool
    x_mid: fx.Node
    x_out: fx.Node
    nodes: set = field(default_factory=set, repr=False)
    lin_attn: int = 0             # multiply-adds per token in linears before the merge point
    lin_mlp: int = 0              # ... and after it (the MLP)
    attn_dim: int = 0             # heads * head_dim (attention cost is 2 * N^2 * attn_dim)
    lin_qkv: int = 0              # multiply-adds per token in the linears feeding attention (part of lin_attn)

    def macs(self, n_in: int, n_out: int) -> int:
        """Multiply-adds per image when ``n_in`` tokens enter and ``n_out`` leave (:func:`.cost.block_macs`)."""
        return cost.block_macs(self.lin_attn, self.attn_dim, self.lin_mlp, n_in, n_out)

    def rows_macs(self, n_in: int, rows: int) -> int:
        """Multiply-adds per image when ``n_in`` tokens enter and only ``rows`` are computed after the keys and
        values (:func:`.cost.rows_macs`)."""
        return cost.rows_macs(self.lin_qkv, self.lin_attn, self.attn_dim, self.lin_mlp, n_in, rows)


@dataclass
class MatchResult:
    blocks: list[Block]
    batch: int = 0
    tokens: int = 0
    width: int = 0
    prefix: int = 0
    grid: Optional[tuple[int, int]] = None
    problems: list[str] = field(default_factory=list)  # why something was not matched
    other_macs: int = 0           # MACs outside the blocks (patch embed, head)

    @property
    def ok(self) -> bool:
        return bool(self.blocks)

    def summary(self) -> str:
        """The problems, one line per reason with the places it applies to."""
        return summarize(self.problems)

    def price(self, plans: list) -> list:
        """``plans`` (one per block, with ``index``, ``tokens_in`` and ``tokens_out``), each given its block's
        ``macs`` at those token counts."""
        for p in plans:
            p.macs = self.blocks[p.index].macs(p.tokens_in, p.tokens_out)
        return plans

    def dense_macs(self) -> int:
        """The unmerged model's MACs per image."""
        return sum(b.macs(self.tokens, self.tokens) for b in self.blocks) + self.other_macs


def summarize(problems: list[str]) -> str:
    """'a.attn: why; b.attn: why' -> 'a.attn, b.attn: why' (first three places, then a count)."""
    where: dict[str, list[str]] = {}
    for p in problems:
        place, sep, why = p.partition(": ")
        where.setdefault(why if sep else p, []).append(place if sep else "")
    parts = []
    for why, places in where.items():
        places = [p for p in places if p]
        head = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
        parts.append(f"{head}: {why}" if head else why)
    return "; ".join(parts)


def to_nx(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for u in n.all_input_nodes:
            g.add_edge(u, n)
    return g


def _strip_through(node: fx.Node, ok) -> fx.Node:
    while ok(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _head_mix(node: fx.Node) -> bool:
    """A permute, or a linear over permuted heads: talking-heads attention (CaiT) mixes heads before
    and after the softmax, which keeps every key on its own axis."""
    return is_call(node, (), {"permute"}) or (is_linear(node) and is_call(node.args[0], (), {"permute"}))


def _find_attention(graph: fx.Graph) -> list[tuple[fx.Node, str, fx.Node, bool, fx.Node]]:
    """(core, kind, keys, keys_transposed, output) for every attention in topological order."""
    found = []
    for n in graph.nodes:
        if is_call(n, SDPA):
            k = n.args[1] if len(n.args) > 1 else n.kwargs.get("key")
            if n.kwargs.get("is_causal") or (len(n.args) > 5 and n.args[5]):
                continue
            found.append((n, "sdpa", k, False, n))
        elif is_call(n, SOFTMAX_FN, {"softmax"}):
            # logits = (q @ kᵀ) possibly scaled/biased; output = probs @ v (after dropout)
            logits = _strip_through(n.args[0], lambda m: is_call(m, {operator.mul, operator.truediv, torch.mul, operator.add},
                                                                 {"mul", "div", "add", "float", "to"}) or _head_mix(m))
            if not is_call(logits, MATMUL_FN, {"matmul", "__matmul__", "bmm"}):
                continue
            kt = logits.args[1]
            users = list(n.users)
            probs = n
            while len(users) == 1 and (is_call(users[0], {F.dropout}, {"type_as", "to", "float"}) or _head_mix(users[0])):
                probs = users[0]
                users = list(probs.users)
            outs = [u for u in users if is_call(u, MATMUL_FN, {"matmul", "__matmul__", "bmm"}) and u.args[0] is probs]
            if len(outs) != 1:
                continue
            found.append((n, "softmax", kt, True, outs[0]))
    return found


def _patch_grid(graph: fx.Graph, first_in: fx.Node, g: nx.DiGraph, tokens: int):
    """(prefix, grid, problem) from the patch-embedding conv feeding the first block; a negative
    prefix means the blocks see pooled tokens (not a plain ViT)."""
    anc = nx.ancestors(g, first_in)
    convs = [n for n in anc if is_call(n, {torch.conv2d, F.conv2d}) and shape(n) and len(shape(n)) == 4]
    if not convs:
        for p in range(0, 9):
            s = math.isqrt(tokens - p)
            if s * s == tokens - p:
                return p, (s, s), f"no patch-embedding conv found; assuming {p} prefix token(s) and a {s}x{s} grid"
        return 0, None, "no patch-embedding conv found and the token count is not a square"
    conv = max(convs, key=lambda c: len(nx.ancestors(g, c)))
    _, _, h, w = shape(conv)
    prefix = tokens - h * w
    if prefix < 0:
        return prefix, None, (f"the blocks see fewer tokens ({tokens}) than the {h}x{w} patch grid: a "
                              "hierarchical model pools tokens between stages")
    if prefix:
        # the prefix must be prepended: in the token concat, the patch tokens come last
        cats = [n for n in anc if is_call(n, {torch.cat, torch.concat}) and shape(n) and len(shape(n)) == 3
                and conv in nx.ancestors(g, n)]
        for c in cats:
            parts = c.args[0]
            dim = c.kwargs.get("dim", c.args[1] if len(c.args) > 1 else 0)
            if dim not in (1, -2):
                continue
            last = parts[-1]
            if not (last is conv or conv in nx.ancestors(g, last)):
                return 0, None, "extra tokens are appended after the patch tokens (unsupported layout)"
    return prefix, (h, w), None


def _cone(g: nx.DiGraph, start: fx.Node, limit: int = 80) -> list[fx.Node]:
    """Nodes reachable forward from ``start`` in breadth-first order (bounded)."""
    out, seen, frontier = [], {start}, [start]
    while frontier and len(out) < limit:
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    out.append(u)
                    nxt.append(u)
        frontier = nxt
    return out


def _residual_split(g: nx.DiGraph, core: fx.Node, out: fx.Node) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
    """(x_mid, x_in): the add after attention that joins the attention's output with the stream before it."""
    anc_core = nx.ancestors(g, core)
    down = nx.descendants(g, out) | {out}
    for n in _cone(g, out):
        if is_add(n):
            a, b = n.args[0], n.args[1]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            if a in down and b not in down and b in anc_core:
                return n, b
            if b in down and a not in down and a in anc_core:
                return n, a
    return None, None


def _mlp_residual(g: nx.DiGraph, x_mid: fx.Node) -> Optional[fx.Node]:
    """x_out: the next add that joins ``x_mid`` with something computed from it (the MLP)."""
    mid_down = nx.descendants(g, x_mid)
    for n in _cone(g, x_mid):
        if is_add(n) and x_mid in n.args:
            other = n.args[1] if n.args[0] is x_mid else n.args[0]
            if isinstance(other, fx.Node) and other in mid_down:
                return n
    return None


def _match_block(gm: fx.GraphModule, g: nx.DiGraph, attns: list, core, kind, keys, kt, out) -> "Block | str":
    """The block around one attention, or why there is none (structure only: no costs)."""
    where = module_path(core) or core.name
    x_mid, x_in = _residual_split(g, core, out)
    if x_mid is None:
        return f"{where}: attention has no residual add (post-norm or parallel block?)"
    s_mid = shape(x_mid)
    if s_mid is not None and len(s_mid) == 4:
        return (f"{where}: the residual stream is a 2-D token map {s_mid} (windowed or hierarchical "
                "attention, e.g. SAM, Swin, Hiera); merging needs a [batch, tokens, width] stream")
    ks = shape(keys)
    if ks and s_mid and len(s_mid) == 3 and (ks[-1] if kt else ks[-2]) != s_mid[1]:
        return (f"{where}: the attention's keys ({ks[-1] if kt else ks[-2]}) are not the block's "
                f"{s_mid[1]} tokens (windowed, pooled or class attention); left unmerged")
    x_out = _mlp_residual(g, x_mid)
    if x_out is None:
        return f"{where}: no MLP residual add after the attention residual"
    nodes = (nx.descendants(g, x_in) & nx.ancestors(g, x_out)) | {x_out}
    if any(c is not core and c in nodes for c, *_ in attns):
        return f"{where}: MLP path contains another attention"
    mid_down = nx.descendants(g, x_mid)
    if not any(is_linear(n) and n in mid_down for n in nodes):
        return f"{where}: no linear layer between the residual adds (not an MLP)"
    s_in, s_out = shape(x_in), shape(x_out)
    if s_in is None or len(s_in) != 3 or s_in != s_mid or s_in != s_out:
        return f"{where}: residual stream is not a [batch, tokens, width] tensor ({s_in})"
    if set(symbolic_dims(x_in)) - {0}:
        return (f"{where}: the token count is symbolic (dynamic image size); a static schedule "
                "needs a fixed token count")
    name = (module_path(x_out) or module_path(core)).rsplit(".attn", 1)[0].rsplit(".mlp", 1)[0]
    lin_attn, lin_mlp, attn_dim, lin_qkv = cost.block_costs(gm, nodes, mid_down, ks, kt, s_in[0],
                                                            nx.ancestors(g, core))
    return Block(0, name, x_in, core, kind, keys, kt, x_mid, x_out, nodes, lin_attn, lin_mlp, attn_dim, lin_qkv)


def find_blocks(gm: fx.GraphModule) -> MatchResult:
    """Match the chain of transformer blocks in ``gm`` and price it (:mod:`.cost`); never raises for
    unmatched graphs, and never changes ``gm``."""
    graph = gm.graph
    g = to_nx(graph)
    attns = _find_attention(graph)
    if not attns:
        return MatchResult([], problems=[NO_ATTENTION])
    blocks: list[Block] = []
    problems: list[str] = []
    for found in attns:
        b = _match_block(gm, g, attns, *found)
        if isinstance(b, str):
            problems.append(b)
            continue
        b.name = b.name or f"block{len(blocks)}"
        blocks.append(b)
    # keep the first chain of blocks (x_out of one is x_in of the next)
    chain: list[Block] = []
    for b in blocks:
        if chain and b.x_in is not chain[-1].x_out:
            problems.append(f"{b.name}: not chained to {chain[-1].name}; blocks from here on are not merged")
            break
        chain.append(b)
    for i, b in enumerate(chain):
        b.index = i
    if not chain:
        return MatchResult([], problems=problems or ["no transformer block matched"])
    bsz, tokens, width = shape(chain[0].x_in)
    prefix, grid, problem = _patch_grid(graph, chain[0].x_in, g, tokens)
    if problem:
        problems.append(problem)
        if prefix < 0:
            return MatchResult([], problems=problems)
    other = cost.other_macs(gm, set().union(*(b.nodes for b in chain)), bsz)
    return MatchResult(chain, bsz, tokens, width, prefix, grid, problems, other)
