"""ToMato's original, dynamic rule — flood-fill 4-adjacent tokens whose similarity passes a
threshold — used offline to pick the static merge budget the compiled graph needs.

``budget_from_threshold(model, images, threshold)`` runs the model up to the first block's attention
residual on calibration images, flood-fills each image's patch grid as the paper's Algorithms 1-2 do,
and returns the mean number of tokens the dynamic rule would remove: pass it as the recipe's
``budget``. With ``similarity="softmax"`` (the paper's) ``threshold`` is the paper's ``sim``, a
probability: token ``i`` absorbs its 4-neighbour ``j`` when ``softmax_j(x_i . x_k over all patch
tokens k) >= sim``, ``x`` the post-attention tokens; with ``"cosine"`` it is a key cosine (symmetric).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..rewrite.matched import first_match
from ..merge import key_metric, similarity_metric
from ..merge.bipartite import normalize


def _neighbours(c: int, grid: tuple[int, int]) -> list[int]:
    """4-neighbours of cell ``c``, in the order of the paper's code (left, right, up, down)."""
    h, w = grid
    y, x = divmod(c, w)
    return [yy * w + xx for yy, xx in ((y, x - 1), (y, x + 1), (y - 1, x), (y + 1, x)) if 0 <= yy < h and 0 <= xx < w]


def _passes(metric: torch.Tensor, threshold: float, similarity: str):
    """``passes(i, j)``: whether cell ``i`` absorbs its neighbour ``j`` at ``threshold``."""
    if similarity_metric(similarity) == "tokens":
        m = metric.detach().double()
        logp = (m @ m.T).log_softmax(dim=-1)  # the paper's attn, as log-probabilities (no underflow)
        if threshold <= 0:
            return lambda i, j: True
        log_t = math.log(threshold)
        return lambda i, j: bool(logp[i, j] >= log_t)
    m = normalize(metric.float())
    return lambda i, j: float(m[i] @ m[j]) >= threshold


def flood_fill_groups(metric: torch.Tensor, grid: tuple[int, int], threshold: float,
                      similarity: str = "softmax") -> list[list[int]]:
    """The paper's Algorithms 1-2 on one image's patch tokens ``metric`` [H*W, D]: visit cells in
    order; from each unvisited one, absorb 4-neighbours that pass, recursively; each visit is a group.
    The softmax similarity is directed (the visiting cell's row), so groups follow the visiting order."""
    passes = _passes(metric, threshold, similarity)
    visited: set[int] = set()
    groups = []
    for root in range(grid[0] * grid[1]):
        if root in visited:
            continue
        group, stack = [], [root]
        while stack:
            c = stack.pop()
            if c in visited:
                continue
            visited.add(c)
            group.append(c)
            stack.extend(d for d in reversed(_neighbours(c, grid)) if d not in visited and passes(c, d))
        groups.append(sorted(group))
    return sorted(groups)


def block_metric(model: torch.nn.Module, images: torch.Tensor, block: int = 0, similarity: str = "softmax"):
    """(metric [B, N, D], prefix, grid) that ``similarity`` reads in a block, found structurally: the
    post-attention tokens (softmax) or the attention keys averaged over heads (cosine)."""
    tokens = similarity_metric(similarity) == "tokens"
    m = first_match(model, images)
    gm, b = m.graph, m.match.blocks[block]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if tokens:
        metric = b.x_mid
    else:
        with gm.graph.inserting_before(out):
            metric = gm.graph.call_function(key_metric, (b.keys, b.x_in, b.keys_transposed))
    out.args = (metric,)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    with torch.no_grad():
        return gm(*m.inputs), m.match.prefix, m.match.grid


def block_keys(model: torch.nn.Module, images: torch.Tensor, block: int = 0):
    """(metric [B, N, D], prefix, grid) of a block's attention keys, found structurally."""
    return block_metric(model, images, block, "cosine")


def removed_per_image(model: torch.nn.Module, images: Iterable[torch.Tensor], threshold: float,
                      similarity: str = "softmax") -> list[int]:
    """Tokens ToMato's flood fill at ``threshold`` removes in the first block, one count per image."""
    removed = []
    for batch in images:
        metric, prefix, grid = block_metric(model, batch, 0, similarity)
        for b in range(metric.shape[0]):
            groups = flood_fill_groups(metric[b, prefix:], grid, threshold, similarity)
            removed.append(grid[0] * grid[1] - len(groups))
    return removed


def budget_from_threshold(model: torch.nn.Module, images: Iterable[torch.Tensor], threshold: float,
                          similarity: str = "softmax") -> int:
    """Mean tokens removed per image by ToMato's flood fill at ``threshold`` (rounded)."""
    removed = removed_per_image(model, images, threshold, similarity)
    return int(round(sum(removed) / max(len(removed), 1)))
