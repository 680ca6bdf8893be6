"""What the graph passes and the matcher ask of a node: its fake value and shape, its module path, the
marks the passes hand each other, and which op it calls. The only module that reads or writes ``node.meta``.

mergepass's own keys:

* :data:`INSERTED` (``True``): on every node ``insert_merges`` and ``fix_token_literals`` add. A node
  that fails in ``fix_token_literals`` with this mark is mergepass's own (never the model's), and
  ``replace_attention`` and ``int8_attention`` treat a mask that carries it as proportional attention's float bias.
* :data:`UNMERGED_SHAPE` (a shape tuple): on proportional attention's bias, the shape it would have
  without merging, so that ``fix_token_literals`` recognises position tables added to it
  (:mod:`mergepass.rewrite.position_tables`).
* ``mergepass_state``: on dynamo's placeholders, whether each is module state (:func:`state_mark`).

dynamo's and torch's: ``example_value`` (dynamo's fake value of a node: every shape the matcher and the
passes read; ``expand_mha`` fills it for the nodes it adds), ``val`` (the same after ``torch.export``),
``nn_module_stack`` (module paths: block names, linear names for ``quantize.<engine>.keep_fp32``) and
``source_fn_stack`` (the quantizer's module of a node).

Invariants after :func:`mergepass.rewrite.capture.prepare`: every node that computes a tensor has
``example_value``; no inference dropout remains; multi-head attention modules are written out as SDPA.
After ``insert_merges`` the graph's outputs keep their unmerged shapes (the stream is unmerged where it
leaves the rewritten blocks).
"""
from __future__ import annotations

import operator
import re
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw as hint_int, is_concrete_int

from .. import compat

SDPA = {F.scaled_dot_product_attention, compat.C_SDPA}
SOFTMAX_FN = {F.softmax, torch.softmax, torch.nn.functional.softmax}
MATMUL_FN = {operator.matmul, torch.matmul, torch.bmm}
ADD_FN = {operator.add, torch.add, operator.iadd}
LINEAR_FN = {F.linear, compat.C_LINEAR}
TRANSPOSE_METHODS = {"transpose", "mT", "permute"}


INSERTED = "mergepass"
UNMERGED_SHAPE = "unmerged_shape"
_STATE = "mergepass_state"
_TRACED = "example_value"  # dynamo's fake value of a node
_EXPORTED = "val"  # torch.export's (and aten graphs' after it)
_MODULE_STACK = "nn_module_stack"
_WIDTH = "mergepass_width"
_SOURCE_FN = "source_fn_stack"
_GRAPHARG = "grapharg"  # dynamo's record of a placeholder while it compiles (torch 2.14.1)
_ROOT = re.compile(r"^[LG]\[[^\]]+\]\.?")  # dynamo's root of a module path: L['self'], G['model'], ...


def traced_value(node) -> Any:
    """dynamo's fake value of ``node`` (``meta['example_value']``); None for a non-node or a node without one."""
    return node.meta.get(_TRACED) if isinstance(node, fx.Node) else None


def exported_value(node) -> Any:
    """``torch.export``'s fake value of ``node`` (``meta['val']``); None for a non-node or a node without one."""
    return node.meta.get(_EXPORTED) if isinstance(node, fx.Node) else None


def fake_value(node) -> Any:
    """The fake value of a node of either graph: dynamo's where it has one, else ``torch.export``'s."""
    return node.meta.get(_TRACED, node.meta.get(_EXPORTED)) if isinstance(node, fx.Node) else None


def record_traced_value(node: fx.Node, value) -> None:
    """Give ``node`` dynamo's fake value ``value`` unless it has one (a node a pass added)."""
    node.meta.setdefault(_TRACED, value)


def set_exported_value(node: fx.Node, value) -> None:
    """Give ``node`` (of an exported graph) the fake value ``value``."""
    node.meta[_EXPORTED] = value


def copy_exported_meta(node: fx.Node, src: fx.Node) -> None:
    """What a node that replaces ``src`` in an exported graph takes over: value, module stack, stack trace."""
    node.meta.update({k: v for k, v in src.meta.items() if k in (_EXPORTED, _MODULE_STACK, "stack_trace")})


def copy_module_stack(node: fx.Node, src: fx.Node) -> None:
    """Give ``node`` (which a pass wrote in place of ``src``) ``src``'s module stack: its names for exclusion."""
    node.meta[_MODULE_STACK] = src.meta.get(_MODULE_STACK, {})


