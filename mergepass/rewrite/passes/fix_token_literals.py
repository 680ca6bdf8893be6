"""Propagate shapes through a rewritten graph and make token-count literals follow the merges.

Dynamo bakes the token count into reshapes/views as Python ints (``reshape(B, 197, 3, H, D)``).
After a merge those literals are wrong. Walking the graph with shape-only tensors, every shape op whose
input lost tokens gets the literal that equals the old token count replaced by the new one. Anything
that cannot be fixed unambiguously raises :class:`RewriteError` naming the node, and the caller
merges fewer blocks instead.

The walk runs on meta tensors, whose ops are shape functions dispatched in C++. Fake tensors (dispatched in
Python, several times slower per op) run only the nodes meta tensors cannot: a copy to a device, a module
holding real weights, an op without a meta kernel.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw as hint_int
from torch.fx.node import map_aggregate

from ... import compat
from ...graph.lift import is_state
from ...graph.nodes import inserted, mark_inserted, traced_value, unmerged_shape
from ...merge import gather_positions
from ..position_tables import table_reads

SHAPE_METHODS = {"reshape", "view", "expand", "new_zeros", "new_ones", "new_empty", "new_full"}
SHAPE_FUNCTIONS = {torch.reshape}


class RewriteError(RuntimeError):
    def __init__(self, node: fx.Node, reason: str):
        super().__init__(f"cannot follow the token count through node {node.name!r} ({node.format_node()}): {reason}")
        self.node = node


def _concrete(v):
    """A SymInt's example value (dynamo traces with a hint for every symbolic size)."""
    return hint_int(v) if isinstance(v, torch.SymInt) else v  # constant SymInts have a hint too


def _blank(t: torch.Tensor, device) -> torch.Tensor:
    """An uninitialised tensor of ``t``'s concrete sizes, strides and dtype on ``device``."""
    return torch.empty_strided(tuple(_concrete(d) for d in t.shape), tuple(_concrete(d) for d in t.stride()),
                               dtype=t.dtype, device=device)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_meta else _blank(t, "meta")


