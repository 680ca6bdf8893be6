"""What the graph passes and the matcher ask of a node: its fake value and shape, its module path, and
which op it calls. The only reader of the ``node.meta`` keys dynamo and ``torch.export`` write."""
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


_TRACED = "example_value"  # dynamo's fake value of a node
_EXPORTED = "val"  # torch.export's (and aten graphs' after it)
_MODULE_STACK = "nn_module_stack"
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
