"""The one orchestration every entry point runs: capture → match → schedule → merge → attention ops →
quantize → lower. ``backend``, ``export``, ``plan`` and ``search`` call these stages; none repeats them.

* :func:`merge_stage`: prepare → match → resolve ``auto`` → rewrite (the merges).
* :func:`graph_stages`: the merge stage, then mergepass's attention ops.
* :func:`lower_stage`: quantize (int8 recipes) and lower to a target (:mod:`mergepass.targets`), or take the
  result the target kept.
* :class:`Planner` / :func:`plan`: the schedule the backend would use, without compiling.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from .decide import Decision
from .errors import MergepassWarning, briefly, replay
from .graph.lift import Inputs
from .graph.match import find_blocks, summarize
from .methods import get_method, get_op, method_names
from .quantize import Quantized, fit_to_graph, quantize, read_calibration
from .recipe import Recipe, load
from .rewrite import passes
from .rewrite.capture import capture_graphs, copy_graph_module, prepare
from .rewrite.merges import RewriteResult, prune_rows, rewrite
from .schedule import Schedule
from .search.auto import choose
from .search.score import graph_fidelity
from .stages import stage
from .targets import Lowered, Target, Work


def merge_stage(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, *,
                calibration: Optional[list[tuple]] = None, model: str = "", warn: Any = True,
                fused: bool = False) -> RewriteResult:
    """Insert the recipe's merges into a copy of dynamo's graph. Recipe method ``auto`` is resolved
    first (:mod:`mergepass.search.auto`), scored on ``calibration`` (from :func:`read_calibration`). With
    ``lower.prune_rows``, the last block computes only the rows the outputs read (merges or none)."""
    base = prepare(gm, example_inputs)
    prune = recipe.lower.prune_rows
    if not recipe.merges:  # only rows to prune
        return prune_rows(base, example_inputs) if prune else RewriteResult(base, None, None)
    if recipe.merge.method != "auto":
        return rewrite(base, example_inputs, recipe, model=model, warn=warn, fused=fused, prune=prune)
    match = find_blocks(copy_graph_module(base))
    if not match.ok:
        return rewrite(base, example_inputs, recipe, model=model, warn=warn, fused=fused, prune=prune)
    scorer = None
    if calibration is not None:
        batches = fit_to_graph(calibration, base, example_inputs)
        scorer = graph_fidelity(base, example_inputs, batches) if batches else None
    choice = choose(match, recipe, scorer)
    choice.schedule.model = model
    return rewrite(base, example_inputs, choice.recipe, schedule=choice.schedule, notes=[choice.note],
                   model=model, warn=warn, fused=fused, prune=prune)


def training(example_inputs: Sequence) -> bool:
    """Whether the graph is compiled for gradients (int8 and the fused kernels are inference-only)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def attention_stage(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, own=None
                    ) -> tuple[fx.GraphModule, int, Optional[Decision]]:
    """(graph, attentions now on one of mergepass's attention ops, the measured decision behind ``auto`` or
    None) for recipe field ``lower.attention_kernel``; ``own``: the pt2e engine's config where it quantizes the
    graph (:func:`_pt2e_config`). ``gm`` itself is never modified."""
    from .rewrite.passes.replace_attention import replace_attention, shapes, wanted
    on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
    choice = recipe.lower.attention_kernel
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
    return work, passes.run(replace_attention, work, kind), decision


def _kernel_op(method: str):
    """The merge op whose kernels ``merge.kernel = "auto"`` times for ``method`` (ToMe's for recipe ``auto``, whose
    method is chosen later)."""
    return get_op(get_method(method).kernel_op if method in method_names() else "global")


def merge_kernel_stage(recipe: Recipe, example_inputs: Sequence) -> tuple[bool, Optional[Decision]]:
    """Whether merges run as the fused CPU kernel (:mod:`mergepass.merge.fused`) in this graph, and the
    measurement behind ``merge.kernel = "auto"``."""
    if recipe.merge.kernel == "reference" or recipe.lower.target == "tensorrt":  # TensorRT has no converter for it
        return False, None
    why = None
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in example_inputs):
        why = "the inputs are not on the CPU"
    elif training(example_inputs):
        why = "the graph needs gradients and the kernel has no backward"
    else:
        from .merge import fused
        with stage("fused merge kernel: build or load"):
            err = fused.kernel_error()
        if err is not None:
            why = f"its build failed ({err})"
            if recipe.merge.kernel == "auto":
                warnings.warn(f"mergepass: fused merge kernel unavailable, {why}; using the reference merge "
                              "ops (same results, slower)", MergepassWarning, stacklevel=3)
        elif recipe.merge.kernel == "auto":
            with stage("merge kernel: measure or read the kept decision"):
                decision = fused.choose(op=_kernel_op(recipe.merge.method))
            return decision.choice == "fused", decision
    if why is not None and recipe.merge.kernel == "fused":
        raise RuntimeError(f"recipe field 'merge.kernel' is 'fused' but the fused merge kernel is unavailable: "
                           f"{why}; use merge.kernel='auto' or 'reference'")
    return why is None, None


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
    merge_kernel: str = ""         # the merges' kernel: "fused" or "reference" ("" without merges)
    unchanged: bool = False        # dynamo's graph as it came, lowered without int8

    @property
    def schedule(self) -> Optional[Schedule]:
        return self.rewrite.schedule

    @property
    def int8(self) -> bool:
        """Whether lowering quantizes the graph first."""
        return self.recipe.quantize.enabled and not self.unchanged


