"""Every FX graph pass mergepass runs, one per file. :data:`ORDER` names them in the order they run on a graph,
and every caller runs them through :func:`run`, which refuses any other function:

* prepare (:func:`mergepass.rewrite.capture.prepare`): dynamo's graph in the form matching expects;
* merge (:func:`mergepass.rewrite.merges.rewrite`), after matching and scheduling: on a fresh copy again for
  each block that falls back (``prune_unread_rows`` also where nothing merges); then, where merges run as the fused
  CPU kernel, ``screen_merges`` (:func:`mergepass.pipeline.graph_stages`);
* attention ops (:func:`mergepass.pipeline.attention_stage`), as ``lower.attention_kernel`` asks;
* int8 (:mod:`mergepass.quantize.pt2e`): ``int8_attention`` before ``torch.export`` (its fusion then runs
  inside inductor), the last two on the exported graph.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from .affine_batch_norms import affine_batch_norms
from .expand_mha import expand_mha
from .explicit_conv_padding import explicit_conv_padding
from .fix_token_literals import RewriteError, fix_token_literals
from .fold_scalars import fold_scalars
from .insert_merges import insert_merges
from .prune_unread_rows import prune_unread_rows
from .int8_attention import decompose_attention
from .replace_attention import replace_attention
from .screen_merges import screen_merges
from .strip_noops import strip_noops

ORDER: tuple[Callable[..., Any], ...] = (
    strip_noops, fold_scalars, expand_mha,    # prepare
    insert_merges, prune_unread_rows, fix_token_literals, screen_merges,  # merge
    replace_attention,                        # attention ops
    decompose_attention,                      # int8, before export
    explicit_conv_padding, affine_batch_norms,  # int8, on the exported graph
)


def name(fn: Callable[..., Any]) -> str:
    """A pass's name: its file's."""
    return fn.__module__.rpartition(".")[2]


NAMES = tuple(name(p) for p in ORDER)
_WATCHERS: list[Callable[[str], None]] = []


def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for a pass of :data:`ORDER`, said first to each :func:`watch`-er by name."""
    if fn not in ORDER:
        raise ValueError(f"{getattr(fn, '__qualname__', fn)!r} is not a pass of mergepass.rewrite.passes.ORDER")
    for w in _WATCHERS:
        w(name(fn))
    return fn(*args, **kwargs)


@contextlib.contextmanager
def watch(seen: Callable[[str], None]) -> Iterator[None]:
    """Call ``seen(name)`` as each pass starts, in this process, while the context lasts."""
    _WATCHERS.append(seen)
    try:
        yield
    finally:
        _WATCHERS.remove(seen)


__all__ = ["ORDER", "NAMES", "run", "watch", "name", "strip_noops", "fold_scalars", "expand_mha", "insert_merges",
           "prune_unread_rows", "fix_token_literals", "screen_merges", "RewriteError", "replace_attention", "decompose_attention", "explicit_conv_padding",
           "affine_batch_norms"]
