"""mergepass's attention ops (mergepass/kernels/attention.py, bf16, int8 and int16): numerics against SDPA and
plain references, the pass that inserts them, the recipe field that picks them, and their declines."""
import operator

import pytest
import torch
import torch.nn.functional as F

import mergepass
from mergepass.kernels import attention
from mergepass.rewrite.passes import replace_attention
from helpers import attention_skip, rel_err, threads, tiny_vit
from fxgraphs import GraphBuilder

# the pass and the compile tests run on whichever op this CPU runs (int16 needs only AVX2)
RUNNABLE = next((k for k in attention.KINDS if attention_skip(k) is None), None)
needs_op = pytest.mark.skipif(RUNNABLE is None, reason=str(attention_skip(attention.KINDS[-1])))
KINDS = [pytest.param(k, marks=pytest.mark.skipif(attention_skip(k) is not None, reason=str(attention_skip(k))))
         for k in attention.KINDS]
REFERENCE = {"bf16": attention.reference, "int8": attention.int8_reference, "int16": attention.int16_reference}
# the plain references compute exp exactly; the kernels' polynomial may round a bf16 probability, or a u8
# one by a unit, the other way
TOLERANCE = {"bf16": dict(rtol=2e-3, atol=5e-3), "int8": dict(rtol=1e-2, atol=3e-2), "int16": dict(rtol=2e-3, atol=2e-3)}
MIN_COSINE = {"bf16": 0.9999, "int8": 0.999, "int16": 0.99999}  # per call on Gaussian q, k, v (near-uniform attention: hardest)


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 3, 17, 64), (1, 6, 197, 64), (2, 2, 33, 80), (1, 1, 5, 8), (3, 2, 1, 16),
                                   (2, 2, 9, 6)])
