"""int8 (torchao pt2e, x86 inductor): real int8 kernels in the generated code, calibration, fallbacks."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mergepass
from mergepass.quantize import pt2e
from mergepass.quantize.pt2e import cpu_has_vnni
from helpers import INT8_GEMM, int8_linears, run_and_get_code, tiny_vit

DEPTH = 2
LINEARS = 4 * DEPTH + 1  # qkv, proj, fc1, fc2 per block + head


def _run(model, x, be):
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(model, backend=be, dynamic=False), x, be)
    return out, "\n".join(code)


def _calib(n=3, b=4, size=64):
    return [torch.randn(b, 3, size, size) for _ in range(n)]


def _float(m, x, recipe="tome"):
    """The same model and merges without int8, run eagerly: what int8 is compared with."""
    with torch.no_grad():
        merge = {"r": 3} if recipe != "none" else {}
        return torch.compile(m, backend=mergepass.backend(recipe, lower="eager", merge=merge), dynamic=False)(x)


@pytest.fixture(scope="module")
def tome_int8():
    """One inductor compile of ``tome_int8`` (r=3, static scales), shared by the tests that read it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = tiny_vit(depth=DEPTH)
    x, calib = torch.randn(4, 3, 64, 64), _calib()
    be = mergepass.backend("tome_int8", merge={"r": 3}, calibration=calib,
                           cache=False)  # set up before the per-test MERGEPASS_CACHE=0 of conftest
    out, code = _run(m, x, be)
    torch._dynamo.reset()
    return m, x, calib, be, out, code


def _check_int8(m, x, be, out, code, float_recipe):
    assert len(INT8_GEMM.findall(code)) >= LINEARS, "int8 GEMMs missing: fp32 fallback"
    assert not re.search(r"mkl_linear|extern_kernels\.addmm|aoti_torch_cpu_addmm", code)
    assert be.quantized[-1].mode == "static"
    cos = torch.nn.functional.cosine_similarity(out, _float(m, x, float_recipe)).min().item()
    assert 0.98 < cos < 1.0 - 1e-7, cos  # quantized (not bit-equal) yet close to the same fp32 graph


@pytest.mark.compile_cache
def test_int8_kernels_present_and_a_later_compile_is_served_from_the_cache_bit_for_bit():
    """The backend's int8 graph: real int8 kernels, compiled (or taken from an earlier run's entry of the
    compile cache), then served to a later compile bit for bit."""
    m = tiny_vit(depth=DEPTH)
    x, calib = torch.randn(4, 3, 64, 64), _calib()
    be = mergepass.backend("int8", calibration=calib)
    out, code = _run(m, x, be)
    _check_int8(m, x, be, out, code, "none")
    if not cpu_has_vnni():  # the default 7-bit operand (the other one: test_seven_bit_int8_does_not_saturate...)
        _assert_unsaturated(m, x, out)
    assert be.results[-1].package.is_file()
    torch._dynamo.reset()
    again = mergepass.backend("int8", calibration=calib)
    out2, _ = _run(m, x, again)
    assert again.results[-1].cached and again.results[-1].package == be.results[-1].package
    assert again.quantized[-1].mode == "static"
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


@pytest.mark.xdist_group("tome_int8")
def test_int8_kernels_present_with_merges(tome_int8):
    m, x, _, be, out, code = tome_int8
    _check_int8(m, x, be, out, code, "tome")
    # merge_kernel = "auto" picks by measurement: the fused op is called by name, inductor names its own merge
    # kernels after the scatter-adds they fuse
    kernel = be.results[-1].merge_kernel
    assert "bipartite_merge" in code if kernel == "fused" else ("scatter" in code and kernel == "reference")


@pytest.mark.parametrize("vnni,seven_bits,act_max,w_range,observer", [
    (True, "activations", 255, (-128, 127), "MinMaxObserver"), (True, "weights", 255, (-128, 127), "MinMaxObserver"),
    (False, "activations", 127, (-128, 127), "HistogramObserver"), (False, "weights", 255, (-63, 63), "MinMaxObserver")])
