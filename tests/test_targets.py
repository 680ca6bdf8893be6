"""Lowering targets: the inductor JIT and the AOTInductor package, reached through one ``lower_stage``."""
import sys
from pathlib import Path

import pytest
import torch

import mergepass
from mergepass import pipeline, targets
from mergepass.graph.lift import Inputs, Lifted
from mergepass.graph.nodes import output_dtypes
from mergepass.pipeline import unchanged
from mergepass.quantize import Quantized
from mergepass.rewrite.capture import capture_graphs
from mergepass.targets import JitTarget, PackageTarget, Work
from helpers import tiny_vit


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()


@pytest.fixture(scope="module")
def graph():
    """A tiny MLP, dynamo's graph of it, its example inputs, and an input of another batch."""
    m, x = _mlp(), torch.randn(2, 8)
    (gm, ex), = capture_graphs(m, x)
    torch._dynamo.reset()
    return m, gm, ex, x


def _work(gm, ex, recipe="none", **kw):
    return Work(gm, ex, Inputs(gm, ex), mergepass.load_recipe(recipe), output_dtypes(gm), **kw)


def _autocast(gm, ex, out_dtypes):
    """A Work whose 'quantized' module (exported, as an int8 engine's is) runs under bf16 autocast, as the
    int8 engines' rest="bf16" does."""
    inputs = Inputs(gm, ex)
    user = inputs.user_inputs(ex)
    module = torch.export.export(Lifted(gm, ex, inputs), user).module()
    q = Quantized(module, inputs.user_idx, user, "test", "static", freezing=False, autocast=torch.bfloat16)
    return Work(gm, ex, inputs, mergepass.load_recipe("none"), out_dtypes, quantized=q)


def test_jit_target_has_no_key_and_builds_a_callable_of_dynamos_inputs(graph):
    m, gm, ex, x = graph
    work, target = _work(gm, ex), JitTarget("inductor")
    assert target.key(work) is None and target.load("any", work) is None
    lowered = target.build(work)
    assert lowered.package is None and lowered.quantized is None and not lowered.cached
    with torch.no_grad():
        torch.testing.assert_close(lowered.run(*ex)[0], m(ex[Inputs(gm, ex).user_idx[0]]))


