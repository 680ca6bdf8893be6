"""The offline schedule search: budget, determinism, a reproducible TOML, and a real gain."""
from pathlib import Path

import pytest
import torch

import mergepass
from mergepass.graph.match import find_blocks
from mergepass.rewrite.capture import capture_graphs, copy_graph_module, prepare
from mergepass.schedule import make_schedule
from mergepass.search.evolve import evolve, fit_budget
from helpers import DINO_CKPT, IMAGES, rel_err, tiny_vit
from reference import reference_forward


def _match(m, x):
    gm, ex = capture_graphs(m, x)[0]
    return find_blocks(copy_graph_module(prepare(gm, ex)))


def test_per_block_r_merges_as_scheduled_and_matches_the_reference():
    m = tiny_vit(depth=4, img_size=96)
    x = torch.randn(2, 3, 96, 96)
    be = mergepass.backend("tome", merge={"r": [0, 6, 3, 1]}, lower="eager")
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False)(x)
        ref = reference_forward(m, x, be.schedule)
    assert [b.merged for b in be.schedule.blocks] == [0, 6, 3, 1]
    assert rel_err(out, ref) <= 1e-4
    with pytest.raises(ValueError, match="lists 3 values but the model has 4 blocks"):
        mergepass.plan(m, x, "tome", merge={"r": [1, 2, 3]})


def test_search_respects_the_budget_is_deterministic_and_round_trips_as_toml(tmp_path):
    m = tiny_vit(depth=4, img_size=96)
    x = torch.randn(4, 3, 96, 96)
    match = _match(m, x)
    calls = []

    def score(recipe):  # a synthetic score that prefers merging late; the search must find that
        calls.append(recipe.merge.r)
        return -sum((4 - i) * r for i, r in enumerate(recipe.merge.r))
    budget = 0.8
    runs = [evolve(match, mergepass.load_recipe("tome"), score, budget, iterations=5, children=4, seed=3)
            for _ in range(2)]
    assert runs[0].recipe.merge.r == runs[1].recipe.merge.r and runs[0].history == runs[1].history
    for r, _ in runs[0].history:  # the schedule mergepass.plan would print, without capturing the model again
        assert make_schedule(match, mergepass.load_recipe("tome", merge={"r": list(r)})).macs_ratio <= budget + 1e-9
    assert runs[0].score >= runs[0].start_score
    assert runs[0].schedule.macs_ratio <= budget
    other = evolve(match, mergepass.load_recipe("tome"), score, budget, iterations=5, children=4, seed=4)
    assert other.history != runs[0].history  # the seed matters
    path = tmp_path / "searched.toml"
    path.write_text(runs[0].recipe.to_toml())
    loaded = mergepass.load_recipe(str(path))
    assert loaded.merge.r == runs[0].recipe.merge.r
    again = mergepass.plan(m, x, str(path), lower={"prune_rows": False})  # the search prices every row
    assert again.token_counts() == runs[0].schedule.token_counts() and again.macs == runs[0].schedule.macs


def test_fit_budget_spends_the_budget():
    m = tiny_vit(depth=4, img_size=96)
    match = _match(m, torch.randn(1, 3, 96, 96))
    x = torch.randn(1, 3, 96, 96)
    r = fit_budget(match, mergepass.load_recipe("tome"), [1.0] * 4, 0.7)
    assert len(set(r)) == 1  # equal weights: constant ToMe
    # budgets count every row of the last block (a compile that prunes it costs less: lower.prune_rows)
    every_row = {"prune_rows": False}
    assert mergepass.plan(m, x, "tome", merge={"r": list(r)}, lower=every_row).macs_ratio <= 0.7
    # the least merging within the budget: one token fewer per block breaks it
    assert mergepass.plan(m, x, "tome", merge={"r": [v - 1 for v in r]}, lower=every_row).macs_ratio > 0.7


SEARCHED = Path(__file__).resolve().parents[1] / "docs" / "results" / "searched" / "dinov2_s14_tome_match_r12.toml"