def test_seven_bit_operand_follows_the_cpus_int8_instructions(monkeypatch, vnni, seven_bits, act_max, w_range, observer):
    """Pre-VNNI x86 (AVX2) saturates u8*s8 pair sums at 16 bits: one operand must keep 7 bits there
    (``quantize.pt2e.seven_bits``); 7-bit activations take the histogram under ``observer = "auto"``, 8-bit ones
    the min/max range. With int8 dot products both operands have 8 bits, whatever the field says."""
    monkeypatch.setattr(pt2e, "cpu_has_vnni", lambda: vnni)
    for dynamic in (False, True):
        cfg = pt2e.make_quantizer(dynamic, seven_bits=seven_bits).global_config
        assert (cfg.input_activation.quant_min, cfg.input_activation.quant_max) == (0, act_max)
        assert (cfg.weight.quant_min, cfg.weight.quant_max) == w_range
    static = pt2e.make_quantizer(False, seven_bits=seven_bits).global_config.input_activation.observer_or_fake_quant_ctr
    assert static.p.func.__name__ == observer
    auto = pt2e.make_quantizer(False).global_config
    chosen = pt2e.make_quantizer(False, seven_bits=pt2e.SEVEN_BIT_DEFAULT).global_config
    assert (auto.input_activation.quant_max, auto.weight.quant_min) == (chosen.input_activation.quant_max,
                                                                        chosen.weight.quant_min)


def _assert_unsaturated(m, x, out):
    """On a CPU without int8 dot products oneDNN's int8 GEMMs sum u8*s8 pairs in 16 bits: with either operand at 7
    bits the int8 graph stays as close to FP32 as int8 does elsewhere (with 8-bit activations and weights this model
    fell to 0.986 on an AMD EPYC Zen 3)."""
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(out, m(x)).min() > 0.995


@pytest.mark.skipif(cpu_has_vnni(),
                    reason="the 16-bit saturation 7 bits avoid exists only on CPUs without int8 dot products")
@pytest.mark.parametrize("seven_bits", [s for s in ("activations", "weights") if s != pt2e.SEVEN_BIT_DEFAULT])
def test_seven_bit_int8_does_not_saturate_without_vnni(seven_bits):
    """The 7-bit operand the default does not choose (the default's int8 graph: the cache test above)."""
    m, x = tiny_vit(depth=DEPTH), torch.randn(4, 3, 64, 64)
    be = mergepass.backend("int8", calibration=_calib(), quantize={"pt2e": {"seven_bits": seven_bits}})
    out, code = _run(m, x, be)
    assert len(INT8_GEMM.findall(code)) >= LINEARS
    _assert_unsaturated(m, x, out)


@pytest.mark.parametrize("flags,isa,vnni", [({"avx2", "avx512_vnni", "amx_int8"}, "AMX", True),
                                             ({"avx2", "avx512f", "avx512_vnni"}, "AVX-512 VNNI", True),
                                             ({"avx2", "avx_vnni"}, "AVX-VNNI", True),
                                             ({"avx2", "fma"}, "none", False)])
def test_int8_isa_reads_the_cpu_flags(monkeypatch, flags, isa, vnni):
    from mergepass import cpu
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert cpu.int8_isa() == isa and pt2e.cpu_has_vnni.__wrapped__() is vnni


@pytest.mark.parametrize("observer", ["minmax", "histogram"])
def test_static_scales_follow_the_observer(monkeypatch, observer):
    """minmax quantizes the image over exactly its calibration range (with 0); histogram clips a rare outlier."""
    monkeypatch.setattr(pt2e, "cpu_has_vnni", lambda: True)  # 8-bit activations on every CPU
    calib = _calib()
    calib[1][2, 0, 7, 7] = 40.0  # one pixel in 36,864: a range worth clipping
    lo, hi = min(0.0, min(b.min().item() for b in calib)), max(0.0, max(b.max().item() for b in calib))
    be = mergepass.backend("int8", calibration=calib, quantize={"pt2e": {"observer": observer}}, lower="eager")
    _run(tiny_vit(depth=DEPTH), torch.randn(4, 3, 64, 64), be)
    gm = be.quantized[-1].module
    q = torch.ops.quantized_decomposed.quantize_per_tensor.default
    scale = next(n.args[1] for n in gm.graph.nodes if n.target == q and n.args[0].op == "placeholder")
    if observer == "minmax":
        assert scale == pytest.approx((hi - lo) / 255, rel=1e-5)
    else:
        assert scale < 0.5 * (hi - lo) / 255


