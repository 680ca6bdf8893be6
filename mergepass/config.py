"""What every stage's config is: a frozen dataclass that names a bad or unknown field (torchao's
``quantize_(model, Config())`` pattern). Merge methods' and quantization engines' configs subclass it."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Mapping


def close_names(name: str, allowed, n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The names in ``allowed`` closest to ``name``, best first (difflib's ratio at least ``cutoff``)."""
    return difflib.get_close_matches(name, sorted(allowed), n=n, cutoff=cutoff)


def did_you_mean(name: str, allowed, *, aside: bool = True, show=repr) -> str:
    """The hint for an unknown ``name``: `` (did you mean 'x'?)``, or ``; did you mean 'x'?`` with
    ``aside=False`` (for a message that goes on in parentheses); empty when no name in ``allowed`` is
    close. ``show`` writes each name."""
    close = close_names(name, allowed)
    if not close:
        return ""
    hint = f"did you mean {', '.join(map(show, close))}?"
    return f" ({hint})" if aside else f"; {hint}"


def unknown_field(name: str, allowed, where: str) -> ValueError:
    """The error for a recipe field ``name`` that ``where`` does not have, with close matches."""
    return ValueError(f"unknown recipe field {name!r}{did_you_mean(name, allowed)} for {where}; "
                      f"its fields: {sorted(allowed)}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """ValueError naming recipe field ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"recipe field {name!r} must be one of {choices}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """ValueError naming recipe field ``name`` when ``value`` is not true or false."""
    if not isinstance(value, bool):
        raise ValueError(f"recipe field {name!r} must be true or false, got {value!r}")


def finite_number(v: Any) -> bool:
    """An int or float that is neither NaN nor infinite (NaN passes every ``<`` check unnoticed)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass(frozen=True)
class Config:
    """A stage's own recipe fields. Subclass it (frozen); ``validate`` raises ValueError naming a bad field."""

    def __post_init__(self):
        for f in dataclasses.fields(self):  # TOML arrays arrive as lists: configs hold tuples (hashable, frozen)
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field whose value this stage cannot use."""

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, values: Mapping[str, Any], where: str) -> "Config":
        """From a mapping of this config's fields; a field it lacks is a ValueError naming it and ``where``."""
        for k in values:
            if k not in cls.field_names():
                raise unknown_field(k, cls.field_names(), where)
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
