"""Recipes: loading names, files, dicts and overrides; every bad or unknown field named."""
import pytest

import mergepass


def test_invalid_recipe_fields_name_the_field():
    with pytest.raises(ValueError, match="'method'"):
        mergepass.backend("tome", method="tomee")
    with pytest.raises(ValueError, match="'r'"):
        mergepass.backend("tome", r=-1)
    with pytest.raises(ValueError, match="unknown recipe field 'rr'"):
        mergepass.load_recipe({"method": "tome", "rr": 3})
    with pytest.raises(ValueError, match="unknown recipe 'tomee'.*did you mean tome"):
        mergepass.backend("tomee")
    with pytest.raises(ValueError, match="'merge_kernel' must be one of"):
        mergepass.backend("tome", merge_kernel="fast")
    with pytest.raises(ValueError, match="'merge_kernel' = 'fused'.*TensorRT"):
        mergepass.backend("tome", merge_kernel="fused", lower="tensorrt")


def test_a_field_the_method_does_not_have_is_named_with_its_fields():
    """Each method takes only its own config: another method's field is an error, in a keyword, a flat table or
    the [merge] table."""
    for bad in (lambda: mergepass.backend("tome", budget=5), lambda: mergepass.load_recipe({"method": "tome", "window": 3}),
                lambda: mergepass.load_recipe({"merge": {"method": "tomato", "r": 4}})):
        with pytest.raises(ValueError, match=r"unknown recipe field '(budget|window|r)' for method '(tome|tomato)'; its "
                                             r"fields: \["):
            bad()
    with pytest.raises(ValueError, match=r"'windw' \(did you mean 'window'\?\) for method 'dfe_lgtm'"):
        mergepass.load_recipe("dfe_lgtm", windw=3)
    with pytest.raises(ValueError, match=r"unknown recipe field 'targt' \(did you mean 'target'\?\) for table \[lower\]"):
        mergepass.load_recipe({"method": "none", "lower": {"targt": "eager"}})
    # switching method keeps the fields both configs have
    r = mergepass.load_recipe("tome", r=8, skip=1).replace(method="tomato")
    assert r.merge == type(r.merge)(skip=1) and r.replace(method="dfe").merge.skip == 1


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


def test_flat_recipes_and_overrides_map_onto_the_nested_shape(tmp_path):
    """A flat recipe file (older layout) loads to the recipe its nested form gives, and to_toml writes the nested
    form, which loads back equal."""
    flat = tmp_path / "flat.toml"
    flat.write_text('method = "dfe_lgtm"\nr = "auto"\nmatch_tome_r = 12\nwindow = 3\nlower = "eager"\n'
                    'target_speedup = 0.0\n[quantize]\nenabled = true\n')
    nested = tmp_path / "nested.toml"
    nested.write_text('[merge]\nmethod = "dfe_lgtm"\nr = "auto"\nmatch_tome_r = 12\nwindow = 3\n'
                      '[quantize]\nenabled = true\n[lower]\ntarget = "eager"\n')
    a, b = mergepass.load_recipe(flat), mergepass.load_recipe(nested)
    assert a.replace(name="x") == b.replace(name="x")
    assert (a.method, a.r, a.window, a.lower, a.quantize.enabled) == ("dfe_lgtm", "auto", 3, "eager", True)
    again = tmp_path / "again.toml"
    again.write_text(a.to_toml())
    assert "[merge]" in again.read_text() and mergepass.load_recipe(again).replace(name="x") == a.replace(name="x")
    assert mergepass.load_recipe("int8", quantize_rest="fp32").quantize.rest == "fp32"
