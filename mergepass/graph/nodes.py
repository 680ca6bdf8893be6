"""What the graph passes and the matcher ask of a node: its shape, and which op it calls."""
from __future__ import annotations

import operator
from typing import Optional

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


def shape(node) -> Optional[tuple[int, ...]]:
    """A node's shape, symbolic sizes (a dynamic batch) at their example values."""
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    if isinstance(v, torch.Tensor):
        return tuple(hint_int(d) if isinstance(d, torch.SymInt) else int(d) for d in v.shape)
    return None


def symbolic_dims(node) -> list[int]:
    """Which dimensions of a node's value are symbolic (dynamic shapes)."""
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return [i for i, d in enumerate(v.shape) if not is_concrete_int(d)] if isinstance(v, torch.Tensor) else []


def is_call(node: fx.Node, fns=(), methods=()) -> bool:
    return (node.op == "call_function" and node.target in fns) or (node.op == "call_method" and node.target in methods)


def is_add(node: fx.Node) -> bool:
    return is_call(node, ADD_FN, {"add", "add_", "__add__"}) and len(node.args) >= 2


def is_linear(node: fx.Node) -> bool:
    return is_call(node, LINEAR_FN)
