"""The fused CPU merge kernel: bipartite matching and the size-weighted merge as one custom op.

``torch.ops.mergepass.bipartite_merge`` computes what :func:`~mergepass.merge.global_merge`,
:func:`~mergepass.merge.window_merge` and :func:`~mergepass.merge.adjacent_merge` compute, in one
call per block instead of ~15-25 small kernels (similarity matmul, max, sorts, index arithmetic,
scatter-adds). Inductor keeps it as one extern call, so the compiled graph stays free of graph
breaks and its shapes stay static.

The C++ source (``csrc/bipartite_merge.cpp``) is built on first use with
``torch.utils.cpp_extension`` and cached; inductor's CPU backend needs the same C++ compiler.
When it cannot be built, :func:`kernel_error` says why and callers use the reference functions.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Optional

import torch

from ..cpu import cpu_id
from .ops import checkerboard, largest_norms, window_perm
from .tokens import init_state

_SRC = Path(__file__).with_name("csrc") / "bipartite_merge.cpp"

_LIB = torch.library.Library("mergepass", "DEF")
_LIB.define("bipartite_merge(Tensor x, Tensor metric, Tensor size, Tensor source, Tensor a_pos, Tensor b_pos, "
            "Tensor? allowed, int r, int prefix) -> (Tensor, Tensor, Tensor)")


@torch.library.register_fake("mergepass::bipartite_merge")
def _shapes(x, metric, size, source, a_pos, b_pos, allowed, r, prefix):
    b, n, c = x.shape
    n_out = n - r * a_pos.shape[-2]
    return x.new_empty(b, n_out, c), x.new_empty(b, n_out, 1), source.new_empty(source.shape, dtype=torch.long)


@functools.cache
def kernel_error() -> Optional[str]:
    """Build and load the kernel once; ``None`` when it is ready, else why it is not."""
    import logging
    import warnings
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # "no CUDA runtime" noise, for this build only
    try:
        from torch.utils.cpp_extension import load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # -march=native: a cached build must never be loaded on a different CPU, so the name says which
            cpu = hashlib.sha1(cpu_id().encode()).hexdigest()[:10]
            load(name=f"mergepass_kernels_{cpu}", sources=[str(_SRC)], is_python_module=False,
                 extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                 verbose=False)
    except Exception as e:  # no compiler, no headers, a build error: all mean "use the reference path"
        msg = str(e).strip()
        return f"{type(e).__name__}: {msg.splitlines()[-1] if msg else ''}"
    finally:
        log.setLevel(level)
    return None


def _call(x, metric, size, source, a_pos, b_pos, allowed, r, prefix):
    size, source = init_state(x, size, source)
    return torch.ops.mergepass.bipartite_merge(x, metric, size, source, a_pos, b_pos, allowed, r, prefix)


def fused_global_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                       source: Optional[torch.Tensor], *, r: int, prefix: int, offset: int = 0, protect: int = 0):
    """:func:`~mergepass.merge.global_merge` (ToMe) as one kernel."""
    pos = torch.arange(prefix, x.shape[1], device=x.device)
    allowed = None
    if protect:  # protected tokens neither propose (empty rows) nor accept (empty columns) a merge
        free = ~largest_norms(metric[:, prefix:], protect)
        allowed = free[:, offset::2, None] & free[:, None, 1 - offset::2]
    return _call(x, metric, size, source, pos[None, None, offset::2], pos[None, None, 1 - offset::2], allowed, r,
                 prefix)


def fused_adjacent_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                         source: Optional[torch.Tensor], *, r: int, prefix: int, grid: tuple[int, int]):
    """:func:`~mergepass.merge.adjacent_merge` (ToMato, checkerboard sets, 4-neighbours) as one kernel."""
    a_ids, b_ids, adj = checkerboard(grid)
    dev = x.device
    a_pos = torch.tensor(a_ids, device=dev)[None, None] + prefix
    b_pos = torch.tensor(b_ids, device=dev)[None, None] + prefix
    return _call(x, metric, size, source, a_pos, b_pos, adj.to(dev), r, prefix)


def fused_window_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                       source: Optional[torch.Tensor], *, r: int, prefix: int,
                       grid: tuple[int, int], windows: tuple[int, int]):
    """:func:`~mergepass.merge.window_merge` (LGTM, ``r`` merges in each window) as one kernel; the
    windows are formed from the tracked token locations exactly as there, padding marked -1."""
    size, source = init_state(x, size, source)
    b, n, _ = x.shape
    perm, per, _ = window_perm(source, n, prefix, grid, windows)
    tok = torch.where(perm < n - prefix, perm + prefix, -1).reshape(b, windows[0] * windows[1], per)
    return _call(x, metric, size, source, tok[..., ::2], tok[..., 1::2], None, r, prefix)


__all__ = ["kernel_error", "fused_global_merge", "fused_adjacent_merge", "fused_window_merge"]