def unchanged(gm: fx.GraphModule, recipe: Recipe, why: str) -> Staged:
    """dynamo's graph, staged to be compiled as it is (no merges, no int8), ``why`` noted."""
    return Staged(RewriteResult(gm, None, None, [why]), recipe, gm, unchanged=True)


def graph_stages(gm: fx.GraphModule, example_inputs: Sequence, recipe: Recipe, *,
                 calibration: Optional[list[tuple]] = None, model: str = "", warn: Any = True,
                 kernels: bool = True) -> Staged:
    """The merge stage, then mergepass's attention ops. ``kernels=False`` keeps torch's SDPA and the reference
    merge ops, as a package that must load without mergepass needs. ``gm`` itself is never modified."""
    fused, merge_decision = merge_kernel_stage(recipe, example_inputs) if kernels and recipe.merges else (False, None)
    merge_kernel = ("fused" if fused else "reference") if recipe.merges else ""
    if recipe.merges or (recipe.lower.prune_rows and not training(example_inputs)):
        with stage("match, schedule and merge"):
            result = merge_stage(gm, example_inputs, recipe, calibration=calibration, model=model, warn=warn,
                                 fused=fused)
    else:
        result = RewriteResult(gm, None, None)
    if result.schedule is not None:
        recipe = recipe.with_merge(result.schedule.merge)
    screens = []
    if result.schedule is not None and result.schedule.merging:  # changes only fused merge calls
        from .merge.fused import choose_screen
        with stage("merge similarity: measure or read the kept decisions"):
            screens = passes.run(passes.screen_merges, result.gm, choose_screen)
    graph, ops, decision = result.gm, 0, None
    if kernels:
        own = _pt2e_config(recipe, example_inputs)
        with stage("attention ops"):
            graph, ops, decision = attention_stage(result.gm, example_inputs, recipe, own)
        if result.schedule is not None:
            from .quantize.pt2e import rest_decision
            rest = rest_decision(own.rest) if own is not None else None
            result.schedule.kernels += [d.line() for d in (decision, rest) if d is not None]
    if result.schedule is not None:
        result.schedule.kernels[:0] = [d.line() for d in ([merge_decision] if merge_decision else []) + screens]
    return Staged(result, recipe, graph, ops, decision, merge_kernel)


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


def lower_stage(target: Target, staged: Staged, example_inputs: Sequence, calibration: Optional[list[tuple]], *,
                inputs: Inputs, out_dtypes: list, warn: Callable[[str], None]) -> Lowered:
    """Quantize the staged graph (int8 recipes) and lower it to ``target``
    (:mod:`mergepass.targets`), or take the result the target kept under its key. ``inputs``: dynamo's
    inputs, sorted once; ``out_dtypes``: what the model returns. Where int8 declines the graph, it is
    lowered in floating point to ``target.jit``, with a warning (no ``jit``: :class:`Int8Declined`); a fused
    int8 attention that fails to lower is built once more with float attention, with a warning."""
    work = Work(staged.graph, example_inputs, inputs, staged.recipe, out_dtypes, calibration)
    key = target.key(work)
    if key is not None:
        with stage("compile cache: key and lookup"):
            kept = target.load(key, work)
        if kept is not None:
            for message in kept.said:
                warn(message)  # what the build said, said again
            return kept
    if not staged.int8:
        return target.build(work, key)
    try:
        return _lower_int8(target, work, key, warn)
    except Int8Declined as e:
        if target.jit is None:
            raise
        warn(f"mergepass: int8 quantization failed for this graph ({e}); it is compiled in floating point")
        return target.jit.build(work)


def _lower_int8(target: Target, work: Work, key: Optional[str], warn: Callable[[str], None]) -> Lowered:
    q, said = _quantize(work.graph, work.example_inputs, work.recipe, work.calibration, warn)
    try:
        return _build(target, replace(work, quantized=q, said=said), key, warn)
    except Exception as e:  # noqa: BLE001 - a prototype fusion must not cost the user the compile
        if not q.int8_attention:
            raise
        said.append(f"mergepass: int8 attention did not compile ({type(e).__name__}: {e}); compiling "
                    "with floating-point attention instead")
        warn(said[-1])
    work = replace(work, recipe=work.recipe.replace(quantize={"pt2e": {"attention": "float"}}))
    q, more = _quantize(work.graph, work.example_inputs, work.recipe, work.calibration, warn)
    return _build(target, replace(work, quantized=q, said=said + more), target.key(work), warn)


def _build(target: Target, work: Work, key: Optional[str], warn: Callable[[str], None]) -> Lowered:
    """``target.build``; a graph that cannot be packaged goes to ``target.jit`` with a warning (a fused int8
    attention raises: it is retried with float attention first)."""
    try:
        return target.build(work, key)
    except Exception as e:  # noqa: BLE001 - the cache must never cost the user the compile
        if target.jit in (None, target) or work.quantized.int8_attention:
            raise
        warn(f"mergepass: this int8 graph could not be packaged for the compile cache ({briefly(e)}); it is "
             "compiled without the cache")
    return target.jit.build(work)


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