@pytest.mark.parametrize("bias", [None, "size", "full"])
def test_op_matches_sdpa_and_the_plain_reference(kind, shape, bias):
    """Odd token counts, batch 1, head sizes that are not a multiple of 4, 16 or 32, with proportional
    attention's [B, 1, 1, N] bias and a full float mask."""
    torch.manual_seed(0)
    b, h, n, d = shape
    q, k, v = (torch.randn(*shape) * 2 for _ in range(3))
    mask = {None: None, "size": torch.rand(b, 1, 1, n).log(), "full": torch.randn(b, h, n, n)}[bias]
    out = attention.attention(kind, q, k, v, mask)
    want = F.scaled_dot_product_attention(q, k, v, mask)
    assert out.shape == want.shape and out.dtype == torch.float32
    assert _cos(out, want) >= MIN_COSINE[kind]
    torch.testing.assert_close(out, REFERENCE[kind](q, k, v, mask), **TOLERANCE[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_op_computes_the_same_on_one_thread_and_on_several(kind):
    """The op splits batches, heads and blocks of query rows across threads: the same output on 1, 2 and 3."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 197, 64) * 2 for _ in range(3))
    mask = torch.rand(3, 1, 1, 197).log()
    outs = []
    for n in (1, 2, 3):
        with threads(n):
            outs.append(attention.attention(kind, q, k, v, mask))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 3])
def test_op_takes_fewer_queries_than_keys(kind, rows):
    """The last block on the rows its outputs read (rewrite/passes/prune_unread_rows.py): queries are the first
    rows of the projection, keys and values all of them."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 97, 32).unbind(0)
    q = q[:, :, :rows]
    mask = torch.rand(2, 1, 1, 97).log()
    out = attention.attention(kind, q, k, v, mask)
    want = F.scaled_dot_product_attention(q, k, v, mask)
    assert out.shape == (2, 4, rows, 32) and _cos(out, want) >= MIN_COSINE[kind]
    torch.testing.assert_close(out, REFERENCE[kind](q, k, v, mask), **TOLERANCE[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_op_takes_a_scale_a_broadcast_mask_and_bf16_inputs(kind):
    q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
    mask = torch.randn(9, 9)
    out = attention.attention(kind, q, k, v, mask, scale=0.3)
    assert _cos(out, F.scaled_dot_product_attention(q, k, v, mask, scale=0.3)) >= MIN_COSINE[kind]
    low = attention.attention(kind, q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16())
    assert low.dtype == torch.bfloat16 and _cos(low.float(), F.scaled_dot_product_attention(q, k, v, mask)) >= 0.999


@pytest.mark.parametrize("kind", KINDS)
def test_op_reads_views_of_one_qkv_projection_in_place(kind):
    """timm's q, k, v are strided views of one [B, N, 3, H, D] tensor; the op reads them as they are."""
    qkv = torch.randn(2, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = torch.randn(2, 1, 1, 17)
    assert not q.is_contiguous()
    torch.testing.assert_close(attention.attention(kind, q, k, v, bias),
                               attention.attention(kind, q.contiguous(), k.contiguous(), v.contiguous(), bias))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_and_inf_reach_the_outputs_they_touch(kind, where):
    """As in softmax(q kᵀ) v written out (torch's flash SDPA drops a NaN in q): a NaN in a query row
    spoils that row, in a key row every row, in a value channel that channel; inf likewise."""
    q, k, v = (torch.randn(1, 1, 6, 8) for _ in range(3))
    t = {"q": q, "k": k, "v": v}[where]
    for bad in (float("nan"), float("inf")):
        t[0, 0, 2, 3] = bad
        with torch.no_grad():
            want = torch.softmax(q.double() @ k.double().transpose(-2, -1) * 8 ** -0.5, -1) @ v.double()
        got = attention.attention(kind, q, k, v)
        if bad != bad:  # NaN: exactly the outputs it touches
            assert torch.equal(~got.isfinite(), ~want.isfinite()), (bad, got)
        else:  # inf: never a finite output where the math has none (int8 scales make a whole key row NaN)
            assert (~got.isfinite())[~want.isfinite()].all() and not got.isfinite().all(), (bad, got)
        t[0, 0, 2, 3] = 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("-inf"), float("inf")])
def test_an_infinite_key_element_spoils_only_the_logits_it_makes_infinite(kind, bad):
    """A key element at ±inf gives that key a logit of -inf (dropped) or +inf (NaN row) by the sign of each
    query's element there, as in SDPA: the other rows stay finite and close (int8 used to turn the head NaN)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 64) for _ in range(3))
    k[0, 1, 5, 7] = bad
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    got = attention.attention(kind, q, k, v)
    finite = want.isfinite()
    assert 0 < finite[0, 1].float().mean() < 1  # rows of both kinds in the spoilt head
    assert torch.equal(got.isfinite(), finite)
    assert torch.nn.functional.cosine_similarity(got[finite].double(), want[finite].double(), 0) > 0.9995


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 5, 8),) * 3, "4-D"),
    ((torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 8)), "shapes do not match"),
    ((torch.randn(1, 2, 5, 8),) * 3 + (torch.ones(5, 5, dtype=torch.bool),), "float mask"),
    ((torch.ones(1, 2, 5, 8, dtype=torch.long),) * 3, "floating dtype"),
])
def test_op_rejects_what_it_cannot_compute(kind, args, match):
    q, k, v, *mask = args
    with pytest.raises(RuntimeError, match=match):
        attention.op(kind)(q, k, v, mask[0] if mask else None, 0.5)


needs_int16 = pytest.mark.skipif(attention_skip("int16") is not None, reason=str(attention_skip("int16")))


@needs_int16
@pytest.mark.parametrize("d,n", [(256, 600), (64, 1370), (8, 3)])
def test_int16_sums_stay_in_int32_at_their_largest(d, n):
    """Every q row and centred k row at its full int16 range (keys +-1, half of each sign, queries 1), so that q kᵀ
    sums reach m(d)² d; half the probabilities at their full range times v at its own: int32 sums that wrap
    would give garbage."""
    k = torch.ones(1, 2, n, d)
    k[:, :, 1::2] = -1
    q = torch.ones(1, 2, n, d) * 3
    v = -k[..., :1].expand(1, 2, n, 16).clone()
    v[:, 1] *= -1
    out = attention.attention("int16", q, k, v)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    assert _cos(out, want) >= MIN_COSINE["int16"]
    torch.testing.assert_close(out, attention.int16_reference(q, k, v), **TOLERANCE["int16"])
    m = attention.int16_magnitude(d)
    assert m * m * d <= 2**31 - 1 < (m + 1) ** 2 * d or m == 32767
    mp, mv = attention.int16_pv_magnitudes(n + n % 2)
    assert mp * mv * (n + n % 2) <= 2**31 - 1 and mp > mv


@pytest.mark.parametrize("kind", attention.KINDS)
def test_a_cpu_without_the_instructions_is_told_which_it_lacks(monkeypatch, kind):
    monkeypatch.setattr(attention, "cpu_flags", lambda: frozenset({"sse4_2"}))
    lacks = {"bf16": "AVX512-BF16", "int8": "AVX-512 VNNI", "int16": "AVX2"}[kind]
    assert f"no {lacks}" in attention.missing_instructions(kind)
    monkeypatch.setattr(attention, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512_vnni", "avx512_bf16"}))
    assert attention.missing_instructions(kind) is None
    if kind == "int16":  # the kernel is built only with both
        monkeypatch.setattr(attention, "cpu_flags", lambda: frozenset({"avx2"}))
        assert "no AVX2 and FMA" in attention.missing_instructions(kind)


# -- the pass ----------------------------------------------------------------------------------------

def _attention_graph():
    g = GraphBuilder()
    q, k, v = (g.input(f"L_{n}_", torch.randn(2, 2, 7, 8, generator=g.gen)) for n in "qkv")
    fmask = g.input("L_mask_", torch.randn(2, 1, 1, 7, generator=g.gen))
    bmask = g.input("L_bmask_", torch.rand(7, 7, generator=g.gen) > 0.2)
    sdpa = torch._C._nn.scaled_dot_product_attention
    outs = [g.fn(sdpa, q, k, v),                       # plain: replaced
            g.fn(sdpa, q, k, v, attn_mask=fmask),      # float mask: replaced
            g.fn(sdpa, q, k, v, fmask, 0.0, False, scale=0.2),  # explicit scale: replaced
            g.fn(sdpa, q, k, v, is_causal=True),       # causal: kept
            g.fn(sdpa, q, k, v, bmask),                # boolean mask: kept
            g.fn(sdpa, q, k, v, dropout_p=0.1)]        # dropout: kept
    total = outs[0]
    for o in outs[1:5]:
        total = g.fn(operator.add, total, o)
    return g, g.output(g.fn(operator.add, total, g.fn(operator.mul, outs[5], 0.0)))


@needs_op
def test_pass_replaces_exactly_the_attentions_the_op_computes():
    g, gm = _attention_graph()
    ref = g.run(gm)
    assert replace_attention(gm, RUNNABLE) == 3
    ops = [n for n in gm.graph.nodes if n.target is attention.op(RUNNABLE)]
    assert [n.args[4] for n in ops] == [8 ** -0.5, 8 ** -0.5, 0.2]
    kept = [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
    assert len(kept) == 3 and all("example_value" in n.meta for n in ops)
    torch.manual_seed(0)  # the kept dropout attention is multiplied by 0
    assert _cos(g.run(gm), ref) >= 0.9999


# -- the recipe field --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_input():
    return tiny_vit(depth=2), torch.randn(2, 3, 64, 64)


@needs_op
@pytest.mark.xdist_group("attention_compile")
def test_inductor_keeps_the_op_opaque_and_the_model_close(model_and_input):
    from torch._inductor.utils import run_and_get_code
    m, x = model_and_input
    torch._dynamo.reset()
    be = mergepass.backend("tome", merge={"r": 3}, lower={"attention_kernel": RUNNABLE})
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(m, backend=be, dynamic=False), x)
        ref = torch.compile(m, backend=mergepass.backend("tome", merge={"r": 3},
                                                         lower={"target": "eager", "attention_kernel": "sdpa"}),
                            dynamic=False)(x)
    code = "\n".join(code)
    assert be.results[-1].attention_ops == 2 and code.count(f"mergepass.{RUNNABLE}_attention") >= 2
    assert "scaled_dot_product" not in code  # not fused back into SDPA
    assert _cos(out, ref) >= 0.9999


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recipe", ["tome_int8", "int8"])
def test_int8_graphs_quantize_around_the_op(model_and_input, recipe, kind):
    m, x = model_and_input
    merge = {"r": 3} if recipe != "int8" else {}  # int8 alone does not merge: it has no r
    be = mergepass.backend(recipe, merge=merge, lower={"target": "eager", "attention_kernel": kind}, calibration=[x])
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False)(x)
        ref = m(x)
    assert be.results[-1].attention_ops == 2 and be.quantized[-1].mode == "static"
    targets = {str(n.target) for n in be.quantized[-1].module.graph.nodes}
    assert any(f"{kind}_attention" in t for t in targets)
    assert F.cosine_similarity(out, ref).min() > 0.98


def test_auto_keeps_sdpa_in_float_graphs_and_measures_in_int8_graphs():
    from mergepass.rewrite.passes.replace_attention import wanted
    assert wanted("auto", False, False, False, True) == (None, "")        # FP32 recipes keep FP32 attention
    assert wanted("auto", True, False, False, True) == ("measure", "")    # int8 graphs: timed on this CPU
    assert wanted("sdpa", True, False, False, True)[0] is None
    assert "int8" in wanted("auto", True, True, False, True)[1]
    assert "gradients" in wanted("bf16", False, False, True, True)[1]
    assert "CPU" in wanted("int8", False, False, False, False)[1]


_FLAGS = [{"avx2"}, {"avx2", "avx512_vnni"}, {"avx2", "avx512_vnni", "avx512_bf16"},
          {"avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"}]
_AT_ZERO = [("tome", {"r": 0}), ("dfe", {"r": 0}), ("dfe_lgtm", {"r": 0, "transition": 0}), ("tomato", {"budget": 0.0})]


# each CPU one recipe, each recipe on two CPUs (one per vendor): every pair would compile 32 times for the same check
@pytest.mark.parametrize("vendor, flags, recipe, zero", [
    (vendor, flags, *_AT_ZERO[(i + j) % len(_AT_ZERO)])
    for j, vendor in enumerate(["AuthenticAMD", "GenuineIntel"]) for i, flags in enumerate(_FLAGS)])
def test_fp32_recipes_at_r0_reproduce_the_model_on_every_cpu(monkeypatch, vendor, flags, recipe, zero):
    """r=0 is the original model under attention_kernel = "auto", whatever the CPU says it has."""
    from mergepass import cpu
    monkeypatch.setattr(cpu, "_cpuinfo", lambda key: {"vendor_id": vendor, "flags": " ".join(sorted(flags))}.get(key, ""))
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(attention, "cpu_flags", lambda: frozenset(flags))
    m = tiny_vit(depth=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = m(x)
        be = mergepass.backend(recipe, lower="eager", merge={"kernel": "reference", **zero})  # nothing merges at r=0
        out = torch.compile(m, backend=be, dynamic=False)(x)
    assert be.results[-1].attention_ops == 0
    assert rel_err(out, want) <= 1e-5


def test_a_cpu_without_the_op_declines_auto_and_refuses_bf16(monkeypatch, model_and_input, tmp_path):
    m, x = model_and_input
    monkeypatch.setenv("MERGEPASS_DECISIONS_DIR", str(tmp_path))  # another CPU: not this one's kept decisions
    monkeypatch.setattr(attention, "unavailable", lambda kind="bf16": "the CPU has no AVX512-BF16 (bf16: none)")
    be = mergepass.backend("tome_int8", merge={"r": 3}, lower="eager", calibration=[x])
    with torch.no_grad():
        torch.compile(m, backend=be, dynamic=False)(x)
    assert be.results[-1].attention_ops == 0
    decision = be.results[-1].attention_decision
    assert decision.choice == "sdpa" and not decision.measured and "bf16" in decision.declined
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="attention_kernel' is 'bf16'.*no AVX512-BF16"):
        torch.compile(m, backend=mergepass.backend("tome", merge={"r": 3},
                                                   lower={"target": "eager", "attention_kernel": "bf16"}),
                      dynamic=False)(x)
    with pytest.raises(ValueError, match="attention_kernel"):
        mergepass.load_recipe("tome", lower={"attention_kernel": "fast"})

