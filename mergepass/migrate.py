"""The one place a recipe's older names are read: :func:`migrate` rewrites a recipe mapping in the flat layout into
nested tables and says once, in a DeprecationWarning, which old names it rewrote.

The flat layout: ``method``, ``prop_attn``, ``merge_kernel`` and the method's fields (``r = 16``) at the top,
``lower = "eager"``, ``attention_kernel``, the search targets at the top, ``quantize_<field>`` keywords, an engine's
field in ``[quantize]`` itself, and a method's renamed fields (ToMato's ``skip``, now ``merge_block``).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Optional

from .methods import AUTO, MethodConfig, config_of, method_names
from .quantize import engine_names, get_engine
from .quantize.config import COMMON
from .tables import Search, field_names

if TYPE_CHECKING:
    from .recipe import Recipe

_MERGE = {"method": "method", "prop_attn": "prop_attn", "merge_kernel": "kernel"}  # old name -> [merge] key
_LOWER = {"lower": "target", "attention_kernel": "attention_kernel", "attention_tolerance": "attention_tolerance"}
# A flat file written before recipes had tables names every method's fields, the chosen method's and the others'
# at these values: the others are dropped (and said so).
_FLAT_DEFAULTS = {"r": 16, "skip": 0, "window": AUTO, "transition": AUTO, "match_tome_r": 0, "budget": 0.2,
                  "similarity": "softmax", "partition": "patches", "protect": 0}


def migrate(d: Mapping[str, Any], *, base: Optional["Recipe"] = None) -> dict:
    """``d`` with its old names rewritten to nested tables, and one DeprecationWarning naming each (none when
    ``d`` uses none). ``base``: the recipe ``d`` overrides (its method and engine place the flat fields)."""
    new, said = rewrite(d, base)
    deprecated(said)
    return new


def deprecated(said: list[str]) -> None:
    """One DeprecationWarning naming every old name in ``said`` (``old -> new``); nothing when it is empty."""
    if said:
        warnings.warn("mergepass: recipe fields by their old names (" + "; ".join(said) + "): use the new names, "
                      "the old ones will stop working", DeprecationWarning, stacklevel=_outside_stacklevel())


def rewrite(d: Mapping[str, Any], base: Optional["Recipe"] = None) -> tuple[dict, list[str]]:
    """(``d`` in nested tables, what was rewritten as ``old -> new``). Names no table has stay where they are,
    for the recipe to reject by name."""
    d, said = dict(d), []
    tables = {t: _copy(d, t) for t in ("merge", "quantize", "search", "lower")}
    for old in [k for k in d if k.startswith("quantize_")]:
        _move(d, old, tables["quantize"], old[len("quantize_"):], said, f"quantize.{old[len('quantize_'):]}")
    for old, new in _LOWER.items():
        _move(d, old, tables["lower"], new, said, f"lower.{new}")
    for old, new in _MERGE.items():
        _move(d, old, tables["merge"], new, said, f"merge.{new}")
    for old in field_names(Search):
        _move(d, old, tables["search"], old, said, f"search.{old}")
    merge = tables["merge"]
    if isinstance(merge, dict):
        method = merge.get("method", base.merge.method if base is not None else "tome")
        _merge_fields(d, merge, method, said)
    q = tables["quantize"]
    if isinstance(q, dict):
        engine = q.get("engine", base.quantize.engine if base is not None else "auto")
        _engine_fields(q, engine, said)
    for t, table in tables.items():
        if table or t in d:
            d[t] = table
    return d, said


def _copy(d: dict, table: str):
    """A copy of table ``table`` of ``d`` to add to ({} if absent); a config object or a non-table as it is."""
    t = d.get(table)
    if t is None or (table == "lower" and isinstance(t, str)):
        return {}
    return dict(t) if isinstance(t, Mapping) else t


def _move(d: dict, old: str, table, new: str, said: list, shown: str) -> None:
    if old in d and isinstance(table, dict) and not (old == "lower" and not isinstance(d[old], str)):
        table[new] = d.pop(old)
        said.append(f"{old} -> {shown}")


def _merge_fields(d: dict, merge: dict, method: str, said: list) -> None:
    """The method's fields from the top level into ``merge``, renamed ones under their new names; another method's
    field at the flat layout's default is dropped."""
    if method not in method_names():
        return  # the recipe names the unknown method
    cls = config_of(method)
    renamed = cls.renamed
    for old, new in renamed.items():
        if old in merge and new not in merge:
            merge[new] = merge.pop(old)
            said.append(f"merge.{old} -> merge.{new} (method {method!r})")
    # the fields every method shares moved above by their old names (_MERGE); a top-level "kernel" was never one
    known = {f for m in method_names() for f in config_of(m).field_names()} - set(MethodConfig.field_names())
    for k in [k for k in d if k in known]:
        v = d.pop(k)
        if k in renamed:
            merge[renamed[k]] = v
            said.append(f"{k} -> merge.{renamed[k]} (method {method!r})")
        elif k not in cls.field_names() and k in _FLAT_DEFAULTS and v == _FLAT_DEFAULTS[k] \
                and type(v) is type(_FLAT_DEFAULTS[k]):
            said.append(f"{k} = {v!r} dropped (not a field of method {method!r})")
        else:
            merge[k] = v
            said.append(f"{k} -> merge.{k}")


def _engine_fields(q: dict, engine: str, said: list) -> None:
    """Engine fields given in ``[quantize]`` itself into their engine's table: the chosen engine's, or (engine
    ``auto``) every engine's that has the field."""
    if engine != "auto" and engine not in engine_names():
        return  # the recipe names the unknown engine
    for k in [k for k in q if k not in COMMON and k not in engine_names()]:
        having = [n for n in engine_names() if k in get_engine(n).config.field_names()]
        if not having:
            continue  # no engine's field: the recipe rejects it by name
        if engine != "auto":
            having = [engine]  # the engine's table names the field when the engine lacks it
        v = q.pop(k)
        for n in having:
            sub = q.setdefault(n, {})
            if isinstance(sub, Mapping):
                q[n] = {**sub, k: v}
        said.append(f"quantize.{k} -> " + ", ".join(f"quantize.{n}.{k}" for n in having))


def _outside_stacklevel() -> int:
    """The stacklevel of the first caller outside mergepass: Python shows a DeprecationWarning by default only when
    it is attributed to the code that triggered it."""
    here, level = os.path.dirname(__file__), 3
    frame = sys._getframe(3)
    while frame is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    return level