def test_without_calibration_falls_back_to_dynamic_with_warning():
    m = tiny_vit(depth=DEPTH)
    x = torch.randn(4, 3, 64, 64)
    be = mergepass.backend("int8")
    with pytest.warns(UserWarning, match="needs calibration data.*dynamic"):
        out, code = _run(m, x, be)
    assert be.quantized[-1].mode == "dynamic"
    assert len(INT8_GEMM.findall(code)) >= LINEARS


def test_keep_fp32_by_name_and_by_outlier_statistics():
    m = tiny_vit(depth=DEPTH)
    with torch.no_grad():  # one token, one hidden unit of blocks.1's MLP: a sparse outlier into blocks.1.mlp.fc2
        m.pos_embed[0, 3, 5] = 1000.0
        m.blocks[1].mlp.fc1.weight[7, 5] = 10.0
    x = torch.randn(4, 3, 64, 64)
    be = mergepass.backend("int8", calibration=_calib(),
                           quantize={"pt2e": {"keep_fp32": ["blocks.0.mlp.fc2"], "sensitivity": 6.0}},
                           # which linears are int8 is settled in the quantized graph; blocks.1 on all its rows
                           lower={"target": "eager", "prune_rows": False})
    _run(m, x, be)
    kept = be.quantized[-1].kept_fp32
    assert sorted(kept) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert int8_linears(be.quantized[-1].module) == LINEARS - len(kept)


def test_int8_refuses_training():
    m = tiny_vit(depth=DEPTH).train()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(Exception, match="inference-only"):
        torch.compile(m, backend=mergepass.backend("int8"), dynamic=False)(x)


def test_quantize_fields_are_validated():
    with pytest.raises(ValueError, match="quantize.mode"):
        mergepass.load_recipe("int8", quantize={"mode": "weird"})
    with pytest.raises(ValueError, match="quantize.pt2e.observer"):
        mergepass.load_recipe("int8", quantize={"pt2e": {"observer": "percentile"}})
    with pytest.raises(ValueError, match="quantize.pt2e.seven_bits.*'both'"):
        mergepass.load_recipe("int8", quantize={"pt2e": {"seven_bits": "both"}})
    with pytest.raises(ValueError, match="unknown recipe field 'quantize.scale'"):
        mergepass.load_recipe({"method": "none", "quantize": {"scale": 1}})


def test_each_engine_takes_its_own_fields():
    """[quantize.<engine>] sets that engine's fields and no other's; a field the engine lacks is an error naming
    the engine."""
    r = mergepass.load_recipe("int8", quantize={"pt2e": {"observer": "minmax", "keep_fp32": ["head"]}})
    assert r.quantize.options("pt2e").observer == "minmax" and r.quantize.options("pt2e").keep_fp32 == ("head",)
    assert all(r.quantize.options(e).keep_fp32 == () for e in ("torchao", "modelopt"))
    with pytest.raises(ValueError, match=r"unknown recipe field 'rest' for engine 'torchao' \(\[quantize.torchao\]\); "
                                         r"its fields: \['keep_fp32'\]"):
        mergepass.load_recipe("int8", quantize={"engine": "torchao", "torchao": {"rest": "bf16"}})
    with pytest.raises(ValueError, match=r"'obsrver' \(did you mean 'observer'\?\) for engine 'pt2e'"):
        mergepass.load_recipe("int8", quantize={"pt2e": {"obsrver": "minmax"}})
    import tomllib
    assert mergepass.recipe.from_dict(tomllib.loads(r.to_toml()), name=r.name) == r


