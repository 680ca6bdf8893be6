"""The backend end to end on tiny timm ViTs: exactness, the ToMe reference, invariants, bad input."""

import pytest
import torch
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

import mergepass
from mergepass.merge import adjacent_merge, fused, global_merge, window_merge
from helpers import compile_with, rel_err, require_fused_merge, tiny_vit
from reference import reference_forward

CONFIGS = {
    "vit_cls": dict(name="vit_tiny_patch16_224"),
    "deit_distilled": dict(name="deit_tiny_distilled_patch16_224"),
    "no_cls_avgpool": dict(name="vit_tiny_patch16_224", class_token=False, global_pool="avg"),
    "cls_avgpool": dict(name="vit_tiny_patch16_224", global_pool="avg"),
}


def test_r0_reproduces_the_model():
    m = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    be = mergepass.backend("tome", merge={"r": 0})
    with torch.no_grad():
        out, ref = compile_with(m, be)(x), m(x)
    assert rel_err(out, ref) <= 1e-5
    assert not be.schedule.merging


@pytest.mark.parametrize("config", list(CONFIGS))
def test_tome_matches_reference(config):
    m = tiny_vit(**CONFIGS[config])
    x = torch.randn(2, 3, 64, 64)
    be = mergepass.backend("tome", merge={"r": 3}, lower="eager")
    with torch.no_grad():
        out = compile_with(m, be)(x)
        ref = reference_forward(m, x, be.schedule)
        unmerged = m(x)
    assert be.schedule.merging
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(out, unmerged) > 1e-3, "merging must actually change the output"


def test_tome_explicit_softmax_attention():
    m = tiny_vit()
    for blk in m.blocks:
        blk.attn.fused_attn = False  # timm's TIMM_FUSED_ATTN=0 path: q@kᵀ → softmax → @v
    x = torch.randn(2, 3, 64, 64)
    be = mergepass.backend("tome", merge={"r": 3}, lower="eager")
    with torch.no_grad():
        out = compile_with(m, be)(x)
        ref = reference_forward(m, x, be.schedule)
    assert [b.kind for b in be.schedule.blocks] == ["global"] * 3
    assert rel_err(out, ref) <= 1e-4


def test_no_proportional_attention_recipe_field():
    m = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    be = mergepass.backend("tome", merge={"r": 3, "prop_attn": False}, lower="eager")
    with torch.no_grad():
        out = compile_with(m, be)(x)
        ref = reference_forward(m, x, be.schedule, prop_attn=False)
        ref_prop = reference_forward(m, x, be.schedule, prop_attn=True)
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(out, ref_prop) > 1e-4


def _merge_nodes(gm):
    fns = {global_merge, window_merge, adjacent_merge,
           fused.fused_global_merge, fused.fused_window_merge, fused.fused_adjacent_merge}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in fns]


def test_schedule_equals_compiled_token_counts_and_clamps():
    m = tiny_vit(depth=4)
    x = torch.randn(2, 3, 64, 64)
    # every block's merge compiled: the last block on all its rows (pruned, it drops its merge)
    be = mergepass.backend("tome", merge={"r": 5}, lower={"target": "eager", "prune_rows": False})
    with torch.no_grad():
        compile_with(m, be)(x)
    res = be.results[-1]
    gm = res.gm
    ShapeProp(gm).propagate(*_inputs_of(gm, m, x))
    seen = []
    for n in _merge_nodes(gm):
        tokens_in = n.args[0].meta["tensor_meta"].shape[1]
        tokens_out = next(u for u in n.users if u.args[1] == 0).meta["tensor_meta"].shape[1]
        seen.append((tokens_in, tokens_out))
    planned = mergepass.plan(m, x, "tome", merge={"r": 5}, lower={"prune_rows": False})
    assert seen == planned.token_counts() == be.schedule.token_counts()
    # 16 patches merge 5, 5, then at most half of what is left: 3 (clamped), 1 (clamped)
    assert planned.token_counts() == [(17, 12), (12, 7), (7, 4), (4, 3)]
    assert planned.blocks[1].note == "" and "clamped 5->3" in planned.blocks[2].note
    assert "clamped" in planned.table()


def _inputs_of(gm, model, x):
    """Real tensors for the dynamo graph's placeholders (image + parameters by name)."""
    params = dict(model.named_parameters())
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        if n.target == "L_x_":
            out.append(x)
            continue
        key = n.target[len("L_self_"):].rstrip("_").replace("modules_", "").replace("parameters_", "")
        match = [v for k, v in params.items() if k.replace(".", "_") == key]
        assert match, n.target
        out.append(match[0])
    return out


