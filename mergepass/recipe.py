"""Recipes: what to merge, how much, and whether to quantize. Plain data, loaded from TOML."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Union

from .merge import SIMILARITIES
from .methods import AUTO, RESERVED, method_names
from .methods.tome import is_inflected
from .lower import LOWERINGS
from .quantize.engines import engine_names, get_engine

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

QUANT_MODES = ("static", "dynamic")
MERGE_KERNELS = ("auto", "fused", "reference")
ATTENTION_KERNELS = ("auto", "sdpa", "bf16", "int8")
PARTITIONS = ("patches", "sequence")
REST_PRECISIONS = ("auto", "fp32", "bf16")
ATTENTION_PRECISIONS = ("float", "int8")
OBSERVERS = ("auto", "minmax", "histogram")


def recipes_dir() -> Path:
    """Where named recipes live: $MERGEPASS_RECIPES, else the ``recipes`` folder shipped in the package."""
    env = os.environ.get("MERGEPASS_RECIPES")
    return Path(env) if env else Path(str(importlib.resources.files("mergepass") / "recipes"))


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

    def validate(self) -> None:
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


@dataclass(frozen=True)
class Recipe:
    """A merge (and quantization) recipe.

    Model-dependent fields accept ``"auto"`` and are resolved against the matched graph by
    :func:`mergepass.schedule.make_schedule` (the resolved values are printed by ``mergepass.plan``).
    """

    name: str = "custom"
    method: str = "tome"
    r: Union[int, str, tuple] = 16     # tokens merged per merging block, one value per block, ToMe's
                                       # [r, inflect] (inflect a float in [-1, 1]: r falls or rises
                                       # linearly with depth), or "auto" (from match_tome_r)
    skip: Union[int, str] = 0          # DFE: blocks left dense at the start ("auto": depth/6)
    window: Union[int, str] = AUTO     # LGTM: initial window side, in tokens
    transition: Union[int, str] = AUTO  # LGTM: number of local blocks ("auto": Algorithm 1's rule)
    match_tome_r: int = 0              # r/budget="auto": the value whose MACs are closest to ToMe with this r
    budget: Union[int, float, str] = 0.2  # ToMato: tokens removed (int), fraction of patch tokens, or "auto"
    similarity: str = "softmax"        # ToMato: which 4-adjacent pairs merge: "softmax" (the paper's: row-softmax of
                                       # the post-attention tokens' dot products) | "cosine" (of the keys, as ToMe)
    prop_attn: bool = True             # proportional attention: log(size) added to attention logits
    partition: str = "patches"         # ToMe's A/B split: alternate over patch positions, or over
                                       # sequence positions as official ToMe (differs for an odd prefix)
    protect: Union[int, float] = 0     # ToMe steps: the mergeable tokens with the largest key norms never merge,
                                       # this many per block (int) or this fraction of the patch tokens (float < 1)
    quantize: Quantize = field(default_factory=Quantize)
    target_speedup: float = 0.0        # auto: predicted (MACs-model) speedup to reach
    max_macs_ratio: float = 0.0        # auto: merged/unmerged MACs at most this
    min_cosine: float = 0.0            # auto: quality floor (mean output cosine on calibration images)
    search_iterations: int = 6         # auto with calibration images: steps of the per-block r search
    lower: str = "inductor"
    merge_kernel: str = "auto"         # fused: one C++ op per merge (CPU); reference: pure tensor ops
    attention_kernel: str = "auto"     # bf16 | int8: mergepass's attention ops (AVX512-BF16 | AVX-512 VNNI, dynamic
                                       # scales); sdpa: torch's; auto: in merged or int8 graphs, the op that is
                                       # faster than SDPA on this CPU, if any (mergepass.kernels.attention)
    description: str = ""

    def __post_init__(self):
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        methods = RESERVED + method_names()
        if self.method not in methods:
            close = difflib.get_close_matches(str(self.method), methods, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"recipe field 'method' must be one of {methods}, got {self.method!r}{hint}")
        if self.lower not in LOWERINGS:
            raise ValueError(f"recipe field 'lower' must be one of {LOWERINGS}, got {self.lower!r}")
        if self.merge_kernel not in MERGE_KERNELS:
            raise ValueError(f"recipe field 'merge_kernel' must be one of {MERGE_KERNELS}, got {self.merge_kernel!r}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"recipe field 'attention_kernel' must be one of {ATTENTION_KERNELS}, "
                             f"got {self.attention_kernel!r}")
        if is_inflected(self.r):
            if isinstance(self.r[0], bool) or not isinstance(self.r[0], int) or self.r[0] < 0 \
                    or not -1.0 <= self.r[1] <= 1.0:
                raise ValueError("recipe field 'r' as ToMe's [r, inflect] needs an integer r >= 0 and a float inflect "
                                 f"in [-1, 1], got {list(self.r)!r}")
        elif isinstance(self.r, (tuple, list)):
            if not self.r or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.r):
                raise ValueError(f"recipe field 'r' as a list must hold one integer >= 0 per block, got {list(self.r)!r}")
        else:
            _int_or_auto("r", self.r)
        if self.partition not in PARTITIONS:
            raise ValueError(f"recipe field 'partition' must be one of {PARTITIONS}, got {self.partition!r}")
        _int_or_auto("skip", self.skip)
        _int_or_auto("window", self.window, minimum=2)
        _int_or_auto("transition", self.transition)
        if not isinstance(self.search_iterations, int) or isinstance(self.search_iterations, bool) \
                or self.search_iterations < 0:
            raise ValueError(f"recipe field 'search_iterations' must be an integer >= 0, got {self.search_iterations!r}")
        if isinstance(self.protect, bool) or not (
                (isinstance(self.protect, int) and self.protect >= 0)
                or (isinstance(self.protect, float) and 0.0 <= self.protect < 1.0)):
            raise ValueError("recipe field 'protect' must be an integer >= 0 (tokens) or a fraction in [0, 1) of the "
                             f"patch tokens, got {self.protect!r}")
        if not isinstance(self.match_tome_r, int) or isinstance(self.match_tome_r, bool) or self.match_tome_r < 0:
            raise ValueError(f"recipe field 'match_tome_r' must be an integer >= 0, got {self.match_tome_r!r}")
        if self.r == AUTO and self.match_tome_r <= 0:
            raise ValueError("recipe field 'r' is 'auto' but 'match_tome_r' is not set (> 0)")
        b = self.budget
        if b == AUTO:
            if self.match_tome_r <= 0:
                raise ValueError("recipe field 'budget' is 'auto' but 'match_tome_r' is not set (> 0)")
            b = 0
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"recipe field 'budget' must be an int (tokens), a float in [0, 1) or 'auto', got {b!r}")
        if isinstance(b, float) and not 0.0 <= b < 1.0:
            raise ValueError(f"recipe field 'budget' as a fraction must be in [0, 1), got {b!r}")
        if isinstance(b, int) and b < 0:
            raise ValueError(f"recipe field 'budget' must be >= 0, got {b!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"recipe field 'similarity' must be one of {SIMILARITIES}, got {self.similarity!r}")
        for name in ("target_speedup", "max_macs_ratio", "min_cosine"):
            v = getattr(self, name)
            if not _finite_number(v) or v < 0:
                raise ValueError(f"recipe field {name!r} must be a finite number >= 0, got {v!r}")
        if self.max_macs_ratio > 1 or self.min_cosine > 1:
            raise ValueError("recipe fields 'max_macs_ratio' and 'min_cosine' must be <= 1")
        if self.method == "auto" and not (self.target_speedup or self.max_macs_ratio or self.min_cosine):
            raise ValueError("recipe method 'auto' needs 'target_speedup', 'max_macs_ratio' or 'min_cosine'")
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"recipe field 'prop_attn' must be true or false, got {self.prop_attn!r}")
        if not isinstance(self.quantize, Quantize):
            raise ValueError("recipe field 'quantize' must be a table")
        self.quantize.validate()
        if self.merge_kernel == "fused" and self.lower == "tensorrt":
            raise ValueError("recipe field 'merge_kernel' = 'fused' is a CPU kernel TensorRT cannot convert: "
                             "use merge_kernel='auto' (reference ops under TensorRT) or lower='inductor'")
        if self.quantize.engine != "auto":
            get_engine(self.quantize.engine).check(self)

    @property
    def merges(self) -> bool:
        return self.method != "none"

    def replace(self, **overrides: Any) -> "Recipe":
        """A copy with some fields changed (``quantize`` may be a dict of its fields)."""
        d = self.to_dict()
        for k, v in _nest_overrides(overrides).items():
            if k == "quantize" and isinstance(v, Mapping):
                d["quantize"] = {**d["quantize"], **v}
            elif k == "quantize" and isinstance(v, Quantize):
                d["quantize"] = dataclasses.asdict(v)
            else:
                d[k] = v
        return from_dict(d, name=self.name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["quantize"]["keep_fp32"] = list(d["quantize"]["keep_fp32"])
        if isinstance(d["r"], tuple):
            d["r"] = list(d["r"])
        return d

    def to_toml(self) -> str:
        """The recipe as TOML that :func:`load` reads back into an equal recipe."""
        d = self.to_dict()
        q = d.pop("quantize")
        lines = [f"{k} = {_toml_value(v)}" for k, v in d.items()]
        lines += ["", "[quantize]"] + [f"{k} = {_toml_value(v)}" for k, v in q.items()]
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _finite_number(v: Any) -> bool:
    """An int or float that is neither NaN nor infinite (NaN passes every ``<`` check unnoticed)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _int_or_auto(name: str, value: Any, minimum: int = 0) -> None:
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"recipe field {name!r} must be an integer >= {minimum} or 'auto', got {value!r}")


