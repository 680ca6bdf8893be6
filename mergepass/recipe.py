"""Recipes: what to merge, how much, whether to quantize, and how to lower. Plain data, loaded from TOML.

A recipe composes the configs of the layers below it, each a frozen dataclass the layer owns::

    name, description
    [merge]     method = "tome", prop_attn, kernel, then the method's own fields (mergepass.methods: ToMeConfig, ...)
    [quantize]  enabled, mode, calibration_batches, engine; [quantize.<engine>] its own fields (mergepass.quantize)
    [search]    target_speedup, max_macs_ratio, min_cosine, search_iterations (recipe method "auto")
    [lower]     target = "inductor" | "tensorrt" | "eager", attention_kernel, attention_tolerance

Each field has one name, its table's then its own: ``recipe.merge.method``, ``recipe.merge.r``, ``recipe.merge.kernel``,
``recipe.lower.target``, ``recipe.search.min_cosine``; overrides take the same tables (``merge={"r": 8}``). A field the
chosen method does not have is an error naming it. Files, dicts and overrides in the older flat layout are rewritten
once, with a DeprecationWarning, by :func:`mergepass.migrate.migrate`.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

from .config import did_you_mean
from .methods import MERGE_KERNELS, MethodConfig, ToMeConfig, check_method, config_of
from .methods.base import unknown_field
from .migrate import deprecated, migrate, rewrite
from .quantize import Quantize
from .quantize.config import COMMON
from .tables import ATTENTION_KERNELS, Lower, Search, field_names

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

__all__ = ["Recipe", "Search", "Lower", "load", "from_dict", "parse_spec", "available", "recipes_dir",
           "MERGE_KERNELS", "ATTENTION_KERNELS"]

_TABLES = ("merge", "quantize", "search", "lower")
_TOP = ("name", "description") + _TABLES


def recipes_dir() -> Path:
    """Where named recipes live: $MERGEPASS_RECIPES, else the ``recipes`` folder shipped in the package."""
    env = os.environ.get("MERGEPASS_RECIPES")
    return Path(env) if env else Path(str(importlib.resources.files("mergepass") / "recipes"))


@dataclass(frozen=True)
class Recipe:
    """A merge (and quantization) recipe.

    ``merge`` is the method's config (``recipe.merge.method``, ``recipe.merge.r``); model-dependent fields accept
    ``"auto"`` and are resolved against the matched graph by :func:`mergepass.schedule.make_schedule` (the resolved
    values are printed by ``mergepass.plan``).
    """

    name: str = "custom"
    merge: MethodConfig = field(default_factory=ToMeConfig)
    quantize: Quantize = field(default_factory=Quantize)
    search: Search = field(default_factory=Search)
    lower: Lower = field(default_factory=Lower)
    description: str = ""

    def __post_init__(self):
        self.validate()
        object.__setattr__(self, "_tables", self._as_dict())  # read for every compile's cache key

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        for name, cls in (("merge", MethodConfig), ("quantize", Quantize), ("search", Search), ("lower", Lower)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"recipe field {name!r} must be a table")
        self.lower.validate()
        self.quantize.validate(self.lower.target)
        self._check_merge()

    def _check_merge(self) -> None:
        """What the other tables ask of the method's config."""
        self.search.validate(self.merge.method)
        if self.merge.kernel == "fused" and self.lower.target == "tensorrt":
            raise ValueError("recipe field 'merge.kernel' = 'fused' is a CPU kernel TensorRT cannot convert: "
                             "use merge.kernel='auto' (reference ops under TensorRT) or lower.target='inductor'")

    @property
    def merges(self) -> bool:
        return self.merge.method != "none"

    def with_merge(self, merge: MethodConfig) -> "Recipe":
        """This recipe with another method config (a schedule's resolved one, or what recipe ``auto`` chose); the
        other tables, valid already, are not checked again."""
        if not isinstance(merge, MethodConfig):
            raise ValueError("recipe field 'merge' must be a table")
        new = copy.copy(self)
        object.__setattr__(new, "merge", merge)
        new._check_merge()
        object.__setattr__(new, "_tables", {**self._tables, "merge": merge.to_dict()})
        return new

    def replace(self, **overrides: Any) -> "Recipe":
        """A copy with some tables' fields changed (``merge={"r": 8}``, ``quantize={"pt2e": {"rest": "fp32"}}``,
        ``lower={"target": "eager"}``, ``name="x"``); a table may also be given whole (a :class:`Quantize`, a
        method's config). A new ``merge.method`` keeps the fields its config shares with the old one."""
        return _build(migrate(overrides, base=self), base=self)

    def to_dict(self) -> dict:
        """The recipe as nested tables, the shape :func:`from_dict` and TOML files take."""
        return copy.deepcopy(self._tables)

    def _as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "merge": self.merge.to_dict(),
                "quantize": self.quantize.to_dict(), "search": dataclasses.asdict(self.search),
                "lower": dataclasses.asdict(self.lower)}

    def to_toml(self) -> str:
        """The recipe as TOML that :func:`load` reads back into an equal recipe."""
        d = self.to_dict()
        lines = [f"{k} = {_toml_value(d.pop(k))}" for k in ("name", "description")]
        for table, values in d.items():
            lines += ["", f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
            for sub, inner in ((k, v) for k, v in values.items() if isinstance(v, dict)):
                lines += ["", f"[{table}.{sub}]"] + [f"{k} = {_toml_value(v)}" for k, v in inner.items()]
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table(d: dict, key: str, cls: type) -> dict:
    t = d.pop(key, None)
    if t is None:
        return {}
    if isinstance(t, cls):
        return dataclasses.asdict(t)
    if not isinstance(t, Mapping):
        raise ValueError(f"recipe field {key!r} must be a table, got {t!r}")
    return dict(t)


def _check_keys(table: dict, cls: type, where: str) -> None:
    for key in table:
        if key not in field_names(cls):
            raise unknown_field(key, field_names(cls), where)


def _unknown_top(key: str, method: str) -> ValueError:
    """The error for a top-level ``key`` no table has, with the closest names by their place in the tables."""
    where = {k: k for k in _TOP}
    where.update({k: f"merge.{k}" for k in config_of(method).field_names()})
    where.update({k: f"search.{k}" for k in field_names(Search)})
    where.update({k: f"lower.{k}" for k in field_names(Lower)})
    where.update({k: f"quantize.{k}" for k in COMMON})
    return ValueError(f"unknown recipe field {key!r}{did_you_mean(key, where, show=lambda k: repr(where[k]))} "
                      f"(method {method!r}); a recipe holds {list(_TOP)}, its method's fields in [merge]: "
                      f"{list(config_of(method).field_names())}")


def _build(d: Mapping[str, Any], base: "Recipe | None" = None, name: str | None = None) -> Recipe:
    """A validated recipe from nested tables (old names already migrated), on top of ``base`` (default: the
    defaults)."""
    d = dict(d)
    fresh, base = base is None, base if base is not None else Recipe()
    given = d.pop("merge", None)
    cfg_given = given if isinstance(given, MethodConfig) else None
    merge = {} if cfg_given is not None else _table({"merge": given}, "merge", MethodConfig)
    method = cfg_given.method if cfg_given is not None else merge.pop("method", base.merge.method)
    check_method(method)
    cls = config_of(method)
    for k in d:
        if k not in _TOP:
            raise _unknown_top(k, method)
    lower = _table(d, "lower", Lower)
    _check_keys(lower, Lower, "table [lower]")
    search = _table(d, "search", Search)
    _check_keys(search, Search, "table [search]")
    given_q = d.pop("quantize", None)
    quantize = given_q if isinstance(given_q, Quantize) else base.quantize.updated(
        _table({"quantize": given_q}, "quantize", Quantize))
    if name is not None and "name" not in d:
        d["name"] = name
    if cfg_given is not None:
        cfg = cfg_given
    else:
        old = {} if fresh else {k: v for k, v in base.merge.to_dict().items() if k in cls.field_names()}
        cfg = cls.build({**old, **merge}, method)
    return dataclasses.replace(base, merge=cfg, quantize=quantize, search=dataclasses.replace(base.search, **search),
                               lower=dataclasses.replace(base.lower, **lower), **d)


def from_dict(d: Mapping[str, Any], name: str | None = None) -> Recipe:
    """Build a validated recipe from a plain mapping (as read from TOML) of nested tables."""
    return _build(migrate(d), name=name)


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"tome:merge.r=8,lower.target=eager"`` -> ("tome", {"merge": {"r": 8}, "lower": {"target": "eager"}}): each
    key a field's dotted name, each value an int, a float, true/false or text."""
    name, _, rest = spec.partition(":")
    overrides: dict = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        *tables, key = k.split(".")
        into = overrides
        for t in tables:
            into = into.setdefault(t, {})
            if not isinstance(into, dict):
                raise ValueError(f"recipe spec {spec!r} gives {t!r} both a value and fields")
        into[key] = _spec_value(v)
    return name, overrides


def _spec_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            continue
    return {"true": True, "false": False}.get(v.lower(), v)


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
    """Load a recipe from a name (``recipes/NAME.toml``), a path, a dict, or a Recipe; apply overrides (tables, as
    :meth:`Recipe.replace` takes them). Old names in the file, the dict and the overrides are said in one warning."""
    said: list[str] = []
    if isinstance(spec, Recipe):
        recipe = spec
    elif isinstance(spec, Mapping):
        recipe = _build(_rewrite(spec, said))
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
            recipe = _build(_rewrite(data, said), name=path.stem)
        except ValueError as e:
            raise ValueError(f"recipe file {path}: {e}") from None
    else:
        raise TypeError(f"recipe must be a name, path, dict or Recipe, not {type(spec).__name__}")
    if overrides:
        recipe = _build(_rewrite(overrides, said, base=recipe), base=recipe)
    deprecated(said)
    return recipe


def _rewrite(d: Mapping[str, Any], said: list, base: "Recipe | None" = None) -> dict:
    new, more = rewrite(d, base)
    said += more
    return new