def test_user_model_is_not_mutated():
    m = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        before = m(x)
        compile_with(m, mergepass.backend("tome", merge={"r": 3}))(x)
        torch._dynamo.reset()
        compile_with(m, mergepass.backend("tome", merge={"r": 5}, lower="eager"))(x)
        after = m(x)
    assert state.keys() == m.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_new_input_shape_recompiles_with_new_schedule():
    m = tiny_vit(dynamic_img_size=True)
    be = mergepass.backend("tome", merge={"r": 3}, lower="eager")
    cm = torch.compile(m, backend=be)
    with torch.no_grad():
        cm(torch.randn(2, 3, 64, 64))
        x2 = torch.randn(1, 3, 96, 96)
        out2 = cm(x2)
        ref2 = reference_forward(m, x2, be.schedule)
    assert be.schedule.tokens == 37 and be.schedule.batch == 1
    assert rel_err(out2, ref2) <= 1e-4


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_non_vit_compiles_unchanged_with_warning():
    m = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(mergepass.MergepassWarning, match="no transformer blocks matched"):
        with torch.no_grad():
            out = compile_with(m, mergepass.backend("tome"))(x)
    torch.testing.assert_close(out, m(x).detach())
    with pytest.raises(ValueError, match="no transformer blocks"):
        mergepass.plan(m, x)


class MeanInMLP(nn.Module):
    """A block whose MLP branch reads a mean over tokens: unsafe to merge (sizes ignored)."""

    def __init__(self, blk):
        super().__init__()
        self.blk = blk

    def forward(self, x):
        b = self.blk
        x = x + b.ls1(b.attn(b.norm1(x)))
        h = b.norm2(x)
        return x + b.ls2(b.mlp(h + 0.0 * h.mean(1, keepdim=True)))


def test_unsafe_block_is_skipped_with_later_blocks():
    m = tiny_vit(depth=4)
    m.blocks[2] = MeanInMLP(m.blocks[2])
    x = torch.randn(2, 3, 64, 64)
    be = mergepass.backend("tome", merge={"r": 2}, lower="eager")
    with pytest.warns(mergepass.MergepassWarning, match="consumes the token axis"):
        with torch.no_grad():
            out = compile_with(m, be)(x)
    kinds = [b.kind for b in be.schedule.blocks]
    assert kinds == ["global", "global", "off", "off"]
    assert "not merged because" in be.schedule.table()
    ref_model = tiny_vit(depth=4)  # same weights, plain blocks: 0*mean adds nothing
    with torch.no_grad():
        ref = reference_forward(ref_model, x, be.schedule)
    assert rel_err(out, ref) <= 1e-4


def _targets(be):
    return {n.target for r in be.results for n in r.gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("recipe,fn,overrides", [
    ("tome", "fused_global_merge", dict(r=4)),
    ("tomato", "fused_adjacent_merge", dict(budget=10)),
    ("dfe_lgtm", "fused_window_merge", dict(skip=0, r=6, window=3, transition=2)),
])
def test_fused_merge_kernel_is_used_on_cpu_and_matches_the_reference_ops(recipe, fn, overrides):
    require_fused_merge()
    m = tiny_vit(depth=2, img_size=96)
    x = torch.randn(2, 3, 96, 96)
    outs = {}
    for kernel, lower in (("fused", "inductor"), ("reference", "eager")):  # inductor + fused op against plain ops
        torch._dynamo.reset()
        be = mergepass.backend(recipe, merge={"kernel": kernel, **overrides}, lower=lower)
        with torch.no_grad():
            outs[kernel] = torch.compile(m, backend=be, dynamic=False, fullgraph=True)(x)
        assert (getattr(fused, fn) in _targets(be)) == (kernel == "fused")
    assert rel_err(outs["fused"], outs["reference"]) <= 1e-5
    with torch.no_grad():
        assert rel_err(outs["fused"], reference_forward(m, x, be.schedule)) <= 1e-4


def test_fused_kernel_build_failure_warns_and_uses_reference_ops(monkeypatch):
    monkeypatch.setattr(fused, "kernel_error", lambda: "CalledProcessError: no compiler")
    m, x = tiny_vit(depth=2), torch.randn(2, 3, 64, 64)
    be = mergepass.backend("tome", merge={"r": 3}, lower="eager")
    with torch.no_grad(), pytest.warns(mergepass.MergepassWarning, match="fused merge kernel unavailable.*no compiler"):
        out = compile_with(m, be)(x)
    assert global_merge in _targets(be) and fused.fused_global_merge not in _targets(be)
    with torch.no_grad():
        assert rel_err(out, reference_forward(m, x, be.schedule)) <= 1e-4
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="merge.kernel' is 'fused'.*no compiler"):
        compile_with(m, mergepass.backend("tome", merge={"r": 3, "kernel": "fused"}, lower="eager"))(x)


def test_training_gradients_match_reference():
    m = tiny_vit(depth=2).train()
    x = torch.randn(2, 3, 64, 64)
    be = mergepass.backend("tome", merge={"r": 3}, lower="eager")  # the graph and its ops; inductor's autograd is torch's
    cm = compile_with(m, be)
    cm(x).square().mean().backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    reference_forward(m, x, be.schedule).square().mean().backward()
    assert be.schedule.merging and len(grads) > 10
    for k, p in m.named_parameters():
        assert rel_err(grads[k], p.grad) <= 1e-4, k
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.step()  # one optimizer step on the merged model's gradients works
    assert fused.fused_global_merge not in _targets(be), "training uses the differentiable reference ops"
    torch._dynamo.reset()
    with pytest.raises(Exception, match="merge.kernel' is 'fused'.*gradients"):
        compile_with(m, mergepass.backend("tome", merge={"r": 3, "kernel": "fused"}, lower="eager"))(x)
