"""dynamo's graph as a module of the user's inputs alone: its parameter inputs held as constants."""
from __future__ import annotations

import fnmatch
from typing import Optional, Sequence

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .. import compat
from .nodes import input_source, module_paths, set_state_mark, state_mark, symbolic_dims, traced_value


def path_matches(path: str, patterns) -> bool:
    """Glob match on '.' boundaries: the root differs when a wrapper module is compiled."""
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, "*." + p) for p in patterns)


def is_state(node: fx.Node, value) -> bool:
    """Module state rather than a user input: parameters, buffers, and module attributes dynamo
    lifted as inputs (unspecialised floats such as a dropout p under ``dynamic=True``).

    Where dynamo found the tensor settles it: a compiled ``nn.Sequential`` or a ``forward`` whose first
    argument is not named ``self`` lifts its buffers under other names. dynamo drops that record when its
    compile ends (:func:`keep_state_marks` keeps the answer for a graph used later); the names are the fallback."""
    if isinstance(value, torch.nn.Parameter):
        return True
    if not isinstance(value, torch.Tensor):
        return False
    from_state = compat.module_state_input(input_source(node))
    if from_state is None:
        from_state = state_mark(node)
    return from_state if from_state is not None else str(node.target).startswith(("L_self_", "G_"))


def keep_state_marks(gm: fx.GraphModule, example_inputs: Sequence) -> None:
    """Record on each placeholder whether it is module state, while dynamo's record of where it came from lasts."""
    for n, v in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs):
        set_state_mark(n, is_state(n, v))


def _symbol_source(node: fx.Node, users: list[fx.Node]):
    """(position among ``users``, dim) of a user tensor whose size is the SymInt placeholder ``node``."""
    sym = traced_value(node)
    for pos, u in enumerate(users):
        v = traced_value(u)
        for d, size in enumerate(getattr(v, "shape", ())):
            if not is_concrete_int(size) and isinstance(sym, torch.SymInt) and size.node.expr == sym.node.expr:
                return pos, d
    return None


class Inputs:
    """dynamo's graph inputs sorted into module state (constants), sizes derived from user tensors
    (dynamic shapes), and the user's own inputs."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence):
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.count = len(phs)
        self.const = {i: v for i, (n, v) in enumerate(zip(phs, example_inputs)) if is_state(n, v)}
        sizes = {i for i, v in enumerate(example_inputs) if isinstance(v, torch.SymInt)}
        self.user_idx = [i for i in range(self.count) if i not in self.const and i not in sizes]
        # per user input, its symbolic dims as ``{dim: Dim.AUTO}`` (None where all are static)
        self.dims = [{d: torch.export.Dim.AUTO for d in symbolic_dims(phs[i])} or None for i in self.user_idx]
        users = [phs[i] for i in self.user_idx]
        self.derived = {}
        for i in sizes:
            where = _symbol_source(phs[i], users)
            if where is None:
                raise ValueError(f"graph input {phs[i].name} is a size mergepass cannot derive from a tensor input")
            self.derived[i] = where

    def user_inputs(self, example_inputs: Sequence) -> tuple:
        """The entries of dynamo's ``example_inputs`` that are the user's (not state, not sizes)."""
        return tuple(example_inputs[i] for i in self.user_idx)

    def assemble(self, user_args: Sequence, const_of) -> list:
        """dynamo's full argument list from the user's arguments; ``const_of(i)`` gives constant ``i``."""
        args = [None] * self.count
        for i in self.const:
            args[i] = const_of(i)
        for i, a in zip(self.user_idx, user_args):
            args[i] = a
        for i, (pos, d) in self.derived.items():
            args[i] = user_args[pos].shape[d]
        return args


class Lifted(torch.nn.Module):
    """dynamo's graph with its module state held as constants: ``forward(*user_inputs)``.

    Runs the graph through an Interpreter with node meta preserved, so the exported graph keeps
    dynamo's ``nn_module_stack`` (names for exclusion) and ``source_fn_stack`` (for the quantizer).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence, inputs: Optional[Inputs] = None):
        super().__init__()
        self.gm = gm
        self.inputs = inputs if inputs is not None else Inputs(gm, example_inputs)
        self.user_idx = self.inputs.user_idx
        for i, v in self.inputs.const.items():
            self.register_buffer(f"c{i}", v.detach(), persistent=False)

    def user_inputs(self, example_inputs: Sequence) -> tuple:
        return self.inputs.user_inputs(example_inputs)

    def input_dims(self) -> list[Optional[dict]]:
        """Per user input, its symbolic dims as ``{dim: Dim.AUTO}`` (None where all are static)."""
        return self.inputs.dims

    def dynamic_shapes(self) -> Optional[tuple]:
        """``torch.export`` dynamic_shapes for the user inputs: their symbolic dims, or None if all static."""
        specs = self.input_dims()
        return (tuple(specs),) if any(specs) else None  # forward(*user_args): one tuple argument

    def forward(self, *user_args):
        args = self.inputs.assemble(user_args, lambda i: getattr(self, f"c{i}"))
        with fx.traceback.preserve_node_meta():
            return fx.Interpreter(self.gm).run(*args)


def cast_outputs(outs, dtypes: Sequence):
    """``outs`` (a tensor, tuple or list) with each tensor cast to its entry of ``dtypes`` where that is given
    and differs: a graph run under autocast returns what the model returns."""
    seq = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    dtypes = list(dtypes) + [None] * (len(seq) - len(dtypes))
    seq = [o.to(d) if isinstance(o, torch.Tensor) and d is not None and o.dtype != d else o
           for o, d in zip(seq, dtypes)]
    return type(outs)(seq) if isinstance(outs, (tuple, list)) else seq[0]


def linear_modules_graph(gm: fx.GraphModule, example_inputs: Sequence) -> tuple[fx.GraphModule, list, dict]:
    """A copy of ``gm`` whose linears on parameter weights are ``nn.Linear`` submodules (sharing
    the weights) and whose other parameter inputs are buffers; takes only the user inputs.

    Returns (module, user input indices, {submodule name: original module path})."""
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict = {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = Inputs(gm, example_inputs)
    if inputs.derived:
        raise ValueError("this int8 engine needs static shapes; compile with dynamic=False")
    const = {phs[i]: v for i, v in inputs.const.items()}
    user_idx = inputs.user_idx
    names: dict = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n in const:
            name = f"c{len(env)}"
            root.register_buffer(name, const[n].detach(), persistent=False)
            env[n] = graph.get_attr(name)
        elif n.op == "call_function" and n.target in (compat.C_LINEAR, torch.nn.functional.linear) \
                and len(n.args) >= 2 and n.args[1] in const and not n.kwargs:
            w = const[n.args[1]]
            b = const.get(n.args[2]) if len(n.args) > 2 and n.args[2] is not None else None
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            lin.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
            if b is not None:
                lin.bias = torch.nn.Parameter(b.detach(), requires_grad=False)
            name = f"lin{len(names)}"
            root.add_module(name, lin)
            paths = [p for p in module_paths(n) if p]
            names[name] = paths[-1] if paths else n.name
            env[n] = graph.call_module(name, (env[n.args[0]],))
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(root, graph), user_idx, names
