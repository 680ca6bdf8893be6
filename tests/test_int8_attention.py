"""int8 attention (``quantize.pt2e.attention``): torchao's fused quantized SDPA where it can run, a clean
decline where it cannot. Where neither AMX nor torchao's compiled CPU kernel exists, the fused graph
runs on mergepass's eager reference kernel, so the rewrite, the fusion and the scales are checked on
every machine."""
import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import mergepass
from helpers import INT8_GEMM, run_and_get_code, tiny_vit
from mergepass.errors import MergepassWarning
from mergepass.quantize.qsdpa_reference import reference_kernel
from mergepass.rewrite.passes import int8_attention

DEPTH = 2


def _calib(n=3, b=2, size=64):
    return [torch.randn(b, 3, size, size) for _ in range(n)]


def _compile_run(model, x, be):
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, code = run_and_get_code(torch.compile(model, backend=be, dynamic=False), x, be)
    return out, "\n".join(code), [str(w.message) for w in caught if issubclass(w.category, MergepassWarning)]


def fused_attentions(code: str) -> int:
    """Attentions that run as torchao's fused int8 SDPA: calls of the op (its compiled or reference kernel), or,
    on AMX, where inductor lowers the op to torchao's C++ template, instances of that template."""
    return code.count("qscaled_dot_product") + code.count("INT8_QSDPA_TEMPLATE")


def _kernel():
    """The op's kernel for this test: the machine's own, or the eager reference."""
    return contextlib.nullcontext() if int8_attention.unavailable() is None else reference_kernel()


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_fusable_form_equals_sdpa(mask, scale):
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    m = torch.randn(2, 1, 1, 7) if mask else None
    torch.testing.assert_close(int8_attention.fusable_sdpa(q, k, v, m, scale=scale),
                               F.scaled_dot_product_attention(q, k, v, m, scale=scale), rtol=1e-5, atol=1e-6)


def test_only_plain_attention_is_rewritten():
    """Causal, boolean-mask and 3-D-mask attention keep SDPA (the fused kernel serves none of them)."""
    class M(torch.nn.Module):
        def forward(self, q, k, v, b, m3):
            return (F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    + F.scaled_dot_product_attention(q, k, v, attn_mask=b)
                    + F.scaled_dot_product_attention(q, k, v, attn_mask=m3))
    gms = []

    def grab(gm, ex):
        gms.append(gm)
        return gm
    args = [torch.randn(1, 2, 5, 4) for _ in range(3)] + [torch.rand(5, 5) > 0.3, torch.randn(2, 5, 5)]
    torch.compile(M(), backend=grab)(*args)
    assert int8_attention.decompose_attention(gms[0]) == (1, 4)


# each of mask (tome's proportional attention), batch 1 and bf16 rest is on in one case and off in the other
@pytest.mark.parametrize("recipe,batch,rest", [("int8", 1, "fp32"), ("tome_int8", 2, "bf16")])
def test_int8_attention_fuses_every_block_and_matches_the_quantized_graph(recipe, batch, rest):
    """Every attention becomes one qscaled_dot_product call (with and without proportional attention's
    mask, batch 1, bf16 rest), and the compiled model computes what the quantized graph computes eagerly."""
    m = tiny_vit(depth=DEPTH)
    x = torch.randn(batch, 3, 64, 64)
    calib = _calib(b=batch)
    with _kernel():
        merge = {"r": 2} if recipe != "int8" else {}  # int8 alone does not merge: it has no r
        # every block attends with all its rows; the quantized graph itself is compared, which a cache hit does not keep
        be = mergepass.backend(recipe, merge=merge, quantize={"pt2e": {"rest": rest, "attention": "int8"}},
                               lower={"prune_rows": False}, calibration=calib, cache=False)
        out, code, warned = _compile_run(m, x, be)
        q = be.quantized[-1]
        with torch.no_grad():
            sim = q.module(x)
        sim = sim[0] if isinstance(sim, (tuple, list)) else sim
    assert not warned, warned
    assert q.int8_attention == DEPTH and fused_attentions(code) >= DEPTH
    assert "scaled_dot_product_attention" not in code.replace("qscaled_dot_product", "")
    # the int8 linears alone leave the compiled model at cosine ~0.9997 of its eager quantized graph, whose
    # attention matmuls are quantized (a kernel ignoring the scales or the mask falls far below this)
    assert F.cosine_similarity(out.float(), sim.float()).min() > (0.995 if rest == "bf16" else 0.999)


def test_int8_attention_declined_cleanly_where_it_cannot_run():
    """Without AMX or a compiled kernel, 'int8' warns once and compiles float attention."""
    why = int8_attention.unavailable()
    if why is None:
        pytest.skip("this machine runs int8 attention")
    m = tiny_vit(depth=DEPTH)
    x = torch.randn(2, 3, 64, 64)
    out, code, warned = _compile_run(m, x, mergepass.backend("tome_int8", merge={"r": 2}, calibration=_calib(),
                                                             quantize={"pt2e": {"attention": "int8"}}))
    assert len(warned) == 1 and "quantize.pt2e.attention = 'int8' cannot run here" in warned[0] and why in warned[0]
    assert fused_attentions(code) == 0 and "scaled_dot_product" in code
    with torch.no_grad():
        assert F.cosine_similarity(out, m(x)).min() > 0.98


def test_dynamic_scales_keep_float_attention():
    """The fused kernel takes static scales: dynamic int8 keeps float attention, with a reason."""
    from mergepass.quantize.pt2e import attention_unavailable
    assert "static" in attention_unavailable("int8", "dynamic")
    assert attention_unavailable("float", "static") is not None


def test_bad_attention_value_is_named():
    with pytest.raises(ValueError, match="quantize.pt2e.attention"):
        mergepass.backend("int8", quantize={"pt2e": {"attention": "int4"}})


def test_a_failing_int8_attention_compile_falls_back_to_float_attention(monkeypatch):
    """Should the fusion fail to compile on some CPU, the user gets one warning and a working model."""
    def broken(self, graph):
        raise RuntimeError("template failed")
    monkeypatch.setattr(int8_attention.FusionPass, "__call__", broken)
    m = tiny_vit(depth=DEPTH)
    x = torch.randn(2, 3, 64, 64)
    with _kernel():
        be = mergepass.backend("tome_int8", merge={"r": 2}, quantize={"pt2e": {"attention": "int8"}}, calibration=_calib(),
                               cache=False)  # the broken pass must run, not a cached entry
        out, code, warned = _compile_run(m, x, be)
    assert len(warned) == 1 and "int8 attention did not compile" in warned[0] and "template failed" in warned[0]
    assert fused_attentions(code) == 0 and be.quantized[-1].int8_attention == 0
    with torch.no_grad():
        assert F.cosine_similarity(out, m(x)).min() > 0.98


def test_only_the_rewritten_attentions_matmuls_are_quantized():
    """A model's own matmul outside attention keeps float inputs when int8 attention is on."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)
            self.mix = torch.nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16)
            return o @ self.mix
    x = torch.randn(2, 5, 16)
    with _kernel(), torch.no_grad():
        be = mergepass.backend("int8", calibration=[x], quantize={"pt2e": {"attention": "int8"}}, lower="eager")
        torch.compile(M().eval(), backend=be, dynamic=False)(x)
    dq = "dequantize_per_tensor"
    quantized = [all(dq in str(a.target) for a in n.args) for n in be.quantized[-1].module.graph.nodes
                 if n.target == torch.ops.aten.matmul.default]
    assert sorted(quantized) == [False, True, True], quantized
