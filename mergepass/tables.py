"""The recipe's ``[search]`` and ``[lower]`` tables: frozen dataclasses that name a bad field."""
from __future__ import annotations

from dataclasses import dataclass, fields

from .config import check_bool, check_choice, finite_number
from .lower import LOWERINGS
from .stages import verbose

ATTENTION_KERNELS = ("auto", "sdpa", "bf16", "int8", "int16")


@dataclass(frozen=True)
class Search:
    """The ``[search]`` table: the targets of recipe method ``auto`` (:mod:`mergepass.search.auto`)."""

    target_speedup: float = 0.0        # predicted (MACs-model) speedup to reach
    max_macs_ratio: float = 0.0        # merged/unmerged MACs at most this
    min_cosine: float = 0.0            # quality floor (mean output cosine on calibration images)
    search_iterations: int = 6         # with calibration images: steps of the per-block r search

    def validate(self, method: str) -> None:
        for name in ("target_speedup", "max_macs_ratio", "min_cosine"):
            v = getattr(self, name)
            if not finite_number(v) or v < 0:
                raise ValueError(f"recipe field 'search.{name}' must be a finite number >= 0, got {v!r}")
        if self.max_macs_ratio > 1 or self.min_cosine > 1:
            raise ValueError("recipe fields 'search.max_macs_ratio' and 'search.min_cosine' must be <= 1")
        it = self.search_iterations
        if not isinstance(it, int) or isinstance(it, bool) or it < 0:
            raise ValueError(f"recipe field 'search.search_iterations' must be an integer >= 0, got {it!r}")
        if method == "auto" and not (self.target_speedup or self.max_macs_ratio or self.min_cosine):
            raise ValueError("recipe method 'auto' needs 'search.target_speedup', 'search.max_macs_ratio' or "
                             "'search.min_cosine'")


@dataclass(frozen=True)
class Lower:
    """The ``[lower]`` table: the compiler, and which attention op the compiled graph runs."""

    target: str = "inductor"           # inductor | tensorrt | eager
    attention_kernel: str = "auto"     # bf16 | int8 | int16: mergepass's attention ops (AVX512-BF16 | AVX-512 VNNI
                                       # | AVX2, dynamic scales); sdpa: torch's; auto: SDPA in floating-point graphs,
                                       # and in int8 graphs the fastest that runs here, as timed on this CPU, within
    attention_tolerance: float = 5e-4  # ... this per-call error (1 - cosine against FP32 SDPA)
    prune_rows: bool = True            # the last block computes only the token rows the outputs read, where those
                                       # are protected tokens (a class token): exact
    autotune: bool = False             # inductor times its C++ GEMM template against oneDNN for every GEMM shape
                                       # and keeps the faster (max_autotune): first compiles take 3-7x as long

    def inductor_options(self) -> dict:
        """Inductor settings this table asks for (of the graphs inductor compiles). Inductor's table of timings
        per GEMM is printed only with ``MERGEPASS_VERBOSE``."""
        if not self.autotune:
            return {}
        quiet = {} if verbose() else {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
        return {"max_autotune": True, **quiet}

    def validate(self) -> None:
        check_choice("lower.target", self.target, LOWERINGS)
        check_choice("lower.attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        check_bool("lower.prune_rows", self.prune_rows)
        check_bool("lower.autotune", self.autotune)
        tol = self.attention_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:
            raise ValueError(f"recipe field 'lower.attention_tolerance' must be a number in [0, 1], got {tol!r}")


def field_names(table: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(table))
