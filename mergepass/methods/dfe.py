"""Dense Feature Extractor: the first blocks stay dense (they build the features matching relies
on), then ToMe; by default ``r`` is matched to ToMe's MACs at ``match_tome_r``."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_method
from .tome import ToMe, ToMeConfig


@dataclass(frozen=True)
class DFEConfig(ToMeConfig):
    """DFE's fields: ToMe's (``skip = "auto"`` is DFE's rule)."""


def default_skip(depth: int) -> int:
    """The DFE paper skips about one sixth of the depth (2 of 12)."""
    return max(1, round(depth / 6)) if depth > 1 else 0


class DFE(ToMe):
    name = "dfe"
    config = DFEConfig
    auto_rank = 1

    def default_skip(self, depth: int) -> int:
        return default_skip(depth)

    def candidate(self, r):
        return self.config(method=self.name, r=r, skip="auto")


register_method(DFE())
