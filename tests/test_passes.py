"""Each graph pass and the matcher on small hand-built FX graphs (tests/fxgraphs.py): no compile.

The contracts pinned here: what each pass changes, what it returns, the node tags and shapes later
passes read, and how a block that cannot be rewritten is declined."""
import operator
import sys

import pytest
import torch
import torch.nn.functional as F

import mergepass
from mergepass.graph import cost
from mergepass.graph.match import NO_ATTENTION, find_blocks
from mergepass.graph.nodes import inserted, unmerged_shape
from mergepass.merge import attn_bias, gather_positions, global_merge, key_metric, unmerge
from mergepass.rewrite.capture import copy_graph_module, prepare
from mergepass.rewrite.merges import rewrite
from mergepass.rewrite.passes import RewriteError, expand_mha, fix_token_literals, fold_scalars, insert_merges, strip_noops
from mergepass.schedule import make_schedule
from fxgraphs import GraphBuilder, vit_graph


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


# -- strip_noops -------------------------------------------------------------------------------------

def test_strip_noops_drops_inference_dropout_and_keeps_training_dropout():
    g = GraphBuilder()
    x = g.input("L_x_", torch.randn(2, 5))
    a = g.fn(F.dropout, x, 0.0, True)          # p = 0
    b = g.fn(F.dropout, a, p=0.3, training=False)
    c = g.fn(F.dropout, b, 0.3, True)          # real training dropout
    gm = g.output(g.fn(operator.mul, c, 2.0))
    assert strip_noops(gm) == 2
    left = _calls(gm, F.dropout)
    assert len(left) == 1 and left[0].args[0].op == "placeholder" and left[0].args[1:] == (0.3, True)
    assert strip_noops(gm) == 0  # idempotent


# -- fold_scalars ------------------------------------------------------------------------------------

def test_fold_scalars_turns_item_reads_of_module_state_into_constants():
    g = GraphBuilder()
    x = g.input("L_x_", torch.randn(2, 5))
    eps = g.input("L_self_eps", torch.tensor(0.25))      # module state lifted by dynamic=True
    user = g.input("L_scale_", torch.tensor(3.0))        # a user input: stays an input
    y = g.fn(operator.add, x, g.method("item", eps))
    gm = g.output(g.fn(operator.mul, y, g.method("item", user)))
    ref = g.run(gm)
    assert fold_scalars(gm, g.inputs) == 1
    items = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "item"]
    assert [n.args[0].target for n in items] == ["L_scale_"]
    add = _calls(gm, operator.add)[0]
    assert add.args[1] == 0.25
    torch.testing.assert_close(g.run(gm), ref)


# -- expand_mha --------------------------------------------------------------------------------------

def _mha_graph(**kw):
    g = GraphBuilder()
    seq, bsz, dim, heads = 7, 2, 8, 2
    x = g.input("L_x_", torch.randn(seq, bsz, dim))
    w_in, b_in = g.param("in_proj_weight", 3 * dim, dim), g.param("in_proj_bias", 3 * dim)
    w_out, b_out = g.param("out_proj_weight", dim, dim), g.param("out_proj_bias", dim)
    args = dict(bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=w_out,
                out_proj_bias=b_out, training=False, need_weights=False)
    args.update(kw)
    out = g.fn(F.multi_head_attention_forward, x, x, x, dim, heads, w_in, b_in, **args)
    return g, g.output(g.fn(operator.getitem, out, 0))


def test_expand_mha_writes_plain_self_attention_out_as_sdpa():
    g, gm = _mha_graph()
    ref = g.run(gm)
    assert expand_mha(gm, g.inputs) == 1
    assert not _calls(gm, F.multi_head_attention_forward)
    assert len(_calls(gm, F.scaled_dot_product_attention)) == 1
    assert all("example_value" in n.meta for n in gm.graph.nodes if n.op != "output")  # the matcher reads shapes
    torch.testing.assert_close(g.run(gm), ref, rtol=1e-5, atol=1e-6)


def test_expand_mha_leaves_attention_with_extra_terms_alone():
    g, gm = _mha_graph(add_zero_attn=True)
    assert expand_mha(gm, g.inputs) == 0 and len(_calls(gm, F.multi_head_attention_forward)) == 1


