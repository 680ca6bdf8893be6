"""Inference batch norms of an exported graph as per-channel affine ops on constants, before quantization."""
from __future__ import annotations

import torch
from torch import fx

from ...graph.nodes import copy_exported_meta, exported_value, module_paths, set_exported_value


def _batch_norm_affine(gm: fx.GraphModule, bn: fx.Node, i: int) -> None:
    """Replace the inference batch norm ``bn`` by ``x * scale + shift`` on constants ``bn_scale{i}``, ``bn_shift{i}``."""
    w, b, mean, var = (None if a is None else getattr(gm, a.target) for a in bn.args[1:5])
    eps = bn.args[7]
    scale = torch.rsqrt(var + eps) * (w if w is not None else 1)
    shift = (b if b is not None else 0) - mean * scale
    val = exported_value(bn)
    view = (-1,) + (1,) * (val.dim() - 2)  # channels on dim 1
    with gm.graph.inserting_before(bn):
        consts = []
        for name, t in ((f"bn_scale{i}", scale), (f"bn_shift{i}", shift)):
            gm.register_buffer(name, t.reshape(view).detach().clone(), persistent=False)
            consts.append(gm.graph.get_attr(name))
            set_exported_value(consts[-1], val.fake_mode.from_tensor(getattr(gm, name), static_shapes=True))
        mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (bn.args[0], consts[0]))
        add = gm.graph.call_function(torch.ops.aten.add.Tensor, (mul, consts[1]))
    for n in (mul, add):
        copy_exported_meta(n, bn)
    bn.replace_all_uses_with(add)
    gm.graph.erase_node(bn)


def affine_batch_norms(gm: fx.GraphModule) -> int:
    """Rewrite each inference ``aten.batch_norm`` of an exported graph as a per-channel ``x * scale + shift``;
    returns the number rewritten. torchao's ``convert_pt2e`` would otherwise fold any batch norm left by
    ``prepare_pt2e`` by tracing patterns with strict ``torch.export``, which resets dynamo in the middle of
    the compile that called the backend (an AssertionError, then a crash). Raises ValueError for a batch
    norm that normalises by the batch's own statistics: it has no constant scale."""
    bns = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.batch_norm.default]
    for i, bn in enumerate(bns):
        consts = bn.args[1:5]  # weight, bias, running mean, running var
        if exported_value(bn) is None:
            raise ValueError(f"the batch norm {bn.name} has no recorded shape, so its channels cannot be told apart")
        if bn.args[5] or consts[2] is None or not all(a is None or (isinstance(a, fx.Node) and a.op == "get_attr")
                                                      for a in consts):
            where = [s for s in module_paths(bn) if s]
            raise ValueError(f"the batch norm {where[-1] if where else bn.name} normalises by each batch's own "
                             "statistics (training mode or track_running_stats=False): int8 needs constant scales")
        _batch_norm_affine(gm, bn, i)
    if bns:
        gm.graph.lint()
        gm.recompile()
    return len(bns)
