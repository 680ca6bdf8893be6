"""Fixtures. What tests import (model builders, runners, shared paths) is in helpers.py."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def _worker_threads():
    """Each pytest-xdist worker computes on its share of the cores, and so do the processes it starts: with every
    worker on all of them, OpenMP threads wait for cores the other worker holds, and on 2 cores the suite took a
    third longer (AMD Zen 5, 2026-12-07). Kernels on several threads are tested on purpose (``helpers.threads``).
    A thread count the caller set in ``OMP_NUM_THREADS`` is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


_THREADS = _worker_threads()
import torch  # noqa: E402  (after OMP_NUM_THREADS is set)

if _THREADS is not None:
    torch.set_num_threads(_THREADS)  # in case torch was imported, and its thread count read, before this file

from helpers import tiny_vit  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session", autouse=True)
def _kernels_built_side_by_side():
    """The first two xdist workers each build one of mergepass's C++ kernels before their first test: both builds
    (10-14 s each on a 2-core Zen 3 with a cold cache) run at once, and no worker waits for the other's. A build
    that fails is reported by the tests of that kernel, not here."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker == "gw0":
        from mergepass.merge import fused
        fused.kernel_error()
    elif worker == "gw1":
        from mergepass.kernels import attention
        runnable = [k for k in attention.KINDS if not attention.missing_instructions(k)]
        if runnable:
            attention.unavailable(runnable[0])


def pytest_configure(config):
    config.addinivalue_line("markers", "compile_cache: int8 compiles go through the compile cache, as by default "
                                       "(mergepass.cache); elsewhere MERGEPASS_CACHE=0")


@pytest.fixture(autouse=True)
def _compile_cache(request, monkeypatch):
    """The compile cache is on (its default) only in the tests about it, marked ``compile_cache``. Elsewhere an int8
    compile is one in-process JIT compile, whose kernels inductor's own cache shares across tests; a cache miss
    would build a whole AOTInductor package instead (test_cache.py, test_artifacts.py, the demo)."""
    if request.node.get_closest_marker("compile_cache"):
        monkeypatch.delenv("MERGEPASS_CACHE", raising=False)
    else:
        monkeypatch.setenv("MERGEPASS_CACHE", "0")


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
        path = mergepass.export(m, torch.randn(2, 3, 64, 64), "tome", path=root / "m.pt2", merge={"r": 3})
    torch._dynamo.reset()
    return m, path, root / "cache"
