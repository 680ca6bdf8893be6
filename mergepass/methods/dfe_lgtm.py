"""DFE + Local-Global Token Merging (Algorithm 1 of the DFE+LGTM paper): after the dense blocks,
merge inside windows whose side grows by one per block while the tokens still fill at least 2x2
windows (or for ``transition`` blocks), then merge globally as ToMe does."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from ..merge import window_layout, window_merge
from ..merge.fused import fused_window_merge
from .base import AUTO, Merge, MergeOp, check_int_or_auto, register_method, register_op
from .dfe import DFE, DFEConfig
from .tome import block_r, global_step, partition_offset, protect_count

register_op(MergeOp("local", window_merge, fused_window_merge))


@dataclass(frozen=True)
class DFELGTMConfig(DFEConfig):
    """DFE's fields, and LGTM's windows."""

    window: Union[int, str] = AUTO      # initial window side, in tokens ("auto": the paper's rule)
    transition: Union[int, str] = AUTO  # number of local blocks ("auto": Algorithm 1's rule)

    def validate(self) -> None:
        super().validate()
        check_int_or_auto("window", self.window, minimum=2)
        check_int_or_auto("transition", self.transition)


def default_window(grid: tuple[int, int]) -> int:
    """The largest window side that divides the grid into at least 2x2 windows (7 for 14x14)."""
    h = min(grid)
    divisors = [d for d in range(2, h // 2 + 1) if h % d == 0]
    return max(divisors) if divisors else max(2, math.ceil(h / 2))


def window_grid(tokens: int, grid: tuple[int, int], side: int) -> tuple[int, int]:
    """Windows per axis for ``tokens`` tokens spread over the grid's aspect ratio."""
    gh, gw = grid
    scale = math.sqrt(tokens / (gh * gw))
    return max(1, math.ceil(round(gh * scale) / side)), max(1, math.ceil(round(gw * scale) / side))


class DFELGTM(DFE):
    name = "dfe_lgtm"
    config = DFELGTMConfig
    needs_grid = True
    fields = ("r", "skip", "window", "transition", "protect")
    search_keeps = ("transition",)  # "auto" follows the searched r, so it is resolved per candidate
    auto_rank = 0

    def resolve(self, cfg, match, limit):
        if cfg.window == AUTO:
            cfg = cfg.replace(window=default_window(match.grid))
        cfg = super().resolve(cfg, match, limit)
        if cfg.transition == AUTO:
            local = sum(1 for p in self.plan_blocks(cfg, match, limit) if p.kind == "local")
            cfg = cfg.replace(transition=local)
        return cfg

    def decide(self, cfg, block, tokens, match, state):
        if block.index < cfg.skip or block_r(cfg.r, block.index) <= 0:
            return None
        done = state.setdefault("local_done", 0)
        side = cfg.window + done
        nh, nw = window_grid(tokens - match.prefix, match.grid, side)
        auto = cfg.transition == AUTO
        local = nh * nw >= 2 and not state.get("global") and (auto or done < cfg.transition)
        if not local:
            state["global"] = auto  # Algorithm 1: once global, global for good
            return global_step(block, tokens, match.prefix, cfg.r, cfg.skip, partition_offset(cfg, match),
                               protect_count(cfg.protect, match))
        nwin = nh * nw
        per, pad = window_layout(tokens - match.prefix, nwin)
        rw = math.ceil(block_r(cfg.r, block.index) / nwin)
        take = min(rw, max(0, (per - pad) // 2))
        state["local_done"] = done + 1
        note = f"w={side}, {per} tok/win, {take}/win" + (f" (clamped {rw}->{take})" if take < rw else "")
        detail = {"window_side": side, **({"clamped": (rw, take), "field": "r per window"} if take < rw else {})}
        return Merge("local", take, take * nwin, args={"grid": match.grid, "windows": (nh, nw)}, note=note,
                     label=f"local {nh}x{nw} win", detail=detail)

    def notes(self, asked, cfg, match, plans):
        out = super().notes(asked, cfg, match, plans)
        first = next((p for p in plans if p.index >= cfg.skip and p.kind != "off"), None)
        if first is not None and asked.r not in (0, AUTO) and asked.transition != 0:
            nh, nw = window_grid(first.tokens_in - match.prefix, match.grid, cfg.window)
            if nh * nw < 2:
                g = f"{match.grid[0]}x{match.grid[1]}"
                out.append(f"window={cfg.window} gives {nh}x{nw} window on the {g} grid (LGTM needs at least "
                           "2x1): the blocks merge globally (ToMe) instead")
        return out

    def candidate(self, r):
        return self.config(method=self.name, r=r, skip="auto")


register_method(DFELGTM())
