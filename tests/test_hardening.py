"""Failure paths a new user meets: the wheel, reduced precision, dynamic shapes, global settings,
calibration data, swallowed errors, the fused op's inputs, recipe files. The command lines' are in test_cli.py."""
import logging
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import mergepass
from mergepass.merge import fused
from mergepass.methods import base as methods_base
from helpers import rel_err, require_fused_merge, tiny_vit
from reference import reference_forward

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=None, env=None, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


# -- 1. the wheel ships the recipes ----------------------------------------------------------------

def test_wheel_ships_and_loads_every_recipe(tmp_path):
    import shutil
    # built from a copy: an in-tree build would leave build/ behind, and a stale one would ship old files
    src = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "__pycache__", ".git", ".hypothesis", ".pytest_cache", "*.pt2"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("mergepass-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).stem for n in names if n.startswith("mergepass/recipes/") and n.endswith(".toml"))
    assert shipped == sorted(p.stem for p in (ROOT / "mergepass" / "recipes").glob("*.toml")) and shipped
    assert "mergepass/merge/csrc/bipartite_merge.cpp" in names and "mergepass/kernels/csrc/attention.cpp" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what pip install puts in site-packages
    code = ("import mergepass; names = mergepass.available_recipes(); "
            "[mergepass.load_recipe(n) for n in names]; print(mergepass.__file__); print(' '.join(names))")
    env = {k: v for k, v in os.environ.items() if k != "MERGEPASS_RECIPES"}
    env["PYTHONPATH"] = str(target)  # ahead of the editable install of the checkout
    res = _run("-c", code, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    where, listed = res.stdout.splitlines()[-2:]
    assert where.startswith(str(target)), where  # the installed copy, not the checkout
    assert listed.split() == shipped


# -- 2. bf16 and fp16 models -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recipe,overrides", [("tome", dict(r=4)), ("tomato", dict(budget=10)),
                                              ("dfe_lgtm", dict(skip=0, r=6, window=3, transition=2))])
def test_reduced_precision_models_merge_with_the_fused_kernel(dtype, recipe, overrides):
    require_fused_merge()
    m = tiny_vit(img_size=96).to(dtype)
    x = torch.randn(2, 3, 96, 96).to(dtype)
    outs = {}
    for kernel in ("fused", "reference"):
        torch._dynamo.reset()
        be = mergepass.backend(recipe, merge={"kernel": kernel, **overrides}, lower="eager")
        with torch.no_grad():
            outs[kernel] = torch.compile(m, backend=be, dynamic=False, fullgraph=True)(x)
    assert outs["fused"].dtype == dtype and be.schedule.merging
    assert rel_err(outs["fused"].float(), outs["reference"].float()) <= 3e-2
    with torch.no_grad():
        plain = m.float()(x.float())
    assert torch.nn.functional.cosine_similarity(outs["fused"].float(), plain).min() > 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_op_accumulates_reduced_precision_in_float(dtype):
    require_fused_merge()
    torch.manual_seed(0)
    x, metric = (torch.randn(2, 33, 16) * 100).to(dtype), torch.randn(2, 33, 8).to(dtype)
    exact = fused.fused_global_merge(x.double(), metric.double(), None, None, r=8, prefix=1)
    low = fused.fused_global_merge(x, metric, None, None, r=8, prefix=1)
    for a, b in zip(low, exact):
        assert a.dtype == (torch.long if b.dtype == torch.long else dtype)
    assert torch.equal(low[2], exact[2])
    # one rounding of the float result, not one per partial sum
    tol = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    assert ((low[0].double() - exact[0]).abs() <= tol * exact[0].abs() + 1e-3).all()


# -- 3. dynamic shapes -------------------------------------------------------------------------------

def _compiles():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _plain_compiles(m, sizes, **kw):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    f = torch.compile(m, backend="eager", **kw)
    with torch.no_grad():
        for b in sizes:
            f(torch.randn(b, 3, 64, 64))
    count = _compiles()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return count


