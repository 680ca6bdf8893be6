"""The peer engines of the benchmarks: ONNX Runtime and OpenVINO + NNCF, alone and on the model with
ToMe patched in."""
import pytest
import torch

import mergepass
from mergepass.eval import peers
from mergepass.eval.evaluate import compile_spec
from mergepass.fidelity import cosine
from helpers import compile_with, tiny_vit

@pytest.fixture(scope="module")
def setup():
    model = tiny_vit(depth=2)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        merged = compile_with(model, mergepass.backend("tome", merge={"r": 4, "kernel": "reference"}, lower="eager"))(x)
        dense = model(x)
    return model, x, merged, dense


def test_merged_module_is_the_merged_model(setup):
    model, x, merged, dense = setup
    module = peers.merged_module(model, x, peers.merge_recipe("ort_int8_tome", {"merge": {"r": 4}}))
    with torch.no_grad():
        out = module(x)
    assert torch.allclose(out, merged, atol=1e-5)
    assert not torch.allclose(out, dense, atol=1e-3)  # the merges are in it


def test_ort_runs_the_merged_graph(setup):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, x, merged, _ = setup
    fn, be = compile_spec(model, "ort_int8_tome:merge.r=4", [x, x])
    assert be is None
    out = fn(x)
    assert out.shape == merged.shape and cosine(out, merged).min() > 0.9
    assert 0 < fn.schedule.macs_ratio < 1


def test_unmerged_peer_rejects_options():
    with pytest.raises(ValueError, match="ort_int8"):
        peers.merge_recipe("ort_int8", {"merge": {"r": 4}})
    assert peers.merge_recipe("ort_int8", {}) is None


@pytest.mark.parametrize("name,over", [("ov_int8", {}), ("ov_int8_tome", {"merge": {"r": 4}}),
                                       ("ov_fp32_tome", {"merge": {"r": 4}})])
def test_openvino_runs_the_model_and_the_merged_graph(setup, name, over):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    model, x, merged, dense = setup
    fn, be = compile_spec(model, f"{name}:merge.r=4" if over else name, [x, x])
    assert be is None
    out = fn(x)
    want = merged if over else dense
    assert out.shape == want.shape and cosine(out, want).min() > (0.9999 if "fp32" in name else 0.9)
    if over:
        assert 0 < fn.schedule.macs_ratio < 1 and cosine(out, dense).min() < cosine(out, merged).min()
    else:
        assert fn.schedule is None


def test_a_missing_engine_is_named(monkeypatch, setup):
    import sys
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an import of an absent package raises
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "openvino and nncf" in peers.available("ov_int8_tome") and "[bench]" in peers.available("ov_int8")
    assert "onnxruntime and onnx" in peers.available("ort_int8")
    with pytest.raises(RuntimeError, match="openvino"):
        peers.build("ov_int8", setup[0], setup[1])