def test_torchao_engine_gives_int8_matmuls():
    """The CUDA default (torchao quantize_, dynamic per-token activations), exercised on CPU."""
    m = tiny_vit(depth=DEPTH)
    x = torch.randn(4, 3, 64, 64)
    be = mergepass.backend("tome_int8", merge={"r": 3}, quantize={"engine": "torchao", "torchao": {"keep_fp32": ["head"]}})
    out, code = _run(m, x, be)
    assert be.quantized[-1].mode == "dynamic-torchao" and be.quantized[-1].kept_fp32 == ["head"]
    assert code.count("qlinear_pointwise") + code.count("_int_mm") >= LINEARS - 1
    assert torch.nn.functional.cosine_similarity(out, _float(m, x)).min().item() > 0.98
    assert all(p.dtype == torch.float32 for p in m.parameters()), "the user's weights stay untouched"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int8_uses_int_mm():
    m = tiny_vit(depth=DEPTH).cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    out, code = _run(m, x, mergepass.backend("tome_int8", merge={"r": 3}))
    assert "_int_mm" in code


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and torch-tensorrt")
def test_tensorrt_lowering():
    pytest.importorskip("torch_tensorrt")
    m = tiny_vit(depth=DEPTH).cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        out = torch.compile(m, backend=mergepass.backend("tome", merge={"r": 3}, lower="tensorrt"), dynamic=False)(x)
        ref = torch.compile(m, backend=mergepass.backend("tome", merge={"r": 3}), dynamic=False)(x)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


without_tensorrt = pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None
                                      and torch.cuda.is_available(), reason="torch-tensorrt and CUDA are present")


@without_tensorrt
def test_tensorrt_missing_gives_a_clear_error():
    m = tiny_vit(depth=DEPTH)
    with pytest.raises(Exception, match="torch-tensorrt|CUDA GPU"):
        torch.compile(m, backend=mergepass.backend("tome", merge={"r": 3}, lower="tensorrt"), dynamic=False)(torch.randn(2, 3, 64, 64))


def _linear_inputs(module, batches):
    """Max |input| of every nn.Linear child over ``batches``, recorded with plain hooks."""
    seen, hooks = {}, []
    for k, mod in module.named_children():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(
                lambda _, a, k=k: seen.__setitem__(k, max(seen.get(k, 0.0), a[0].abs().max().item()))))
    with torch.no_grad():
        for b in batches:
            module(b)
    for h in hooks:
        h.remove()
    return seen


