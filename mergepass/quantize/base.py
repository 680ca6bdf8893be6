"""The quantization-engine registry and what every engine returns."""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Sequence

import torch
from torch import fx

from ..config import Config, did_you_mean, finite_number

if TYPE_CHECKING:
    from .config import Quantize


@dataclass
class Quantized:
    """What an engine produced: a module taking the user's inputs, and how to compile it."""

    module: Optional[torch.nn.Module]    # None when the compile cache served the compiled graph
    user_idx: list[int]                  # which of dynamo's example inputs are the user's
    inputs: tuple                        # example user inputs
    engine: str
    mode: str                            # static | dynamic | dynamic-torchao | static-modelopt
    kept_fp32: list[str] = field(default_factory=list)   # linears left in floating point, by module path
    freezing: bool = True                # inductor must fold the q/dq patterns into int8 kernels
    trace_context: Optional[Callable[[], AbstractContextManager]] = None  # needed while lowering traces
    autocast: Optional[torch.dtype] = None  # compile under CPU autocast: int8 kernels emit it, the rest runs in it
    inductor_config: dict = field(default_factory=dict)  # inductor settings for this compile only
    int8_attention: int = 0              # attentions rewritten for the fused int8 kernel

    def describe(self) -> dict:
        """What a compile-cache entry keeps of this result (all but the module and how to compile it)."""
        return {"user_idx": self.user_idx, "engine": self.engine, "mode": self.mode, "kept_fp32": self.kept_fp32,
                "autocast": None if self.autocast is None else str(self.autocast).removeprefix("torch."),
                "int8_attention": self.int8_attention}

    @classmethod
    def from_cache(cls, d: dict, inputs: tuple) -> "Quantized":
        """The result a cache entry describes; its ``module`` is None (the entry holds the compiled package)."""
        return cls(None, list(d["user_idx"]), inputs, d["engine"], d["mode"], list(d["kept_fp32"]),
                   autocast=None if d["autocast"] is None else getattr(torch, d["autocast"]),
                   int8_attention=d["int8_attention"])


@dataclass(frozen=True)
class EngineConfig(Config):
    """An engine's own recipe fields (its ``[quantize.<engine>]`` table). Subclass it (frozen) per engine."""


def check_keep_fp32(value, engine: str) -> None:
    if not isinstance(value, (tuple, list)) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"recipe field 'quantize.{engine}.keep_fp32' must be a list of strings, got {value!r}")


def check_sensitivity(value, engine: str) -> None:
    if not finite_number(value) or value < 0:
        raise ValueError(f"recipe field 'quantize.{engine}.sensitivity' must be a number >= 0, got {value!r}")


class QuantEngine:
    """An int8 engine: subclasses set ``name`` and ``config`` and implement :meth:`quantize`, which reads its
    own config (``q.options(self.name)``) and the settings every engine shares (``q.mode``)."""

    name: ClassVar[str]
    config: ClassVar[type[EngineConfig]] = EngineConfig   # the engine's own fields
    priority: ClassVar[int] = 0   # among engines that are the default here, "auto" takes the highest (then by name)

    def is_default(self, lower: str, on_cuda: bool) -> bool:
        """Whether ``quantize.engine = "auto"`` picks this engine for the lowering and device."""
        return False

    def check(self, q: "Quantize", lower: str) -> None:
        """Raise ValueError for settings this engine cannot serve (called at recipe validation)."""

    def quantize(self, gm: fx.GraphModule, example_inputs: Sequence, q: "Quantize",
                 batches: Optional[list[tuple]]) -> Quantized:
        raise NotImplementedError


_ENGINES: dict[str, QuantEngine] = {}


def register_engine(engine: QuantEngine) -> QuantEngine:
    if engine.name == "auto":
        raise ValueError("'auto' is reserved for choosing an engine")
    _ENGINES[engine.name] = engine
    return engine


def engine_names() -> tuple[str, ...]:
    return tuple(_ENGINES)


def get_engine(name: str) -> QuantEngine:
    if name not in _ENGINES:
        raise ValueError(f"unknown quantization engine {name!r}{did_you_mean(name, _ENGINES, aside=False)} "
                         f"(registered: {', '.join(_ENGINES)})")
    return _ENGINES[name]


def resolve_engine(q: "Quantize", lower: str, example_inputs: Sequence) -> QuantEngine:
    """``quantize.engine``, or for ``auto`` the engine of highest ``priority`` (then first by name) among those
    that are the default here: the choice never depends on the order engines were registered in."""
    if q.engine != "auto":
        return get_engine(q.engine)
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    defaults = [e for e in _ENGINES.values() if e.is_default(lower, on_cuda)]
    if defaults:
        return min(defaults, key=lambda e: (-e.priority, e.name))
    raise ValueError(f"no quantization engine serves lower={lower!r} on {'CUDA' if on_cuda else 'CPU'}")
