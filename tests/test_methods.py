"""DFE, DFE+LGTM and ToMato end to end (compiled, fullgraph, static shapes) against the eager reference."""
import pytest
import torch

import mergepass
from mergepass.methods.dfe import default_skip
from mergepass.methods.dfe_lgtm import default_window
from helpers import rel_err, tiny_vit
from reference import reference_forward

CASES = {
    "dfe": dict(recipe="dfe", overrides=dict(skip=1, r=4), kinds=["dense", "global", "global"]),
    "dfe_lgtm": dict(recipe="dfe_lgtm", overrides=dict(skip=1, r=8, window=3),
                     kinds=["dense", "local", "local"]),
    "dfe_lgtm_padded": dict(recipe="dfe_lgtm", overrides=dict(skip=0, r=6, window=3, transition=2),
                            kinds=["local", "global", "global"], img=80),
    "tomato": dict(recipe="tomato", overrides=dict(budget=10), kinds=["adjacent", "dense", "dense"]),
    "tomato_cosine": dict(recipe="tomato", overrides=dict(budget=10, similarity="cosine"),
                          kinds=["adjacent", "dense", "dense"]),
    "tomato_tome": dict(recipe="tomato", overrides=dict(method="tomato_tome", budget=10, r=4),
                        kinds=["adjacent", "global", "global"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_reference_fullgraph(case):
    c = CASES[case]
    img = c.get("img", 96)
    m = tiny_vit(img_size=img)
    x = torch.randn(2, 3, img, img)
    be = mergepass.backend(c["recipe"], lower="eager", merge=c["overrides"])  # inductor: test_backend's fused parity
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False, fullgraph=True)(x)
        ref = reference_forward(m, x, be.schedule)
        plain = m(x)
    assert [b.kind for b in be.schedule.blocks] == c["kinds"]
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(out, plain) > 1e-3


@pytest.mark.parametrize("recipe,over", [("dfe", dict(r=4, skip=3)), ("dfe_lgtm", dict(r=4, skip=3)),
                                         ("tomato", dict(budget=5, merge_block=3))])
def test_skip_or_merge_block_equal_to_depth_merges_nothing(recipe, over):
    m = tiny_vit(img_size=96)
    x = torch.randn(2, 3, 96, 96)
    be = mergepass.backend(recipe, merge=over, lower="eager")
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False)(x)
        plain = m(x)
    assert not be.schedule.merging
    assert rel_err(out, plain) <= 1e-5


def test_resolved_defaults_follow_the_paper(planner):
    assert default_skip(12) == 2 and default_skip(24) == 4
    assert default_window((14, 14)) == 7 and default_window((16, 16)) == 8
    assert default_window((37, 37)) == 19  # prime grid: padded windows
    sched = planner(12, 224).plan("dfe_lgtm")
    r = sched.merge
    assert (r.skip, r.window) == (2, 7)
    kinds = [b.kind for b in sched.blocks]
    assert kinds[:2] == ["dense", "dense"] and kinds[2] == "local"
    # Algorithm 1: local while the (growing) window is smaller than sqrt(remaining tokens)
    locals_ = [b for b in sched.blocks if b.kind == "local"]
    assert r.transition == len(locals_) >= 1
    assert [b.detail["window_side"] for b in locals_] == list(range(7, 7 + len(locals_)))
    for b in locals_:
        assert b.detail["window_side"] < round((b.tokens_in - 1) ** 0.5)
    nxt = sched.blocks[2 + len(locals_)]
    assert nxt.kind == "global"
    assert "window=7" in sched.table() and "local 2x2 win" in sched.table()


@pytest.mark.parametrize("recipe,overrides", [("dfe", {}), ("dfe_lgtm", {}),
                                              ("tomato", dict(method="tomato_tome", r="auto", match_tome_r=16)),
                                              ("tomato", dict(budget="auto", match_tome_r=16))])
def test_auto_strength_matches_tome_macs(recipe, overrides, planner):
    tome = planner(12, 224).plan("tome", merge={"r": 16})
    other = planner(12, 224).plan(recipe, merge=overrides)
    assert abs(other.macs / tome.macs - 1) <= 0.05



@pytest.mark.parametrize("recipe", ["tome", "dfe_lgtm"])
def test_protection_yields_to_r_and_scales_with_patches(recipe, planner):
    """``protect`` never changes a schedule's merges or MACs: it shrinks where tokens run low. A fraction
    is of the patch tokens (49 here)."""
    plain = planner(6, 112).plan(recipe, merge={"r": 8})
    for protect, want in ((6, 6), (0.0625, 3)):
        s = planner(6, 112).plan(recipe, merge={"r": 8, "protect": protect})
        assert [(b.kind, b.tokens_out) for b in s.blocks] == [(b.kind, b.tokens_out) for b in plain.blocks]
        assert s.macs == plain.macs
        steps = [b for b in s.blocks if b.kind == "global"]
        assert [b.args.get("protect", 0) for b in steps] == [min(want, (b.tokens_in - 1) // 2 - b.r) for b in steps]
        assert steps[0].args["protect"] == want
    assert steps[-1].args.get("protect", 0) < want  # the last block has too few tokens for all


@pytest.mark.parametrize("bad", [-1, 1.5, True, "many"])
def test_protect_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="protect"):
        mergepass.load_recipe("tome", merge={"protect": bad})

def test_tomato_budget_fraction_and_clamp(planner):
    assert planner(3, 96).plan("tomato", merge={"budget": 0.25}).blocks[0].merged == 9
    s = planner(3, 96).plan("tomato", merge={"budget": 30})
    assert s.blocks[0].merged == 18 and "clamped" in s.blocks[0].note


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3, 1.01])
def test_tomato_flood_fill_matches_paper_algorithm(threshold):
    from mergepass.search.tomato_budget import flood_fill_groups
    from reference import tomato_flood_fill
    metric = torch.randn(6 * 7, 4)
    assert flood_fill_groups(metric, (6, 7), threshold, "cosine") == tomato_flood_fill(metric, (6, 7), threshold)


