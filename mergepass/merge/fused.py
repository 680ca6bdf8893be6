"""The fused CPU merge kernel: bipartite matching and the size-weighted merge as one custom op.

``torch.ops.mergepass.bipartite_merge`` computes what :func:`~mergepass.merge.global_merge`,
:func:`~mergepass.merge.window_merge` and :func:`~mergepass.merge.adjacent_merge` compute, in one
call per block instead of ~15-25 small kernels (similarity matmul, max, sorts, index arithmetic,
scatter-adds). Inductor keeps it as one extern call, so the compiled graph stays free of graph
breaks and its shapes stay static.

Exactly ``r`` A tokens per group leave. A pair is permitted unless ``allowed`` forbids it, its B slot
is padding (-1) or its similarity is NaN; A tokens without a permitted partner rank below all others
and, when still among the ``r``, are dropped: they join no average (sizes then sum to fewer tokens)
and their source entries point at the group's first real B token. :func:`~mergepass.merge.match`
does the same, so the kernel and the reference functions agree.

The C++ source (``csrc/bipartite_merge.cpp``) is built on first use with
``torch.utils.cpp_extension`` and cached; inductor's CPU backend needs the same C++ compiler.
When it cannot be built, :func:`kernel_error` says why and callers use the reference functions.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

from ..decide import Candidate, Decision, decide
from ..kernels.build import build_extension, source_digest
from .ops import adjacent_merge, checkerboard, largest_norms, similarity_metric, window_perm
from .tokens import init_state

_SRC = Path(__file__).with_name("csrc") / "bipartite_merge.cpp"

_LIB = torch.library.Library("mergepass", "DEF")
_LIB.define("bipartite_merge(Tensor x, Tensor metric, Tensor size, Tensor source, Tensor a_pos, Tensor b_pos, "
            "Tensor? allowed, int r, int prefix, bool nearest=False, bool screen=False) -> (Tensor, Tensor, Tensor)")


@torch.library.register_fake("mergepass::bipartite_merge")
def _shapes(x, metric, size, source, a_pos, b_pos, allowed, r, prefix, nearest=False, screen=False):
    b, n, c = x.shape
    n_out = n - r * a_pos.shape[-2]
    return x.new_empty(b, n_out, c), x.new_empty(b, n_out, 1), source.new_empty(source.shape, dtype=torch.long)


@functools.cache
def kernel_error() -> Optional[str]:
    """Build and load the kernel once; ``None`` when it is ready, else why it is not."""
    return build_extension("mergepass_kernels", [_SRC])


def _call(x, metric, size, source, a_pos, b_pos, allowed, r, prefix, nearest=False, screen=False):
    size, source = init_state(x, size, source)
    return torch.ops.mergepass.bipartite_merge(x, metric, size, source, a_pos, b_pos, allowed, r, prefix, nearest,
                                               screen)


def _halves(x: torch.Tensor, prefix: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's alternating A and B positions after the prefix, as the kernel's one group."""
    pos = torch.arange(prefix, x.shape[1], device=x.device)
    return pos[None, None, offset::2], pos[None, None, 1 - offset::2]


def _free_pairs(protected: torch.Tensor, offset: int) -> torch.Tensor:
    """[B, Ma, Mb] ``allowed`` for ToMe's halves where ``protected`` [B, M] patch tokens neither propose (empty rows)
    nor accept (empty columns) a merge."""
    free = ~protected
    return free[:, offset::2, None] & free[:, None, 1 - offset::2]


def fused_global_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                       source: Optional[torch.Tensor], *, r: int, prefix: int, offset: int = 0, protect: int = 0,
                       screen: bool = False):
    """:func:`~mergepass.merge.global_merge` (ToMe) as one kernel. ``screen``: pairs screened by a bf16 matmul
    (the same matches; :func:`choose_screen` says where it is faster)."""
    allowed = _free_pairs(largest_norms(metric[:, prefix:], protect), offset) if protect else None
    return _call(x, metric, size, source, *_halves(x, prefix, offset), allowed, r, prefix, False, screen)


def fused_nearest_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                        source: Optional[torch.Tensor], *, r: int, prefix: int, offset: int = 0,
                        protect: Optional[torch.Tensor] = None, screen: bool = False):
    """ToMe's choice of the ``r`` leaving tokens by ``metric``, each of them joining its most similar kept token
    (unmerged A or B) instead of its B partner: soft merging's ``k = 1`` as one kernel. ``protect`` [B, M]: patch
    tokens that neither leave nor absorb. ``screen``: as :func:`fused_global_merge`'s."""
    allowed = None if protect is None else _free_pairs(protect, offset)
    return _call(x, metric, size, source, *_halves(x, prefix, offset), allowed, r, prefix, True, screen)


