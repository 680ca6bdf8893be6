"""The package's shape: floors that import only downwards, a merge-method registry open to outside
code, and a public API that stays put."""
import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch

import mergepass
from mergepass.methods import base
from helpers import benchmark, rel_err, tiny_vit
from reference import _assemble, reference_forward

PKG = Path(mergepass.__file__).parent
# lowest first; a module may import from its own floor or below, never above
FLOORS = [{"errors", "cpu", "decide", "fidelity", "kernels", "merge", "stages", "compat", "config"}, {"graph"}, {"methods"}, {"schedule"}, {"rewrite"}, {"quantize", "lower", "artifact", "cache"},
          {"recipe", "tables", "migrate"}, {"search"}, {"pipeline", "targets", "backend", "export"}, {"eval", "cli", "plan", "demo", "viz", "infer", "__init__"}]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, type_checking: bool = False) -> set[str]:
    """Modules of mergepass that ``path`` imports at run time (``if TYPE_CHECKING:`` blocks excluded unless
    ``type_checking``)."""
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = set() if type_checking else {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mergepass")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("mergepass"):
                continue
            for a in node.names:  # `from . import x` imports a submodule
                sub = f"{mod}.{a.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else mod)
    return out - {me}


def _floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, f in enumerate(FLOORS) if top in f)


def test_imports_form_floors_without_cycles():
    """No import climbs, not even one for type checking only (graph analysis never names a rewrite); run-time
    imports form no cycle."""
    g = nx.DiGraph()
    typed = []
    for path in PKG.rglob("*.py"):
        me = _module_name(path)
        for dep in _imports(path):
            g.add_edge(me, dep)
        typed += [(me, dep) for dep in _imports(path, type_checking=True)]
    # `python -m` entry points (__main__) run as scripts and are imported by nothing
    upward = [(a, b) for a, b in typed if a != "mergepass" and not a.endswith("__main__") and _floor(b) > _floor(a)]
    assert not upward, f"imports that climb to a higher floor: {upward}"
    cycles = list(nx.simple_cycles(g.subgraph(n for n in g if n != "mergepass")))
    assert not cycles, f"import cycles: {cycles}"


def test_no_layer_below_the_recipe_imports_it_even_for_type_checking():
    """Methods, schedules, graph passes, quantization and lowering take their own configs, never the recipe."""
    below = [p for p in PKG.rglob("*.py") if _floor(_module_name(p)) < _floor("mergepass.recipe")]
    assert len(below) > 20
    offenders = [_module_name(p) for p in below if "mergepass.recipe" in _imports(p, type_checking=True)]
    assert not offenders, offenders


def test_every_method_and_engine_config_is_one_frozen_dataclass_in_its_file():
    import dataclasses
    from mergepass.methods import MethodConfig, get_method, method_names
    for name in method_names():
        method = get_method(name)
        cfg = method.config
        assert issubclass(cfg, MethodConfig) and dataclasses.is_dataclass(cfg), name
        assert cfg.__dataclass_params__.frozen and cfg.__module__ == type(method).__module__, name
        assert set(method.fields) <= set(cfg.field_names()), name  # what the plan table reports
    from mergepass.quantize import get_engine, engine_names
    from mergepass.quantize.base import EngineConfig
    for name in engine_names():
        engine = get_engine(name)
        cfg = engine.config
        assert issubclass(cfg, EngineConfig) and cfg.__dataclass_params__.frozen, name
        assert cfg.__module__ == type(engine).__module__, name


# documented APIs under private module names, kept at their call sites (mergepass/compat.py says why)
DOCUMENTED = ("torch._inductor.config", "torch._dynamo.mark_dynamic", "torch._dynamo.reset")


def _is_private(dotted: str) -> bool:
    for name in DOCUMENTED:
        if dotted == name or dotted.startswith(name + "."):
            dotted = dotted[len(name):]  # what follows a documented name must be public too
            break
    return (dotted + ".").startswith("torchao.prototype.") or any(
        c.startswith("_") and not (c.startswith("__") and c.endswith("__")) for c in dotted.split("."))


