"""Engines a user could pick instead of mergepass, timed and scored the same way (optional:
``pip install 'mergepass[bench]'``).

``ort_int8``: ONNX Runtime's static int8 (QDQ), calibrated on the same batches: the model exported
to ONNX, ``quantize_static`` with per-channel int8 weights and uint8 activations on every MatMul and
Gemm (the attention matmuls too), run by ``InferenceSession`` on the CPU with torch's thread count.

``ort_int8_tome`` (``ort_int8_tome:r=12``): the same, on the model with ToMe patched in. The ONNX graph
is mergepass's merged FP32 graph with its plain tensor merge ops (what a user gets by patching ToMe
into the model before export: bipartite matching, size-weighted merge, proportional attention), and with
the last block on the class token alone where mergepass prunes it (``lower.prune_rows``): the strongest
form of the peer. ``ov_int8_tome:merge.r=16,lower.prune_rows=false`` is ToMe as patched in by hand.

``ov_int8``: OpenVINO with NNCF's post-training int8 (``nncf.quantize``, transformer model type,
calibrated on the same batches), compiled for the CPU with OpenVINO's defaults (bf16 for what is not
quantized, where the CPU has bf16 instructions) and torch's thread count. ``ov_int8_tome``: the same
on the model with ToMe patched in before conversion, as OpenVINO's own token-merging module does.
``ov_fp32``: OpenVINO without NNCF, FP32 inference precision, and ``ov_fp32_tome`` the same with ToMe: on CPUs
without int8 dot products (AVX2 only) OpenVINO's int8 runs slower than its FP32, which is then the peer to beat.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

PEERS = ("ort_int8", "ort_fp32", "ort_int8_tome", "ov_int8", "ov_fp32", "ov_int8_tome", "ov_fp32_tome")
MERGED = {"ort_int8_tome": "tome", "ov_int8_tome": "tome", "ov_fp32_tome": "tome"}  # peer -> the recipe whose merges it runs


def merge_recipe(name: str, overrides: Optional[dict] = None):
    """The merge recipe peer ``name`` runs (None for an unmerged peer); ``overrides`` are its fields."""
    from ..recipe import load

    if name not in MERGED:
        if overrides:
            raise ValueError(f"peer {name!r} takes no options, got {sorted(overrides)}")
        return None
    overrides = dict(overrides or {})
    merge = {**overrides.pop("merge", {}), "kernel": "reference"}
    return load(MERGED[name], **overrides, merge=merge)


class _FirstOutput(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def merged_module(model: torch.nn.Module, example: torch.Tensor, recipe) -> torch.nn.Module:
    """``model`` with ``recipe``'s merges as a plain FP32 module for ``example``'s shape; its
    ``schedule`` attribute is the merge schedule."""
    from ..export import merged_graph
    from ..graph.lift import Lifted

    gm, example_inputs, _, schedule = merged_graph(model, example, recipe)
    module = _FirstOutput(Lifted(gm, example_inputs).eval()).eval()
    module.schedule = schedule
    return module


def available(name: str) -> Optional[str]:
    """None when peer ``name`` can run here, else why not."""
    try:
        if name.startswith("ov_"):
            import nncf  # noqa: F401
            import openvino  # noqa: F401
        else:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
    except ImportError as e:
        need = "openvino and nncf" if name.startswith("ov_") else "onnxruntime and onnx"
        return f"{name} needs {need} (pip install 'mergepass[bench]'): {e}"
    return None


def build(name: str, model: torch.nn.Module, example: torch.Tensor, calibration=None,
          overrides: Optional[dict] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Peer ``name`` (one of :data:`PEERS`) for ``example``'s shape, calibrated on ``calibration``."""
    merge = merge_recipe(name, overrides)
    if name.startswith("ov_"):
        return openvino_peer(model, example, calibration, int8=name.startswith("ov_int8"), merge=merge)
    return ort(model, example, calibration, int8=name.startswith("ort_int8"), merge=merge)


