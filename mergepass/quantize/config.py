"""The ``[quantize]`` table of a recipe: what every engine shares, and each engine's own config.

``[quantize]`` holds ``enabled``, ``mode``, ``calibration_batches`` and ``engine``; ``[quantize.<engine>]`` holds
that engine's fields (``[quantize.pt2e] observer = "minmax"``). An engine field given in ``[quantize]`` itself
(``quantize_rest="bf16"``, the older layout) applies to every engine that has it; one no engine has, or one the
chosen engine lacks, is an error naming it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import check_choice, unknown_field
from .base import EngineConfig
from .engines import engine_names, get_engine

QUANT_MODES = ("static", "dynamic")


@dataclass(frozen=True)
class Quantize:
    """int8 post-training quantization settings (see :mod:`mergepass.quantize`)."""

    enabled: bool = False
    mode: str = "static"          # static: calibrated activation scales; dynamic: per-batch scales
    calibration_batches: int = 8  # at most this many calibration batches are used
    engine: str = "auto"          # pt2e (x86, CPU default) | torchao (CUDA default) | modelopt (TensorRT default)
    engines: tuple = ()           # each registered engine's config (those not given: their defaults)

    def __post_init__(self):
        given = {type(c): c for c in self.engines}
        object.__setattr__(self, "engines", tuple(
            given.get(get_engine(n).config) or get_engine(n).config() for n in engine_names()))

    def options(self, engine: str) -> EngineConfig:
        """Engine ``engine``'s own config."""
        cls = get_engine(engine).config
        return next(c for c in self.engines if type(c) is cls)

    def __getattr__(self, name: str) -> Any:
        """An engine field by its flat name: the chosen engine's, or (engine ``auto``) the first engine's that has it."""
        engines = self.__dict__.get("engines", ())
        chosen = self.__dict__.get("engine")
        if chosen == "auto":  # the CPU default's, the engine "auto" picks for inductor on the CPU
            chosen = next((n for n in engine_names() if get_engine(n).is_default("inductor", False)), chosen)
        for c in sorted(engines, key=lambda c: type(c) is not _engine_config(chosen)):
            if name in c.field_names():
                return getattr(c, name)
        raise AttributeError(name)

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
        """This config with a ``[quantize]`` table's values (shared fields, engine subtables, flat engine fields)."""
        table = dict(table)
        common = {k: table.pop(k) for k in list(table) if k in _COMMON}
        engine = common.get("engine", self.engine)
        if engine != "auto" and engine not in engine_names():
            return dataclasses.replace(self, **common)  # validate names the engine
        configs = {type(c): c for c in self.engines}
        for name in engine_names():
            sub = table.pop(name, None)
            if sub is not None:
                if not isinstance(sub, Mapping):
                    raise ValueError(f"recipe field 'quantize.{name}' must be a table, got {sub!r}")
                cls = get_engine(name).config
                for k in sub:
                    if k not in cls.field_names():
                        raise unknown_field(k, cls.field_names(), f"engine {name!r} ([quantize.{name}])")
                configs[cls] = configs[cls].replace(**sub)
        for k, v in table.items():  # flat engine fields: every engine that has the field
            having = [cls for cls in configs if k in cls.field_names()]
            if not having:
                allowed = set(_COMMON) | {f for cls in configs for f in cls.field_names()} | set(engine_names())
                raise unknown_field(f"quantize.{k}", {f"quantize.{a}" for a in allowed}, "[quantize]")
            if engine != "auto" and _engine_config(engine) not in having:
                raise unknown_field(k, _engine_config(engine).field_names(), f"engine {engine!r}")
            for cls in having:
                configs[cls] = configs[cls].replace(**{k: v})
        return dataclasses.replace(self, engines=tuple(configs.values()), **common)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _COMMON}
        for name in engine_names():
            d[name] = self.options(name).to_dict()
        return d


_COMMON = ("enabled", "mode", "calibration_batches", "engine")


def _engine_config(engine: str):
    return get_engine(engine).config if engine in engine_names() else None