# -- find_blocks (the matcher) -----------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "softmax"])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_matcher_finds_the_chain_grid_prefix_and_costs(attention, prefix):
    dim, depth = 16, 3
    g, gm = vit_graph(depth=depth, prefix=prefix, dim=dim, attention=attention)
    m = find_blocks(gm)
    assert m.ok and not m.problems, m.problems
    assert len(m.blocks) == depth and [b.index for b in m.blocks] == list(range(depth))
    assert (m.batch, m.tokens, m.width, m.prefix, m.grid) == (2, prefix + 16, dim, prefix, (4, 4))
    for a, b in zip(m.blocks, m.blocks[1:]):
        assert a.x_out is b.x_in
    for b in m.blocks:
        assert b.attn_kind == attention and b.keys_transposed == (attention == "softmax")
        assert (b.lin_attn, b.lin_mlp, b.attn_dim) == (4 * dim * dim, 4 * dim * dim, dim)
        assert b.macs(10, 4) == 10 * b.lin_attn + 2 * 100 * b.attn_dim + 4 * b.lin_mlp
        assert b.x_mid in b.nodes and b.x_out in b.nodes and b.attn in b.nodes
    assert m.other_macs == 5 * dim  # the head, on one token per image
    # the cost model prices what the matcher found, on its own
    assert cost.other_macs(gm, set().union(*(b.nodes for b in m.blocks)), m.batch) == m.other_macs
    assert cost.block_macs(3, 5, 7, n_in=10, n_out=4) == 10 * 3 + 2 * 100 * 5 + 4 * 7


def test_matcher_leaves_the_graph_untouched():
    g, gm = vit_graph()
    before = [(n.op, n.target, n.args) for n in gm.graph.nodes]
    find_blocks(gm)
    assert [(n.op, n.target, n.args) for n in gm.graph.nodes] == before


def test_matcher_names_why_it_declines():
    g = GraphBuilder()
    x = g.input("L_x_", torch.randn(2, 5, 8))
    gm = g.output(g.fn(torch._C._nn.linear, x, g.param("fc_weight", 4, 8)))
    m = find_blocks(gm)
    assert not m.ok and m.problems == [NO_ATTENTION]
    _, post = vit_graph(post_norm=True)
    m = find_blocks(post)
    assert not m.ok and "no MLP residual add" in m.summary()


# -- insert_merges -----------------------------------------------------------------------------------

def _scheduled(depth=3, r=3, **kw):
    g, gm = vit_graph(depth=depth, **kw)
    work = copy_graph_module(gm)
    match = find_blocks(work)
    return g, gm, work, match, make_schedule(match, mergepass.load_recipe("tome", merge={"r": r}))


