"""Recipes: loading names, files, dicts and overrides; every bad or unknown field named."""
import warnings

import pytest
import torch

import mergepass
from mergepass.methods import DFEConfig, ToMatoConfig, ToMeConfig
from mergepass.migrate import migrate
from mergepass.quantize import Quantize, base
from mergepass.quantize.base import EngineConfig, QuantEngine
from mergepass.quantize.pt2e import PT2EConfig
from mergepass.recipe import Lower, Search


def test_invalid_recipe_fields_name_the_field():
    with pytest.raises(ValueError, match="'merge.method'"):
        mergepass.backend("tome", merge={"method": "tomee"})
    with pytest.raises(ValueError, match="'r'"):
        mergepass.backend("tome", merge={"r": -1})
    with pytest.raises(ValueError, match=r"unknown recipe field 'rr' \(did you mean 'r'\?\) for method 'tome'"):
        mergepass.load_recipe({"merge": {"method": "tome", "rr": 3}})
    with pytest.raises(ValueError, match=r"unknown recipe field 'rr' \(did you mean 'merge.r'\?\)"):
        mergepass.load_recipe({"rr": 3})
    with pytest.raises(ValueError, match="unknown recipe 'tomee'.*did you mean tome"):
        mergepass.backend("tomee")
    with pytest.raises(ValueError, match="'merge.kernel' must be one of"):
        mergepass.backend("tome", merge={"kernel": "fast"})
    with pytest.raises(ValueError, match="'merge.kernel' = 'fused'.*TensorRT"):
        mergepass.backend("tome", merge={"kernel": "fused"}, lower="tensorrt")


def test_a_field_the_method_does_not_have_is_named_with_its_fields():
    """Each method takes only its own config: another method's field is an error, in an override or the [merge]
    table."""
    for bad in (lambda: mergepass.backend("tome", merge={"budget": 5}),
                lambda: mergepass.load_recipe({"merge": {"method": "tome", "window": 3}}),
                lambda: mergepass.load_recipe({"merge": {"method": "tomato", "r": 4}})):
        with pytest.raises(ValueError, match=r"unknown recipe field '(budget|window|r)' for method '(tome|tomato)'; its "
                                             r"fields: \["):
            bad()
    with pytest.raises(ValueError, match=r"'windw' \(did you mean 'window'\?\) for method 'dfe_lgtm'"):
        mergepass.load_recipe("dfe_lgtm", merge={"windw": 3})
    with pytest.raises(ValueError, match=r"unknown recipe field 'targt' \(did you mean 'target'\?\) for table \[lower\]"):
        mergepass.load_recipe({"merge": {"method": "none"}, "lower": {"targt": "eager"}})
    # switching method keeps the fields both configs have, and only those: ToMe's skip is not ToMato's merge_block
    tome = mergepass.load_recipe("tome", merge={"r": 8, "skip": 1})
    assert tome.replace(merge={"method": "tomato"}).merge == ToMatoConfig()
    assert tome.replace(merge={"method": "dfe"}).merge == DFEConfig(r=8, skip=1)


@pytest.mark.parametrize("table,where", [("search", r"table \[search\]"), ("lower", r"table \[lower\]"),
                                         ("merge", "method 'tome'"), ("quantize", r"\[quantize\]"),
                                         ("quantize.pt2e", r"engine 'pt2e' \(\[quantize.pt2e\]\)")])
def test_an_unknown_field_in_any_table_of_a_recipe_file_is_named(tmp_path, table, where):
    path = tmp_path / "bogus.toml"
    path.write_text(f'[{table}]\nbogus = 1\n')
    with pytest.raises(ValueError, match=rf"recipe file .*bogus.toml: unknown recipe field '(quantize.)?bogus'.* for {where}"):
        mergepass.load_recipe(path)
    if table == "search":
        with pytest.raises(ValueError, match=r"unknown recipe field 'min_cosin' \(did you mean 'min_cosine'\?\) for "
                                             r"table \[search\]"):
            mergepass.load_recipe("tome").replace(search={"min_cosin": 0.9})


FLAT = ('method = "dfe_lgtm"\nr = "auto"\nmatch_tome_r = 12\nwindow = 3\nlower = "eager"\nattention_kernel = "sdpa"\n'
        'target_speedup = 0.0\n[quantize]\nenabled = true\nrest = "fp32"\n')
