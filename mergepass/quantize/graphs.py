"""Graph preparation for the int8 engines: dynamo's graph with its parameters held as constants."""
from __future__ import annotations

import fnmatch
import re
from typing import Sequence

import torch
from torch import fx

_ROOT = re.compile(r"^[LG]\[[^\]]+\]\.?")


def module_names(node: fx.Node) -> list[str]:
    """Module paths in a node's nn_module_stack, dynamo's root stripped ('blocks.0.mlp.fc2')."""
    out = []
    for v in (node.meta.get("nn_module_stack") or {}).values():
        path = v[0] if isinstance(v, tuple) else str(v)
        path = _ROOT.sub("", path)
        path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
        out.append(re.sub(r"\[(\d+)\]", r".\1", path).strip("."))
    return out


def path_matches(path: str, patterns) -> bool:
    """Glob match on '.' boundaries: the root differs when a wrapper module is compiled."""
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, "*." + p) for p in patterns)


def _is_param(node: fx.Node, value) -> bool:
    if isinstance(value, torch.nn.Parameter):
        return True
    src = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", "")
    src = src() if callable(src) else src
    return "._buffers[" in str(src) or "._parameters[" in str(src)


class Lifted(torch.nn.Module):
    """dynamo's graph with its parameter inputs held as constants: ``forward(*user_inputs)``.

    Runs the graph through an Interpreter with node meta preserved, so the exported graph keeps
    dynamo's ``nn_module_stack`` (names for exclusion) and ``source_fn_stack`` (for the quantizer).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence):
        super().__init__()
        self.gm = gm
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.n = len(phs)
        self.const_idx, self.user_idx = [], []
        for i, (node, v) in enumerate(zip(phs, example_inputs)):
            if isinstance(v, torch.Tensor) and _is_param(node, v):
                self.const_idx.append(i)
                self.register_buffer(f"c{i}", v.detach(), persistent=False)
            else:
                self.user_idx.append(i)

    def forward(self, *user_args):
        args = [None] * self.n
        for i in self.const_idx:
            args[i] = getattr(self, f"c{i}")
        for i, a in zip(self.user_idx, user_args):
            args[i] = a
        with fx.traceback.preserve_node_meta():
            return fx.Interpreter(self.gm).run(*args)


def linear_modules_graph(gm: fx.GraphModule, example_inputs: Sequence) -> tuple[fx.GraphModule, list, dict]:
    """A copy of ``gm`` whose linears on parameter weights are ``nn.Linear`` submodules (sharing
    the weights) and whose other parameter inputs are buffers; takes only the user inputs.

    Returns (module, user input indices, {submodule name: original module path})."""
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict = {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    const = {n: v for n, v in zip(phs, example_inputs) if isinstance(v, torch.Tensor) and _is_param(n, v)}
    user_idx = [i for i, n in enumerate(phs) if n not in const]
    names: dict = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n in const:
            name = f"c{len(env)}"
            root.register_buffer(name, const[n].detach(), persistent=False)
            env[n] = graph.get_attr(name)
        elif n.op == "call_function" and n.target in (torch._C._nn.linear, torch.nn.functional.linear) \
                and len(n.args) >= 2 and n.args[1] in const and not n.kwargs:
            w = const[n.args[1]]
            b = const.get(n.args[2]) if len(n.args) > 2 and n.args[2] is not None else None
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            lin.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
            if b is not None:
                lin.bias = torch.nn.Parameter(b.detach(), requires_grad=False)
            name = f"lin{len(names)}"
            root.add_module(name, lin)
            paths = [p for p in module_names(n) if p]
            names[name] = paths[-1] if paths else n.name
            env[n] = graph.call_module(name, (env[n.args[0]],))
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(root, graph), user_idx, names
