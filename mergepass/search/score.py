"""Scoring a candidate recipe on calibration batches: the merged graph's output against the unmerged one's."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import fx

from ..fidelity import cosine
from ..graph.lift import Lifted
from ..rewrite.merges import rewrite

if TYPE_CHECKING:
    from ..recipe import Recipe


def _outputs(module, batches) -> list:
    with torch.no_grad():
        return [module(*b) for b in batches]


def graph_fidelity(base: fx.GraphModule, example_inputs: Sequence, batches: Sequence[tuple]) -> Callable[["Recipe"], float]:
    """A scorer: mean cosine (CLS token for token features) of the merged graph's first output
    against the unmerged graph's on ``batches`` (argument tuples that fit the graph's inputs)."""
    ref = _outputs(Lifted(base, example_inputs), batches)

    def score(recipe: "Recipe") -> float:
        res = rewrite(base, example_inputs, recipe, warn=False)
        out = _outputs(Lifted(res.gm, example_inputs), batches)
        return torch.cat([cosine(o, r) for o, r in zip(out, ref)]).mean().item()
    return score