def fused_adjacent_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                         source: Optional[torch.Tensor], *, r: int, prefix: int, grid: tuple[int, int],
                         similarity: str = "cosine", screen: bool = False):
    """:func:`~mergepass.merge.adjacent_merge` (ToMato, checkerboard sets, 4-neighbours) as one kernel.

    Only for ``similarity="cosine"``: the kernel scores pairs by the cosine of the metric it is given,
    while the paper's ``"softmax"`` needs each A token's normaliser over all tokens, which no per-pair
    cosine of a fixed metric gives exactly (a lifted metric whose cosines are monotone in the
    log-probabilities exists, but its float32 rounding would break exact agreement with the reference
    ops). ToMato merges once per model, so the kernel's saving is one block's ~20 small ops: the softmax
    similarity runs the reference ops here, and this is the one place that choice is made."""
    if similarity_metric(similarity) != "keys":
        return adjacent_merge(x, metric, size, source, r=r, prefix=prefix, grid=grid, similarity=similarity)
    a_ids, b_ids, adj = checkerboard(grid)
    dev = x.device
    a_pos = torch.tensor(a_ids, device=dev)[None, None] + prefix
    b_pos = torch.tensor(b_ids, device=dev)[None, None] + prefix
    return _call(x, metric, size, source, a_pos, b_pos, adj.to(dev), r, prefix, False, screen)


def fused_window_merge(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                       source: Optional[torch.Tensor], *, r: int, prefix: int,
                       grid: tuple[int, int], windows: tuple[int, int], screen: bool = False):
    """:func:`~mergepass.merge.window_merge` (LGTM, ``r`` merges in each window) as one kernel; the
    windows are formed from the tracked token locations exactly as there, padding marked -1."""
    size, source = init_state(x, size, source)
    b, n, _ = x.shape
    perm, per, _ = window_perm(source, n, prefix, grid, windows)
    tok = torch.where(perm < n - prefix, perm + prefix, -1).reshape(b, windows[0] * windows[1], per)
    return _call(x, metric, size, source, tok[..., ::2], tok[..., 1::2], None, r, prefix, False, screen)


__all__ = ["kernel_error", "choose", "choose_screen", "fused_global_merge", "fused_nearest_merge", "fused_adjacent_merge",
           "fused_window_merge"]


# ViT-S/14 at 224 px, batch 8, ToMe r=16 in its first block: one shape for every model, so that this CPU is
# timed once (an inductor compile of the reference ops takes seconds), not once per graph
_SHAPE = {"batch": 8, "tokens": 257, "width": 384, "metric": 384, "r": 16, "prefix": 1}


def _sample(width: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Tokens and a ``width``-channel metric at ``_SHAPE``, and the merge's keyword arguments: what is timed."""
    s = _SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["batch"], s["tokens"], s["width"], generator=g)
    metric = torch.randn(s["batch"], s["tokens"], width, generator=g)
    return x, metric, {"r": s["r"], "prefix": s["prefix"]}


def _decide(question: str, facts: dict, candidates: dict, default: str, timer, keep: bool) -> Decision:
    """:func:`~mergepass.decide.decide`, keyed by ``_SHAPE``, ``facts`` and this kernel's source, outside any trace."""
    from ..compat import outside_tracing
    with torch.no_grad(), outside_tracing():
        return decide(question, {**_SHAPE, **facts, "kernels": source_digest(_SRC)}, candidates, default=default,
                      timer=timer, keep=keep)


def choose(timer=None, keep: bool = True, op=None) -> Decision:
    """``merge.kernel = "auto"`` on this CPU, by measurement: this kernel against the reference ops compiled by
    inductor, at one representative shape (``_SHAPE``). ``op``: the merge op to time (a registered
    :class:`~mergepass.methods.base.MergeOp` whose functions take ``r`` and ``prefix`` alone, such as ``soft``);
    ToMe's ``global`` merge by default. Each op is decided once, kept on disk (:mod:`mergepass.decide`)."""
    from .ops import global_merge
    name, fast, ref = (op.name, op.fused, op.reference) if op is not None else ("global", fused_global_merge,
                                                                                 global_merge)
    x, metric, kw = _sample(_SHAPE["metric"])
    why = kernel_error() or ("" if fast is not None else f"the {name} merge has no fused kernel")
    candidates = {"fused": Candidate(None if why else lambda: fast(x, metric, None, None, **kw), why)}
    compiled = []

    def reference():  # compiled on first call: only when a measurement is made
        if not compiled:
            compiled.append(torch.compile(lambda x, m: ref(x, m, None, None, **kw), dynamic=False, fullgraph=True))
        return compiled[0](x, metric)

    candidates["reference"] = Candidate(reference)
    try:
        return _decide(f"merge kernel ({name} merge)", {"op": name}, candidates, "fused" if not why else "reference",
                       timer, keep)
    finally:
        compiled.clear()


def choose_screen(width: int, timer=None, keep: bool = True) -> Decision:
    """Whether the kernel screens pairs with a bf16 matmul (``"bf16"``) or scores them all in fp32 (``"fp32"``) for a
    ``width``-channel metric on this CPU, by measurement at ``_SHAPE``'s tokens. Both give the same matches bit for bit,
    so only time decides; the decision is kept on disk (:mod:`mergepass.decide`)."""
    x, metric, kw = _sample(width)
    why = kernel_error() or ""
    run = {on: (lambda on=on: fused_global_merge(x, metric, None, None, screen=on, **kw)) for on in (False, True)}
    candidates = {"fp32": Candidate(run[False]), "bf16": Candidate(None if why else run[True], why)}
    return _decide("merge similarity", {"metric": width}, candidates, "fp32", timer, keep)