@pytest.mark.parametrize("recipe", ["tome", "tome_int8"])
def test_dynamic_batch_merges_and_quantizes_every_batch_size(recipe):
    m = tiny_vit(depth=2)
    sizes = (3, 8, 5, 1)
    plain = _plain_compiles(m, sizes, dynamic=True)
    be = mergepass.backend(recipe, merge={"r": 3}, calibration=[torch.randn(4, 3, 64, 64)], lower="eager")
    f = torch.compile(m, backend=be, dynamic=True)
    with torch.no_grad():
        for b in sizes:
            x = torch.randn(b, 3, 64, 64)
            out = f(x)
            ref = reference_forward(m, x, be.schedule)
            assert be.schedule.merging and out.shape == ref.shape
            cos = torch.nn.functional.cosine_similarity(out, ref).min().item()
            assert cos > (0.99 if "int8" in recipe else 1 - 1e-6), (b, cos)
    # dynamo compiles batch 1 on its own (0/1 specialisation); mergepass adds no compile to that
    assert _compiles() == plain, (_compiles(), plain)
    assert all(r.rewrite.merged for r in be.results)
    if "int8" in recipe:
        assert be.quantized and all(q.mode == "static" for q in be.quantized)


def test_one_compile_serves_every_batch_size_with_a_dynamic_batch():
    """One graph for every batch size marked dynamic (int8 with a dynamic batch under inductor: test_cache.py)."""
    m = tiny_vit(depth=2)
    be = mergepass.backend("tome", merge={"r": 3})
    f = torch.compile(m, backend=be)
    torch._dynamo.utils.counters.clear()
    x = torch.randn(3, 3, 64, 64)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        for x in (x, torch.randn(8, 3, 64, 64), torch.randn(5, 3, 64, 64), torch.randn(2, 3, 64, 64)):
            out = f(x)
            cos = torch.nn.functional.cosine_similarity(out, reference_forward(m, x, be.schedule)).min().item()
            assert cos > 1 - 1e-6
    assert _compiles() == 1 and be.schedule.merging


class TokenViT(torch.nn.Module):
    """Transformer blocks over a token sequence of any length (a timm ViT minus its patch embedding)."""

    def __init__(self):
        super().__init__()
        self.vit = tiny_vit(depth=2)

    def forward(self, tokens):
        x = tokens
        for blk in self.vit.blocks:
            x = blk(x)
        return self.vit.norm(x).mean(1)


@pytest.mark.parametrize("recipe,names_int8", [("tome", False), ("tome_int8", True)])
def test_symbolic_token_count_compiles_unmerged_with_one_warning(recipe, names_int8):
    m = TokenViT().eval()
    be = mergepass.backend(recipe, merge={"r": 3}, calibration=[torch.randn(2, 17, 192)], lower="eager")
    f = torch.compile(m, backend=be)
    x = torch.randn(2, 17, 192)
    torch._dynamo.mark_dynamic(x, 1)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in (x, torch.randn(2, 23, 192), torch.randn(2, 30, 192)):
            assert rel_err(f(x), m(x)) <= 1e-5
    ours = [str(w.message) for w in caught if issubclass(w.category, mergepass.MergepassWarning)]
    assert len(ours) == 1 and "symbolic" in ours[0], ours
    assert ("int8" in ours[0]) == names_int8
    assert be.schedule is None and not be.quantized


