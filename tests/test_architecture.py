"""The package's shape: floors that import only downwards, a merge-method registry open to outside
code, and a public API that stays put."""
import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import torch

import mergepass
from mergepass.methods import base
from conftest import rel_err, tiny_vit
from reference import _assemble, reference_forward

PKG = Path(mergepass.__file__).parent
# lowest first; a module may import from its own floor or below, never above
FLOORS = [{"errors", "cpu", "fidelity", "kernels", "merge", "stages", "compat"}, {"methods"}, {"schedule"}, {"graph"}, {"quantize", "lower", "artifact", "cache"},
          {"recipe"}, {"search"}, {"pipeline", "backend", "export"}, {"eval", "cli", "plan", "demo", "viz", "infer", "__init__"}]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of mergepass that ``path`` imports at run time (``if TYPE_CHECKING:`` blocks excluded)."""
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
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
    g = nx.DiGraph()
    for path in PKG.rglob("*.py"):
        me = _module_name(path)
        for dep in _imports(path):
            g.add_edge(me, dep)
    # `python -m` entry points (__main__) run as scripts and are imported by nothing
    upward = [(a, b) for a, b in g.edges if a != "mergepass" and not a.endswith("__main__") and _floor(b) > _floor(a)]
    assert not upward, f"imports that climb to a higher floor: {upward}"
    cycles = list(nx.simple_cycles(g.subgraph(n for n in g if n != "mergepass")))
    assert not cycles, f"import cycles: {cycles}"


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

    def decide(self, recipe, block, tokens, match, state):
        if block.index != 1:
            return None
        take = min(recipe.r, (tokens - match.prefix) // 2)
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
    be = mergepass.backend({"name": "toy", "method": "toy_pairs", "r": 5, "lower": "eager"})
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False, fullgraph=True)(x)
        ref = reference_forward(m, x, be.schedule, extra={"toy_pairs": _pairs_reference})
        plain = m(x)
    assert [b.kind for b in be.schedule.blocks] == ["dense", "toy_pairs", "dense"]
    assert be.schedule.blocks[1].merged == 5 and "toy_pairs" in be.schedule.table()
    assert rel_err(out, ref) <= 1e-4 and rel_err(out, plain) > 1e-3
    assert be.schedule.recipe.method == "toy_pairs"


def test_unknown_method_names_the_registered_ones():
    try:
        mergepass.load_recipe("tome", method="tomee")
    except ValueError as e:
        assert "'tome'" in str(e) and "did you mean" in str(e)
    else:
        raise AssertionError("an unknown method was accepted")
