"""The pipeline runs mergepass's graph passes in the order mergepass.rewrite.passes.ORDER names them."""
import contextlib

import pytest
import torch

import mergepass
from helpers import attention_skip, tiny_vit
from mergepass.quantize.qsdpa_reference import reference_kernel
from mergepass.rewrite import passes
from mergepass.rewrite.passes import int8_attention


def _passes_run(**overrides) -> list[str]:
    calib = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    be = mergepass.backend("tome_int8", merge={"r": 3}, calibration=calib, cache=False, **overrides)
    seen = []
    with passes.watch(seen.append), torch.no_grad():
        torch.compile(tiny_vit(depth=2), backend=be, dynamic=False)(torch.randn(2, 3, 64, 64))
    assert be.quantized and be.schedule.merging
    return seen


# one ToMe int8 compile for each attention: mergepass's attention op (replace_attention) or torchao's fused int8
# attention (int8_attention); the one not chosen never runs
@pytest.mark.parametrize("attention", ["op", "int8"])
def test_the_pipeline_runs_each_pass_once_in_the_listed_order(attention):
    if attention == "op":
        if attention_skip("bf16"):
            pytest.skip(attention_skip("bf16"))
        seen = _passes_run(lower={"target": "eager", "attention_kernel": "bf16"})
    else:
        kernel = contextlib.nullcontext() if int8_attention.unavailable() is None else reference_kernel()
        with kernel:
            seen = _passes_run(lower={"target": "eager"}, quantize={"pt2e": {"attention": "int8"}})
    unused = "int8_attention" if attention == "op" else "replace_attention"
    assert seen == [name for name in passes.NAMES if name != unused]
