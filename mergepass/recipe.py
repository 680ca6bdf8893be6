"""Recipes: what to merge, how much, whether to quantize, and how to lower. Plain data, loaded from TOML.

A recipe composes the configs of the layers below it, each a frozen dataclass the layer owns::

    name, description
    [merge]     method = "tome", prop_attn, kernel, and the method's own fields (mergepass.methods: ToMeConfig, ...)
    [quantize]  enabled, mode, engine, ... (mergepass.quantize.Quantize)
    [search]    target_speedup, max_macs_ratio, min_cosine, search_iterations (recipe method "auto")
    [lower]     target = "inductor" | "tensorrt" | "eager", attention_kernel

A field the chosen method does not have is an error naming it. The older flat files (``method = "tome"``,
``r = 16`` at the top) and flat keyword overrides (``r=8``, ``quantize_rest="fp32"``) map onto this shape.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Union

from .config import check_choice, did_you_mean
from .lower import LOWERINGS
from .methods import AUTO, RESERVED, MethodConfig, config_of, method_names
from .methods.base import finite_number, unknown_field
from .quantize import Quantize

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

MERGE_KERNELS = ("auto", "fused", "reference")
ATTENTION_KERNELS = ("auto", "sdpa", "bf16", "int8")


def recipes_dir() -> Path:
    """Where named recipes live: $MERGEPASS_RECIPES, else the ``recipes`` folder shipped in the package."""
    env = os.environ.get("MERGEPASS_RECIPES")
    return Path(env) if env else Path(str(importlib.resources.files("mergepass") / "recipes"))


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
                raise ValueError(f"recipe field {name!r} must be a finite number >= 0, got {v!r}")
        if self.max_macs_ratio > 1 or self.min_cosine > 1:
            raise ValueError("recipe fields 'max_macs_ratio' and 'min_cosine' must be <= 1")
        it = self.search_iterations
        if not isinstance(it, int) or isinstance(it, bool) or it < 0:
            raise ValueError(f"recipe field 'search_iterations' must be an integer >= 0, got {it!r}")
        if method == "auto" and not (self.target_speedup or self.max_macs_ratio or self.min_cosine):
            raise ValueError("recipe method 'auto' needs 'target_speedup', 'max_macs_ratio' or 'min_cosine'")


_SEARCH_FIELDS = tuple(f.name for f in fields(Search))
# The flat layout's defaults: a flat file written before recipes had tables names every method's fields, the
# chosen method's and the others' at these values; the others are dropped when they hold them.
_FLAT_DEFAULTS = {"r": 16, "skip": 0, "window": AUTO, "transition": AUTO, "match_tome_r": 0, "budget": 0.2,
                  "similarity": "softmax", "partition": "patches", "protect": 0}
_MERGE_TABLE = {"method": "method", "prop_attn": "prop_attn", "kernel": "merge_kernel"}  # [merge] key -> field
_LOWER_TABLE = {"target": "lower", "attention_kernel": "attention_kernel",              # [lower] key -> field
                "attention_tolerance": "attention_tolerance"}


@dataclass(frozen=True)
class Recipe:
    """A merge (and quantization) recipe.

    ``merge`` holds the method's own fields (``recipe.r`` etc. read them); model-dependent ones accept
    ``"auto"`` and are resolved against the matched graph by :func:`mergepass.schedule.make_schedule`
    (the resolved values are printed by ``mergepass.plan``).
    """

    name: str = "custom"
    method: str = "tome"
    merge: MethodConfig = None         # type: ignore[assignment]  # the method's config (None: its defaults)
    prop_attn: bool = True             # proportional attention: log(size) added to attention logits
    merge_kernel: str = "auto"         # fused: one C++ op per merge (CPU); reference: pure tensor ops
    quantize: Quantize = field(default_factory=Quantize)
    search: Search = field(default_factory=Search)
    lower: str = "inductor"
    attention_kernel: str = "auto"     # bf16 | int8: mergepass's attention ops (AVX512-BF16 | AVX-512 VNNI, dynamic
                                       # scales); sdpa: torch's; auto: SDPA in floating-point graphs, and in int8
                                       # graphs the fastest of the three as timed on this CPU, within
    attention_tolerance: float = 5e-4  # ... this per-call error (1 - cosine against FP32 SDPA)
    description: str = ""

    def __post_init__(self):
        self.validate()

    def __getattr__(self, name: str) -> Any:
        """The method's and the search's fields by their flat names (``recipe.r``, ``recipe.target_speedup``)."""
        merge, search = self.__dict__.get("merge"), self.__dict__.get("search")
        if isinstance(merge, MethodConfig) and name in merge.field_names():
            return getattr(merge, name)
        if search is not None and name in _SEARCH_FIELDS:
            return getattr(search, name)
        raise AttributeError(f"recipe {self.__dict__.get('name')!r} has no field {name!r} (method "
                             f"{self.__dict__.get('method')!r})")

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        _check_method(self.method)
        cls = config_of(self.method)
        if self.merge is None:
            object.__setattr__(self, "merge", cls())
        elif isinstance(self.merge, Mapping):
            object.__setattr__(self, "merge", cls.build(self.merge, self.method))
        if type(self.merge) is not cls:
            raise ValueError(f"recipe field 'merge' must be a {cls.__name__} for method {self.method!r}, "
                             f"got {type(self.merge).__name__}")
        check_choice("lower", self.lower, LOWERINGS)
        check_choice("merge_kernel", self.merge_kernel, MERGE_KERNELS)
        check_choice("attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        tol = self.attention_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:
            raise ValueError(f"recipe field 'attention_tolerance' must be a number in [0, 1], got {tol!r}")
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"recipe field 'prop_attn' must be true or false, got {self.prop_attn!r}")
        if not isinstance(self.quantize, Quantize):
            raise ValueError("recipe field 'quantize' must be a table")
        if not isinstance(self.search, Search):
            raise ValueError("recipe field 'search' must be a table")
        self.search.validate(self.method)
        self.quantize.validate(self.lower)
        if self.merge_kernel == "fused" and self.lower == "tensorrt":
            raise ValueError("recipe field 'merge_kernel' = 'fused' is a CPU kernel TensorRT cannot convert: "
                             "use merge_kernel='auto' (reference ops under TensorRT) or lower='inductor'")

    @property
    def merges(self) -> bool:
        return self.method != "none"

    def with_merge(self, merge: MethodConfig) -> "Recipe":
        """This recipe with another config of its method (a schedule's resolved one)."""
        return dataclasses.replace(self, merge=merge)

    def with_method(self, method: str, merge: MethodConfig) -> "Recipe":
        """This recipe with another method and its config (what recipe ``auto`` chose)."""
        return dataclasses.replace(self, method=method, merge=merge)

    def replace(self, **overrides: Any) -> "Recipe":
        """A copy with some fields changed, by flat name (``r=8``, ``quantize_rest="fp32"``) or by table
        (``quantize={...}``, ``merge={...}``, ``search={...}``). A new ``method`` keeps the fields its config
        shares with the old one."""
        return _build(_flat_overrides(overrides), base=self)

    def to_dict(self) -> dict:
        """The recipe as nested tables, the shape :func:`from_dict` and TOML files take."""
        q = self.quantize.to_dict()
        return {"name": self.name, "description": self.description,
                "merge": {"method": self.method, "prop_attn": self.prop_attn, "kernel": self.merge_kernel,
                          **self.merge.to_dict()},
                "quantize": q, "search": dataclasses.asdict(self.search),
                "lower": {"target": self.lower, "attention_kernel": self.attention_kernel,
                          "attention_tolerance": self.attention_tolerance}}

    def to_toml(self) -> str:
        """The recipe as TOML that :func:`load` reads back into an equal recipe."""
        d = self.to_dict()
        lines = [f"{k} = {_toml_value(d.pop(k))}" for k in ("name", "description")]
        for table, values in d.items():
            lines += ["", f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
            for sub, inner in ((k, v) for k, v in values.items() if isinstance(v, dict)):
                lines += ["", f"[{table}.{sub}]"] + [f"{k} = {_toml_value(v)}" for k, v in inner.items()]
        return "\n".join(lines) + "\n"


def _check_method(method: Any) -> None:
    methods = RESERVED + method_names()
    if method not in methods:
        raise ValueError(f"recipe field 'method' must be one of {methods}, got {method!r}"
                         + did_you_mean(str(method), methods))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _flat_overrides(overrides: Mapping[str, Any]) -> dict:
    """Keyword overrides as a recipe mapping: ``quantize_x`` into the quantize table."""
    out: dict = {}
    for k, v in overrides.items():
        if k.startswith("quantize_"):
            out.setdefault("quantize", {})[k[len("quantize_"):]] = v
        else:
            out[k] = v
    return out


def _table(d: dict, key: str) -> dict:
    t = d.pop(key, None)
    if t is None:
        return {}
    if dataclasses.is_dataclass(t):
        return dataclasses.asdict(t)
    if not isinstance(t, Mapping):
        raise ValueError(f"recipe field {key!r} must be a table, got {t!r}")
    return dict(t)


def _build(d: Mapping[str, Any], base: "Recipe | None" = None, name: str | None = None) -> Recipe:
    """A validated recipe from nested tables or flat fields, on top of ``base`` (default: the defaults)."""
    d = dict(d)
    top: dict = {}
    given = d.pop("merge", None)
    cfg_given = given if isinstance(given, MethodConfig) else None
    merge = {} if cfg_given is not None else _table({"merge": given}, "merge")
    for key, fname in _MERGE_TABLE.items():
        if key in merge:
            top[fname] = merge.pop(key)
    lower = d.get("lower")
    if isinstance(lower, Mapping):
        d.pop("lower")
        for key, value in lower.items():
            if key not in _LOWER_TABLE:
                raise unknown_field(key, _LOWER_TABLE, "table [lower]")
            top[_LOWER_TABLE[key]] = value
    search = _table(d, "search")
    for key in search:
        if key not in _SEARCH_FIELDS:
            raise unknown_field(key, _SEARCH_FIELDS, "table [search]")
    given_q = d.pop("quantize", None)
    quantize = given_q if isinstance(given_q, Quantize) else _table({"quantize": given_q}, "quantize")
    top_fields = {f.name for f in fields(Recipe)} - {"merge", "quantize", "search"}
    method = top.get("method", d.get("method", base.method if base is not None else Recipe.method))
    _check_method(method)
    cls = config_of(method)
    for k in list(d):  # flat fields: the method's, the search's, or the recipe's own
        if k in top_fields:
            top[k] = d.pop(k)
        elif k in _SEARCH_FIELDS:
            search[k] = d.pop(k)
        elif k in cls.field_names():
            merge[k] = d.pop(k)
        elif k in _FLAT_DEFAULTS and d[k] == _FLAT_DEFAULTS[k] and type(d[k]) is type(_FLAT_DEFAULTS[k]):
            d.pop(k)  # another method's field at the flat layout's default: what an older file always holds
        else:
            known = set(top_fields) | set(_SEARCH_FIELDS) | set(cls.field_names()) | {"merge", "quantize", "search"}
            raise ValueError(f"unknown recipe field {k!r}{did_you_mean(k, known)} for method {method!r}; its "
                             f"fields: {list(cls.field_names())}; the recipe's: {sorted(top_fields | set(_SEARCH_FIELDS))}")
    if name is not None and "name" not in top:
        top["name"] = name
    if cfg_given is not None:
        if type(cfg_given) is not cls:
            raise ValueError(f"recipe field 'merge' must be a {cls.__name__} for method {method!r}, "
                             f"got {type(cfg_given).__name__}")
        base = Recipe(method=method, merge=cfg_given) if base is None else \
            dataclasses.replace(base, method=method, merge=cfg_given)
    if base is None:
        cfg = cls.build(merge, method)
        q = quantize if isinstance(quantize, Quantize) else Quantize().updated(quantize)
        srch = Search(**search)
        return Recipe(merge=cfg, quantize=q, search=srch, **top)
    old = base.merge.to_dict()
    if method != base.method:
        old = {k: v for k, v in old.items() if k in cls.field_names()}
    cfg = cls.build({**old, **merge}, method)
    q = quantize if isinstance(quantize, Quantize) else base.quantize.updated(quantize)
    srch = dataclasses.replace(base.search, **search) if search else base.search
    return dataclasses.replace(base, merge=cfg, quantize=q, search=srch, **top)


def from_dict(d: Mapping[str, Any], name: str | None = None) -> Recipe:
    """Build a validated recipe from a plain mapping (as read from TOML): nested tables or flat fields."""
    return _build(d, name=name)


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
                hint = did_you_mean(str(spec), names, aside=False, show=str)
                raise ValueError(f"unknown recipe {str(spec)!r}{hint} (shipped: {', '.join(names)})")
        data = _read_toml(path)
        try:
            recipe = from_dict(data, name=path.stem)
        except ValueError as e:
            raise ValueError(f"recipe file {path}: {e}") from None
    else:
        raise TypeError(f"recipe must be a name, path, dict or Recipe, not {type(spec).__name__}")
    return recipe.replace(**overrides) if overrides else recipe