def _private_touches(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) for each torch or torchao name with a private component (or under ``torchao.prototype``)
    that ``tree`` imports, reaches by an attribute chain (import aliases followed) or by getattr/hasattr."""
    alias, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in ("torch", "torchao"):
                    alias[a.asname or top] = a.name if a.asname else top
                    found += [(node.lineno, a.name)] if _is_private(a.name) else []
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] in ("torch", "torchao"):
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
                found += [(node.lineno, f"{node.module}.{a.name}")] if _is_private(f"{node.module}.{a.name}") else []

    def dotted(n):
        parts = []
        while isinstance(n, ast.Attribute):
            parts.append(n.attr)
            n = n.value
        return ".".join([alias[n.id], *reversed(parts)]) if isinstance(n, ast.Name) and n.id in alias else None

    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # report whole chains only
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            name = dotted(node)
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            base = dotted(node.args[0])
            name = base and f"{base}.{node.args[1].value}"
        if name and _is_private(name):
            found.append((node.lineno, name))
    return sorted(found)


def test_private_torch_and_torchao_apis_are_touched_only_in_compat():
    touches = [f"mergepass/{path.relative_to(PKG).as_posix()}:{line}: {name}" for path in sorted(PKG.rglob("*.py"))
               if path.relative_to(PKG).as_posix() not in {"compat.py"}
               for line, name in _private_touches(ast.parse(path.read_text()))]
    assert not touches, "private torch/torchao APIs outside mergepass/compat.py:\n" + "\n".join(touches)


def test_the_private_api_check_follows_aliases_and_spares_documented_names():
    code = ("import torch\n"
            "from torch import _C as C\n"                   # 2
            "from torch._inductor import config as ic\n"
            "from torchao.prototype.x import y\n"           # 4
            "torch._guards.tracing(None)\n"                 # 5
            "C._nn.linear\n"                                # 6
            "getattr(torch.cpu, '_is_amx_tile_supported')\n"  # 7
            "ic._post_fusion_custom_pass\n"                 # 8
            "ic.patch(freezing=True)\ntorch._dynamo.reset()\ntorch.__version__\n")
    assert [line for line, _ in _private_touches(ast.parse(code))] == [2, 4, 5, 6, 7, 8]


def test_plan_stays_the_function_after_every_submodule_is_imported():
    code = ("import importlib, inspect, pkgutil, mergepass\n"
            "for m in pkgutil.walk_packages(mergepass.__path__, 'mergepass.'):\n"
            "    importlib.import_module(m.name)\n"
            "import mergepass.plan, mergepass.cli.plan\n"
            "assert inspect.isfunction(mergepass.plan), mergepass.plan\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def pair_merge(x, metric, size, source, *, r, prefix):
    """A toy merge op: average the first ``r`` pairs of adjacent patch tokens (size-weighted)."""
    b, n, c = x.shape
    size = x.new_ones(b, n, 1) if size is None else size
    source = torch.arange(n).expand(b, n) if source is None else source
    end = prefix + 2 * r
    sp = size[:, prefix:end].reshape(b, r, 2, 1)
    s = sp.sum(2)
    merged = (x[:, prefix:end].reshape(b, r, 2, c) * sp).sum(2) / s
    idx = torch.arange(n)
    new = torch.where(idx < prefix, idx, torch.where(idx < end, prefix + (idx - prefix) // 2, idx - r))
    return (torch.cat([x[:, :prefix], merged, x[:, end:]], 1), torch.cat([size[:, :prefix], s, size[:, end:]], 1),
            new.expand(b, n).gather(1, source))


class Pairs(mergepass.MergeMethod):
    name = "toy_pairs"

    def decide(self, cfg, block, tokens, match, state):
        if block.index != 1:
            return None
        take = min(cfg.r, (tokens - match.prefix) // 2)
        return base.Merge("toy_pairs", take, take)


def _pairs_reference(x, metric, size, groups, prefix, plan):
    n = x.shape[0]
    pairs = [[prefix + 2 * i, prefix + 2 * i + 1] for i in range(plan.r)]
    return _assemble(x, size, groups, prefix, pairs + [[t] for t in range(prefix + 2 * plan.r, n)])


def test_a_merge_method_registered_from_outside_the_package(monkeypatch):
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))
    monkeypatch.setattr(base, "_OPS", dict(base._OPS))
    mergepass.register_op(mergepass.MergeOp("toy_pairs", pair_merge))
    mergepass.register_method(Pairs())
    m = tiny_vit(depth=3, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    be = mergepass.backend({"name": "toy", "merge": {"method": "toy_pairs", "r": 5}, "lower": {"target": "eager"}})
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False, fullgraph=True)(x)
        ref = reference_forward(m, x, be.schedule, extra={"toy_pairs": _pairs_reference})
        plain = m(x)
    assert [b.kind for b in be.schedule.blocks] == ["dense", "toy_pairs", "dense"]
    assert be.schedule.blocks[1].merged == 5 and "toy_pairs" in be.schedule.table()
    assert rel_err(out, ref) <= 1e-4 and rel_err(out, plain) > 1e-3
    assert be.schedule.merge.method == "toy_pairs"


def test_unknown_method_names_the_registered_ones():
    try:
        mergepass.load_recipe("tome", merge={"method": "tomee"})
    except ValueError as e:
        assert "'tome'" in str(e) and "did you mean" in str(e)
    else:
        raise AssertionError("an unknown method was accepted")


def test_backend_and_export_share_one_orchestration():
    """Both run mergepass.pipeline's stages and quantize nowhere else (their outputs agree:
    test_artifacts.py::test_exported_int8_package_computes_what_the_backend_runs)."""
    for name in ("backend.py", "export.py"):
        imported = {(n.module, a.name) for n in ast.walk(ast.parse((PKG / name).read_text()))
                    if isinstance(n, ast.ImportFrom) for a in n.names}
        assert {("pipeline", "graph_stages"), ("pipeline", "lower_stage")} <= imported, name
        assert not {("quantize", "quantize"), ("pipeline", "merge_stage"), ("rewrite.merges", "rewrite")} & imported, name


# the node.meta keys torch and dynamo write: read only through mergepass/graph/nodes.py
TORCH_META_KEYS = {"example_value", "val", "nn_module_stack", "source_fn_stack", "grapharg", "stack_trace"}


def _meta_touches(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each ``.meta`` of a node or graph module (a dict: a method ``x.meta()`` is something
    else), ``getattr(x, "meta")``, and each of :data:`TORCH_META_KEYS` spelled as a string."""
    found = []
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "meta" and id(node) not in called:
            found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "meta"):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Constant) and node.value in TORCH_META_KEYS:
            found.append((node.lineno, repr(node.value)))
    return sorted(found)


