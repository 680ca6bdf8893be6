"""The one orchestration every entry point runs: capture → match → schedule → merge → attention ops →
quantize → lower. ``backend``, ``export``, ``plan`` and ``search`` call these stages; none repeats them.

* :func:`merge_stage`: prepare → match → resolve ``auto`` → rewrite (the merges).
* :func:`graph_stages`: the merge stage, then mergepass's attention ops.
* :func:`lower_stage`: quantize (int8 recipes) and lower, or take the result from the compile cache.
* :class:`Planner` / :func:`plan`: the schedule the backend would use, without compiling.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from . import artifact, cache
from .decide import Decision
from .errors import MergepassWarning, briefly, replay
from .graph.capture import capture_graphs, copy_graph_module, prepare
from .graph.match import find_blocks, summarize
from .graph.rewrite import RewriteResult, rewrite
from .quantize import Quantized, fit_to_graph, quantize, read_calibration
from .recipe import Recipe, load
from .schedule import Schedule
from .search.auto import choose
from .search.score import graph_fidelity
from .stages import stage


def merge_stage(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, *,
                calibration: Optional[list[tuple]] = None, model: str = "", warn: Any = True,
                fused: bool = False) -> RewriteResult:
    """Insert the recipe's merges into a copy of dynamo's graph. Recipe method ``auto`` is resolved
    first (:mod:`mergepass.search.auto`), scored on ``calibration`` (from :func:`read_calibration`)."""
    base = prepare(gm, example_inputs)
    if recipe.method != "auto":
        return rewrite(base, example_inputs, recipe, model=model, warn=warn, fused=fused)
    match = find_blocks(copy_graph_module(base))
    if not match.ok:
        return rewrite(base, example_inputs, recipe, model=model, warn=warn, fused=fused)
    scorer = None
    if calibration is not None:
        batches = fit_to_graph(calibration, base, example_inputs)
        scorer = graph_fidelity(base, example_inputs, batches) if batches else None
    choice = choose(match, recipe, scorer)
    choice.schedule.model = model
    return rewrite(base, example_inputs, choice.recipe, schedule=choice.schedule, notes=[choice.note],
                   model=model, warn=warn, fused=fused)


def training(example_inputs: Sequence) -> bool:
    """Whether the graph is compiled for gradients (int8 and the fused kernels are inference-only)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def attention_stage(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe
                    ) -> tuple[fx.GraphModule, int, Optional[Decision]]:
    """(graph, attentions now on one of mergepass's attention ops, the measured decision behind ``auto`` or
    None) for recipe field ``lower.attention_kernel``. ``gm`` itself is never modified."""
    from .graph.passes.replace_attention import replace_attention, shapes, wanted
    on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
    choice = recipe.lower.attention_kernel
    own = _pt2e_config(recipe, example_inputs)
    int8_attention = own is not None and own.attention == "int8"
    kind, why = wanted(choice, recipe.quantize.enabled, int8_attention, training(example_inputs), on_cpu)
    if choice not in ("auto", "sdpa") and kind is None:
        raise RuntimeError(f"recipe field 'lower.attention_kernel' is {choice!r} but mergepass's {choice} attention "
                           f"cannot run here: {why}; use lower.attention_kernel='auto' or 'sdpa'")
    decision = None
    if kind == "measure":
        found = shapes(gm)
        if found is None:
            return gm, 0, None
        from .kernels.attention import choose
        from .quantize.pt2e import rest_dtype
        with stage("attention kernel: measure or read the kept decision"):
            decision = choose(*found, dtype=(own is not None and rest_dtype(own.rest)) or torch.float32,
                              tolerance=recipe.lower.attention_tolerance)
        kind = None if decision.choice == "sdpa" else decision.choice
    if kind is None:
        return gm, 0, decision
    work = copy_graph_module(gm)
    return work, replace_attention(work, kind), decision


def _pt2e_config(recipe: Recipe, example_inputs: Sequence):
    """The pt2e engine's config where it quantizes this graph (its ``rest`` and ``attention`` shape the attention
    ops), else None."""
    if not recipe.quantize.enabled:
        return None
    from .quantize.pt2e import PT2EConfig
    own = recipe.quantize.engine_config(recipe.lower.target, example_inputs)
    return own if isinstance(own, PT2EConfig) else None


@dataclass
class Staged:
    """A graph after match → schedule → merge → attention ops: what quantization and lowering take."""

    rewrite: RewriteResult
    recipe: Recipe                 # as the schedule resolved it
    graph: fx.GraphModule          # merged, with mergepass's attention ops where chosen
    attention_ops: int = 0
    attention_decision: Optional[Decision] = None  # what lower.attention_kernel = "auto" measured

    @property
    def schedule(self) -> Optional[Schedule]:
        return self.rewrite.schedule