def copy_meta(dst, src) -> None:
    """Give ``dst`` (a node or graph module written in place of ``src``) a shallow copy of ``src``'s meta."""
    dst.meta = dict(getattr(src, "meta", {}))


def mark_inserted(node: fx.Node) -> None:
    """Mark ``node`` as mergepass's own (:data:`INSERTED`)."""
    node.meta[INSERTED] = True


def inserted(node) -> bool:
    """Whether ``node`` is a node mergepass added (:data:`INSERTED`)."""
    return isinstance(node, fx.Node) and bool(node.meta.get(INSERTED))


def set_unmerged_shape(node: fx.Node, shape: tuple) -> None:
    node.meta[UNMERGED_SHAPE] = shape


def unmerged_shape(node) -> Optional[tuple]:
    """The shape proportional attention's bias ``node`` would have without merging (None for other nodes)."""
    return node.meta.get(UNMERGED_SHAPE) if isinstance(node, fx.Node) else None


def set_state_mark(node: fx.Node, state: bool) -> None:
    """Record on a placeholder whether it is module state (dynamo's record of it does not outlast its compile)."""
    node.meta[_STATE] = state


def state_mark(node: fx.Node) -> Optional[bool]:
    """What :func:`set_state_mark` recorded on a placeholder, or None."""
    return node.meta.get(_STATE)


def input_source(node: fx.Node):
    """Where dynamo found the value of placeholder ``node`` (its graph argument's source), or None once dynamo's
    compile has ended or for a graph without that record."""
    return getattr(node.meta.get(_GRAPHARG), "source", None)


def has_meta(node: fx.Node, key: str) -> bool:
    """Whether a pass outside mergepass (a quantizer's annotation) left ``key`` on ``node``."""
    return key in node.meta


def source_fn(node: fx.Node):
    """The function or module a node of an exported graph was traced from (``source_fn_stack``), or None."""
    stack = node.meta.get(_SOURCE_FN) or []
    return stack[-1][1] if stack else None


def module_paths(node: fx.Node) -> list[str]:
    """Module paths in a node's ``nn_module_stack``, outermost first, dynamo's root stripped ('blocks.0.mlp.fc2')."""
    out = []
    for v in (node.meta.get(_MODULE_STACK) or {}).values():
        path = v[0] if isinstance(v, tuple) else str(v)
        path = _ROOT.sub("", path)
        path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
        out.append(re.sub(r"\[(\d+)\]", r".\1", path).strip("."))
    return out


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node ('' when dynamo recorded none)."""
    paths = module_paths(node)
    return paths[-1] if paths else ""


def shape(node) -> Optional[tuple[int, ...]]:
    """A node's shape, symbolic sizes (a dynamic batch) at their example values."""
    v = traced_value(node)
    if isinstance(v, torch.Tensor):
        return tuple(hint_int(d) if isinstance(d, torch.SymInt) else int(d) for d in v.shape)
    return None


def set_width(node: fx.Node, width: int) -> None:
    """Record the last dimension of an inserted node's value (it has no traced value: the shape walk would read one)."""
    node.meta[_WIDTH] = width


def width(node) -> Optional[int]:
    """A node's last dimension: the one :func:`set_width` recorded, else its traced shape's; None when unknown."""
    if isinstance(node, fx.Node) and _WIDTH in node.meta:
        return node.meta[_WIDTH]
    s = shape(node)
    return s[-1] if s else None


def symbolic_dims(node) -> list[int]:
    """Which dimensions of a node's value are symbolic (dynamic shapes)."""
    v = traced_value(node)
    return [i for i, d in enumerate(v.shape) if not is_concrete_int(d)] if isinstance(v, torch.Tensor) else []


def is_call(node: fx.Node, fns=(), methods=()) -> bool:
    return (node.op == "call_function" and node.target in fns) or (node.op == "call_method" and node.target in methods)


def is_add(node: fx.Node) -> bool:
    return is_call(node, ADD_FN, {"add", "add_", "__add__"}) and len(node.args) >= 2


def is_linear(node: fx.Node) -> bool:
    return is_call(node, LINEAR_FN)


def output_dtypes(gm: fx.GraphModule) -> list:
    """The dtype of each output of dynamo's graph (None for a non-tensor)."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [getattr(traced_value(o), "dtype", None) for o in outs]
