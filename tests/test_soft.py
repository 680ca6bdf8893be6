"""Soft many-to-many merging (method ``soft``): the op against the plain reference, end to end and alone,
and its invariants."""
import functools

import pytest
import torch

import mergepass
from mergepass.methods.soft import fused_soft_merge, soft_merge
from helpers import benchmark, rel_err, require_fused_merge, tiny_vit
from reference import merge_tokens_soft, reference_forward


def _soft(x, metric, size, groups, prefix, plan):
    a = plan.args
    return merge_tokens_soft(x, metric, size, groups, prefix, plan.r, a["k"], a["tau"], a["compare"],
                             a.get("offset", 0), a.get("protect", 0))


CASES = {
    "hard_tokens": dict(r=6),
    "shared_keys": dict(r=6, k=3, tau=0.05, compare="keys"),
    "shared_tokens": dict(r=4, k=4, tau=0.2),
    "protect_sequence_split": dict(r=5, k=2, tau=0.1, protect=3, partition="sequence"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_soft_matches_reference_fullgraph(case):
    m = tiny_vit(img_size=96)
    x = torch.randn(2, 3, 96, 96)
    be = mergepass.backend("soft", lower="eager", merge=CASES[case])
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False, fullgraph=True)(x)
        ref = reference_forward(m, x, be.schedule, extra={"soft": _soft})
        plain = m(x)
    assert [b.kind for b in be.schedule.blocks] == ["soft"] * 3
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(out, plain) > 1e-3


def test_soft_fused_kernel_matches_reference_fullgraph():
    """k = 1 without protection runs as the fused kernel's nearest mode; compiled, it matches the plain reference."""
    require_fused_merge()
    m = tiny_vit(depth=2, img_size=96)
    x = torch.randn(2, 3, 96, 96)
    be = mergepass.backend("soft", lower="inductor", merge={"kernel": "fused", **CASES["hard_tokens"]}, cache=False)
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False, fullgraph=True)(x)
        ref = reference_forward(m, x, be.schedule, extra={"soft": _soft})
    assert be.results[-1].merge_kernel == "fused"
    assert rel_err(out, ref) <= 1e-4