def graph_stages(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, *,
                 calibration: Optional[list[tuple]] = None, model: str = "", warn: Any = True, fused: bool = False,
                 attention: bool = True) -> Staged:
    """The merge stage, then mergepass's attention ops (``attention=False`` keeps torch's SDPA, as a package
    that must load without mergepass needs). ``gm`` itself is never modified."""
    if recipe.merges:
        with stage("match, schedule and merge"):
            result = merge_stage(gm, example_inputs, recipe, calibration=calibration, model=model, warn=warn,
                                 fused=fused)
    else:
        result = RewriteResult(gm, None, None)
    if result.schedule is not None:
        recipe = result.schedule.recipe
    graph, ops, decision = result.gm, 0, None
    if attention:
        with stage("attention ops"):
            graph, ops, decision = attention_stage(result.gm, example_inputs, recipe)
        if result.schedule is not None:
            from .quantize.pt2e import rest_decision
            own = _pt2e_config(recipe, example_inputs)
            rest = rest_decision(own.rest) if own is not None else None
            result.schedule.kernels += [d.line() for d in (decision, rest) if d is not None]
    return Staged(result, recipe, graph, ops, decision)


class Int8Declined(RuntimeError):
    """The engine failed to quantize a graph (never the user's calibration data: that is said as it is)."""


def _quantize(graph, example_inputs, recipe, calibration, warn) -> tuple[Quantized, list[str]]:
    """The engine's result and what it warned (said through ``warn`` and returned, to keep with a cache entry)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MergepassWarning)
        try:
            q = quantize(graph, example_inputs, recipe.quantize, recipe.lower.target, calibration)
        except Exception as e:  # noqa: BLE001 - an op or pattern the engine cannot quantize
            if isinstance(e, (ValueError, RuntimeError)) and "calibration" in str(e):
                raise
            raise Int8Declined(briefly(e)) from e
    return q, replay(caught, warn)


def lower_stage(graph: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, calibration: Optional[list[tuple]],
                *, key_of: Callable[[Recipe], Optional[str]],
                lower: Callable[[Optional[Quantized], list, Optional[str]], Any], served: Callable[[Path], Any],
                warn: Callable[[str], None]) -> tuple[Any, Optional[Quantized], bool]:
    """Quantize ``graph`` (int8 recipes) and lower it, or take the result from the compile cache:
    (result, Quantized or None, cached).

    ``key_of(recipe)``: the cache key (None: no cache). ``served(package)``: the result for a verified entry
    (None: unusable, build anew). ``lower(q, said, key)``: the result of a build (``said``: what quantizing
    warned; ``q`` None without int8). A fused int8 attention that fails to lower is built once more with float
    attention, with a warning.
    """
    key = key_of(recipe)
    if key is not None:
        with stage("compile cache: key and lookup"):
            hit = cache.verified(key)
            meta = artifact.read_manifest(hit)["meta"] if hit is not None else None
            result = served(hit) if hit is not None else None
        if result is not None:
            for message in meta.get("warnings", []):  # what the build said, said again
                warn(message)
            quantized = meta.get("quantized")
            return result, None if quantized is None else Quantized.from_cache(quantized, ()), True
    if not recipe.quantize.enabled:
        return lower(None, [], key), None, False
    q, said = _quantize(graph, example_inputs, recipe, calibration, warn)
    try:
        return lower(q, said, key), q, False
    except Exception as e:  # noqa: BLE001 - a prototype fusion must not cost the user the compile
        if not q.int8_attention:
            raise
        said.append(f"mergepass: int8 attention did not compile ({type(e).__name__}: {e}); compiling "
                    "with floating-point attention instead")
        warn(said[-1])
    recipe = recipe.replace(quantize={"pt2e": {"attention": "float"}})  # only pt2e runs int8 attention
    q, more = _quantize(graph, example_inputs, recipe, calibration, warn)
    return lower(q, said + more, key_of(recipe)), q, False


class Planner:
    """Schedules for one model at one input shape: the model is captured once, then planned under any
    number of recipes (what :func:`plan` does for one)."""

    def __init__(self, model: torch.nn.Module, example_input: torch.Tensor, model_name: str = ""):
        self.graphs = capture_graphs(model, example_input)
        self.model_type = type(model).__name__
        self.model_name = model_name or self.model_type

    def plan(self, recipe: Any = "tome", calibration=None, **overrides: Any) -> Schedule:
        """The schedule the backend would use with ``recipe``. Raises ValueError when no transformer block
        is found (the backend would compile the model unchanged)."""
        r = load(recipe, **overrides)
        batches = read_calibration(calibration, r.quantize.calibration_batches)
        best, problems = None, []
        for gm, ex in self.graphs:
            res = merge_stage(gm, ex, r, calibration=batches, model=self.model_name, warn=False)
            if res.schedule is not None and (best is None or len(res.schedule.blocks) > len(best.blocks)):
                best = res.schedule
            if res.match is not None:
                problems += [p for p in res.match.problems if p not in problems]
        if best is None:
            why = f" ({summarize(problems)})" if problems else ""
            raise ValueError(f"no transformer blocks matched in {self.model_type}{why}; the backend would compile "
                             "it unchanged")
        return best


def plan(model: torch.nn.Module, example_input: torch.Tensor, recipe: Any = "tome",
         model_name: str = "", calibration=None, **overrides: Any) -> Schedule:
    """Match the model's blocks and compute the static schedule for this input shape.

    Raises ValueError when no transformer block is found (the backend would compile it unchanged).
    """
    r = load(recipe, **overrides)  # a bad recipe is said before the model is captured
    return Planner(model, example_input, model_name).plan(r, calibration)
