"""Calibration data and activation statistics shared by the int8 engines."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import fx

from ..graph.lift import Lifted
from ..graph.nodes import module_paths


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
        names = [s for s in module_paths(n) if s]
        out.append(names[-1] if names else n.name)
    return out


def _check_batch(b: tuple, i: int) -> None:
    """Raise ValueError naming batch ``i`` when its input is not floating point (or is an 8-bit float)
    or holds NaN/inf.

    The first entry is the model's input; later ones may be a DataLoader's integer labels, which are
    dropped (:func:`fit_batches`), so only uint8 (raw images) is refused there."""
    for k, t in enumerate(b):
        if not isinstance(t, torch.Tensor):
            continue
        dtype = str(t.dtype).removeprefix("torch.")
        if t.dtype == torch.uint8 or (k == 0 and not t.is_floating_point()):
            raw = " (raw images?)" if t.dtype == torch.uint8 else ""
            raise ValueError(f"calibration batch {i} holds a tensor of dtype {dtype}{raw}: pass the model's input "
                             "as it is called, normalised to floating point")
        if t.is_floating_point() and t.element_size() == 1:  # float8: no model takes it, and torch has few ops for it
            raise ValueError(f"calibration batch {i} holds a tensor of dtype {dtype}: pass the model's input as it "
                             "is called (float32, float16 or bfloat16), not an 8-bit float")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"calibration batch {i} holds non-finite values (NaN or inf): int8 scales need "
                             "finite activations")


def read_calibration(calibration, limit: int) -> Optional[list[tuple]]:
    """Read a calibration iterable once (a generator is used up by reading): at most ``limit``
    batches, each as a tuple of inputs. Raises ValueError for an empty or non-iterable one, and for a
    batch whose input is not floating point (uint8 images, int64, bool), is an 8-bit float or holds NaN/inf."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        raise ValueError("calibration must be an iterable of batches (a list of tensors, a DataLoader), "
                         f"not one tensor of shape {tuple(calibration.shape)}; wrap it in a list")
    try:
        items = iter(calibration) if not isinstance(calibration, (str, bytes)) else None
    except TypeError:
        items = None
    if items is None:
        raise ValueError("calibration must be an iterable of batches (a list of tensors, a DataLoader), "
                         f"not {type(calibration).__name__} {calibration!r:.40}")
    batches = []
    for b in items:
        b = tuple(b) if isinstance(b, (tuple, list)) else (b,)
        _check_batch(b, len(batches))
        batches.append(b)
        if len(batches) >= limit:
            break
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch of inputs")
    return batches


def fit_batches(batches: Optional[list[tuple]], user_ex: tuple) -> Optional[list[tuple]]:
    """Calibration batches with exactly the graph's input shapes, dtype and device (None without data).

    A single image input is re-batched to the graph's batch size; a DataLoader's trailing labels are
    dropped. Raises ValueError naming the expected shape when the data cannot fit."""
    if batches is None:
        return None
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in user_ex]
    batches = [b[:len(user_ex)] for b in batches]
    if len(user_ex) == 1 and isinstance(user_ex[0], torch.Tensor) and all(isinstance(b[0], torch.Tensor) for b in batches):
        ex = user_ex[0]
        bad = next((b[0] for b in batches if b[0].shape[1:] != ex.shape[1:]), None)
        if bad is not None:
            raise ValueError(f"calibration batch of shape {tuple(bad.shape)} does not fit the compiled input "
                             f"{tuple(ex.shape)}: each sample must have shape {tuple(ex.shape[1:])}")
        flat = torch.cat([b[0] for b in batches]).to(device=ex.device, dtype=ex.dtype)
        if len(flat) < ex.shape[0]:
            flat = flat.repeat(-(-ex.shape[0] // len(flat)), *[1] * (flat.dim() - 1))
        return [(flat[i * ex.shape[0]:(i + 1) * ex.shape[0]],) for i in range(len(flat) // ex.shape[0])]
    out = []
    for b in batches:
        if len(b) != len(user_ex) or any(isinstance(e, torch.Tensor) and (
                not isinstance(t, torch.Tensor) or t.shape != e.shape) for t, e in zip(b, user_ex)):
            got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in b]
            raise ValueError(f"calibration batch with inputs {got} does not fit the compiled inputs {shapes}")
        bad = next((t.dtype for t, e in zip(b, user_ex) if isinstance(e, torch.Tensor) and e.is_floating_point()
                    and not t.is_floating_point()), None)
        if bad is not None:  # an integer tensor cast to a float input would calibrate on wrong values
            raise ValueError(f"calibration batch holds a tensor of dtype {str(bad).removeprefix('torch.')} "
                             "where the compiled input is floating point")
        out.append(tuple(t.to(e.device, e.dtype) if isinstance(e, torch.Tensor) else t for t, e in zip(b, user_ex)))
    return out


def fit_to_graph(batches: Optional[list[tuple]], gm: fx.GraphModule, example_inputs: Sequence) -> Optional[list[tuple]]:
    """:func:`fit_batches` for dynamo's graph ``gm``: the batches fitted to its user inputs."""
    return fit_batches(batches, Lifted(gm, example_inputs).user_inputs(example_inputs))