def _prepare(name: str, model: torch.nn.Module, example: torch.Tensor, merge):
    """(the module peer ``name`` converts, its merge schedule or None); raises when ``name`` cannot run."""
    why = available(name)
    if why:
        raise RuntimeError(why)
    if merge is None:
        return model, None
    merged = merged_module(model, example, merge)
    return merged, merged.schedule


def _calibration_batches(calibration, example: torch.Tensor) -> list[torch.Tensor]:
    """The calibration batches of ``example``'s shape (the exported graphs are static)."""
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in (calibration or [example])]
    return [b.float() for b in batches if b.shape == example.shape] or [example.float()]


def openvino_peer(model: torch.nn.Module, example: torch.Tensor, calibration=None, int8: bool = True,
                  merge=None, profile: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` converted to OpenVINO for ``example``'s shape, int8 by NNCF (transformer model type)
    calibrated on ``calibration``; with ``merge`` (a recipe), the model with that recipe's merges.
    ``profile``: OpenVINO records per-node times (``PERF_COUNT``), read with ``run.profile()`` after a
    call as (node type, execution type, node name, ms) rows."""
    model, schedule = _prepare("ov_int8" if int8 else "ov_fp32", model, example, merge)
    import openvino as ov

    with torch.no_grad():
        converted = ov.convert_model(_FirstOutput(model).eval(), example_input=example, input=[tuple(example.shape)])
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    if profile:
        config["PERF_COUNT"] = "YES"
    if int8:
        import nncf
        batches = _calibration_batches(calibration, example)
        converted = nncf.quantize(converted, nncf.Dataset(batches, lambda b: b.numpy()),
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches))
    else:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = ov.Core().compile_model(converted, "CPU", config)
    request = compiled.create_infer_request()
    out_port = compiled.output(0)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(request.infer({0: x.detach().float().numpy()})[out_port].copy())
    run.schedule = schedule
    run.profile = lambda: [(i.node_type, i.exec_type, i.node_name, i.real_time.total_seconds() * 1e3)
                           for i in request.get_profiling_info()]
    return run


def _export(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    with torch.no_grad():
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"], opset_version=18,
                              external_data=False)
        except Exception:  # noqa: BLE001 - the TorchScript exporter handles what the dynamo one cannot
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], opset_version=17)


def _session(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _runner(session, schedule=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The session as a function of one tensor; ``run.schedule``: the merge schedule it runs, or None."""
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().float().numpy()})[0])
    run.schedule = schedule
    return run


def ort(model: torch.nn.Module, example: torch.Tensor, calibration: Optional[Sequence[torch.Tensor]] = None,
        int8: bool = True, merge=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` as an ONNX Runtime session for ``example``'s shape (int8 QDQ calibrated on
    ``calibration``); with ``merge`` (a recipe), the model with that recipe's merges."""
    model, schedule = _prepare("ort_int8" if int8 else "ort_fp32", model, example, merge)
    tmp = Path(tempfile.mkdtemp(prefix="mergepass_ort_"))
    _export(model, example, tmp / "fp32.onnx")
    if not int8:
        return _runner(_session(tmp / "fp32.onnx"), schedule)
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..quantize.pt2e import cpu_has_vnni

    batches = _calibration_batches(calibration, example)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": b.float().numpy()} for b in batches])

        def get_next(self):
            return next(self.it, None)

    try:
        quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"))
    except Exception:  # noqa: BLE001 - ORT's symbolic shape inference fails on merged graphs (gather/scatter)
        quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
    # without VNNI, u8 x s8 pair sums saturate at 16 bits: ORT's reduce_range keeps weights to 7 bits
    quantize_static(str(tmp / "pre.onnx"), str(tmp / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, reduce_range=not cpu_has_vnni(),
                    op_types_to_quantize=["MatMul", "Gemm"],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return _runner(_session(tmp / "int8.onnx"), schedule)