def _old_shape(node) -> tuple | None:
    old = unmerged_shape(node)
    if old is not None:
        return old
    v = traced_value(node)
    return tuple(_concrete(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def _is_mergepass_op(n: fx.Node) -> bool:
    return inserted(n)


def _shape_args(n: fx.Node):
    """(getter, setter) for the literal shape of a shape op."""
    if len(n.args) == 2 and isinstance(n.args[1], (tuple, list, torch.Size)):
        return list(n.args[1]), lambda new: setattr(n, "args", (n.args[0], tuple(new)))
    if "size" in n.kwargs or "shape" in n.kwargs:
        key = "size" if "size" in n.kwargs else "shape"
        return list(n.kwargs[key]), lambda new: setattr(n, "kwargs", {**n.kwargs, key: tuple(new)})
    return list(n.args[1:]), lambda new: setattr(n, "args", (n.args[0], *new))


class _Fixer(fx.Interpreter):
    def __init__(self, gm, allowed_changes: set, source_of: dict, data: set, tokens: int, prefix: int,
                 device: torch.device):
        super().__init__(gm)
        self.allowed = allowed_changes
        self.source_of, self.data, self.tokens, self.prefix = source_of, data, tokens, prefix
        self.device, self.fake = device, None
        self.fixed = 0

    def fetch_attr(self, target: str):
        v = super().fetch_attr(target)
        return _meta(v) if isinstance(v, torch.Tensor) else v

    def _execute(self, n: fx.Node):
        """``n``'s output on meta tensors, or, where they cannot run it, on fake tensors of the model's device."""
        try:
            return super().run_node(n)
        except Exception:  # noqa: BLE001 - the fake-tensor run below says whether the node fails for real
            return map_aggregate(self._on_fake(n), lambda v: _meta(v) if isinstance(v, torch.Tensor) else v)

    def _on_fake(self, n: fx.Node):
        if self.fake is None:
            self.fake = compat.fake_mode()
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        with self.fake:
            args, kwargs = map_aggregate((args, kwargs),
                                         lambda v: _blank(v, self.device) if isinstance(v, torch.Tensor) else v)
            return getattr(self, n.op)(n.target, args, kwargs)

    def run_node(self, n: fx.Node):
        if n.op in ("call_method", "call_function") and (
                (n.op == "call_method" and n.target in SHAPE_METHODS) or
                (n.op == "call_function" and n.target in SHAPE_FUNCTIONS)):
            self._fix(n)
        if n in self.source_of:
            self._read_tables(n)
        try:
            out = self._execute(n)
        except RuntimeError as e:
            # a model op refusing the new token count (a shape check, a size mismatch) declines the
            # block; a failure inside mergepass's own ops is a bug and must not pass for a decline
            if _is_mergepass_op(n):
                raise RuntimeError(f"mergepass op {n.name!r} ({n.format_node()}) failed during shape "
                                   f"propagation: {e}") from e
            raise RewriteError(n, f"{type(e).__name__}: {e}") from e
        old = _old_shape(n)
        if old is not None and isinstance(out, torch.Tensor):
            if tuple(out.shape) != old and n not in self.allowed:
                raise RewriteError(n, f"shape changed from {old} to {tuple(out.shape)} outside the merged blocks")
            if tuple(out.shape) == old and n in self.allowed and self._input_changed(n) and not self._prefix_select(n):
                # a reduction or selection over the merged token axis: its value would silently
                # ignore token sizes, so this block is not safe to merge
                raise RewriteError(n, "consumes the token axis (reduction or selection over merged tokens)")
        return out

    def _shape_now(self, a):
        v = self.env.get(a)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    def _read_tables(self, n: fx.Node) -> None:
        """Read position tables that meet merged tokens at the merged positions (position_tables.py)."""
        shapes = {a: (_old_shape(a), self._shape_now(a)) for a in n.all_input_nodes}
        reads = table_reads(n, shapes, self.data, self.tokens, self.prefix)
        for rd in reads:
            with self.graph.inserting_before(n):
                g = self.graph.call_function(gather_positions, (rd.table, self.source_of[n], rd.dims, rd.offset,
                                                                rd.n, rd.ndim))
            mark_inserted(g)
            self.env[g] = self._execute(g)  # inserted behind the walk: run it here
            self.allowed.add(g)
            if isinstance(rd.slot, int):
                n.args = n.args[:rd.slot] + (g,) + n.args[rd.slot + 1:]
            else:
                n.kwargs = {**n.kwargs, rd.slot: g}
            self.fixed += 1

    def _prefix_select(self, n: fx.Node) -> bool:
        """Whether ``n`` selects only protected tokens on the merged axis (``q[:, :, :prefix]``): those
        never merge and stay first, so the selection means the same before and after merging."""
        if not (n.op == "call_function" and n.target is operator.getitem):
            return False
        src, idx = n.args[0], n.args[1]
        old, new = _old_shape(src), self._shape_now(src)
        if old is None or new is None or len(old) != len(new):
            return False
        diff = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(diff) != 1 or diff[0] >= len(idx) or not all(isinstance(i, slice) for i in idx[:diff[0]]):
            return False
        sel = idx[diff[0]]
        if isinstance(sel, int):
            return 0 <= sel < self.prefix
        return (isinstance(sel, slice) and sel.step in (None, 1) and (sel.start or 0) >= 0
                and isinstance(sel.stop, int) and 0 <= sel.stop <= self.prefix)

    def _input_changed(self, n: fx.Node) -> bool:
        for a in n.all_input_nodes:
            old, new = _old_shape(a), self._shape_now(a)
            if old is not None and new is not None and new != old:
                return True
        return False

    def _fix(self, n: fx.Node) -> None:
        src = n.args[0]
        old = _old_shape(src)
        new = self.env.get(src)
        if old is None or not isinstance(new, torch.Tensor) or tuple(new.shape) == old:
            return
        new_shape = tuple(new.shape)
        if len(new_shape) != len(old):
            raise RewriteError(n, "rank of the input changed")
        diff = [i for i, (a, b) in enumerate(zip(old, new_shape)) if a != b]
        if len(diff) != 1:
            raise RewriteError(n, f"more than one dimension changed ({old} -> {new_shape})")
        d = diff[0]
        n_old, n_new = old[d], new_shape[d]
        lits, set_lits = _shape_args(n)
        if n.target in ("reshape", "view", torch.reshape):
            j = _reshape_dim(old, _old_shape(n), d)
            if j is None:
                raise RewriteError(n, f"the token axis {d} of {old} is split by the reshape to {lits}")
        elif n.target == "expand":
            j = d + len(lits) - len(old)
        else:
            raise RewriteError(n, f"{n.target} builds a tensor from the token count")
        if lits[j] == -1:
            return
        if not isinstance(lits[j], int) or lits[j] % n_old:
            raise RewriteError(n, f"shape entry {lits[j]!r} does not hold the token count {n_old}")
        lits[j] = lits[j] // n_old * n_new
        set_lits(lits)
        self.fixed += 1


def _reshape_dim(old_in: tuple, old_out: tuple | None, d: int):
    """Index of the output dim of a row-major reshape that contains input dim ``d`` whole."""
    if old_out is None:
        return None
    import math
    lo, hi = math.prod(old_in[:d]), math.prod(old_in[:d + 1])
    for j in range(len(old_out)):
        a, b = math.prod(old_out[:j]), math.prod(old_out[:j + 1])
        if a <= lo and hi <= b and lo % a == 0 and b % hi == 0:
            return j
    return None


def _data_nodes(gm: fx.GraphModule, example_inputs: Sequence) -> set:
    """Nodes computed from the user's tensors (not from module state or sizes alone)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    data = {n for n, v in zip(phs, example_inputs) if isinstance(v, torch.Tensor) and not is_state(n, v)}
    for n in gm.graph.nodes:
        if n not in data and any(a in data for a in n.all_input_nodes):
            data.add(n)
    return data


def fix_token_literals(gm: fx.GraphModule, example_inputs: Sequence, allowed_changes: set,
                       source_of: dict | None = None, tokens: int = 0, prefix: int = 0) -> int:
    """Fix literals in place; raises RewriteError when a change escapes ``allowed_changes``.

    ``source_of``: {node: the source map valid there} for nodes in merged blocks, where position
    tables are read at merged positions; ``tokens``/``prefix``: the original and protected token counts.
    Returns the number of literals and tables changed. Graph outputs must keep their original shapes.
    """
    # symbolic sizes (a dynamic batch) run at their example values; scalar module state read with .item() was
    # folded into constants before (passes/fold_scalars.py)
    shapes = [_meta(t) if isinstance(t, torch.Tensor) else _concrete(t) for t in example_inputs]
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    fixer = _Fixer(gm, set(allowed_changes), source_of or {}, _data_nodes(gm, example_inputs), tokens, prefix, device)
    fixer.run(*shapes)
    gm.recompile()
    return fixer.fixed