def test_a_new_image_size_recompiles_merged_and_int8_keeps_working():
    m = tiny_vit(depth=2, dynamic_img_size=True)
    be = mergepass.backend("tome_int8", merge={"r": 3}, calibration=[torch.randn(2, 3, 64, 64)], lower="eager")
    f = torch.compile(m, backend=be, dynamic=False)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for size in (64, 80):
            x = torch.randn(2, 3, size, size)
            cos = torch.nn.functional.cosine_similarity(f(x), reference_forward(m, x, be.schedule)).min()
            assert be.schedule.tokens == 1 + (size // 16) ** 2 and cos > 0.99
    assert [q.mode for q in be.quantized] == ["static", "dynamic"]  # the 64x64 calibration fits only the first
    assert any("do not fit" in str(w.message) and "slower" in str(w.message) for w in caught)


# -- 4. no global side effects -----------------------------------------------------------------------

def _unrelated_compiles():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    f = torch.compile(lambda t: t.sin() + 1, backend="eager")
    for n in range(2, 12):
        f(torch.randn(n))
    return _compiles()


def test_mergepass_changes_no_global_setting():
    before_cfg = torch._dynamo.config.get_config_copy()
    before_inductor = torch._inductor.config.get_config_copy()
    before = _unrelated_compiles()
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    mergepass.backend("none")
    m = tiny_vit(depth=2)
    with torch.no_grad():
        torch.compile(m, backend=mergepass.backend("tome", merge={"r": 3}), dynamic=False)(torch.randn(2, 3, 64, 64))
        mergepass.plan(m, torch.randn(2, 3, 64, 64), "tome", merge={"r": 3})
    fused.kernel_error()
    assert _unrelated_compiles() == before
    assert torch._dynamo.config.get_config_copy() == before_cfg
    assert torch._inductor.config.get_config_copy() == before_inductor
    assert log.level == level


# -- 5. calibration ----------------------------------------------------------------------------------

def test_calibration_generator_is_read_once_and_used_for_int8():
    reads = []

    def batches():
        for i in range(3):
            reads.append(i)
            yield torch.randn(4, 3, 64, 64)
    m = tiny_vit(depth=2)
    be = mergepass.backend("tome_int8", merge={"r": 3}, quantize={"calibration_batches": 2}, calibration=batches(), lower="eager")
    with torch.no_grad():
        torch.compile(m, backend=be, dynamic=False)(torch.randn(4, 3, 64, 64))
        torch.compile(m, backend=be, dynamic=False)(torch.randn(2, 3, 64, 64))  # a recompile reads nothing new
    assert reads == [0, 1]  # at most calibration_batches batches, read once
    assert [q.mode for q in be.quantized] == ["static", "static"]


@pytest.mark.parametrize("calibration,match", [
    ([], "calibration is empty"),
    ([torch.zeros(2, 3, 64, 64, dtype=torch.uint8)], "uint8"),
    (torch.randn(2, 3, 64, 64), "iterable of batches"),
    ([torch.zeros(2, 3, 64, 64, dtype=torch.int64)], "batch 0 holds a tensor of dtype int64"),
    ([(torch.zeros(2, 3, 64, 64, dtype=torch.bool), torch.zeros(2))], "batch 0 holds a tensor of dtype bool"),
    ([torch.randn(2, 3, 64, 64), torch.full((2, 3, 64, 64), float("nan"))], "batch 1 holds non-finite values"),
    ([torch.randn(2, 3, 64, 64).index_fill(0, torch.tensor([1]), float("inf"))], "batch 0 holds non-finite"),
    (5, "calibration must be an iterable of batches .* not int 5"),
    ([torch.randn(2, 3, 64, 64).to(torch.float8_e4m3fn)], "batch 0 holds a tensor of dtype float8_e4m3fn.*not an 8-bit"),
])
def test_bad_calibration_data_gets_a_clear_error(calibration, match):
    be = mergepass.backend("int8", calibration=calibration)
    with pytest.raises(ValueError, match=match):
        be.calibration


def test_calibration_keeps_integer_labels_but_not_integer_inputs():
    from mergepass.quantize import fit_batches, read_calibration
    x, labels = torch.randn(2, 4), torch.tensor([3, 7])
    assert len(read_calibration([(x, labels)], 8)[0]) == 2  # a DataLoader's labels trail the input
    with pytest.raises(ValueError, match="dtype int64 where the compiled input is floating point"):
        fit_batches([(x, labels[:, None].expand(2, 4))], (torch.randn(2, 4), torch.randn(2, 4)))


class _Normalised(torch.nn.Module):
    """A normalising layer in front of a model, with a ``forward`` whose first argument is not named ``self``."""

    def __init__(this, model):
        super().__init__()
        this.bn, this.model = torch.nn.BatchNorm1d(4), model

    def forward(this, x):
        return this.model(this.bn(x))


@pytest.mark.parametrize("wrap", [lambda m: torch.nn.Sequential(torch.nn.BatchNorm1d(4), m), _Normalised])
def test_calibration_fits_a_wrapped_model_whose_buffers_dynamo_names_otherwise(wrap):
    """dynamo names a compiled ``nn.Sequential``'s buffers after ``fn`` (and a module's after its ``forward``'s
    first argument): they are module state, not inputs the calibration batches must supply."""
    from mergepass.rewrite.capture import capture_graphs
    from mergepass.graph.lift import Inputs
    from mergepass.quantize import fit_to_graph
    x = torch.randn(2, 4)
    (gm, ex), = capture_graphs(wrap(torch.nn.Linear(4, 3)).eval(), x)
    assert [tuple(t.shape) for t in Inputs(gm, ex).user_inputs(ex)] == [(2, 4)]
    assert [b[0].shape for b in fit_to_graph([(torch.randn(2, 4),)], gm, ex)] == [(2, 4)]


def test_wrong_calibration_shape_names_the_expected_one():
    m = tiny_vit(depth=2)
    be = mergepass.backend("int8", calibration=[torch.randn(2, 3, 32, 32)], lower="eager")
    with torch.no_grad(), pytest.raises(Exception, match=r"each sample must have shape \(3, 64, 64\)"):
        torch.compile(m, backend=be, dynamic=False)(torch.randn(2, 3, 64, 64))


def test_calibration_follows_the_graph_dtype():
    from mergepass.quantize import fit_batches
    out = fit_batches([(torch.randn(3, 4, dtype=torch.float64),)], (torch.randn(2, 4),))
    assert [b[0].dtype for b in out] == [torch.float32] and [b[0].shape for b in out] == [(2, 4)]


@pytest.mark.parametrize("overrides", [{}, {"quantize": {"mode": "dynamic"}}])
def test_dynamic_scales_warn_with_their_cost(overrides):
    """Per-tensor dynamic scales: one outlying or NaN image spoils the batch. Said whether dynamic is chosen or a fallback."""
    m = tiny_vit(depth=2)
    calib = [torch.randn(2, 3, 64, 64)] if overrides else None
    be = mergepass.backend("int8", lower="eager", calibration=calib, **overrides)
    with torch.no_grad(), pytest.warns(mergepass.MergepassWarning, match="slower.*shared by the whole batch.*NaN"):
        torch.compile(m, backend=be, dynamic=False)(torch.randn(2, 3, 64, 64))


def test_check_inputs_refuses_a_non_finite_image_that_static_int8_would_hide():
    m = tiny_vit(depth=2)
    x = torch.randn(2, 3, 64, 64)
    x[1, 0, 5, 5] = float("nan")
    calib = [torch.randn(2, 3, 64, 64)]
    with torch.no_grad():
        out = torch.compile(m, backend=mergepass.backend("int8", lower="eager", calibration=calib), dynamic=False)(x)
        assert torch.isfinite(out).all() and torch.isnan(m(x)[1]).all()  # the silent case check_inputs exists for
        torch._dynamo.reset()
        be = mergepass.backend("int8", lower="eager", calibration=calib, check_inputs=True)
        with pytest.raises(ValueError, match="input 0 holds NaN or inf"):
            torch.compile(m, backend=be, dynamic=False)(x)
        assert torch.isfinite(torch.compile(m, backend=be, dynamic=False)(x.nan_to_num())).all()


@pytest.mark.parametrize("recipe", ["tome", "tome_int8"])
def test_an_empty_batch_gives_an_empty_output(recipe):
    m = tiny_vit(depth=2)
    be = mergepass.backend(recipe, lower="eager", calibration=[torch.randn(2, 3, 64, 64)])
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False)(torch.randn(0, 3, 64, 64))
    assert out.shape == (0, 1000) and be.results[-1].schedule is None