def test_node_meta_is_read_and_written_only_in_graph_nodes():
    touches = [f"mergepass/{path.relative_to(PKG).as_posix()}:{line}: {what}" for path in sorted(PKG.rglob("*.py"))
               if path.relative_to(PKG).as_posix() != "graph/nodes.py"
               for line, what in _meta_touches(ast.parse(path.read_text()))]
    assert not touches, "node.meta outside mergepass/graph/nodes.py:\n" + "\n".join(touches)


def test_the_meta_check_sees_each_spelling():
    code = ("n.meta['val']\n"                                  # 1
            "x = n.meta.get(KEY)\n"                            # 2
            "'nn_module_stack'\n"                              # 3
            "getattr(gm, 'meta', {})\n"                        # 4
            "'''a docstring naming nn_module_stack'''\n"
            "meta = {}\nmeta.get('quantized')\nwork.meta()\n")
    assert sorted({line for line, _ in _meta_touches(ast.parse(code))}) == [1, 2, 3, 4]


def test_graph_analysis_sits_below_the_rewrites():
    """graph/ (what is read from a graph) never imports rewrite/ (what changes it), even for type checking; the
    rewrites' passes live in rewrite/passes/ alone."""
    climbing = [(_module_name(p), dep) for p in (PKG / "graph").rglob("*.py")
                for dep in _imports(p, type_checking=True) if dep.startswith("mergepass.rewrite")]
    assert not climbing, climbing
    from mergepass.rewrite import passes
    strays = [p for p in PKG.rglob("*.py") if p.stem in passes.NAMES and p.parent != PKG / "rewrite" / "passes"]
    assert not strays, strays


def test_the_pass_list_names_each_pass_file_once():
    from mergepass.rewrite import passes
    files = sorted(p.stem for p in (PKG / "rewrite" / "passes").glob("*.py") if p.stem != "__init__")
    assert len(set(passes.NAMES)) == len(passes.NAMES) == len(files)
    assert sorted(passes.NAMES) == files


def _pass_calls(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, pass) for each direct call of a pass: one that does not go through ``passes.run``."""
    return sorted((node.lineno, ast.unparse(node.func)) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  and (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) in names)


def test_every_pass_runs_through_the_ordered_list():
    from mergepass.rewrite import passes
    fns = {p.__name__ for p in passes.ORDER}
    calls = [f"mergepass/{path.relative_to(PKG).as_posix()}:{line}: {what}" for path in sorted(PKG.rglob("*.py"))
             if path.parent != PKG / "rewrite" / "passes"
             for line, what in _pass_calls(ast.parse(path.read_text()), fns)]
    assert not calls, "passes called without mergepass.rewrite.passes.run:\n" + "\n".join(calls)
    assert _pass_calls(ast.parse("passes.run(strip_noops, gm)\nint8_attention.decompose_attention(gm)"), fns) == [
        (2, "int8_attention.decompose_attention")]
    with pytest.raises(ValueError, match="not a pass"):
        passes.run(lambda gm: gm, None)


@pytest.mark.parametrize("recipe", ["tome", "tome_int8"])
def test_one_graph_passes_the_backend_without_callbacks(recipe):
    """Following one graph through ``Backend.__call__`` (``benchmarks/walk.py``), no module calls back into one
    still waiting lower on the stack: every return to a module already left ends a call into a helper. As in
    walk.py, the kernel decisions are kept first (timing calls the candidates it is handed)."""
    walk = benchmark("walk")
    from mergepass.rewrite.capture import capture_graphs

    torch.manual_seed(1)
    gm, example_inputs = capture_graphs(tiny_vit(depth=2), torch.randn(2, 3, 64, 64))[0]
    kwargs = {"calibration": [torch.randn(2, 3, 64, 64)]} if "int8" in recipe else {}
    with torch.no_grad():
        mergepass.backend(recipe, cache=False, lower="eager", **kwargs)(gm, example_inputs)
    backend = mergepass.backend(recipe, cache=False, lower="eager", **kwargs)  # the stages, not inductor's compile
    w = walk.Walk()
    sys.setprofile(w.profile)
    try:
        with torch.no_grad():
            backend(gm, example_inputs)
    finally:
        sys.setprofile(None)
    assert backend.schedule is not None and backend.schedule.merging
    assert {"mergepass.rewrite.merges", "mergepass.schedule.build", "mergepass.targets"} <= {m for m, *_ in w.visits}
    assert not w.callbacks, f"modules called back while they waited: {sorted(set(w.callbacks))}"