def _nest_overrides(overrides: Mapping[str, Any]) -> dict:
    out: dict = {}
    for k, v in overrides.items():
        if k.startswith("quantize_"):
            out.setdefault("quantize", {})[k[len("quantize_"):]] = v
        else:
            out[k] = v
    return out


_RECIPE_FIELDS = {f.name for f in fields(Recipe)}
_QUANT_FIELDS = {f.name for f in fields(Quantize)}


def _check_keys(keys, allowed, where: str) -> None:
    for k in keys:
        if k not in allowed:
            close = difflib.get_close_matches(k, sorted(allowed), n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"unknown recipe field {where}{k!r}{hint}; allowed: {sorted(allowed)}")


def from_dict(d: Mapping[str, Any], name: str | None = None) -> Recipe:
    """Build a validated recipe from a plain mapping (as read from TOML)."""
    d = dict(d)
    _check_keys(d, _RECIPE_FIELDS, "")
    q = d.pop("quantize", {}) or {}
    if isinstance(q, Quantize):
        q = dataclasses.asdict(q)
    if not isinstance(q, Mapping):
        raise ValueError(f"recipe field 'quantize' must be a table, got {q!r}")
    q = dict(q)
    _check_keys(q, _QUANT_FIELDS, "quantize.")
    if isinstance(q.get("keep_fp32"), list):  # TOML's array; anything else is refused by Quantize.validate
        q["keep_fp32"] = tuple(q["keep_fp32"])
    if name is not None and "name" not in d:
        d["name"] = name
    if isinstance(d.get("r"), list):
        d["r"] = tuple(d["r"])
    return Recipe(quantize=Quantize(**q), **d)


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"tome:r=8,prop_attn=false"`` -> ("tome", {"r": 8, "prop_attn": False})."""
    name, _, rest = spec.partition(":")
    overrides: dict = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        for cast in (int, float):
            try:
                overrides[k] = cast(v)
                break
            except ValueError:
                continue
        else:
            overrides[k] = {"true": True, "false": False}.get(v.lower(), v)
    return name, overrides


def available() -> list[str]:
    """Names of the recipes shipped in ``recipes/``."""
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def _read_toml(path: Path) -> dict:
    """A recipe file's table; ValueError naming the file when it is a folder, unreadable, not UTF-8 or not TOML."""
    if path.is_dir():
        raise ValueError(f"recipe {path} is a folder, not a TOML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"recipe file {path} is not UTF-8 text (byte {e.start}): TOML must be UTF-8") from None
    except OSError as e:
        raise ValueError(f"recipe file {path} could not be read ({e.strerror or e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        where = "" if "line" in str(e) else f" (line {len(text.splitlines())}, end of file)"
        raise ValueError(f"recipe file {path} is not valid TOML: {e}{where}") from None


def load(spec: Union[str, os.PathLike, Mapping, Recipe], **overrides: Any) -> Recipe:
    """Load a recipe from a name (``recipes/NAME.toml``), a path, a dict, or a Recipe; apply overrides."""
    if isinstance(spec, Recipe):
        recipe = spec
    elif isinstance(spec, Mapping):
        recipe = from_dict(spec)
    elif isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.suffix != ".toml" or not path.exists():
            named = recipes_dir() / f"{spec}.toml"
            if named.exists():
                path = named
            elif path.suffix == ".toml":
                raise ValueError(f"recipe file not found: {path}")
            else:
                names = available()
                close = difflib.get_close_matches(str(spec), names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"unknown recipe {str(spec)!r}{hint} (shipped: {', '.join(names)})")
        data = _read_toml(path)
        try:
            recipe = from_dict(data, name=path.stem)
        except ValueError as e:
            raise ValueError(f"recipe file {path}: {e}") from None
    else:
        raise TypeError(f"recipe must be a name, path, dict or Recipe, not {type(spec).__name__}")
    return recipe.replace(**overrides) if overrides else recipe
