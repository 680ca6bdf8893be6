"""Insert merge nodes after each scheduled block's attention residual, thread token sizes into later
attention (proportional attention), and restore the original token count where the stream leaves
the merged blocks (unmerge), so everything downstream (norm, pooling, heads, outputs) is unchanged."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

from torch import fx

from ...graph.match import Block, MatchResult
from ...graph.nodes import mark_inserted, set_unmerged_shape, set_width, shape
from ...merge import attn_bias, class_attention, class_logits, key_metric, similarity_metric, unmerge
from ...methods import get_op


@dataclass
class Inserted:
    """What :func:`insert_merges` did to a graph."""

    region: int                                 # blocks rewritten, from the first
    merges: list[fx.Node]                       # the merge calls, in block order
    sources: dict[int, Optional[fx.Node]]       # per rewritten block, the source map valid where it starts
                                                # (None before the first merge)
    added: dict[int, set] = field(default_factory=dict)  # per block, nodes added inside it (attention bias)

    def block_nodes(self, match: MatchResult, i: int) -> set:
        """Block ``i``'s nodes, those added inside it included."""
        return match.blocks[i].nodes | self.added.get(i, set())

    def allowed(self, match: MatchResult) -> set:
        """The nodes whose token count may change: those of the rewritten blocks."""
        return set().union(*(self.block_nodes(match, i) for i in range(self.region)))

    def source_of(self, match: MatchResult) -> dict:
        """For each node of a block entered by merged tokens, the source map valid there."""
        return {n: src for i, src in self.sources.items() if src is not None for n in self.block_nodes(match, i)}


def _unmerged_shape(bias: fx.Node, like: fx.Node, tokens: int) -> None:
    """Record the shape the proportional-attention bias would have without merging, so that
    position tables added to it are recognised (rewrite/position_tables.py)."""
    s = shape(like)
    if s is not None:
        set_unmerged_shape(bias, (s[0], 1, 1, tokens) if len(s) == 4 else (s[0], 1, tokens))


def _sdpa_arg(core: fx.Node, i: int, name: str):
    """Argument ``i`` (keyword ``name``) of an SDPA call, positional or not; None where it is not given."""
    return core.args[i] if len(core.args) > i else core.kwargs.get(name)


def _add_attention_bias(graph: fx.Graph, block: Block, size: fx.Node, tokens: int) -> set:
    """Add log(size) to the block's attention logits; returns the nodes added."""
    core = block.attn
    before = set(graph.nodes)
    with graph.inserting_before(core):
        if block.attn_kind == "sdpa":
            q = _sdpa_arg(core, 0, "query")
            bias = graph.call_function(attn_bias, (size, q))
            _unmerged_shape(bias, q, tokens)
            mask = _sdpa_arg(core, 3, "attn_mask")
            if mask is not None:
                bias = graph.call_function(operator.add, (mask, bias))
            if len(core.args) > 3:
                core.args = core.args[:3] + (bias,) + core.args[4:]
            else:
                core.kwargs = {**core.kwargs, "attn_mask": bias}
        else:
            logits = core.args[0]
            bias = graph.call_function(attn_bias, (size, logits))
            _unmerged_shape(bias, logits, tokens)
            biased = graph.call_function(operator.add, (logits, bias))
            core.args = (biased,) + core.args[1:]
    return set(graph.nodes) - before  # later passes treat the bias as part of the block


def _class_attention(graph: fx.Graph, block: Block) -> fx.Node:
    """The class token's attention in ``block`` (its own logits: proportional attention's bias included), [B, N, 1]."""
    core = block.attn
    if block.attn_kind == "sdpa":
        logits = graph.call_function(class_logits, tuple(_sdpa_arg(core, i, name) for i, name in
                                                         ((0, "query"), (1, "key"), (3, "attn_mask"), (6, "scale"))))
    else:
        logits = core.args[0]  # the softmax's input
    return graph.call_function(class_attention, (logits, block.x_mid))


def _merge_call(graph: fx.Graph, block: Block, plan, sched, size, source, fused: bool):
    args = {k: v for k, v in plan.args.items() if k != "protect_by"}
    if plan.args.get("protect_by") == "class_attention":  # the metric only chooses protected tokens (soft merging)
        metric = _class_attention(graph, block)
    elif "similarity" in plan.args and similarity_metric(plan.args["similarity"]) == "tokens":
        metric = block.x_mid  # ToMato's softmax similarity compares the post-attention tokens themselves
    else:
        metric = graph.call_function(key_metric, (block.keys, block.x_mid, block.keys_transposed))
        keys = shape(block.keys)
        if keys:  # for screen_merges: the head-mean keys are as wide as one head's
            set_width(metric, keys[-2] if block.keys_transposed else keys[-1])
    fn = get_op(plan.kind).function(fused)
    return graph.call_function(fn, (block.x_mid, metric, size, source), dict(r=plan.r, prefix=sched.prefix, **args))


def insert_merges(gm: fx.GraphModule, match: MatchResult, sched, fused: bool = False) -> Inserted:
    """Rewrite ``gm`` (whose nodes ``match`` refers to) in place with ``sched``'s merges; ``match`` itself is
    left as it was. ``fused``: merges call the fused CPU kernel instead of the reference ops."""
    graph = gm.graph
    existing = set(graph.nodes)
    size = source = None
    region = 0
    merges = []
    source_after = []  # the source map valid at each block's output
    sources: dict = {}
    added: dict = {}
    for plan in sched.blocks:
        if plan.kind == "off":
            break
        block = match.blocks[plan.index]
        region = plan.index + 1
        sources[plan.index] = source
        if size is not None and sched.merge.prop_attn:
            added[plan.index] = _add_attention_bias(graph, block, size, match.tokens)
        if plan.merged == 0:
            source_after.append(source)
            continue
        with graph.inserting_before(block.x_mid.next):
            out = _merge_call(graph, block, plan, sched, size, source, fused)
        with graph.inserting_before(out.next):
            x_new = graph.call_function(operator.getitem, (out, 0))
            size = graph.call_function(operator.getitem, (out, 1))
            source = graph.call_function(operator.getitem, (out, 2))
        block.x_mid.replace_all_uses_with(x_new, delete_user_cb=lambda u: u is not out and u is not out.args[1])
        merges.append(out)
        source_after.append(source)
    if source is None:
        _mark_new(graph, existing)
        gm.recompile()
        return Inserted(region, merges, sources, added)
    blocks = match.blocks[:region]
    # where the merged token stream leaves the rewritten blocks, give it back its original length
    for i, block in enumerate(blocks):
        if source_after[i] is None:
            continue
        inside_next = blocks[i + 1].nodes | added.get(i + 1, set()) if i + 1 < len(blocks) else set()
        outside = [u for u in block.x_out.users if u not in inside_next]
        if not outside:
            continue
        with graph.inserting_after(block.x_out):
            restored = graph.call_function(unmerge, (block.x_out, source_after[i]))
        for u in outside:
            u.replace_input_with(block.x_out, restored)
    _mark_new(graph, existing)
    gm.recompile()
    return Inserted(region, merges, sources, added)


def _mark_new(graph: fx.Graph, existing: set) -> None:
    """Tag the nodes this pass added: a failure in one of them is mergepass's, never the model's."""
    for n in graph.nodes:
        if n not in existing:
            mark_inserted(n)