@pytest.fixture(scope="module")
def package(graph, tmp_path_factory):
    """A PackageTarget's build into a fresh compile cache: (target, work, key, lowered)."""
    _, gm, ex, _ = graph
    mp = pytest.MonkeyPatch()
    mp.setenv("MERGEPASS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    target, work = PackageTarget(runs=True, jit=JitTarget()), _work(gm, ex)
    key = target.key(work)
    assert key is not None and target.load(key, work) is None  # nothing kept yet
    yield target, work, key, target.build(work, key)
    mp.undo()


@pytest.mark.xdist_group("targets_package")  # one worker builds the package once
def test_package_target_keys_builds_and_loads(graph, package, monkeypatch):
    m, gm, ex, _ = graph
    target, work, key, built = package
    assert len(key) == 64 and key == target.key(work)
    assert PackageTarget(cached=False).key(work) is None
    assert target.key(_work(gm, ex, "tome")) != key  # another recipe: another entry
    assert PackageTarget(extra={"export": True}).key(work) != key
    assert built.package.parent.name == key and not built.cached
    monkeypatch.setattr(mergepass.artifact, "write", lambda *a, **k: pytest.fail("built again"))
    kept = target.load(key, work)
    assert kept.cached and kept.package == built.package and kept.said == []
    user = ex[work.inputs.user_idx[0]]
    with torch.no_grad():
        want = m(user)
        for lowered in (built, kept):
            torch.testing.assert_close(lowered.run(*ex)[0], want)
    assert PackageTarget(built.package.parent / "written.pt2").load(key, work).run is None  # export: never loaded


@pytest.mark.xdist_group("targets_package")  # one worker builds the package once
def test_a_package_refuses_inputs_it_cannot_serve_and_still_serves_the_rest(package):
    _, work, _, built = package
    art = mergepass.load(built.package)
    with pytest.raises(ValueError, match="must be float32 of shape"):
        art(torch.randn(2, 9))
    with pytest.raises(ValueError, match="must be float32"):
        art(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(2, 8\)"):  # dynamo's graph had a static batch of 2
        art(torch.randn(5, 8))
    y = torch.randn(2, 8)  # refusals leave it serving
    args = [y if i in work.inputs.user_idx else a for i, a in enumerate(work.example_inputs)]
    with torch.no_grad():
        torch.testing.assert_close(art(y)[0], built.run(*args)[0])


def test_a_jit_graph_under_autocast_casts_its_outputs_once(graph, monkeypatch):
    _, gm, ex, _ = graph
    calls = []
    real = targets.cast_outputs
    monkeypatch.setattr(targets, "cast_outputs", lambda outs, dtypes: calls.append(1) or real(outs, dtypes))
    for want in (torch.float32, torch.bfloat16):  # a float32 model gets float32 back; a bf16 one keeps bf16
        lowered = JitTarget("inductor").build(_autocast(gm, ex, [want]))
        calls.clear()
        with torch.no_grad():
            out = lowered.run(*ex)
        assert out[0].dtype == want and len(calls) == 1


def test_an_int8_package_casts_inside_itself_not_again_in_python(graph, monkeypatch, tmp_path):
    _, gm, ex, _ = graph
    monkeypatch.setenv("MERGEPASS_CACHE_DIR", str(tmp_path))
    calls = []
    real = targets.cast_outputs
    monkeypatch.setattr(targets, "cast_outputs", lambda outs, dtypes: calls.append(1) or real(outs, dtypes))
    work = _autocast(gm, ex, [torch.float32])
    target = PackageTarget(runs=True, jit=JitTarget())
    lowered = target.build(work, target.key(work))
    with torch.no_grad():
        out = lowered.run(*ex)
    assert out[0].dtype == torch.float32 and calls == []
    assert '"autocast": "bfloat16"' in mergepass.artifact.manifest_path(lowered.package).read_text()


def _recording(monkeypatch):
    """Every Work built, with the target lowering it and the function that built it."""
    seen = []
    real = pipeline.Work

    def work(*a, **k):
        caller = sys._getframe(1)
        seen.append((caller.f_code.co_name, caller.f_globals["__name__"], type(caller.f_locals["target"])))
        return real(*a, **k)
    monkeypatch.setattr(pipeline, "Work", work)
    return seen


def test_backend_and_export_lower_through_the_same_lower_stage(monkeypatch, tmp_path):
    seen = _recording(monkeypatch)
    m, x = tiny_vit(depth=2), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.compile(m, backend=mergepass.backend("tome", r=2, lower="eager"), dynamic=False)(x)

    class Built(Exception):
        pass
    monkeypatch.setattr(mergepass.artifact, "write", lambda *a, **k: (_ for _ in ()).throw(Built()))
    with pytest.raises(Built):
        mergepass.export(m, x, "tome", path=tmp_path / "m.pt2", r=2, cache=False)
    assert seen == [("lower_stage", "mergepass.pipeline", JitTarget),
                    ("lower_stage", "mergepass.pipeline", PackageTarget)]


def test_a_declined_graph_is_lowered_unchanged_through_lower_stage(graph, monkeypatch):
    m, gm, ex, _ = graph
    seen = _recording(monkeypatch)
    staged = unchanged(gm, mergepass.load_recipe("tome_int8"), "why")
    assert not staged.int8 and staged.rewrite.notes == ["why"]
    lowered = pipeline.lower_stage(JitTarget("eager"), staged, ex, None, inputs=Inputs(gm, ex),
                                   out_dtypes=output_dtypes(gm), warn=pytest.fail)
    assert lowered.run is gm and lowered.quantized is None
    assert seen == [("lower_stage", "mergepass.pipeline", JitTarget)]


def test_lower_autotune_reaches_inductor_for_both_targets_and_only_when_asked(graph, monkeypatch):
    from torch._inductor import config as inductor_config
    _, gm, ex, _ = graph
    seen = []
    monkeypatch.setattr(targets, "compile_graph", lambda *a, **k: seen.append(k["inductor_config_overrides"]) or gm)

    def write(*a, **k):
        seen.append(k["inductor_config_overrides"])
        raise RuntimeError("stop before compiling")
    monkeypatch.setattr(mergepass.artifact, "write", write)
    for autotune in (False, True):
        work = Work(gm, ex, Inputs(gm, ex), mergepass.load_recipe("none", lower={"autotune": autotune}),
                    output_dtypes(gm))
        JitTarget().build(work)
        with pytest.raises(RuntimeError, match="stop before compiling"):
            PackageTarget(cached=False, path=Path("unused.pt2")).build(work)
    assert seen[0] == seen[1] == {}
    assert seen[2] == seen[3] and seen[2]["max_autotune"] is True
    # inductor knows every setting (a renamed one would fail every compile that asks for it)
    with inductor_config.patch(seen[2]):
        assert inductor_config.max_autotune and inductor_config.autotune_num_choices_displayed == 0
    monkeypatch.setenv("MERGEPASS_VERBOSE", "1")  # inductor's per-GEMM timings are shown
    assert mergepass.load_recipe("none", lower={"autotune": True}).lower.inductor_options() == {"max_autotune": True}