@pytest.mark.parametrize("sim", [0.0, 1e-7, 0.01, 0.03, 0.1, 1.01])
def test_tomato_flood_fill_softmax_matches_the_papers_algorithm(sim):
    """The default (softmax) flood fill is the paper's Algorithms 1-2 with its directed probability test
    (tests/reference.py); at these thresholds the groups are neither all singletons nor one group."""
    from mergepass.search.tomato_budget import flood_fill_groups
    from reference import tomato_flood_fill_paper
    torch.manual_seed(2)
    tokens = torch.randn(6 * 7, 4)
    got = flood_fill_groups(tokens, (6, 7), sim)
    assert got == tomato_flood_fill_paper(tokens, (6, 7), sim)
    if sim in (0.03, 0.1):
        assert 1 < len(got) < 42


def test_tomato_flood_fill_softmax_is_directed():
    """Cell 0's row passes its neighbour 1 while 1's row does not pass 0: visiting 0 first absorbs 1,
    but the order 1 -> 0 (a symmetric test would absorb 0 both ways) does not."""
    from mergepass.search.tomato_budget import flood_fill_groups
    tokens = torch.zeros(2, 2)
    tokens[0] = torch.tensor([1.0, 0.0])  # row 0: softmax(1, 2) -> cell 1 has 0.73
    tokens[1] = torch.tensor([2.0, 0.0])  # row 1: softmax(2, 4) -> cell 0 has 0.12
    assert flood_fill_groups(tokens, (1, 2), 0.5) == [[0, 1]]
    assert flood_fill_groups(tokens.flip(0), (1, 2), 0.5) == [[0], [1]]


def test_tomato_budget_from_threshold_drives_the_static_merge():
    from mergepass.search.tomato_budget import budget_from_threshold
    m = tiny_vit(img_size=96)
    imgs = [torch.randn(2, 3, 96, 96)]
    budgets = [budget_from_threshold(m, imgs, t, similarity="cosine") for t in (1.01, 0.5, 0.0, -1.01)]
    assert budgets[0] == 0 and budgets[-1] == 35  # nothing passes / everything joins one group
    assert budgets == sorted(budgets)  # a lower threshold merges more
    sched = mergepass.plan(m, imgs[0], "tomato", merge={"budget": budgets[1]})
    assert sched.blocks[0].merged == min(budgets[1], 18)


