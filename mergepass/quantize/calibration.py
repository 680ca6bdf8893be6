"""Calibration data and activation statistics shared by the int8 engines."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import fx

from .graphs import module_names


def _linear_nodes(gm: fx.GraphModule):
    lin = {torch.ops.aten.linear.default}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in lin]


def tail_ratio_tracker():
    """(record(key, x), flagged(ratio)): running input max |x| and 99.9th percentile per key; a key
    whose max exceeds ``ratio`` x its percentile carries outliers that per-tensor int8 would crush."""
    stats: dict = {}

    def record(key, x: torch.Tensor) -> None:
        a = x.detach().abs().flatten().float()
        if a.numel() > 2_000_000:  # torch.quantile's input limit
            a = a[torch.randperm(a.numel())[:2_000_000]]
        mx, p = a.max().item(), torch.quantile(a, 0.999).item()
        old = stats.get(key, (0.0, 0.0))
        stats[key] = (max(old[0], mx), max(old[1], p))

    def flagged(ratio: float) -> list:
        return [k for k, (mx, p) in stats.items() if p > 0 and mx / p > ratio]
    return record, flagged


def outlier_linears(m: fx.GraphModule, batches: Sequence[tuple], ratio: float) -> list[str]:
    """Linears whose input max |x| exceeds ``ratio`` x its 99.9th percentile on the calibration data."""
    nodes = set(_linear_nodes(m))
    record, flagged = tail_ratio_tracker()

    class Rec(fx.Interpreter):
        def run_node(self, n):
            if n in nodes:
                record(n, self.env[n.args[0]])
            return super().run_node(n)

    with torch.no_grad():
        for b in batches:
            Rec(m).run(*b)
    out = []
    for n in flagged(ratio):
        names = [s for s in module_names(n) if s]
        out.append(names[-1] if names else n.name)
    return out


def calibration_batches(calibration, user_ex: tuple, limit: int) -> Optional[list[tuple]]:
    """Calibration data as argument tuples with exactly the graph's input shapes, or None."""
    if calibration is None:
        return None
    batches = []
    for b in calibration:
        b = tuple(b) if isinstance(b, (tuple, list)) else (b,)
        if len(b) > len(user_ex):  # DataLoader (images, labels)
            b = b[:len(user_ex)]
        batches.append(b)
        if len(batches) >= limit * 4:
            break
    if not batches:
        return None
    if len(user_ex) == 1 and all(isinstance(b[0], torch.Tensor) for b in batches):
        ex = user_ex[0]
        if any(b[0].shape[1:] != ex.shape[1:] for b in batches):
            return None
        flat = torch.cat([b[0].to(ex.dtype) for b in batches])
        if len(flat) < ex.shape[0]:
            flat = flat.repeat(-(-ex.shape[0] // len(flat)), *[1] * (flat.dim() - 1))
        n = min(limit, len(flat) // ex.shape[0])
        return [(flat[i * ex.shape[0]:(i + 1) * ex.shape[0]],) for i in range(n)]
    ok = all(len(b) == len(user_ex) and all(
        not isinstance(e, torch.Tensor) or (isinstance(t, torch.Tensor) and t.shape == e.shape)
        for t, e in zip(b, user_ex)) for b in batches)
    return batches[:limit] if ok else None


def missing_calibration(calibration, user_ex: tuple) -> str:
    """Why :func:`calibration_batches` gave nothing, for the warning."""
    if calibration is None:
        return "no calibration data was given"
    return f"the calibration batches do not fit the graph inputs {[tuple(t.shape) for t in user_ex]}"