def test_modelopt_engine_makes_calibrated_qdq_for_tensorrt():
    """The TensorRT int8 path (explicit Q/DQ from ModelOpt), run in PyTorch on CPU: every linear gets
    a per-tensor input and a per-channel weight quantizer whose ranges come from the calibration
    batches on the merged graph; excluded linears get none."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    m = tiny_vit(depth=DEPTH)
    x, cal = torch.randn(4, 3, 64, 64), _calib()
    be = mergepass.backend("tome_int8", merge={"r": 3}, lower="eager", calibration=cal,
                           quantize={"engine": "modelopt", "modelopt": {"keep_fp32": ["blocks.1.mlp.fc2"]}})
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False)(x)
    fp32 = _float(m, x)
    qg = be.quantized[-1]
    assert qg.mode == "static-modelopt" and qg.kept_fp32 == ["blocks.1.mlp.fc2"]
    lins = {k: mod for k, mod in qg.module.named_children() if isinstance(mod, torch.nn.Linear)}
    assert len(lins) == LINEARS
    enabled = [k for k, mod in lins.items() if mod.input_quantizer.is_enabled]
    assert len(enabled) == LINEARS - 1
    for k in enabled:
        w = lins[k].weight_quantizer
        assert w.is_enabled and w.amax.shape == (lins[k].out_features, 1)
        torch.testing.assert_close(w.amax.flatten(), lins[k].weight.abs().amax(dim=1))
    calibrated = {k: lins[k].input_quantizer.amax.item() for k in enabled}
    mtq.disable_quantizer(qg.module, "*")
    seen = _linear_inputs(qg.module, cal)
    assert calibrated == pytest.approx({k: seen[k] for k in enabled}, rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(out, fp32).min().item()
    assert 0.98 < cos < 1.0 - 1e-7, cos
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_modelopt_engine_is_for_tensorrt():
    with pytest.raises(ValueError, match="quantize.engine.*TensorRT"):
        mergepass.load_recipe("tome_int8", quantize={"engine": "modelopt"})


@without_tensorrt
def test_tensorrt_int8_checks_for_tensorrt_before_calibrating():
    m = tiny_vit(depth=DEPTH)

    def never():
        raise AssertionError("calibration data was read before the TensorRT check")
        yield
    with torch.no_grad(), pytest.raises(Exception, match="torch-tensorrt|CUDA GPU"):
        torch.compile(m, backend=mergepass.backend("tome_int8", merge={"r": 3}, lower="tensorrt", calibration=never()),
                      dynamic=False)(torch.randn(2, 3, 64, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA, torch-tensorrt and nvidia-modelopt")
def test_tensorrt_int8_lowering():
    pytest.importorskip("torch_tensorrt")
    pytest.importorskip("modelopt.torch.quantization")
    m = tiny_vit(depth=DEPTH).cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    cal = [c.cuda() for c in _calib()]
    with torch.no_grad():
        out = torch.compile(m, backend=mergepass.backend("tome_int8", merge={"r": 3}, lower="tensorrt", calibration=cal),
                            dynamic=False)(x)
        fp32 = torch.compile(m, backend=mergepass.backend("tome", merge={"r": 3}), dynamic=False)(x)
    assert torch.nn.functional.cosine_similarity(out.float(), fp32).min().item() > 0.98


@pytest.mark.xdist_group("tome_int8")
def test_cpp_wrapper_lowering_keeps_int8_kernels_and_fused_merges(tome_int8):
    """docs/how-it-works.md suggests inductor's C++ wrapper for small batches: it must give the same model."""
    from torch._inductor import config as inductor_config
    m, x, calib, _, _, _ = tome_int8
    # the fused kernel by name: "auto" measures it against the reference ops, and under the suite's load either can win
    runs = {}
    for cpp in (False, True):  # the same compile (no compile cache, the kernel decisions kept on disk), either wrapper
        torch._dynamo.reset()
        with inductor_config.patch(cpp_wrapper=cpp):
            be = mergepass.backend("tome_int8", merge={"r": 3, "kernel": "fused"}, calibration=calib, cache=False)
            runs[cpp] = (be, *_run(m, x, be))
    (py, out_py, _), (cc, out_cpp, code) = runs[False], runs[True]
    assert "qlinear_pointwise" in code and "bipartite_merge" in code and "inductor_entry_impl" in code

    def chosen(b):  # the kernel decisions a compile printed, whether timed then or read back
        return [line.replace("; kept decision", "") for line in b.schedule.kernels]
    assert chosen(cc) == chosen(py) and chosen(cc)
    torch.testing.assert_close(out_cpp, out_py, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("merge_kernel", ["fused", "reference"])
def test_bf16_rest_runs_around_int8_kernels_and_auto_follows_the_cpu(monkeypatch, merge_kernel):
    """quantize.pt2e.rest = "bf16": qlinear emits bf16 and the ops between run in bf16, attention included
    (read off the post-grad graph, with torch's SDPA); fast with AVX512-BF16/AMX only, so "auto" picks it only there.
    Outputs keep the model's dtype."""
    from torch._inductor import config as inductor_config
    seen = []

    def record(graph):
        seen.extend(n.args[0].meta["val"].dtype for n in graph.nodes
                    if n.op == "call_function" and "scaled_dot_product" in str(n.target))
    m = tiny_vit(depth=DEPTH)
    x = torch.randn(4, 3, 64, 64)
    # either merge kernel: merge_kernel = "auto" may pick either by measurement
    be = mergepass.backend("tome_int8", merge={"r": 3, "kernel": merge_kernel}, quantize={"pt2e": {"rest": "bf16"}},
                           lower={"attention_kernel": "sdpa"}, calibration=_calib(),
                           cache=False)  # the pass must see this compile
    with inductor_config.patch(post_grad_custom_post_pass=record):
        out, code = _run(m, x, be)
    assert len(INT8_GEMM.findall(code)) >= LINEARS and "torch.bfloat16" in code
    assert seen and set(seen) == {torch.bfloat16}, seen
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, _float(m, x)).min().item() > 0.97
    if merge_kernel == "reference":
        return
    for isa, want in (("none", None), ("AVX512-BF16", torch.bfloat16), ("AMX-BF16", torch.bfloat16)):
        monkeypatch.setattr(pt2e, "bf16_isa", lambda isa=isa: isa)
        assert pt2e.rest_dtype("auto") is want
        assert pt2e.rest_dtype("fp32") is None and pt2e.rest_dtype("bf16") is torch.bfloat16
    monkeypatch.setattr(pt2e, "bf16_isa", lambda: "none")
    torch._dynamo.reset()
    be = mergepass.backend("tome_int8", merge={"r": 3}, calibration=_calib(), lower="eager")
    _run(m, x, be)
    assert be.quantized[-1].autocast is None, "auto must keep FP32 on a CPU without bf16 instructions"


