"""Fused merge calls whose similarity matmul is faster screened in bf16 on this CPU get ``screen=True``: the kernel
then finds the same partners bit for bit (:mod:`mergepass.merge.fused`), so this pass changes speed only."""
from __future__ import annotations

from typing import Callable

from torch import fx

from ...decide import Decision
from ...graph.nodes import width
from ...methods import all_ops


def screen_merges(gm: fx.GraphModule, choose: Callable[[int], Decision]) -> list[Decision]:
    """Ask ``choose(width)`` once per metric width the fused merges compare; set ``screen`` where it says ``bf16``.
    Returns the decisions, in the order first asked."""
    ops = {op.fused: op for op in all_ops() if op.fused is not None}
    decisions: dict[int, Decision] = {}
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        w = width(node.args[ops[node.target].compares(dict(node.kwargs))])
        if w is None:
            continue
        if w not in decisions:
            decisions[w] = choose(w)
        if decisions[w].choice == "bf16":
            node.kwargs = {**node.kwargs, "screen": True}
            changed = True
    if changed:
        gm.recompile()
    return list(decisions.values())