def test_insert_merges_contract():
    g, gm, work, match, sched = _scheduled()
    old_nodes = set(work.graph.nodes)
    out = insert_merges(work, match, sched)
    blocks_before = [set(b.nodes) for b in match.blocks]
    assert out.region == 3 and len(out.merges) == 3
    assert all(n.target is global_merge and n.kwargs["r"] == 3 and n.kwargs["prefix"] == 1 for n in out.merges)
    assert out.sources[0] is None and all(out.sources[i] is not None for i in (1, 2))
    assert [set(b.nodes) for b in match.blocks] == blocks_before  # the match is left as it was
    # what it added inside blocks 1 and 2 (the attention bias) counts as theirs
    assert not out.added.get(0) and out.added[1] and out.added[2]
    assert out.allowed(match) == set().union(*blocks_before, *out.added.values())
    new = set(work.graph.nodes) - old_nodes
    assert new and all(inserted(n) for n in new)  # failures in these are mergepass's own
    assert not any(inserted(n) for n in old_nodes)
    # each merge reads key_metric of its own block's keys and replaces the attention residual downstream
    for b, mnode in zip(match.blocks, out.merges):
        assert mnode.args[0] is b.x_mid and mnode.args[1].target is key_metric and mnode.args[1].args[0] is b.keys
    # proportional attention: a log-size bias into every attention after the first merge
    masks = [n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask") for n in _calls(work, torch._C._nn.scaled_dot_product_attention)]
    assert masks[0] is None and all(m is not None and m.target is attn_bias for m in masks[1:])
    assert all(unmerged_shape(m) == (2, 1, 1, 17) for m in masks[1:])  # what position_tables compares with
    # one unmerge, where the stream leaves the last block, so the norm and head see 17 tokens
    (un,) = _calls(work, unmerge)
    assert un.args[0] is match.blocks[-1].x_out and all(u not in match.blocks[-1].nodes for u in un.users)


def test_insert_merges_without_proportional_attention_adds_no_bias():
    g, gm = vit_graph(depth=3)
    work = copy_graph_module(gm)
    match = find_blocks(work)
    insert_merges(work, match, make_schedule(match, mergepass.load_recipe("tome", merge={"r": 3, "prop_attn": False})))
    assert not _calls(work, attn_bias)


# -- fix_token_literals ------------------------------------------------------------------------------

def _reshapes(gm):
    return [n.args[1:] for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]


def test_fix_token_literals_makes_reshapes_follow_the_merges():
    g, gm, work, match, sched = _scheduled()
    out = insert_merges(work, match, sched)
    fixed = fix_token_literals(work, g.inputs, out.allowed(match), out.source_of(match), match.tokens, match.prefix)
    tokens = [n_in for n_in, _ in sched.token_counts()]
    assert tokens == [17, 14, 11]
    assert fixed == 2 * 2  # qkv and output reshapes of blocks 1 and 2
    assert _reshapes(work) == [r for n in tokens for r in ((2, n, 3, 2, 8), (2, n, 16))]
    assert g.run(work).shape == g.run(gm).shape
    assert not torch.allclose(g.run(work), g.run(gm))  # merging changed the result


def test_fix_token_literals_refuses_a_change_outside_the_allowed_nodes():
    g, gm, work, match, sched = _scheduled()
    insert_merges(work, match, sched)
    with pytest.raises(RewriteError, match="outside the merged blocks|shape changed"):
        fix_token_literals(work, g.inputs, match.blocks[0].nodes, {}, match.tokens, match.prefix)


def test_a_node_meta_tensors_cannot_run_is_propagated_on_fake_tensors(monkeypatch):
    """The walk runs on meta tensors; a copy to the model's device (which a meta tensor cannot make) in a merged
    block runs on fake tensors, and the literals still follow the merges."""
    from mergepass.rewrite.passes import fix_token_literals as ftl
    ftl_module = sys.modules[ftl.__module__]
    g, gm, work, match, sched = _scheduled(mlp_extra=lambda g, h: g.method("to", h, "cpu"))
    out = insert_merges(work, match, sched)
    on_fake = []
    real = ftl_module._Fixer._on_fake
    monkeypatch.setattr(ftl_module._Fixer, "_on_fake", lambda self, n: on_fake.append(n) or real(self, n))
    fixed = fix_token_literals(work, g.inputs, out.allowed(match), out.source_of(match), match.tokens, match.prefix)
    assert [n.target for n in on_fake] == ["to"]  # block 1's copy, and nothing else
    assert fixed == 4 and _reshapes(work) == [r for n in (17, 14, 11) for r in ((2, n, 3, 2, 8), (2, n, 16))]
    assert g.run(work).shape == g.run(gm).shape


def _mean_over_tokens(g, h):
    return g.fn(operator.add, h, g.fn(operator.mul, g.method("mean", h, 1, keepdim=True), 0.0))


def test_a_reduction_over_merged_tokens_is_refused_and_rewrite_merges_only_the_blocks_before():
    g, gm, work, match, sched = _scheduled(mlp_extra=_mean_over_tokens)
    out = insert_merges(work, match, sched)
    with pytest.raises(RewriteError, match="consumes the token axis") as e:
        fix_token_literals(work, g.inputs, out.allowed(match), {}, match.tokens, match.prefix)
    assert e.value.node in match.blocks[1].nodes
    # the driver declines block 1 and everything after it, with one note naming the block
    notes = []
    res = rewrite(prepare(gm, g.inputs), g.inputs, mergepass.load_recipe("tome", merge={"r": 3}), warn=notes.append)
    assert [b.kind for b in res.schedule.blocks] == ["global", "off", "off"]
    assert len([n for n in notes if "not merged because" in n]) == 1
    assert g.run(res.gm).shape == g.run(gm).shape


def test_position_tables_are_read_at_the_merged_positions():
    g, gm, work, match, sched = _scheduled(attention="softmax", rel_bias=True)
    out = insert_merges(work, match, sched)
    fix_token_literals(work, g.inputs, out.allowed(match), out.source_of(match), match.tokens, match.prefix)
    reads = _calls(work, gather_positions)
    assert len(reads) == 2 and all(inserted(n) for n in reads)  # blocks 1 and 2 see merged tokens
    assert all(n.args[0].target.startswith("L_self_blocks_") for n in reads)
    assert g.run(work).shape == (2, 5)


# -- rewrite (the driver) ----------------------------------------------------------------------------

def test_rewrite_with_nothing_to_merge_returns_the_graph_unchanged():
    g, gm = vit_graph()
    base = prepare(gm, g.inputs)
    res = rewrite(base, g.inputs, mergepass.load_recipe("tome", merge={"r": 0}), warn=False)
    assert res.gm is base and not res.merged
    torch.testing.assert_close(g.run(res.gm), g.run(gm), rtol=0, atol=0)


def test_rewrite_never_modifies_its_input_graph():
    g, gm = vit_graph()
    base = prepare(gm, g.inputs)
    before = [(n.name, n.target, n.args) for n in base.graph.nodes]
    res = rewrite(base, g.inputs, mergepass.load_recipe("tome", merge={"r": 3}), warn=False)
    assert res.merged and res.gm is not base
    assert [(n.name, n.target, n.args) for n in base.graph.nodes] == before


def test_unmatched_graph_comes_back_unchanged_with_one_note():
    g = GraphBuilder()
    x = g.input("L_x_", torch.randn(2, 5, 8))
    gm = g.output(g.fn(torch._C._nn.linear, x, g.param("fc_weight", 4, 8)))
    said = []
    res = rewrite(prepare(gm, g.inputs), g.inputs, mergepass.load_recipe("tome"), warn=said.append)
    assert res.schedule is None and len(said) == 1 and "no transformer blocks matched" in said[0]


# -- prune_unread_rows -------------------------------------------------------------------------------

def _pruned(gm, g, **kw):
    from mergepass.rewrite.merges import prune_rows
    return prune_rows(prepare(gm, g.inputs), g.inputs)


@pytest.mark.parametrize("attention,rel_bias", [("sdpa", False), ("softmax", False), ("softmax", True)])
def test_the_last_block_computes_only_the_class_token_row_and_the_output_is_the_same(attention, rel_bias):
    g, gm = vit_graph(depth=3, attention=attention, rel_bias=rel_bias)
    res = _pruned(gm, g)
    assert res.gm is not gm and len(res.notes) == 1 and "computes 1 token row" in res.notes[0]
    # the last block's attention output and MLP run on one row; the blocks before it on all 17
    assert _reshapes(res.gm) == [(2, 17, 3, 2, 8), (2, 17, 16)] * 2 + [(2, 17, 3, 2, 8), (2, 1, 16)]
    # qkv, proj, fc1, fc2 per block, then the head (its rows: the batch)
    assert _linear_rows(res.gm, g) == [17, 17, 17, 17] * 2 + [17, 1, 1, 1] + [2]
    torch.testing.assert_close(g.run(res.gm), g.run(gm), rtol=1e-5, atol=1e-6)


def _linear_rows(gm, g):
    """The rows each linear of ``gm`` multiplies when it runs on ``g``'s inputs, in graph order."""
    seen = []

    class Rows(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target is torch._C._nn.linear:
                seen.append(out.shape[-2] if out.dim() == 3 else out.shape[0])
            return out
    with torch.no_grad():
        Rows(gm).run(*g.inputs)
    return seen


@pytest.mark.parametrize("pool,prefix", [("avg", 1), ("patch", 1), ("token", 0)])
def test_rows_the_outputs_read_beyond_protected_tokens_are_all_computed(pool, prefix):
    g, gm = vit_graph(depth=2, pool=pool, prefix=prefix, grid=4 if prefix else 5)
    base = prepare(gm, g.inputs)
    from mergepass.rewrite.merges import prune_rows
    res = prune_rows(base, g.inputs)
    assert res.gm is base and not res.notes


def test_a_last_block_that_reduces_over_tokens_keeps_all_its_rows():
    g, gm = vit_graph(depth=2, mlp_extra=_mean_over_tokens)  # block 1, the last, averages its tokens
    res = _pruned(gm, g)
    assert len(res.notes) == 1 and "all rows computed because" in res.notes[0]
    assert "consumes the token axis" in res.notes[0]
    torch.testing.assert_close(g.run(res.gm), g.run(gm), rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["tome", "soft", "tomato", "dfe_lgtm"])
def test_pruned_rows_with_merges_give_the_merged_graph_s_output(recipe):
    """The last block's merge and the unmerge after it go; the merges before it stay."""
    g, gm = vit_graph(depth=3, grid=6)
    base = prepare(gm, g.inputs)
    r = mergepass.load_recipe(recipe)
    full = rewrite(base, g.inputs, r, warn=False)
    pruned = rewrite(base, g.inputs, r, warn=False, prune=True)
    assert full.merged and pruned.merged and any("computes 1 token row" in n for n in pruned.notes)
    merges = [n for n in full.gm.graph.nodes if n.op == "call_function" and n.target is not unmerge
              and inserted(n) and "merge" in getattr(n.target, "__name__", "")]
    kept = [n for n in pruned.gm.graph.nodes if n.op == "call_function" and n.target is not unmerge
            and inserted(n) and "merge" in getattr(n.target, "__name__", "")]
    assert len(kept) == len(merges) - (full.schedule.blocks[-1].merged > 0) and not _calls(pruned.gm, unmerge)
    assert _linear_rows(pruned.gm, g)[-4:] == [1, 1, 1, 2]
    torch.testing.assert_close(g.run(pruned.gm), g.run(full.gm), rtol=1e-5, atol=1e-5)
    # the schedule prices the last block at one row after its keys and values: qkv on every token entering it
    last, block = pruned.schedule.blocks[-1], pruned.match.blocks[-1]
    n, d = last.tokens_in, 16
    assert (block.lin_qkv, block.lin_attn, block.lin_mlp) == (3 * d * d, 4 * d * d, 4 * d * d)
    assert last.macs == n * 3 * d * d + 2 * n * d + (d * d + 4 * d * d) == block.rows_macs(n, 1)
    assert block.rows_macs(n, n) == block.macs(n, n)
    assert full.schedule.macs - pruned.schedule.macs == full.schedule.blocks[-1].macs - last.macs > 0


def test_a_last_block_the_shape_walk_refuses_keeps_its_rows_and_the_merges_before_it():
    g, gm = vit_graph(depth=2, mlp_extra=_mean_over_tokens)
    said = []
    res = rewrite(prepare(gm, g.inputs), g.inputs, mergepass.load_recipe("tome", merge={"r": 3}), warn=said.append,
                  prune=True)
    assert [b.kind for b in res.schedule.blocks] == ["global", "off"]
    assert any("all rows computed because" in n for n in res.notes) and len(_calls(res.gm, unmerge)) == 1
    assert _linear_rows(res.gm, g)[-4:] == [17, 17, 17, 2]  # block 1 on all tokens, unmerged again before it


@pytest.mark.parametrize("prune", [True, False])
def test_the_merge_stage_prunes_a_recipe_without_merges_only_when_asked(prune):
    from mergepass.pipeline import merge_stage
    g, gm = vit_graph(depth=2)
    res = merge_stage(gm, g.inputs, mergepass.load_recipe("none", lower={"prune_rows": prune}), warn=False)
    assert (_linear_rows(res.gm, g)[-5:] == [17, 1, 1, 1, 2]) is prune  # the last qkv, proj, fc1, fc2; the head
    assert any("computes 1 token row" in n for n in res.notes) is prune


# -- screen_merges -----------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe,width", [("tome", 8), ("soft", 16)])  # ToMe's head-mean keys; soft's tokens
def test_screen_merges_screens_exactly_the_widths_measured_faster_and_changes_no_output(recipe, width):
    from helpers import require_fused_merge
    from mergepass.decide import Decision
    from mergepass.rewrite.passes import screen_merges
    require_fused_merge()
    g, gm = vit_graph(depth=3, dim=16, heads=2)
    runs = {}
    for choice in ("fp32", "bf16"):
        work = copy_graph_module(gm)
        match = find_blocks(work)
        sched = make_schedule(match, mergepass.load_recipe(recipe, merge={"r": 3}))
        out = insert_merges(work, match, sched, fused=True)
        fix_token_literals(work, g.inputs, out.allowed(match), out.source_of(match), match.tokens, match.prefix)
        asked = []
        decisions = screen_merges(work, lambda w: asked.append(w) or Decision("merge similarity", choice))
        assert asked == [width] and [d.choice for d in decisions] == [choice]  # one question per width
        assert [n.kwargs.get("screen", False) for n in out.merges] == [choice == "bf16"] * 3
        runs[choice] = g.run(work)
    assert torch.equal(runs["fp32"], runs["bf16"])


def test_screen_merges_leaves_the_reference_ops_alone():
    from mergepass.rewrite.passes import screen_merges
    g, gm, work, match, sched = _scheduled()
    out = insert_merges(work, match, sched)
    assert screen_merges(work, lambda w: pytest.fail("no fused merge to ask about")) == []
    assert all("screen" not in n.kwargs for n in out.merges)