def test_int8_quantizes_a_cnn_and_declines_a_batch_statistics_norm_in_words():
    """A CNN's batch norms become per-channel affines before torchao sees them (its own conv-BN fold failed on
    mergepass's constants with a KeyError), so resnet18 quantizes; a batch norm without running statistics
    has no constant scale: one warning says so, and the model runs in floating point."""
    import torchvision
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    be = mergepass.backend("int8", lower="eager", calibration=[torch.randn(2, 3, 64, 64)])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(m, backend=be, dynamic=False)(x)
        ref = m(x)
    assert not [w for w in caught if issubclass(w.category, mergepass.MergepassWarning)]
    assert [q.mode for q in be.quantized] == ["static"]
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.98
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.BatchNorm2d(3, track_running_stats=False), tiny_vit(depth=2)).eval()
    be = mergepass.backend("int8", lower="eager", calibration=[torch.randn(2, 3, 64, 64)])
    with torch.no_grad(), pytest.warns(mergepass.MergepassWarning, match=r"int8 quantization failed .*the batch norm "
                                       r"0 normalises by each batch's own statistics") as caught:
        out = torch.compile(m, backend=be, dynamic=False)(x)
    assert len([w for w in caught if "int8" in str(w.message)]) == 1 and not be.quantized
    # floating point, with the recipe's attention kernel (bf16 where the CPU has it)
    assert torch.nn.functional.cosine_similarity(out, m(x)).min() > 0.999


