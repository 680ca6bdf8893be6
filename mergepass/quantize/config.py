"""The ``[quantize]`` table of a recipe: what every engine shares, and each engine's own config.

``[quantize]`` holds ``enabled``, ``mode``, ``calibration_batches`` and ``engine``; ``[quantize.<engine>]`` holds
that engine's fields (``[quantize.pt2e] observer = "minmax"``). Which engine runs is :func:`.base.resolve_engine`'s
choice alone; :meth:`Quantize.engine_config` is that engine's config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..config import check_choice, unknown_field
from .base import EngineConfig
from .engines import engine_names, get_engine, resolve_engine

QUANT_MODES = ("static", "dynamic")


@dataclass(frozen=True)
class Quantize:
    """int8 post-training quantization settings (see :mod:`mergepass.quantize`)."""

    enabled: bool = False
    mode: str = "static"          # static: calibrated activation scales; dynamic: per-batch scales
    calibration_batches: int = 8  # at most this many calibration batches are used
    engine: str = "auto"          # pt2e (x86, CPU default) | torchao (CUDA default) | modelopt (TensorRT default)
    engines: tuple = ()           # engine configs that differ from their engine's defaults, by engine name

    def __post_init__(self):
        # only the configs that differ from the defaults, in one order: a Quantize built before an engine was
        # registered equals one built after, and serves that engine its defaults
        kept = {_name_of(type(c)): c for c in self.engines if c != type(c)()}
        object.__setattr__(self, "engines", tuple(kept[n] for n in sorted(kept)))

    @property
    def label(self) -> str:
        """What the plan table prints: ``off``, ``int8-static`` or ``int8-dynamic``."""
        return "int8-" + self.mode if self.enabled else "off"

    def options(self, engine: str) -> EngineConfig:
        """Engine ``engine``'s own config (its defaults where the recipe gives none)."""
        cls = get_engine(engine).config
        return next((c for c in self.engines if type(c) is cls), None) or cls()

    def engine_config(self, lower: str, example_inputs: Sequence = ()) -> EngineConfig:
        """The config of the engine that quantizes for ``lower`` and these inputs (:func:`.base.resolve_engine`)."""
        return self.options(resolve_engine(self, lower, example_inputs).name)

    def validate(self, lower: str) -> None:
        """Raise ValueError naming a bad field (``lower``: the recipe's lowering, which an engine may refuse)."""
        check_choice("quantize.mode", self.mode, QUANT_MODES)
        engines = ("auto",) + engine_names()
        check_choice("quantize.engine", self.engine, engines)
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) \
                or self.calibration_batches < 1:
            raise ValueError("recipe field 'quantize.calibration_batches' must be a positive integer, "
                             f"got {self.calibration_batches!r}")
        if self.engine != "auto":
            get_engine(self.engine).check(self, lower)

    def updated(self, table: Mapping[str, Any]) -> "Quantize":
        """This config with a ``[quantize]`` table's values: shared fields, and engine tables."""
        table = dict(table)
        common = {k: table.pop(k) for k in list(table) if k in COMMON}
        engine = common.get("engine", self.engine)
        if engine != "auto" and engine not in engine_names():
            return dataclasses.replace(self, **common)  # validate names the engine
        configs = {n: self.options(n) for n in engine_names()}
        for name, sub in table.items():
            if name not in configs:
                allowed = set(COMMON) | set(engine_names())
                raise unknown_field(f"quantize.{name}", {f"quantize.{a}" for a in allowed}, "[quantize]")
            if not isinstance(sub, Mapping):
                raise ValueError(f"recipe field 'quantize.{name}' must be a table, got {sub!r}")
            cls = get_engine(name).config
            for k in sub:
                if k not in cls.field_names():
                    raise unknown_field(k, cls.field_names(), f"engine {name!r} ([quantize.{name}])")
            configs[name] = configs[name].replace(**sub)
        return dataclasses.replace(self, engines=tuple(configs.values()), **common)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in COMMON}
        for name in engine_names():
            d[name] = self.options(name).to_dict()
        return d


COMMON = ("enabled", "mode", "calibration_batches", "engine")  # the fields every engine shares


def _name_of(config: type) -> str:
    """The name of the engine whose config is ``config`` (a config of no registered engine: its class name)."""
    return next((n for n in engine_names() if get_engine(n).config is config), config.__name__)