def _tokens(b=2, n=33, c=16, d=8, prefix=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, metric = torch.randn(b, n, c, generator=g), torch.randn(b, n, d, generator=g)
    size = torch.rand(b, n, 1, generator=g) * 3 + 0.5  # as after earlier (soft) merges: fractional
    return x, metric, size


@pytest.mark.parametrize("k,tau,compare", [(1, 0.01, "tokens"), (3, 0.05, "keys"), (5, 1.0, "tokens")])
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_soft_op_matches_reference_and_keeps_invariants(k, tau, compare, prefix):
    x, metric, size = _tokens(prefix=prefix)
    r = 7
    xo, so, src = soft_merge(x, metric, size, None, r=r, prefix=prefix, k=k, tau=tau, compare=compare)
    n = x.shape[1]
    assert xo.shape == (2, n - r, x.shape[2]) and so.shape == (2, n - r, 1)
    torch.testing.assert_close(so.sum(1), size.sum(1))                 # the token count is conserved
    assert torch.equal(xo[:, :prefix], x[:, :prefix]) and torch.equal(so[:, :prefix], size[:, :prefix])
    assert torch.equal(src[:, :prefix], torch.arange(prefix).expand(2, -1))   # protected tokens stay put
    assert (src[:, prefix:] >= prefix).all() and (src < n - r).all()
    for i in range(2):
        groups = [[t] for t in range(n)]
        rx, rs, rg = merge_tokens_soft(x[i], metric[i], size[i, :, 0].tolist(), groups, prefix, r, k, tau, compare)
        torch.testing.assert_close(xo[i], rx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(so[i, :, 0], torch.tensor(rs, dtype=so.dtype), rtol=1e-5, atol=1e-5)
        assert [sorted(torch.nonzero(src[i] == j).flatten().tolist()) for j in range(n - r)] == rg


@pytest.mark.parametrize("compare", ["tokens", "keys"])
@pytest.mark.parametrize("prefix,offset", [(0, 0), (1, 0), (1, 1), (5, 1)])
@pytest.mark.parametrize("r", [9, 10])  # 4-8 unmerged A tokens (every remainder of the blocks of 4), r odd and even
def test_soft_fused_kernel_matches_plain_reference(compare, prefix, offset, r):
    require_fused_merge()
    x, metric, size = _tokens(prefix=prefix, seed=3)
    n = x.shape[1]
    xo, so, src = fused_soft_merge(x, metric, size, None, r=r, prefix=prefix, k=1, compare=compare, offset=offset)
    ref = soft_merge(x, metric, size, None, r=r, prefix=prefix, k=1, compare=compare, offset=offset)
    assert torch.equal(src, ref[2])
    torch.testing.assert_close(xo, ref[0], rtol=1e-5, atol=1e-5)
    for i in range(2):
        groups = [[t] for t in range(n)]
        rx, rs, rg = merge_tokens_soft(x[i], metric[i], size[i, :, 0].tolist(), groups, prefix, r, 1, 0.01, compare,
                                       offset)
        torch.testing.assert_close(xo[i], rx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(so[i, :, 0], torch.tensor(rs, dtype=so.dtype), rtol=1e-5, atol=1e-5)
        assert [sorted(torch.nonzero(src[i] == j).flatten().tolist()) for j in range(n - r)] == rg
    if compare == "tokens":  # on these tokens some leaving token joins an unmerged A token, which ToMe never does
        from mergepass.merge.ops import global_merge
        assert not torch.equal(global_merge(x, x, size, None, r=r, prefix=prefix, offset=offset)[2], src)


def test_soft_fused_kernel_keeps_the_reference_for_shares():
    x, metric, size = _tokens(prefix=1)
    a = fused_soft_merge(x, metric, size, None, r=6, prefix=1, k=3, tau=0.05)
    b = soft_merge(x, metric, size, None, r=6, prefix=1, k=3, tau=0.05)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("compare", ["tokens", "keys"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("r,protect", [(6, 4), (9, 10), (10, 1)])
def test_soft_fused_kernel_protects_the_tokens_the_reference_protects(compare, offset, r, protect):
    """k = 1 with protection runs the kernel: the same merges as the reference ops, and the protected tokens (largest
    metric norms) neither leave nor absorb."""
    require_fused_merge()
    from mergepass.merge.ops import largest_norms
    x, metric, size = _tokens(prefix=1, seed=3)
    kw = dict(r=r, prefix=1, k=1, compare=compare, offset=offset, protect=protect)
    xo, so, src = fused_soft_merge(x, metric, size, None, **kw)
    ref = soft_merge(x, metric, size, None, **kw)
    assert torch.equal(src, ref[2])
    torch.testing.assert_close(xo, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(so, ref[1], rtol=1e-5, atol=1e-5)
    guarded = largest_norms(metric[:, 1:], protect)
    for b in range(x.shape[0]):
        for t in (guarded[b].nonzero()[:, 0] + 1).tolist():
            j = int(src[b, t])
            assert (src[b] == j).sum() == 1 and torch.allclose(so[b, j], size[b, t]) and torch.equal(xo[b, j], x[b, t])


def test_soft_shares_spread_and_sharpen_with_tau():
    """k > 1 spreads a leaving token over several kept tokens (fractional sizes); as tau falls the shares
    concentrate on the nearest, and the merge tends to k = 1's."""
    x, metric, _ = _tokens()
    hard = soft_merge(x, metric, None, None, r=7, prefix=1, k=1)
    wide = soft_merge(x, metric, None, None, r=7, prefix=1, k=4, tau=1.0)
    sharp = soft_merge(x, metric, None, None, r=7, prefix=1, k=4, tau=1e-4)
    shared = lambda s: int(((s - s.round()).abs() > 1e-4).sum())  # noqa: E731  (tokens holding a share)
    assert shared(hard[1]) == 0 and shared(wide[1]) > 7
    assert rel_err(wide[0], hard[0]) > 1e-2
    assert torch.equal(sharp[2], hard[2])
    torch.testing.assert_close(sharp[0], hard[0], rtol=1e-4, atol=1e-4)


def test_soft_rows_are_batch_independent():
    """Static shapes, no cross-image state: merging a batch equals merging each image alone."""
    x, metric, size = _tokens(b=3)
    both = soft_merge(x, metric, size, None, r=5, prefix=1, k=3, tau=0.1)
    for i in range(3):
        one = soft_merge(x[i:i + 1], metric[i:i + 1], size[i:i + 1], None, r=5, prefix=1, k=3, tau=0.1)
        for a, b in zip(both, one):
            torch.testing.assert_close(a[i:i + 1], b)


def test_soft_r0_is_the_original_model():
    m = tiny_vit(img_size=96)
    x = torch.randn(2, 3, 96, 96)
    be = mergepass.backend("soft", merge={"r": 0, "k": 3}, lower="eager")
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False)(x)
        plain = m(x)
    assert not be.schedule.merging
    assert rel_err(out, plain) <= 1e-5


def test_soft_unmerges_outputs_to_their_shape():
    """Patch outputs keep the unmerged token count (each original token reads the token holding it)."""
    m = tiny_vit(img_size=96)
    x = torch.randn(2, 3, 96, 96)
    be = mergepass.backend("soft", merge={"r": 6, "k": 2, "tau": 0.1}, lower="eager")
    f = torch.compile(m.forward_features, backend=be, dynamic=False)
    with torch.no_grad():
        out, plain = f(x), m.forward_features(x)
    assert out.shape == plain.shape == (2, 37, m.embed_dim)


def test_soft_schedule_and_macs_are_tomes(planner):
    tome = planner(12, 224).plan("tome", merge={"r": 16})
    soft = planner(12, 224).plan("soft", merge={"r": 16, "k": 4})
    assert [(b.tokens_in, b.tokens_out) for b in soft.blocks] == [(b.tokens_in, b.tokens_out) for b in tome.blocks]
    assert soft.macs == tome.macs
    assert {b.kind for b in soft.blocks} == {"soft"} and soft.blocks[0].args["k"] == 4
    # k never exceeds the kept tokens free to absorb: the last blocks of a short sequence
    tiny = planner(3, 64).plan("soft", merge={"r": 6, "k": 100})
    assert all(b.args["k"] <= b.tokens_in - 1 - b.r for b in tiny.blocks)


@pytest.mark.parametrize("field,bad", [("k", 0), ("k", 1.5), ("k", True), ("tau", 0), ("tau", float("nan")),
                                       ("tau", -1.0), ("compare", "values")])
def test_soft_rejects_bad_fields(field, bad):
    with pytest.raises(ValueError, match=field):
        mergepass.load_recipe("soft", **{field: bad})


def test_soft_recipes_name_the_method():
    for name in ("soft", "soft_int8"):
        r = mergepass.load_recipe(name)
        assert r.merge.method == "soft" and r.merge.k >= 1
    assert mergepass.load_recipe("soft_int8").quantize.enabled


@functools.cache
def _planner(name: str, depth: int):
    """One capture per model for the schedule tests (257 tokens: a 64 px image in 4 px patches)."""
    return mergepass.pipeline.Planner(tiny_vit(name, depth=depth, img_size=64, patch_size=4), torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", ["soft_delayed_int8", "soft_delayed_protect_int8"])
def test_the_delayed_recipes_give_the_measured_schedule(name):
    """``soft_delayed_int8``: the first block dense, then the least merging spread evenly within MACs 0.611, which on
    a ViT-S at 257 tokens (DINOv2 ViT-S/14's shapes) is the schedule measured: 18, 18, then 19 tokens per block.
    ``soft_delayed_protect_int8``: the same schedule, 3/16 of the patch tokens (48) protected by class attention from
    block 4 on."""
    recipe = mergepass.load_recipe(name).replace(quantize={"enabled": False})
    assert recipe.merge.method == "soft" and mergepass.load_recipe(name).quantize.enabled
    sched = _planner("vit_small_patch16_224", 12).plan(recipe, lower={"prune_rows": False})
    assert sched.tokens == 257
    assert [b.tokens_in - b.tokens_out for b in sched.blocks] == [0, 18, 18] + [19] * 9
    assert sched.macs / sched.base_macs <= 0.611
    protected = [b.index for b in sched.blocks if b.args.get("protect")]
    if name == "soft_delayed_protect_int8":
        assert protected == list(range(4, 12))
        assert sched.blocks[4].args["protect"] == 48  # later, fewer: as many as leave room for the merge
        assert all(0 < b.args["protect"] <= 48 and b.args["protect_by"] == "class_attention" for b in sched.blocks[4:])
    else:
        assert protected == []


@pytest.mark.parametrize("depth", [6, 16])
def test_a_macs_ratio_spreads_the_least_merging_in_budget_evenly_at_any_depth(depth):
    """``r = "auto"`` with ``macs_ratio`` (the delayed recipes' schedule): even after the dense block, later blocks
    taking the remainder, within the budget, and one token fewer would not be."""
    planner, recipe = _planner("vit_tiny_patch16_224", depth), mergepass.load_recipe("soft_delayed_int8")
    sched = planner.plan(recipe, quantize={"enabled": False}, lower={"prune_rows": False})
    r = sched.merge.r
    assert len(r) == depth and r[0] == 0 and sorted(r) == list(r) and r[-1] - r[1] <= 1
    assert 0.6 < sched.macs / sched.base_macs <= 0.611
    q, extra = divmod(sum(r) - 1, depth - 1)  # one token fewer, spread the same way
    fewer = planner.plan(recipe, quantize={"enabled": False}, lower={"prune_rows": False},
                         merge={"r": (0,) + (q,) * (depth - 1 - extra) + (q + 1,) * extra})
    assert fewer.macs / fewer.base_macs > 0.611
    far = planner.plan(recipe, quantize={"enabled": False}, lower={"prune_rows": False}, merge={"macs_ratio": 0.01})
    assert any("macs_ratio=0.01 is out of reach" in n for n in far.notes)


@pytest.mark.parametrize("fields,match", [
    ({"macs_ratio": 1.5}, r"'macs_ratio' must be a number in \[0, 1\], got 1.5"),
    ({"macs_ratio": "0.6"}, r"'macs_ratio' must be a number in \[0, 1\], got '0.6'"),
    ({"macs_ratio": 0.6, "match_tome_r": 16}, r"needs one of 'match_tome_r' \(> 0\) and 'macs_ratio'"),
    ({"macs_ratio": 0.0}, r"needs one of 'match_tome_r' \(> 0\) and 'macs_ratio'"),
])
def test_an_auto_r_names_a_bad_or_missing_budget(fields, match):
    with pytest.raises(ValueError, match=match):
        mergepass.load_recipe("soft_delayed_int8", merge=fields)


@pytest.mark.parametrize("prefix,offset", [(1, 0), (5, 1)])
def test_soft_fused_kernel_on_bf16_tokens_matches_the_reference_ops(prefix, offset):
    """A bf16 graph: the kernel's similarity runs on bf16 unit rows, as the reference ops' bf16 matmul does."""
    require_fused_merge()
    x, metric, size = (t.to(torch.bfloat16) for t in _tokens(prefix=prefix, seed=5))
    xo, so, src = fused_soft_merge(x, metric, size, None, r=9, prefix=prefix, k=1, compare="tokens", offset=offset)
    ref = soft_merge(x, metric, size, None, r=9, prefix=prefix, k=1, compare="tokens", offset=offset)
    assert xo.dtype == torch.bfloat16 and torch.equal(src, ref[2])
    torch.testing.assert_close(xo, ref[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(so, ref[1])


def test_the_merge_op_benchmark_times_tome_and_soft_per_block(capsys):
    require_fused_merge()
    merge_op = benchmark("merge_op")
    assert merge_op.main(["--blocks", "2", "--rounds", "1", "--iters", "1", "--batch", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "int8 ISA" in lines[0] and lines[1].split() == ["tokens", "r", "tome", "tome_tokens", "soft", "tome_screen",
                                                          "soft_screen"]
    rows = [[float(v) for v in line.split()] for line in lines[2:4]]
    assert [r[:2] for r in rows] == [list(map(float, b)) for b in merge_op.BLOCKS[:2]]
    assert all(v > 0 for r in rows for v in r[2:])
    total = [float(v) for v in lines[4].split()[1:]]
    assert total == pytest.approx([a + b for a, b in zip(rows[0][2:], rows[1][2:])], abs=0.02)  # the sum row


def test_class_attention_protection_compiles_to_the_eager_policy():
    """``protect_by = "class_attention"``: the compiled model computes what benchmarks/token_policies.py's eager forward
    does (there the class token's attention comes from its own attention probabilities), and it protects other tokens
    than key norms do."""
    timm = pytest.importorskip("timm")
    tp = benchmark("token_policies")
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=70, depth=4, num_classes=0).eval()
    for blk in m.blocks:  # LayerScale's 1e-5 would hide every merge: give the blocks their full weight
        blk.ls1.gamma.data.fill_(1.0)
        blk.ls2.gamma.data.fill_(1.0)
    x = torch.randn(2, 3, 70, 70)
    outs = {}
    for by in ("class_attention", "keys"):
        merge = {"r": 3, "protect": 4, "protect_by": by, "protect_from": 2}
        be = mergepass.backend("soft", lower="eager", merge=merge, cache=False)
        with torch.no_grad():
            outs[by] = torch.compile(m, backend=be, dynamic=False, fullgraph=True)(x)
    assert [b.merged for b in be.schedule.blocks] == [3, 3, 3, 3]
    with torch.no_grad():
        ref = tp.cls_features(m, x, tp.parse("soft:3*2,soft+protect=4:3*2", 4))
        plain = m(x)
    assert rel_err(outs["class_attention"], ref) <= 1e-4
    assert rel_err(outs["keys"], ref) > 1e-3 and rel_err(plain, ref) > 1e-3


def test_class_attention_protection_needs_the_tokens_compared():
    with pytest.raises(ValueError, match="protect_by.*compare = 'tokens'"):
        mergepass.load_recipe("soft", merge={"protect_by": "class_attention", "compare": "keys"})
    with pytest.raises(ValueError, match="protect_by"):
        mergepass.load_recipe("soft", merge={"protect_by": "attention"})
    with pytest.raises(ValueError, match="protect_from"):
        mergepass.load_recipe("soft", merge={"protect_from": -1})