def test_tomato_budget_from_the_papers_probability_thresholds():
    """Thresholds are the paper's ``sim`` (probabilities of the post-attention tokens' row-softmax):
    1.01 keeps every token, 0 joins all, and lower thresholds merge more; the counts are the paper's
    flood fill (tests/reference.py) on the first block's post-attention tokens."""
    from mergepass.search.tomato_budget import budget_from_threshold, removed_per_image
    from reference import _family, tomato_flood_fill_paper
    m = tiny_vit(img_size=96)
    imgs = [torch.randn(2, 3, 96, 96)]
    sims = (1.01, 1e-7, 1e-24, 1e-26, 1e-28, 0.0)  # this random model's softmax is peaked: tiny thresholds
    budgets = [budget_from_threshold(m, imgs, t) for t in sims]
    assert budgets[0] == 0 and budgets[-1] == 35
    assert budgets == sorted(budgets) and 0 < budgets[3] < 35
    fam = _family(m)  # block 0's post-attention patch tokens, from the reference's own forward
    with torch.no_grad():
        x0 = fam.embed(imgs[0])
        post = [fam.attention_residual(m.blocks[0], x0[b], None, list(range(37)))[0][1:] for b in range(2)]
    for t in (1e-24, 1e-26, 1e-28):
        assert removed_per_image(m, imgs, t) == [36 - len(tomato_flood_fill_paper(p, (6, 6), t)) for p in post]


def test_tomato_similarity_is_a_validated_recipe_field():
    assert mergepass.load_recipe("tomato").merge.similarity == "softmax"  # the paper's, by default
    assert mergepass.load_recipe("tomato", merge={"similarity": "cosine"}).merge.similarity == "cosine"
    for bad in ("dot", "", 1):
        with pytest.raises(ValueError, match="recipe field 'similarity'"):
            mergepass.load_recipe("tomato", merge={"similarity": bad})
    with pytest.raises(ValueError, match="recipe field 'similarity'"):
        mergepass.backend("tomato", merge={"similarity": "Softmax"})


def test_shipped_tomato_recipes_sit_at_the_papers_operating_point(planner):
    """The paper removes 8.16-20.92% of DeiT-B's tokens at block 0 (sim = 1e-7): the shipped recipe
    removes 15% of the patch tokens once, in the first block, with the paper's similarity; its int8
    variant plans the same merges."""
    s = planner(12, 224).plan("tomato")
    assert [b.kind for b in s.blocks] == ["adjacent"] + ["dense"] * 11
    assert 0.08 <= s.blocks[0].merged / 196 <= 0.21
    assert s.blocks[0].args["similarity"] == "softmax"
    q = planner(12, 224).plan("tomato_int8")
    assert [(b.kind, b.merged, b.args) for b in q.blocks] == [(b.kind, b.merged, b.args) for b in s.blocks]
    assert q.quantize == "int8-static" and s.quantize == "off"


@pytest.mark.parametrize("r,inflect", [(16, -0.5), (16, 0.0), (8, 0.5), (13, 1.0), (16, -1.0)])
def test_tome_inflect_shorthand_follows_official_tome(r, inflect, planner):
    """``r = [r, inflect]``: ToMe's schedule shorthand, block by block as official ToMe's ``parse_r``."""
    from reference import tome_parse_r
    want = tome_parse_r(12, (r, inflect))
    s = planner(12, 224).plan("tome", merge={"r": (r, inflect)})
    assert s.merge.r == tuple(want)
    assert [b.r for b in s.blocks] == [min(w, (b.tokens_in - 1) // 2) for w, b in zip(want, s.blocks)]
    if inflect == 0.0:
        assert s.macs == planner(12, 224).plan("tome", merge={"r": r}).macs
    assert mergepass.load_recipe({"merge": {"method": "tome", "r": [r, inflect]}}).merge.r == (r, inflect)  # TOML's [r, inflect]


@pytest.mark.parametrize("bad", [(16, 1.5), (16, -2.0), (-1, 0.5), (1.5, 0.5)])
def test_tome_inflect_shorthand_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="r"):
        mergepass.load_recipe("tome", merge={"r": bad})
