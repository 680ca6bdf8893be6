"""The torch.compile backend: match → schedule → merge → quantize → lower."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import fx

from . import artifact, cache
from .compat import frame_compiles, recompile_limit
from .decide import Decision
from .errors import Say
from .graph.lift import Inputs
from .graph.nodes import output_dtypes, symbolic_dims
from .pipeline import Staged, graph_stages, lower_stage, training, unchanged
from .quantize import Quantized, fit_to_graph, read_calibration
from .recipe import Recipe, load
from .rewrite.merges import RewriteResult
from .rewrite.passes.strip_noops import active_dropouts
from .schedule import Schedule
from .targets import JitTarget, PackageTarget, Target


def _varying_size(gm: fx.GraphModule) -> bool:
    """Whether an input has a symbolic size other than its batch (e.g. a varying image size)."""
    return any(set(symbolic_dims(n)) - {0} for n in gm.graph.nodes if n.op == "placeholder")


@dataclass
class GraphResult:
    """What the backend did to one graph dynamo handed it."""

    rewrite: RewriteResult
    quantized: Optional[Quantized] = None
    attention_ops: int = 0  # attentions on one of mergepass's attention ops (recipe field lower.attention_kernel)
    attention_decision: Optional[Decision] = None  # what lower.attention_kernel = "auto" measured (int8 graphs)
    merge_kernel: str = ""  # the merges' kernel: "fused" or "reference" ("" without merges)
    package: Optional[Path] = None  # the compile cache's package this graph runs (mergepass.cache)
    cached: bool = False  # ... taken from the cache rather than built by this compile

    @property
    def schedule(self) -> Optional[Schedule]:
        return self.rewrite.schedule

    @property
    def gm(self) -> fx.GraphModule:
        """The graph after merging (before quantization)."""
        return self.rewrite.gm


class Backend:
    """A torch.compile backend applying a recipe. Keeps what it did in ``results`` (one per graph)."""

    def __init__(self, recipe: Any = "tome", *, calibration: Optional[Iterable] = None,
                 lower: Union[str, Mapping, None] = None, model_name: str = "", cache: Optional[bool] = None,
                 check_inputs: bool = False, **overrides: Any):
        if lower is not None:  # the target alone, or the whole [lower] table
            overrides["lower"] = {"target": lower} if isinstance(lower, str) else lower
        self.recipe: Recipe = load(recipe, **overrides)
        self._calibration_source = calibration
        self._calibration: Optional[list[tuple]] = None
        self.model_name = model_name
        self.cache = cache  # None: on unless MERGEPASS_CACHE=0 (see mergepass.cache)
        self.check_inputs = check_inputs
        self.results: list[GraphResult] = []
        self._warn_once = Say()  # dynamo may hand the same frame to a backend more than once: each thing said once

    @property
    def calibration(self) -> Optional[list[tuple]]:
        """The calibration batches, read from the user's iterable once, when first needed."""
        if self._calibration is None and self._calibration_source is not None:
            self._calibration = read_calibration(self._calibration_source, self.recipe.quantize.calibration_batches)
            self._calibration_source = None
        return self._calibration

    @property
    def schedule(self) -> Optional[Schedule]:
        """The schedule of the most recently compiled graph that matched blocks."""
        return next((r.schedule for r in reversed(self.results) if r.schedule is not None), None)

    @property
    def quantized(self) -> list[Quantized]:
        """What quantization produced, per int8 graph."""
        return [r.quantized for r in self.results if r.quantized is not None]

    def _calibration_for(self, gm: fx.GraphModule, example_inputs: Sequence) -> Optional[list[tuple]]:
        """The calibration batches for a graph. The first int8 graph must fit them (a clear error
        otherwise); a later recompile for another input shape falls back to dynamic scales."""
        batches = self.calibration
        if batches is None or not self.quantized:
            return batches
        try:
            fit_to_graph(batches, gm, example_inputs)
        except ValueError as e:
            self._warn_once(f"mergepass: the calibration batches do not fit this recompiled graph ({e}); its "
                            "activations are quantized per batch instead (dynamic scales: slower)")
            return None
        return batches

    def _declines(self, gm: fx.GraphModule, example_inputs: Sequence, inputs: Inputs) -> Optional[str]:
        """Why this graph compiles unchanged (None: it goes through the stages); raises where the recipe cannot
        compile it at all (int8 with gradients)."""
        recipe = self.recipe
        if any(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 0 for t in inputs.user_inputs(example_inputs)):
            return "an empty batch: compiled unchanged"
        if recipe.quantize.enabled and training(example_inputs):
            raise RuntimeError(f"recipe {recipe.name!r} quantizes to int8 and is inference-only: "
                               "call the compiled model under torch.no_grad() (or torch.inference_mode()) "
                               "in eval mode, or use a recipe without quantization for training")
        if _varying_size(gm) and (recipe.merges or recipe.quantize.enabled):
            what = " and ".join(w for w, on in (("merging", recipe.merges), ("int8", recipe.quantize.enabled)) if on)
            self._warn_once(f"mergepass: this graph's input size is symbolic beyond the batch (a varying image "
                            f"size, so a varying token count); {what} need{'s' if ' and ' not in what else ''} a "
                            "fixed size, so it compiles without them. A dynamic batch alone is fine; otherwise "
                            "pass dynamic=False.")
            return "symbolic input size: compiled unchanged"
        return None

    def _warn_about_frame(self, gm: fx.GraphModule) -> None:
        n, limit = frame_compiles(), recompile_limit()
        if n is not None and n >= limit:
            self._warn_once(f"mergepass: this is compile {n} of this frame, dynamo's limit (torch._dynamo.config."
                            f"recompile_limit = {limit}); past it dynamo runs the frame eagerly, without merging or "
                            "int8. Compile with dynamic=True, or torch._dynamo.mark_dynamic(x, 0), so that one graph "
                            "serves every batch size")
        if self.recipe.quantize.enabled and active_dropouts(gm):
            self._warn_once("mergepass: the model is in training mode (its dropout is active), so int8 calibration "
                            "and every output run through random dropout; call model.eval() before compiling")

    def _guard_inputs(self, fn, inputs: Inputs):
        """``fn``, refusing non-finite inputs when ``check_inputs`` is set."""
        if not self.check_inputs:
            return fn
        user_idx = inputs.user_idx

        def checked(*args):
            artifact.check_finite([args[i] for i in user_idx])
            return fn(*args)
        return checked

    def _stage(self, gm: fx.GraphModule, example_inputs: Sequence, inputs: Inputs) -> Staged:
        """The graph stages, or dynamo's graph as it came where the backend declines it."""
        self._warn_about_frame(gm)
        declined = self._declines(gm, example_inputs, inputs)
        if declined:
            return unchanged(gm, self.recipe, declined)
        if self.recipe.lower.target == "tensorrt":
            from .lower import require_tensorrt
            require_tensorrt()  # before reading calibration data and calibrating, which take a while
        return graph_stages(gm, example_inputs, self.recipe, model=self.model_name, warn=self._warn_once,
                            calibration=self.calibration if self.recipe.merges else None)

    def _target(self, staged: Staged, example_inputs: Sequence) -> Target:
        """In-process JIT, or for an int8 graph on inductor the compile cache's packages (inductor's own
        caches skip int8 graphs)."""
        jit = JitTarget(staged.recipe.lower.target)
        if staged.int8 and staged.recipe.lower.target == "inductor" and cache.serves(example_inputs, self.cache):
            return PackageTarget(runs=True, jit=jit)
        return jit

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence):
        inputs = Inputs(gm, example_inputs)
        staged = self._stage(gm, example_inputs, inputs)
        done = GraphResult(staged.rewrite, attention_ops=staged.attention_ops,
                           attention_decision=staged.attention_decision, merge_kernel=staged.merge_kernel)
        self.results.append(done)
        calibration = self._calibration_for(gm, example_inputs) if staged.int8 else None
        lowered = lower_stage(self._target(staged, example_inputs), staged, example_inputs, calibration,
                              inputs=inputs, out_dtypes=output_dtypes(gm), warn=self._warn_once)
        done.quantized, done.package, done.cached = lowered.quantized, lowered.package, lowered.cached
        return self._guard_inputs(lowered.run, inputs)


def backend(recipe: Any = "tome", **kwargs: Any) -> Backend:
    """``torch.compile(model, backend=mergepass.backend(recipe="tome", r=8))``.

    ``recipe``: a recipe name, a path to a TOML file, a dict, or a :class:`Recipe`; keyword
    overrides replace fields of the recipe's tables (``merge={"r": 8, "skip": 2}``, ``quantize={"mode": "dynamic"}``).
    ``calibration``: an iterable of input batches for int8 recipes, read once. ``lower``: the recipe's
    ``lower.target`` (inductor | tensorrt | eager), or its whole ``[lower]`` table.
    ``cache``: keep compiled int8 graphs for later processes (:mod:`mergepass.cache`; default on unless
    ``MERGEPASS_CACHE=0``). ``check_inputs``: raise on NaN or inf in an input (static int8 would give finite,
    meaningless outputs for it; the check costs one pass over the input).
    """
    return Backend(recipe, **kwargs)