def test_int8_on_a_tower_with_string_conv_padding():
    """Hugging Face SigLIP embeds patches with conv2d(padding="valid"), an overload the x86 quantizer
    rejects; it is rewritten with integer padding and the tower quantizes and merges."""
    pytest.importorskip("transformers")
    from mergepass.eval.zoo import case
    c = case("hf_siglip")
    model, x = c.build()
    be = mergepass.backend("tome_int8", merge={"r": 2}, lower="eager", calibration=[x])
    with torch.no_grad():
        out = c.run(torch.compile(model, backend=be, dynamic=False), x)[0]
        ref = c.run(model, x)[0]
    assert be.quantized and be.schedule.merging
    assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.9


_BN_IN_FRONT = textwrap.dedent("""
    import json, sys, warnings
    import torch
    import mergepass
    from helpers import tiny_vit

    class Normalised(torch.nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.bn, self.vit = torch.nn.BatchNorm2d(3), vit

        def forward(self, x):
            return self.vit(self.bn(x))

    torch.manual_seed(0)
    vit = tiny_vit(depth=2)
    said, cos, modes = [], [], []
    for model, mode in ((Normalised(vit), "static"), (torch.nn.Sequential(torch.nn.BatchNorm2d(3), vit), "dynamic")):
        bn = model.bn if mode == "static" else model[0]
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
        model.eval()
        x = torch.randn(2, 3, 64, 64)
        be = mergepass.backend("int8", lower="eager", quantize_mode=mode, calibration=[torch.randn(2, 3, 64, 64)])
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = torch.compile(model, backend=be, dynamic=False)(x)
            cos.append(torch.nn.functional.cosine_similarity(out, model(x)).min().item())
        torch._dynamo.reset()
        said += [str(w.message) for w in caught if issubclass(w.category, mergepass.MergepassWarning)]
        modes += [q.mode for q in be.quantized]
    print(json.dumps({"said": said, "cos": cos, "modes": modes}))
""")


def test_int8_quantizes_a_vit_behind_a_batch_norm():
    """A BatchNorm2d in front of the ViT (in a module, or an ``nn.Sequential`` whose buffers dynamo names after
    ``fn``): its batch norm becomes a per-channel affine, so torchao never re-traces inside the compile (which
    crashed the process), and the model quantizes. In a child process: the failure was a crash."""
    tests = Path(__file__).parent
    res = subprocess.run([sys.executable, "-c", _BN_IN_FRONT], capture_output=True, text=True, timeout=600,
                         cwd=tests, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["modes"] == ["static", "dynamic"], got
    assert not [w for w in got["said"] if "int8 quantization failed" in w], got["said"]
    assert min(got["cos"]) > 0.98, got["cos"]


def test_auto_engine_is_chosen_by_priority_not_registration_order(monkeypatch):
    """A new engine that is the default everywhere takes over ``auto`` only with a higher priority, whichever
    order the engines were registered in."""
    from mergepass.quantize import base
    x = [torch.randn(1, 3, 64, 64)]
    recipe = mergepass.load_recipe("int8")
    assert base.resolve_engine(recipe.quantize, recipe.lower, x).name == "pt2e"

    class Everywhere(base.QuantEngine):
        name = "everywhere"

        def is_default(self, lower, on_cuda):
            return True
    for first in (True, False):
        engines = dict(base._ENGINES)
        engines = {"everywhere": Everywhere(), **engines} if first else {**engines, "everywhere": Everywhere()}
        monkeypatch.setattr(base, "_ENGINES", engines)
        assert base.resolve_engine(recipe.quantize, recipe.lower, x).name == "pt2e"  # the built-ins' priority is higher
        monkeypatch.setattr(Everywhere, "priority", base.get_engine("pt2e").priority)
        assert base.resolve_engine(recipe.quantize, recipe.lower, x).name == "everywhere"  # a tie goes by name
        monkeypatch.setattr(Everywhere, "priority", base.get_engine("pt2e").priority + 1)
        assert base.resolve_engine(recipe.quantize, recipe.lower, x).name == "everywhere"
        monkeypatch.setattr(Everywhere, "priority", 0)