NESTED = ('[merge]\nmethod = "dfe_lgtm"\nr = "auto"\nmatch_tome_r = 12\nwindow = 3\n'
          '[quantize]\nenabled = true\n[quantize.pt2e]\nrest = "fp32"\n'
          '[lower]\ntarget = "eager"\nattention_kernel = "sdpa"\n')


def _deprecations(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def _load_counting(*args, **kwargs):
    """(recipe, the DeprecationWarnings its loading gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = mergepass.load_recipe(*args, **kwargs)
    return recipe, _deprecations(caught)


def test_an_old_flat_file_migrates_with_one_warning_to_the_nested_recipe(tmp_path):
    """A file in the older flat layout loads to the recipe its nested form gives, saying once which old names it
    read; the nested file says nothing, and to_toml writes the nested form, which loads back equal."""
    (tmp_path / "flat.toml").write_text(FLAT)
    (tmp_path / "nested.toml").write_text(NESTED)
    a, said = _load_counting(tmp_path / "flat.toml")
    b, none = _load_counting(tmp_path / "nested.toml")
    assert len(said) == 1 and none == []
    for old_new in ("r -> merge.r", "window -> merge.window", "method -> merge.method", "lower -> lower.target",
                    "attention_kernel -> lower.attention_kernel", "target_speedup -> search.target_speedup",
                    "quantize.rest -> quantize.pt2e.rest"):
        assert old_new in said[0], old_new
    assert a.replace(name="x") == b.replace(name="x")
    assert (a.merge.method, a.merge.r, a.merge.window, a.lower.target, a.quantize.options("pt2e").rest) == \
        ("dfe_lgtm", "auto", 3, "eager", "fp32")
    again = tmp_path / "again.toml"
    again.write_text(a.to_toml())
    c, none = _load_counting(again)
    assert "[merge]" in again.read_text() and none == [] and c.replace(name="x") == a.replace(name="x")


def test_old_flat_dicts_and_overrides_migrate_with_one_warning():
    nested = mergepass.load_recipe({"merge": {"method": "tome", "r": 8, "prop_attn": False},
                                    "quantize": {"enabled": True, "pt2e": {"observer": "minmax"}},
                                    "lower": {"target": "eager"}})
    flat = {"method": "tome", "r": 8, "prop_attn": False, "quantize": {"enabled": True, "observer": "minmax"},
            "lower": "eager"}
    got, said = _load_counting(flat)
    assert got == nested and len(said) == 1 and "quantize.observer -> quantize.pt2e.observer" in said[0]
    got, said = _load_counting("tome", r=8, prop_attn=False, quantize_enabled=True, quantize_observer="minmax",
                               lower="eager")
    assert got.replace(name="custom", description="") == nested and len(said) == 1
    assert "quantize_observer -> quantize.observer" in said[0] and "lower -> lower.target" in said[0]
    # an old file and old overrides together: still one warning
    got, said = _load_counting({"method": "tome", "r": 4}, r=8, lower="eager")
    assert got.merge.r == 8 and got.lower.target == "eager" and len(said) == 1
    with pytest.warns(DeprecationWarning, match=r"r -> merge\.r") as caught:
        again = mergepass.load_recipe("tome").replace(r=8)
    assert again.merge == ToMeConfig(r=8) and len(_deprecations(caught)) == 1
    with pytest.warns(DeprecationWarning) as caught:
        assert migrate({"method": "tome", "r": 8}) == {"merge": {"method": "tome", "r": 8}}
    assert len(_deprecations(caught)) == 1


def test_the_nested_form_and_the_shipped_recipes_say_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in mergepass.recipe.available():
            mergepass.load_recipe(name)
        r = mergepass.load_recipe("tome_int8", merge={"r": 8}, quantize={"pt2e": {"rest": "fp32"}},
                                  lower={"attention_kernel": "sdpa"}, search={"min_cosine": 0.5})
        assert migrate(r.to_dict()) == r.to_dict()


def test_another_methods_flat_default_is_dropped_and_said():
    """A flat file names every method's fields: another method's at the flat default is dropped, in the warning."""
    got, said = _load_counting({"method": "tome", "r": 8, "budget": 0.2, "window": "auto"})
    assert got.merge == ToMeConfig(r=8) and len(said) == 1
    assert "budget = 0.2 dropped (not a field of method 'tome')" in said[0]
    with pytest.raises(ValueError, match="unknown recipe field 'budget' for method 'tome'"):
        mergepass.load_recipe({"method": "tome", "budget": 0.3})  # not the default: an error, not dropped


def test_flat_reads_are_attribute_errors():
    r = mergepass.load_recipe("tome_int8")
    for name in ("r", "skip", "target_speedup", "attention_kernel", "attention_tolerance"):
        with pytest.raises(AttributeError):
            getattr(r, name)
    for name in ("rest", "sensitivity", "observer"):
        with pytest.raises(AttributeError):
            getattr(r.quantize, name)
    assert (r.merge.r, r.search.target_speedup, r.lower.attention_kernel, r.quantize.options("pt2e").sensitivity) \
        == (16, Search().target_speedup, Lower().attention_kernel, 6.0)


def test_merge_fields_have_one_name_on_the_method_config():
    """``[merge]``'s method, prop_attn and kernel are fields of the method's config, as TOML names them: the recipe
    has no second name for them, and every shipped file's keys read back by their table and name."""
    import dataclasses
    import tomllib
    assert [f.name for f in dataclasses.fields(mergepass.Recipe)] == ["name", "merge", "quantize", "search", "lower",
                                                                      "description"]
    r = mergepass.load_recipe("tome_int8", merge={"prop_attn": False, "kernel": "reference"})
    assert (r.merge.method, r.merge.prop_attn, r.merge.kernel) == ("tome", False, "reference")
    for name in ("method", "prop_attn", "merge_kernel", "kernel"):
        with pytest.raises(AttributeError):
            getattr(r, name)
    with pytest.raises(TypeError):
        mergepass.Recipe(method="tome")
    assert ToMeConfig(r=8).method == "tome" and DFEConfig().method == "dfe"
    with pytest.raises(ValueError, match=r"'merge' must be a DFEConfig for method 'dfe', got ToMeConfig"):
        ToMeConfig(method="dfe")
    for name in mergepass.recipe.available():
        path = mergepass.recipe.recipes_dir() / f"{name}.toml"
        table, recipe = tomllib.loads(path.read_text()), mergepass.load_recipe(name)
        for t in ("merge", "search", "lower"):
            for k, v in table.get(t, {}).items():
                assert getattr(getattr(recipe, t), k) == (tuple(v) if isinstance(v, list) else v), (name, t, k)
        assert mergepass.recipe.from_dict(tomllib.loads(recipe.to_toml()), name=name) == recipe, name
        assert list(recipe.to_dict()["merge"])[:3] == ["method", "prop_attn", "kernel"]


def test_old_merge_names_in_overrides_warn_once_and_map():
    """``method=``, ``prop_attn=`` and ``merge_kernel=`` (the old keywords) go through the one migration, with one
    warning; a top-level ``kernel`` was never a name and stays an error."""
    got, said = _load_counting("tome", method="dfe", prop_attn=False, merge_kernel="reference")
    assert got.merge == DFEConfig(prop_attn=False, kernel="reference") and len(said) == 1
    for old_new in ("method -> merge.method", "prop_attn -> merge.prop_attn", "merge_kernel -> merge.kernel"):
        assert old_new in said[0], old_new
    with pytest.warns(DeprecationWarning, match=r"merge_kernel -> merge\.kernel") as caught:
        again = mergepass.load_recipe("tome").replace(merge_kernel="fused")
    assert again.merge.kernel == "fused" and len(_deprecations(caught)) == 1
    with pytest.raises(ValueError, match=r"unknown recipe field 'kernel' \(did you mean 'merge.kernel'\?\)"):
        mergepass.load_recipe("tome", kernel="fused")


def test_auto_candidates_keep_the_recipes_shared_merge_fields(planner):
    """Recipe ``auto`` swaps the method's config for a candidate's: proportional attention and the kernel stay the
    recipe's. The schedule keeps that config, and of the recipe only what its table prints."""
    s = planner(6, 128, batch=2).plan("auto", merge={"prop_attn": False, "kernel": "reference"},
                                      search={"target_speedup": 1.5})
    assert s.merge.method != "auto" and (s.merge.prop_attn, s.merge.kernel) == (False, "reference")
    assert not hasattr(s, "recipe") and (s.recipe_name, s.quantize) == ("auto", "off")
    assert f"recipe=auto method={s.merge.method}" in s.table() and "prop_attn=False  quantize=off" in s.table()


def test_tomato_merge_block_and_tome_skip_are_two_fields(planner):
    """ToMe's skip counts dense blocks at the start; ToMato's one merging block is merge_block. ToMato's old
    skip migrates to merge_block with a warning."""
    assert "merge_block" in ToMatoConfig.field_names() and "skip" not in ToMatoConfig.field_names()
    tomato = planner(3, 96).plan("tomato", merge={"merge_block": 1, "budget": 10})
    assert [b.kind for b in tomato.blocks] == ["dense", "adjacent", "dense"]
    tome = planner(3, 96).plan("tome", merge={"skip": 1, "r": 4})
    assert [b.kind for b in tome.blocks] == ["dense", "global", "global"]
    for old in ({"method": "tomato", "skip": 1}, {"merge": {"method": "tomato", "skip": 1}}):
        got, said = _load_counting(old)
        assert got.merge == ToMatoConfig(merge_block=1) and len(said) == 1 and "merge_block" in said[0]
    got, said = _load_counting("tomato", skip=2)
    assert got.merge.merge_block == 2 and len(said) == 1
    with pytest.raises(ValueError, match=r"unknown recipe field 'merge_block' for method 'tome'"):
        mergepass.load_recipe("tome", merge={"merge_block": 1})


def test_unknown_old_names_still_error_by_name():
    with pytest.raises(ValueError, match=r"unknown recipe field 'rr' \(did you mean 'merge.r'\?\)"):
        mergepass.load_recipe({"method": "tome", "rr": 3})
    with pytest.raises(ValueError, match=r"unknown recipe field 'quantize.obsrver'"):
        mergepass.load_recipe("int8", quantize_obsrver="minmax")
    with pytest.raises(ValueError, match=r"unknown recipe field 'windw' \(did you mean 'merge.window'\?\)"):
        mergepass.load_recipe("dfe_lgtm", windw=3)


def test_an_engine_registered_after_a_quantize_was_built_resolves(monkeypatch):
    """A Quantize serves an engine registered after it was built (its defaults), and ``engine_config`` is the
    config of the engine ``resolve_engine`` picks, not of the first registered."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class LateConfig(EngineConfig):
        depth: int = 3

    class Late(QuantEngine):
        name, config, priority = "late", LateConfig, 100

        def is_default(self, lower, on_cuda):
            return lower == "eager"

    before = Quantize(enabled=True, engines=(PT2EConfig(rest="fp32"),))
    monkeypatch.setattr(base, "_ENGINES", dict(base._ENGINES))
    base.register_engine(Late())
    assert before.options("late") == LateConfig()
    assert before.engine_config("eager") == LateConfig()  # the priority resolve_engine reads
    assert before.engine_config("inductor", (torch.zeros(1),)) == PT2EConfig(rest="fp32")
    assert before.engine_config("tensorrt").__class__.__name__ == "ModelOptConfig"
    assert before.to_dict()["late"] == {"depth": 3}
    assert before == Quantize(enabled=True, engines=(PT2EConfig(rest="fp32"),))  # built after: equal
    assert before.updated({"late": {"depth": 5}}).options("late") == LateConfig(depth=5)


@pytest.mark.parametrize("table, field", [("merge", "prop_attn"), ("lower", "prune_rows"), ("lower", "autotune")])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_true_or_false_field_refuses_anything_else_by_name(table, field, value):
    with pytest.raises(ValueError, match=rf"recipe field '{table}\.{field}' must be true or false, got {value!r}"):
        mergepass.load_recipe("tome", **{table: {field: value}})
    assert getattr(getattr(mergepass.load_recipe("tome", **{table: {field: False}}), table), field) is False


def test_the_benchmarks_tome_reference_has_soft_delayed_int8s_schedule_and_int8():
    """``benchmarks/recipes/tome_delayed_int8.toml`` is timed as ToMe at ``soft_delayed_int8``'s MACs: the same
    tokens in every block, the same quantization, only the merge method differs."""
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes" / "tome_delayed_int8.toml"
    tome, soft = mergepass.load_recipe(path), mergepass.load_recipe("soft_delayed_int8")
    assert (tome.merge.method, soft.merge.method) == ("tome", "soft")
    for f in ("r", "macs_ratio", "skip", "partition", "protect", "prop_attn"):
        assert getattr(tome.merge, f) == getattr(soft.merge, f), f
    assert tome.quantize == soft.quantize and tome.lower == soft.lower
