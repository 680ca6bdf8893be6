"""The torch.compile backend: match → schedule → merge → quantize → lower."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import fx

from . import artifact, cache
from .compat import frame_compiles, recompile_limit
from .decide import Decision
from .errors import MergepassWarning, briefly
from .graph.passes.strip_noops import active_dropouts
from .graph.nodes import symbolic_dims
from .graph.rewrite import RewriteResult
from .lower import compile_graph
from .pipeline import Int8Declined, graph_stages, lower_stage, training
from .graph.lift import Inputs, Lifted, output_dtypes
from .quantize import Quantized, fit_to_graph, read_calibration
from .recipe import Recipe, load
from .schedule import Schedule
from .stages import stage


def _varying_size(gm: fx.GraphModule) -> bool:
    """Whether an input has a symbolic size other than its batch (e.g. a varying image size)."""
    return any(set(symbolic_dims(n)) - {0} for n in gm.graph.nodes if n.op == "placeholder")


def _fused_merges(recipe: Recipe, example_inputs: Sequence) -> tuple[bool, Optional[Decision]]:
    """Whether merges run as the fused CPU kernel (:mod:`mergepass.merge.fused`) in this graph, and the
    measurement behind ``merge_kernel = "auto"``."""
    if recipe.merge_kernel == "reference" or recipe.lower.target == "tensorrt":  # TensorRT has no converter for it
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
            if recipe.merge_kernel == "auto":
                warnings.warn(f"mergepass: fused merge kernel unavailable, {why}; using the reference merge "
                              "ops (same results, slower)", MergepassWarning, stacklevel=3)
        elif recipe.merge_kernel == "auto":
            with stage("merge kernel: measure or read the kept decision"):
                decision = fused.choose()
            return decision.choice == "fused", decision
    if why is not None and recipe.merge_kernel == "fused":
        raise RuntimeError(f"recipe field 'merge_kernel' is 'fused' but the fused merge kernel is unavailable: "
                           f"{why}; use merge_kernel='auto' or 'reference'")
    return why is None, None


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
        self._warned: set[str] = set()

    def _warn_once(self, message: str) -> None:
        """dynamo may hand the same frame to a backend more than once: say each thing once."""
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, MergepassWarning, stacklevel=3)

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

    def _lower_int8(self, graph: fx.GraphModule, example_inputs: Sequence, recipe: Recipe,
                    calibration: Optional[list[tuple]], done: GraphResult) -> tuple[Any, Quantized]:
        """Quantize and compile (or take from the compile cache): the compiled callable of the user's inputs."""
        use_cache = recipe.lower.target == "inductor" and cache.serves(example_inputs, self.cache)
        dims = Lifted(graph, example_inputs).input_dims()

        def key_of(r: Recipe) -> Optional[str]:
            return cache.graph_key(graph, example_inputs, r.to_dict(), calibration) if use_cache else None

        def served(package: Path):
            entry = cache.loaded(package)
            if entry is not None:
                done.package = package
            return None if entry is None else entry.run

        def lower(q: Quantized, said: list[str], key: Optional[str]):
            if key is not None:
                try:
                    with stage("inductor: AOTInductor package"):
                        entry = artifact.load(cache.store(key, lambda path: artifact.write(
                            q.module, q.inputs, path, meta={"quantized": q.describe(), "warnings": said},
                            dynamic_shapes=dims, freezing=q.freezing, autocast=q.autocast,
                            output_dtypes=output_dtypes(graph), inductor_config_overrides=q.inductor_config)),
                            verify=False)
                    done.package = entry.path
                    return entry.run
                except Exception as e:  # noqa: BLE001 - the cache must never cost the user the compile
                    if q.int8_attention:
                        raise
                    self._warn_once(f"mergepass: this int8 graph could not be packaged for the compile cache "
                                    f"({briefly(e)}); it is compiled without the cache")
            with stage(f"{recipe.lower.target}: compile"):
                return compile_graph(q.module, q.inputs, recipe.lower.target, freezing=q.freezing,
                                     trace_context=q.trace_context, autocast=q.autocast,
                                     inductor_config_overrides=q.inductor_config)

        compiled, done.quantized, done.cached = lower_stage(graph, example_inputs, recipe, calibration, key_of=key_of,
                                                            lower=lower, served=served, warn=self._warn_once)
        return compiled, done.quantized

    def _declines(self, gm: fx.GraphModule, example_inputs: Sequence) -> Optional[str]:
        """Why this graph compiles unchanged without a word (None: it goes through the stages)."""
        user = Inputs(gm, example_inputs).user_inputs(example_inputs)
        if any(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 0 for t in user):
            return "an empty batch: compiled unchanged"
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

    def _guard_inputs(self, fn, gm: fx.GraphModule, example_inputs: Sequence):
        """``fn``, refusing non-finite inputs when ``check_inputs`` is set."""
        if not self.check_inputs:
            return fn
        user_idx = Inputs(gm, example_inputs).user_idx

        def checked(*args):
            artifact.check_finite([args[i] for i in user_idx])
            return fn(*args)
        return checked

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence):
        fn = self._compile(gm, example_inputs)
        return self._guard_inputs(fn, gm, example_inputs)

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence):
        recipe = self.recipe
        self._warn_about_frame(gm)
        declined = self._declines(gm, example_inputs)
        if declined:
            self.results.append(GraphResult(RewriteResult(gm, None, None, [declined])))
            return compile_graph(gm, example_inputs, recipe.lower.target)
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
            self.results.append(GraphResult(RewriteResult(gm, None, None, ["symbolic input size: compiled unchanged"])))
            return compile_graph(gm, example_inputs, recipe.lower.target)
        if recipe.lower.target == "tensorrt":
            from .lower import require_tensorrt
            require_tensorrt()  # before reading calibration data and calibrating, which take a while
        fused, merge_decision = _fused_merges(recipe, example_inputs) if recipe.merges else (False, None)
        staged = graph_stages(gm, example_inputs, recipe, calibration=self.calibration if recipe.merges else None,
                              model=self.model_name, warn=self._warn_once, fused=fused)
        if merge_decision is not None and staged.schedule is not None:
            staged.schedule.kernels.insert(0, merge_decision.line())
        done = GraphResult(staged.rewrite, attention_ops=staged.attention_ops,
                           attention_decision=staged.attention_decision,
                           merge_kernel=("fused" if fused else "reference") if recipe.merges else "")
        self.results.append(done)
        recipe, graph = staged.recipe, staged.graph
        if not recipe.quantize.enabled:
            with stage(f"{recipe.lower.target}: compile"):
                return compile_graph(graph, example_inputs, recipe.lower.target)

        try:
            compiled, q = self._lower_int8(graph, example_inputs, recipe, self._calibration_for(gm, example_inputs),
                                           done)
        except Int8Declined as e:
            self._warn_once(f"mergepass: int8 quantization failed for this graph ({e}); it is compiled in floating "
                            "point")
            with stage(f"{recipe.lower.target}: compile"):
                return compile_graph(graph, example_inputs, recipe.lower.target)
        if q.autocast is None:
            def run(*args):
                return compiled(*q.select(args))
            return run
        dtypes = output_dtypes(gm)

        def run_cast(*args):  # reduced-precision outputs back to the dtypes the model returns
            outs = compiled(*q.select(args))
            seq = outs if isinstance(outs, (tuple, list)) else [outs]
            cast = [o.to(d) if isinstance(o, torch.Tensor) and d is not None and o.dtype != d else o
                    for o, d in zip(seq, dtypes)]
            return type(outs)(cast) if isinstance(outs, (tuple, list)) else cast[0]
        return run_cast


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
