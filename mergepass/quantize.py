"""int8 post-training quantization of the merged graph with torchao's pt2e flow, then lowering.

x86 CPU: ``X86InductorQuantizer`` (weights int8 per output channel; activations uint8 with static
per-tensor scales from calibration, or dynamic scales without calibration data) → ``convert_pt2e``
→ inductor with ``freezing=True``, whose x86 passes fuse the q/dq patterns into oneDNN ``qlinear``
kernels. Calibration runs on the *merged* graph, so scales see the token statistics the int8
kernels see. Linears whose activations carry outliers can be kept in fp32, by name or found
automatically from calibration statistics (``quantize.sensitivity``).
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import fx

from .recipe import Recipe

_ROOT = re.compile(r"^[LG]\[[^\]]+\]\.?")


def _torchao_pt2e():
    try:
        # importing the quantizer module registers inductor's int8 fusion patterns
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:  # pragma: no cover - torchao is a dependency
        raise RuntimeError("int8 recipes need torchao (pip install torchao)") from e
    return prepare_pt2e, convert_pt2e, xiq


def module_names(node: fx.Node) -> list[str]:
    """Module paths in a node's nn_module_stack, dynamo's root stripped ('blocks.0.mlp.fc2')."""
    out = []
    for v in (node.meta.get("nn_module_stack") or {}).values():
        path = v[0] if isinstance(v, tuple) else str(v)
        path = _ROOT.sub("", path)
        path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
        out.append(re.sub(r"\[(\d+)\]", r".\1", path).strip("."))
    return out


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


def _linear_nodes(gm: fx.GraphModule):
    lin = {torch.ops.aten.linear.default}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in lin]


def outlier_linears(m: fx.GraphModule, batches: Sequence[tuple], ratio: float) -> list[str]:
    """Linears whose input max |x| exceeds ``ratio`` x its 99.9th percentile on the calibration data."""
    stats: dict[fx.Node, list[float]] = {}
    nodes = set(_linear_nodes(m))

    class Rec(fx.Interpreter):
        def run_node(self, n):
            if n in nodes:
                a = self.env[n.args[0]].detach().abs().flatten().float()
                if a.numel() > 2_000_000:
                    a = a[torch.randperm(a.numel())[:2_000_000]]
                mx, p = a.max().item(), torch.quantile(a, 0.999).item()
                old = stats.get(n, [0.0, 0.0])
                stats[n] = [max(old[0], mx), max(old[1], p)]
            return super().run_node(n)

    with torch.no_grad():
        for b in batches:
            Rec(m).run(*b)
    out = []
    for n, (mx, p) in stats.items():
        if p > 0 and mx / p > ratio:
            names = [s for s in module_names(n) if s]
            out.append(names[-1] if names else n.name)
    return out


def _excluder(patterns: Iterable[str]) -> Callable[[fx.Node], bool]:
    pats = list(patterns)

    def exclude(n: fx.Node) -> bool:
        # suffix match on '.' boundaries: the root differs when a wrapper module is compiled
        return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name, "*." + p)
                   for name in module_names(n) for p in pats)
    return exclude


def make_quantizer(dynamic: bool, exclude: Optional[Callable[[fx.Node], bool]] = None):
    """X86InductorQuantizer with the default config; nodes for which ``exclude`` holds stay fp32."""
    _, _, xiq = _torchao_pt2e()

    class Quantizer(xiq.X86InductorQuantizer):
        def annotate(self, model):
            if exclude is not None:
                for n in model.graph.nodes:
                    if n.op == "call_function" and xiq.QUANT_ANNOTATION_KEY not in n.meta and exclude(n):
                        xiq._annotate_nodes_not_quantize(n)  # the mark set_module_name_qconfig(None) uses
            return super().annotate(model)

    q = Quantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
    return q


def _calibration_batches(calibration, user_ex: tuple, limit: int) -> Optional[list[tuple]]:
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


class QuantizedGraph:
    """What quantization produced: the converted graph and the linears kept in fp32."""

    def __init__(self, module, kept_fp32, mode):
        self.module, self.kept_fp32, self.mode = module, kept_fp32, mode


def quantize_graph(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, calibration=None):
    """(converted aten graph taking the user inputs, user input indices, QuantizedGraph info)."""
    prepare_pt2e, convert_pt2e, _ = _torchao_pt2e()
    q = recipe.quantize
    lifted = Lifted(gm, example_inputs).eval()
    user_ex = tuple(example_inputs[i] for i in lifted.user_idx)
    with torch.no_grad():
        exported = torch.export.export(lifted, user_ex, strict=False).module()
    batches = _calibration_batches(calibration, user_ex, q.calibration_batches) if q.mode == "static" else None
    mode = q.mode
    if mode == "static" and batches is None:
        why = "no calibration data was given" if calibration is None else \
            f"the calibration batches do not fit the graph inputs {[tuple(t.shape) for t in user_ex]}"
        warnings.warn(f"mergepass: static int8 needs calibration data, but {why}; using dynamic "
                      "(per-batch) activation scales instead. Pass calibration=... to mergepass.backend.",
                      UserWarning, stacklevel=3)
        mode = "dynamic"
    kept = list(q.keep_fp32)
    if q.sensitivity > 0:
        kept += outlier_linears(exported, batches or [user_ex], q.sensitivity)
    m = prepare_pt2e(exported, make_quantizer(mode == "dynamic", _excluder(kept) if kept else None))
    with torch.no_grad():
        for b in (batches if mode == "static" else [user_ex]):
            m(*b)
        m = convert_pt2e(m)
    return m, lifted.user_idx, user_ex, QuantizedGraph(m, kept, mode)


def _on_cuda(example_inputs: Sequence) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


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


def torchao_quantize(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe):
    """int8 with torchao ``quantize_`` (dynamic per-token activations, int8 weights): on CUDA it
    lowers to ``torch._int_mm``; on CPU with freezing to oneDNN qlinear."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    module, user_idx, names = linear_modules_graph(gm, example_inputs)
    keep = list(recipe.quantize.keep_fp32)

    def wanted(mod, fqn):
        path = names.get(fqn, fqn)
        return isinstance(mod, torch.nn.Linear) and not any(
            fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, "*." + p) for p in keep)
    quantize_(module, Int8DynamicActivationInt8WeightConfig(), filter_fn=wanted)
    kept = [names[k] for k, mod in module.named_children() if k in names and not wanted(mod, k)]
    return module, user_idx, QuantizedGraph(module, kept, "dynamic-torchao")


def quantize_and_lower(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, calibration=None,
                       info: Optional[list] = None):
    """Quantize the (merged) graph and compile it; returns a callable taking dynamo's inputs."""
    engine = recipe.quantize.engine
    if engine == "auto":
        engine = "torchao" if _on_cuda(example_inputs) else "pt2e"
    if engine == "torchao":
        m, user_idx, qinfo = torchao_quantize(gm, example_inputs, recipe)
        user_ex = [example_inputs[i] for i in user_idx]
    else:
        m, user_idx, user_ex, qinfo = quantize_graph(gm, example_inputs, recipe, calibration)
    if info is not None:
        info.append(qinfo)
    if recipe.lower == "tensorrt":
        from .lower import lower
        compiled = lower(m, list(user_ex), "tensorrt")
    elif recipe.lower == "eager":
        compiled = m
    else:
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        with torch.no_grad(), inductor_config.patch(freezing=True):
            compiled = compile_fx(m, list(user_ex))

    def run(*args):
        return compiled(*[args[i] for i in user_idx])
    return run
