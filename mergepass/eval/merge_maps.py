"""Merge maps: which patches ended up in the same token. Each final token's patches are painted
with their mean colour and outlined, ToMe-style (command line: ``python -m mergepass.viz``)."""
from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import torch

from ..rewrite.capture import capture_graphs
from ..methods import all_ops
from ..pipeline import merge_stage
from ..recipe import load
from .data import IMAGENET_MEAN, IMAGENET_STD, open_image


def _merge_fns() -> set:
    return {fn for op in all_ops() for fn in (op.reference, op.fused) if fn is not None}


def source_maps(model: torch.nn.Module, image: torch.Tensor, recipe: Any = "tome", **overrides):
    """(schedule, [source map after each merging block: LongTensor [B, N0]]) for ``image``."""
    r = load(recipe, **overrides).replace(lower={"prune_rows": False})  # the last block's merge is a map too
    gm, ex = capture_graphs(model, image)[0]
    res = merge_stage(gm, ex, r, warn=False)
    if not res.merged:
        return res.schedule, []
    g = res.gm.graph
    sources, fns = [], _merge_fns()
    for n in g.nodes:
        if n.op == "call_function" and n.target in fns:
            sources += [u for u in n.users if u.target is operator.getitem and u.args[1] == 2]
    out = next(n for n in g.nodes if n.op == "output")
    out.args = (tuple(sources),)
    g.eliminate_dead_code()
    res.gm.recompile()
    with torch.no_grad():
        maps = res.gm(*ex)
    return res.schedule, list(maps)


def paint(image_rgb: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Paint [3, H, W] (0..1) by patch groups: ``labels`` [gh*gw] group id per patch."""
    gh, gw = grid
    _, h, w = image_rgb.shape
    ph, pw = h // gh, w // gw
    img = image_rgb[:, :gh * ph, :gw * pw]
    lab = labels.reshape(gh, gw).repeat_interleave(ph, 0).repeat_interleave(pw, 1)  # [H, W]
    n = int(lab.max()) + 1
    flat = lab.flatten()
    sums = torch.zeros(n, 3).index_add_(0, flat, img.reshape(3, -1).T)
    counts = torch.zeros(n).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
    out = (sums / counts.clamp_min(1)[:, None])[flat].T.reshape(3, *lab.shape)
    edge = torch.zeros_like(lab, dtype=torch.bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    out[:, edge] = 0.0
    return out


def render(image_path: str, model: torch.nn.Module, recipe: Any, out: str, img_size: int = 224,
           per_block: bool = False, **overrides) -> Path:
    """Write a PNG: the image and its merge map (or one map per merging block)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = open_image(image_path, img_size)[None]
    rgb = (x[0] * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]).clamp(0, 1)
    sched, maps = source_maps(model, x, recipe, **overrides)
    if sched is None or sched.grid is None:
        raise ValueError("no patch grid / no merges to draw for this model and recipe")
    p = sched.prefix
    merging = [b for b in sched.blocks if b.merged]
    panels = [("input", rgb)]
    chosen = list(zip(merging, maps)) if per_block else list(zip(merging, maps))[-1:]
    for b, src in chosen:
        labels = src[0, p:]
        labels = torch.unique(labels, return_inverse=True)[1]
        panels.append((f"{b.name}: {b.tokens_out} tokens ({b.kind})", paint(rgb, labels, sched.grid)))
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, img) in zip(axes.flat, panels):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{sched.recipe_name} ({sched.merge.method}): {sched.tokens} -> {sched.final_tokens} tokens",
                 fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