@pytest.mark.skipif(not (DINO_CKPT.exists() and IMAGES.exists()), reason="needs the shared DINOv2 weights and images")
def test_searched_schedule_beats_constant_tome_on_real_weights():
    """On real weights, the recorded schedule (``python -m mergepass.search`` on the first 64 shared
    images) beats ToMe r=12 at equal MACs on images the search never saw."""
    from mergepass.eval import data, models
    from mergepass.eval.evaluate import Features
    model = Features(models.create("vit_small_patch14_dinov2", img_size=224, checkpoint=str(DINO_CKPT),
                                   num_classes=0)).eval()
    x, _, _ = data.load_images(IMAGES, limit=96, **data.data_config(model.model, 224, crop_pct=0.875))
    held = x[64:96]

    with torch.no_grad():
        ref = torch.cat([model(held[i:i + 16])[:, 0] for i in range(0, len(held), 16)])

    def cos(recipe, **merge):
        torch._dynamo.reset()
        be = mergepass.backend(recipe, lower="eager", merge=merge)
        f = torch.compile(model, backend=be, dynamic=False)
        with torch.no_grad():
            out = torch.cat([f(held[i:i + 16])[:, 0] for i in range(0, len(held), 16)])
        return torch.nn.functional.cosine_similarity(out, ref).mean().item(), be.schedule.macs_ratio
    (searched, macs_s), (constant, macs_c) = cos(str(SEARCHED)), cos("tome", r=12)
    assert macs_s <= macs_c + 1e-6
    assert searched > constant, (searched, constant)


def test_search_takes_any_registered_method_with_per_block_r(monkeypatch, planner):
    """The search keeps a registered method that takes one r per block, and falls back to ToMe for one that
    does not: it reads the registry, not a list of names."""
    from mergepass.rewrite.capture import copy_graph_module, prepare
    from mergepass.graph.match import find_blocks
    from mergepass.methods import base
    from mergepass.methods.tome import ToMe
    from mergepass.search.evolve import searchable

    class Toy(ToMe):
        name = "toy_per_block"

    class Flat(ToMe):
        name = "toy_flat"
        per_block_r = False
    for m in (Toy(), Flat()):
        monkeypatch.setitem(base._METHODS, m.name, m)
    gm, ex = planner(3, 64).graphs[0]
    match = find_blocks(copy_graph_module(prepare(gm, ex)))
    recipe = mergepass.load_recipe("tome")
    assert searchable(recipe.replace(merge={"method": "toy_per_block"}), match).merge.method == "toy_per_block"
    assert searchable(recipe.replace(merge={"method": "toy_flat"}), match).merge.method == "tome"
    assert searchable(recipe.replace(merge={"method": "tomato"}), match).merge.method == "tome"


def test_auto_searches_a_registered_method_block_by_block(monkeypatch, planner):
    """Recipe ``auto`` with images searches per-block r for the most faithful candidate's method, read from
    the registry: a newly registered method that wins is the one searched."""
    from mergepass.rewrite.capture import copy_graph_module, prepare
    from mergepass.graph.match import find_blocks
    from mergepass.methods import base
    from mergepass.methods.tome import ToMe
    from mergepass.search.auto import choose

    class Toy(ToMe):
        name = "toy_auto"
        auto_rank = 5
    monkeypatch.setitem(base._METHODS, "toy_auto", Toy())
    gm, ex = planner(3, 64).graphs[0]
    match = find_blocks(copy_graph_module(prepare(gm, ex)))
    recipe = mergepass.load_recipe("auto", search={"target_speedup": 1.2, "search_iterations": 1})
    choice = choose(match, recipe, lambda r: 0.9 if r.merge.method == "toy_auto" else 0.5)
    searched = [c for c in choice.candidates if c.method.endswith("(searched)")]
    assert [c.method for c in searched] == ["toy_auto (searched)"] and searched[0].recipe.merge.method == "toy_auto"
    assert isinstance(searched[0].r, tuple) and len(searched[0].r) == len(match.blocks)

