"""ToMato's original, dynamic rule — flood-fill 4-adjacent tokens whose similarity passes a
threshold — used offline to pick the static merge budget the compiled graph needs.

``budget_from_threshold(model, images, threshold)`` runs the model's first block on calibration
images, flood-fills each image's key-similarity grid, and returns the mean number of tokens the
dynamic rule would remove: pass it as the recipe's ``budget``.
"""
from __future__ import annotations

from typing import Iterable

import networkx as nx
import torch

from ..graph.capture import capture_graphs, prepare
from ..graph.match import find_blocks
from ..merge import key_metric
from ..merge.bipartite import normalize


def flood_fill_groups(metric: torch.Tensor, grid: tuple[int, int], threshold: float) -> list[list[int]]:
    """Connected groups of grid cells joined by 4-neighbour edges with cosine >= threshold."""
    h, w = grid
    m = normalize(metric.float())
    g = nx.Graph()
    g.add_nodes_from(range(h * w))
    for c in range(h * w):
        y, x = divmod(c, w)
        for d in ((c + 1) if x + 1 < w else None, (c + w) if y + 1 < h else None):
            if d is not None and float(m[c] @ m[d]) >= threshold:
                g.add_edge(c, d)
    return sorted(sorted(cc) for cc in nx.connected_components(g))


def block_keys(model: torch.nn.Module, images: torch.Tensor, block: int = 0):
    """(metric [B, N, D], prefix, grid) of a block's attention keys, found structurally."""
    for gm, ex in capture_graphs(model, images):
        gm = prepare(gm, ex)
        match = find_blocks(gm)
        if not match.ok:
            continue
        b = match.blocks[block]
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            metric = gm.graph.call_function(key_metric, (b.keys, b.x_in, b.keys_transposed))
        out.args = (metric,)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        with torch.no_grad():
            return gm(*ex), match.prefix, match.grid
    raise ValueError("no transformer blocks matched")


def budget_from_threshold(model: torch.nn.Module, images: Iterable[torch.Tensor], threshold: float) -> int:
    """Mean tokens removed per image by ToMato's flood fill at ``threshold`` (rounded)."""
    removed = []
    for batch in images:
        metric, prefix, grid = block_keys(model, batch)
        for b in range(metric.shape[0]):
            groups = flood_fill_groups(metric[b, prefix:], grid, threshold)
            removed.append(grid[0] * grid[1] - len(groups))
    return int(round(sum(removed) / max(len(removed), 1)))