def test_the_last_compile_dynamo_allows_is_warned():
    m = tiny_vit(depth=2)
    be = mergepass.backend("tome", merge={"r": 2}, lower="eager")
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        c = torch.compile(m, backend=be, dynamic=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", mergepass.MergepassWarning)
            c(torch.randn(1, 3, 64, 64))
        with pytest.warns(mergepass.MergepassWarning, match="recompile_limit = 2.*dynamic=True"):
            c(torch.randn(2, 3, 64, 64))


def test_int8_of_a_model_in_training_mode_warns():
    m = tiny_vit(depth=2, drop_rate=0.2).train()
    be = mergepass.backend("int8", lower="eager", calibration=[torch.randn(2, 3, 64, 64)])
    with torch.no_grad(), pytest.warns(mergepass.MergepassWarning, match="training mode.*model.eval"):
        torch.compile(m, backend=be, dynamic=False)(torch.randn(2, 3, 64, 64))


# -- 6. errors are not swallowed; clamps are said ----------------------------------------------------

def test_a_bug_in_a_merge_op_raises_instead_of_declining(monkeypatch):
    def broken(x, metric, size, source, *, r, prefix):
        raise RuntimeError("boom inside the merge op")
    monkeypatch.setattr(methods_base, "_OPS", dict(methods_base._OPS))
    mergepass.register_op(mergepass.MergeOp("global", broken))
    m = tiny_vit(depth=2)
    with torch.no_grad(), pytest.raises(Exception, match="mergepass op .* failed.*boom"):
        torch.compile(m, backend=mergepass.backend("tome", merge={"r": 3, "kernel": "reference"}, lower="eager"),
                      dynamic=False)(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("recipe,overrides,match", [
    ("tome", dict(r=40), "r clamped"),
    ("tomato", dict(budget=30), "budget clamped"),
    ("dfe", dict(skip=9, r=4), "skip=9 leaves all 3 blocks dense"),
    ("tomato", dict(merge_block=9), "merge_block=9 is past the last of 3 blocks"),
    ("dfe_lgtm", dict(skip=0, r=4, window=8), "merge globally"),
])
def test_clamps_and_method_changes_warn_once_and_show_in_the_plan(recipe, overrides, match):
    m = tiny_vit(depth=3)
    be = mergepass.backend(recipe, lower="eager", merge=overrides)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(m, backend=be, dynamic=False)(torch.randn(2, 3, 64, 64))
    said = [str(w.message) for w in caught if issubclass(w.category, mergepass.MergepassWarning) and match in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert match in be.schedule.table()


# -- 7. the fused op checks its inputs ---------------------------------------------------------------

BAD_CALLS = {
    "source out of range": "src = torch.full((2, 9), 40)",
    "source batch mismatch": "src = torch.zeros(3, 9, dtype=torch.long)",
    "metric wrong shape": "metric = torch.randn(2, 5, 4)",
    "zero sizes": "size = torch.zeros(2, 9, 1)",
    "position out of range": "a_pos = torch.tensor([[[1, 3, 5, 99]]])",
    "integer x": "x = torch.ones(2, 9, 8, dtype=torch.long)",
}


def test_fused_op_rejects_bad_inputs_without_crashing():
    """Every bad call in one child process (a crash must not take the test runner down); it prints the
    case before each call, so a crash names the case that caused it."""
    require_fused_merge()
    cases = "".join(textwrap.dedent(f"""
        x, metric, size = torch.randn(2, 9, 8), torch.randn(2, 9, 4), torch.ones(2, 9, 1)
        src = torch.arange(9).expand(2, 9).contiguous()
        a_pos, b_pos = torch.tensor([[[1, 3, 5, 7]]]), torch.tensor([[[2, 4, 6, 8]]])
        {line}
        print("CASE {name}:", flush=True)
        try:
            torch.ops.mergepass.bipartite_merge(x, metric, size, src, a_pos, b_pos, None, 2, 1)
        except RuntimeError as e:
            print("REJECTED {name}:", str(e).splitlines()[0], flush=True)
        """) for name, line in BAD_CALLS.items())
    code = "import torch\nfrom mergepass.merge import fused\nassert fused.kernel_error() is None\n" + cases
    res = _run("-c", code, timeout=300)
    assert res.returncode == 0, f"crashed ({res.returncode}) after: {res.stdout.splitlines()[-1:]} {res.stderr[-1500:]}"
    for name in BAD_CALLS:
        assert f"REJECTED {name}: bipartite_merge:" in res.stdout, (name, res.stdout)


# -- 8. recipe files and fields -----------------------------------------------------------------------

def test_malformed_recipe_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "tome"\nr = 8\nskip = [\n')
    with pytest.raises(ValueError, match=rf"{bad}.*line"):
        mergepass.load_recipe(str(bad))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[merge]\nmethod = "tome"\nrr = 8\n')
    with pytest.raises(ValueError, match=rf"{wrong}.*'rr'.*did you mean 'r'"):
        mergepass.load_recipe(str(wrong))


def test_keep_fp32_override_that_is_not_a_list_is_a_value_error():
    with pytest.raises(ValueError, match="'quantize.pt2e.keep_fp32' must be a list of strings, got 5"):
        mergepass.load_recipe("tome_int8", quantize={"pt2e": {"keep_fp32": 5}})


@pytest.mark.parametrize("field,value", [("search.target_speedup", float("nan")), ("search.target_speedup", float("inf")),
                                         ("search.max_macs_ratio", float("nan")), ("search.min_cosine", float("nan")),
                                         ("quantize.pt2e.sensitivity", float("nan")),
                                         ("quantize.pt2e.sensitivity", float("inf"))])
def test_non_finite_recipe_fields_are_rejected(field, value):
    *tables, name = field.split(".")
    over = {name: value}
    for t in reversed(tables):
        over = {t: over}
    with pytest.raises(ValueError, match=field):
        mergepass.load_recipe("tome", **over)


