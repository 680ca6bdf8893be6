"""Where a staged graph is lowered to: :class:`JitTarget` (a compile in this process, the backend's) or
:class:`PackageTarget` (an AOTInductor package: what ``export`` writes and the compile cache keeps).

A target answers three questions for :func:`mergepass.pipeline.lower_stage`: ``key`` (what a kept result
is filed under; None: nothing is kept), ``load`` (a kept result, or None) and ``build`` (a new result).
Each returns a :class:`Lowered`, whose ``run`` takes dynamo's inputs as the backend is called with them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from torch import fx

from . import artifact, cache
from .graph.lift import Inputs, Lifted, cast_outputs
from .lower import compile_graph
from .quantize import Quantized
from .recipe import Recipe
from .stages import stage


@dataclass
class Work:
    """A graph ready to lower: dynamo's inputs analysed once, and for int8 graphs the engine's module."""

    graph: fx.GraphModule           # merged, taking dynamo's inputs
    example_inputs: Sequence
    inputs: Inputs                  # dynamo's inputs sorted into state, sizes and the user's
    recipe: Recipe
    out_dtypes: list                # the dtype of each output the model returns
    calibration: Optional[list[tuple]] = None
    quantized: Optional[Quantized] = None
    said: list[str] = field(default_factory=list)  # what quantizing warned, kept with a package

    def meta(self) -> dict:
        """What a package's manifest keeps of the build."""
        q = self.quantized
        return {"recipe": self.recipe.name, "warnings": self.said, "quantized": None if q is None else q.describe()}

    def inductor_options(self) -> dict:
        """Inductor settings for this graph only: the engine's (int8) and the recipe's ``[lower]``."""
        return {**(self.quantized.inductor_config if self.quantized is not None else {}),
                **self.recipe.lower.inductor_options()}

    def module(self) -> tuple[Any, tuple, dict]:
        """(module of the user's inputs, its example inputs, compile options) for a package."""
        q = self.quantized
        if q is None:
            lifted = Lifted(self.graph, self.example_inputs, self.inputs).eval()
            return lifted, lifted.user_inputs(self.example_inputs), dict(inductor_config_overrides=self.inductor_options())
        return q.module, q.inputs, dict(freezing=q.freezing, autocast=q.autocast, output_dtypes=self.out_dtypes,
                                        inductor_config_overrides=self.inductor_options())


@dataclass
class Lowered:
    """What lowering gave: a callable of dynamo's inputs (None for a package nobody runs here), the package
    where there is one, and what quantization produced."""

    run: Optional[Callable]
    package: Optional[Path] = None
    quantized: Optional[Quantized] = None
    cached: bool = False            # taken from the compile cache rather than built
    said: list[str] = field(default_factory=list)  # what its build warned (for a kept one: to say again)


def of_user_inputs(fn: Callable, inputs: Inputs) -> Callable:
    """``fn`` of the user's inputs as a callable of dynamo's (module state and sizes dropped)."""
    def run(*args):
        return fn(*inputs.user_inputs(args))
    return run


def cast_after(fn: Callable, dtypes: Sequence) -> Callable:
    """``fn`` with its outputs cast back to ``dtypes`` (:func:`~mergepass.graph.lift.cast_outputs`)."""
    def run(*args):
        return cast_outputs(fn(*args), dtypes)
    return run


class JitTarget:
    """Inductor (or Torch-TensorRT, or eager) in this process. Nothing outlives the process: no key, nothing
    to load. Where int8 declines a graph, its floating-point graph is compiled here."""

    def __init__(self, how: str = "inductor"):
        self.how = how
        self.jit = self

    def key(self, work: Work) -> Optional[str]:
        return None

    def load(self, key: str, work: Work) -> Optional[Lowered]:
        return None

    def build(self, work: Work, key: Optional[str] = None) -> Lowered:
        q = work.quantized
        with stage(f"{self.how}: compile"):
            if q is None:
                return Lowered(compile_graph(work.graph, work.example_inputs, self.how,
                                             inductor_config_overrides=work.inductor_options()))
            compiled = compile_graph(q.module, q.inputs, self.how, freezing=q.freezing, trace_context=q.trace_context,
                                     autocast=q.autocast, inductor_config_overrides=work.inductor_options())
        if q.autocast is not None:  # a package casts inside itself; a JIT graph returns autocast's dtypes
            compiled = cast_after(compiled, work.out_dtypes)
        return Lowered(of_user_inputs(compiled, work.inputs), quantized=q)


class PackageTarget:
    """An AOTInductor package with its manifest (:mod:`mergepass.artifact`): in the compile cache under
    ``key`` when ``cached``, else at ``path``. ``extra``: more the key depends on. ``runs``: load what is
    built or kept (the backend) or only write it (``export``). ``jit``: where a graph goes that cannot be
    packaged, or that int8 declines (None: the error is raised)."""

    def __init__(self, path: Optional[Path] = None, *, cached: bool = True, extra: Optional[dict] = None,
                 runs: bool = False, jit: Optional[JitTarget] = None):
        self.path, self.cached, self.extra, self.runs, self.jit = path, cached, extra, runs, jit

    def key(self, work: Work) -> Optional[str]:
        if not self.cached:
            return None
        return cache.graph_key(work.graph, work.example_inputs, work.recipe.to_dict(), work.calibration,
                               extra=self.extra, inputs=work.inputs)

    def load(self, key: str, work: Work) -> Optional[Lowered]:
        """The verified entry for ``key``, with what its build warned; None when there is none (or it does not
        load here: it is then deleted, and built anew)."""
        path = cache.verified(key)
        if path is None:
            return None
        meta = artifact.read_manifest(path)["meta"]
        lowered = self.serve(path, work)
        if lowered is None:
            return None
        q = meta.get("quantized")
        return replace(lowered, quantized=None if q is None else Quantized.from_cache(q, ()), cached=True,
                       said=meta.get("warnings", []))

    def serve(self, path: Path, work: Work) -> Optional[Lowered]:
        """The package at ``path`` as a :class:`Lowered` (loaded when ``runs``); None when it does not load."""
        if not self.runs:
            return Lowered(None, path)
        entry = cache.loaded(path)
        return None if entry is None else Lowered(of_user_inputs(entry.run, work.inputs), entry.path)

    def build(self, work: Work, key: Optional[str] = None) -> Lowered:
        if key is None and self.path is None:  # nothing to key it by and nowhere else to put it
            return self.jit.build(work)
        module, inputs, options = work.module()
        write = partial(artifact.write, module, inputs, dynamic_shapes=work.inputs.dims, meta=work.meta(), **options)
        with stage("inductor: AOTInductor package"):
            path = cache.store(key, write) if key is not None else write(self.path)
            if not self.runs:
                return Lowered(None, path, work.quantized)
            entry = artifact.load(path, verify=False)
        return Lowered(of_user_inputs(entry.run, work.inputs), entry.path, work.quantized)


Target = Union[JitTarget, PackageTarget]
