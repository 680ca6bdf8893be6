"""The ``[quantize]`` table of a recipe: int8 post-training quantization settings, all the engines take."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .engines import engine_names, get_engine

QUANT_MODES = ("static", "dynamic")
REST_PRECISIONS = ("auto", "fp32", "bf16")
ATTENTION_PRECISIONS = ("float", "int8")
OBSERVERS = ("auto", "minmax", "histogram")


def _finite_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass(frozen=True)
class Quantize:
    """int8 post-training quantization settings (see `mergepass.quantize`)."""

    enabled: bool = False
    mode: str = "static"          # static: calibrated activation scales; dynamic: per-batch scales
    keep_fp32: tuple[str, ...] = ()  # linears kept in fp32, by module path glob ("blocks.2.mlp.fc2", "*.fc2")
    sensitivity: float = 0.0      # >0: also keep linears whose input max/p99.9 ratio exceeds this
    calibration_batches: int = 8  # at most this many calibration batches are used
    engine: str = "auto"          # pt2e (x86, CPU default) | torchao (CUDA default) | modelopt (TensorRT default)
    rest: str = "auto"            # what runs outside the int8 GEMMs: bf16 | fp32 | auto (bf16 where the CPU
                                  # has AVX512-BF16 or AMX)
    attention: str = "float"      # float (the rest's precision) | int8 (torchao's fused int8 SDPA; costs fidelity)
    observer: str = "auto"        # static activation ranges: minmax (calibration min/max) | histogram (torchao's
                                  # default: least quantization error on a histogram) | auto (minmax for the
                                  # linears' 8-bit activations; histogram for 7-bit ones and int8 attention)

    def __post_init__(self):
        if isinstance(self.keep_fp32, list):  # TOML's array
            object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))

    def validate(self, lower: str) -> None:
        """Raise ValueError naming a bad field (``lower``: the recipe's lowering, which an engine may refuse)."""
        if self.mode not in QUANT_MODES:
            raise ValueError(f"recipe field 'quantize.mode' must be one of {QUANT_MODES}, got {self.mode!r}")
        engines = ("auto",) + engine_names()
        if self.engine not in engines:
            raise ValueError(f"recipe field 'quantize.engine' must be one of {engines}, got {self.engine!r}")
        if not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            raise ValueError("recipe field 'quantize.calibration_batches' must be a positive integer, "
                             f"got {self.calibration_batches!r}")
        if not _finite_number(self.sensitivity) or self.sensitivity < 0:
            raise ValueError(f"recipe field 'quantize.sensitivity' must be a number >= 0, got {self.sensitivity!r}")
        if not isinstance(self.keep_fp32, (tuple, list)) or not all(isinstance(s, str) for s in self.keep_fp32):
            raise ValueError(f"recipe field 'quantize.keep_fp32' must be a list of strings, got {self.keep_fp32!r}")
        if self.rest not in REST_PRECISIONS:
            raise ValueError(f"recipe field 'quantize.rest' must be one of {REST_PRECISIONS}, got {self.rest!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"recipe field 'quantize.observer' must be one of {OBSERVERS}, got {self.observer!r}")
        if self.attention not in ATTENTION_PRECISIONS:
            raise ValueError(f"recipe field 'quantize.attention' must be one of {ATTENTION_PRECISIONS}, "
                             f"got {self.attention!r}")
        if self.engine != "auto":
            get_engine(self.engine).check(self, lower)
