"""A static token schedule: per block, how many tokens go in, how they merge, how many come out.

Every number is a Python int, so the compiled graph has fixed shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..methods import BlockSchedule, MethodConfig


@dataclass
class Schedule:
    merge: "MethodConfig"          # the method's config, its model-dependent fields resolved
    blocks: list["BlockSchedule"]
    batch: int
    tokens: int
    prefix: int
    grid: Optional[tuple[int, int]]
    width: int
    base_macs: int                 # per image, unmerged
    macs: int                      # per image, merged
    notes: list[str] = field(default_factory=list)
    model: str = ""
    resolved: dict = field(default_factory=dict)  # the method's recipe fields, as resolved
    adjusted: list[str] = field(default_factory=list)  # where the plan departs from the recipe (warned once)
    kernels: list[str] = field(default_factory=list)   # the kernels chosen for this graph, and on what evidence
    recipe_name: str = ""          # for the table's header: the recipe's name
    quantize: str = "off"          # and its quantization (Quantize.label)

    @property
    def merging(self) -> bool:
        return any(b.merged for b in self.blocks)

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.base_macs if self.base_macs else 1.0

    @property
    def predicted_speedup(self) -> float:
        return self.base_macs / self.macs if self.macs else 1.0

    @property
    def final_tokens(self) -> int:
        return self.blocks[-1].tokens_out if self.blocks else self.tokens

    def token_counts(self) -> list[tuple[int, int]]:
        return [(b.tokens_in, b.tokens_out) for b in self.blocks]

    def table(self) -> str:
        head = [f"mergepass plan: {self.model or 'model'}  recipe={self.recipe_name} method={self.merge.method}",
                "resolved: " + " ".join(f"{k}={v}" for k, v in self.resolved.items())
                + f"  prop_attn={self.merge.prop_attn}  quantize={self.quantize}"]
        g = f"{self.grid[0]}x{self.grid[1]}" if self.grid else "unknown"
        head.append(f"input: batch {self.batch}, {self.tokens} tokens ({self.prefix} protected, grid {g}), width {self.width}")
        w = max([14] + [len(b.name) + 1 for b in self.blocks])
        rows = [f"{'block':<{w}}{'method':<18}{'tokens in':>10}{'merged':>8}{'tokens out':>11}{'GMACs':>9}  note"]
        for b in self.blocks:
            rows.append(f"{b.name:<{w}}{b.label or b.kind:<18}{b.tokens_in:>10}{b.merged:>8}{b.tokens_out:>11}"
                        f"{b.macs * self.batch / 1e9:>9.3f}  {b.note}")
        tail = [f"total GMACs (batch {self.batch}): {self.macs * self.batch / 1e9:.3f} merged vs "
                f"{self.base_macs * self.batch / 1e9:.3f} unmerged; MACs ratio {self.macs_ratio:.3f}; "
                f"predicted speedup {self.predicted_speedup:.2f}x (MACs model)"]
        tail += [f"note: {p}" for p in self.notes] + list(self.kernels)
        return "\n".join(head + rows + tail)

