"""Static token schedules: per block, how many tokens go in, how they merge, how many come out.

Computed offline from the matched graph (token count, protected prefix, patch grid, depth) and a
recipe. Every number here is a Python int, so the compiled graph has fixed shapes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from .match import MatchResult
from .merge.methods import checkerboard, window_layout
from .recipe import AUTO, Recipe


@dataclass
class BlockPlan:
    index: int
    name: str
    kind: str                      # dense | global | local | adjacent | off
    tokens_in: int
    tokens_out: int
    r: int = 0                     # merges asked for (per window for local)
    windows: Optional[tuple[int, int]] = None
    window_side: Optional[int] = None
    macs: int = 0                  # per image
    note: str = ""

    @property
    def merged(self) -> int:
        return self.tokens_in - self.tokens_out


@dataclass
class Schedule:
    recipe: Recipe                 # with model-dependent fields resolved
    blocks: list[BlockPlan]
    batch: int
    tokens: int
    prefix: int
    grid: Optional[tuple[int, int]]
    width: int
    base_macs: int                 # per image, unmerged
    macs: int                      # per image, merged
    problems: list[str] = field(default_factory=list)
    model: str = ""

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
        r = self.recipe
        head = [f"mergepass plan: {self.model or 'model'}  recipe={r.name} method={r.method}"]
        res = {"r": r.r, "skip": r.skip}
        if r.method == "dfe_lgtm":
            res.update(window=r.window, transition=r.transition)
        if r.method == "tomato":
            res = {"skip": r.skip, "budget": r.budget}
        head.append("resolved: " + " ".join(f"{k}={v}" for k, v in res.items())
                    + f"  prop_attn={r.prop_attn}  quantize={'int8-' + r.quantize.mode if r.quantize.enabled else 'off'}")
        g = f"{self.grid[0]}x{self.grid[1]}" if self.grid else "unknown"
        head.append(f"input: batch {self.batch}, {self.tokens} tokens ({self.prefix} protected, grid {g}), width {self.width}")
        w = max([14] + [len(b.name) + 1 for b in self.blocks])
        rows = [f"{'block':<{w}}{'method':<18}{'tokens in':>10}{'merged':>8}{'tokens out':>11}{'GMACs':>9}  note"]
        for b in self.blocks:
            kind = b.kind
            if b.kind == "local":
                kind = f"local {b.windows[0]}x{b.windows[1]} win"
            rows.append(f"{b.name:<{w}}{kind:<18}{b.tokens_in:>10}{b.merged:>8}{b.tokens_out:>11}"
                        f"{b.macs * self.batch / 1e9:>9.3f}  {b.note}")
        tail = [f"total GMACs (batch {self.batch}): {self.macs * self.batch / 1e9:.3f} merged vs "
                f"{self.base_macs * self.batch / 1e9:.3f} unmerged; MACs ratio {self.macs_ratio:.3f}; "
                f"predicted speedup {self.predicted_speedup:.2f}x (MACs model)"]
        for p in self.problems:
            tail.append(f"note: {p}")
        return "\n".join(head + rows + tail)


def block_macs(b, n_in: int, n_out: int) -> int:
    return n_in * b.lin_attn + 2 * n_in * n_in * b.attn_dim + n_out * b.lin_mlp


def default_skip(depth: int) -> int:
    """The DFE paper skips about one sixth of the depth (2 of 12)."""
    return max(1, round(depth / 6)) if depth > 1 else 0


def default_window(grid: tuple[int, int]) -> int:
    """The largest window side that divides the grid into at least 2x2 windows (7 for 14x14)."""
    h = min(grid)
    divisors = [d for d in range(2, h // 2 + 1) if h % d == 0]
    return max(divisors) if divisors else max(2, math.ceil(h / 2))


def _window_grid(m_tok: int, grid: tuple[int, int], side: int) -> tuple[int, int]:
    """Windows per axis for ``m_tok`` tokens spread over the grid's aspect ratio."""
    gh, gw = grid
    scale = math.sqrt(m_tok / (gh * gw))
    return max(1, math.ceil(round(gh * scale) / side)), max(1, math.ceil(round(gw * scale) / side))


def _simulate(match: MatchResult, recipe: Recipe, limit: int, r: int, skip: int,
              window: int, transition: Optional[int], budget: int) -> list[BlockPlan]:
    plans = []
    n, p = match.tokens, match.prefix
    local_done = 0
    for b in match.blocks:
        n_in = n
        m_tok = n - p
        plan = BlockPlan(b.index, b.name, "dense", n_in, n_in)
        if b.index >= limit:
            plan.kind = "off"
        elif recipe.method == "tomato":
            if b.index == skip and budget > 0:
                ma = len(checkerboard(match.grid)[0])
                take = min(budget, ma)
                plan.kind, plan.r = "adjacent", take
                plan.tokens_out = n_in - take
                if take < budget:
                    plan.note = f"budget clamped {budget}->{take}"
        elif recipe.method in ("tome", "dfe", "dfe_lgtm") and b.index >= skip and r > 0:
            local = False
            if recipe.method == "dfe_lgtm":
                side = window + local_done
                nh, nw = _window_grid(m_tok, match.grid, side)
                if transition is None:
                    local = nh * nw >= 2
                else:
                    local = local_done < transition and nh * nw >= 2
            if local:
                nwin = nh * nw
                per, pad = window_layout(m_tok, nwin)
                rw = math.ceil(r / nwin)
                take = min(rw, max(0, (per - pad) // 2))
                plan.kind, plan.r, plan.windows, plan.window_side = "local", take, (nh, nw), side
                plan.tokens_out = n_in - take * nwin
                plan.note = f"w={side}, {per} tok/win, {take}/win"
                if take < rw:
                    plan.note += f" (clamped {rw}->{take})"
                local_done += 1
            else:
                take = min(r, m_tok // 2)
                plan.kind, plan.r = "global", take
                plan.tokens_out = n_in - take
                if recipe.method == "dfe_lgtm" and transition is None:
                    local_done = 10 ** 6  # transition happened: global from here on
                if take < r:
                    plan.note = f"r clamped {r}->{take}"
            if plan.tokens_out == n_in:
                plan.kind = "dense"
        n = plan.tokens_out
        plan.macs = block_macs(b, plan.tokens_in, plan.tokens_out)
        plans.append(plan)
    return plans


def _total(match: MatchResult, plans: list[BlockPlan]) -> int:
    return sum(p.macs for p in plans) + match.other_macs


def make_schedule(match: MatchResult, recipe: Recipe, limit: Optional[int] = None, model: str = "") -> Schedule:
    """Resolve the recipe's model-dependent fields and compute the static per-block schedule.

    ``limit``: blocks from this index on are not merged (used when a block cannot be rewritten).
    """
    if not match.ok:
        raise ValueError("cannot schedule: no transformer blocks matched")
    depth = len(match.blocks)
    limit = depth if limit is None else limit
    method = recipe.method
    needs_grid = method in ("dfe_lgtm", "tomato")
    if needs_grid and match.grid is None:
        raise ValueError(f"recipe method {method!r} needs the patch grid, which was not found in the graph")

    skip = recipe.skip
    if skip == AUTO:
        skip = default_skip(depth) if method in ("dfe", "dfe_lgtm") else 0
    if skip > depth:
        raise ValueError(f"recipe field 'skip' is {skip} but the model has only {depth} blocks")
    window = recipe.window
    if method == "dfe_lgtm" and window == AUTO:
        window = default_window(match.grid)
    window = window if isinstance(window, int) else 0
    transition = None if recipe.transition == AUTO else recipe.transition
    patches = match.tokens - match.prefix

    def plans_for(r: int = 0, budget: int = 0):
        return _simulate(match, recipe, limit, r, skip, window, transition, budget)

    base = _total(match, _simulate(match, recipe.replace(method="none"), 0, 0, 0, 0, None, 0))
    r, budget = recipe.r, 0
    if method == "tomato":
        budget = recipe.budget
        if budget == AUTO:
            goal = _total(match, _simulate(match, recipe.replace(method="tome"), limit, recipe.match_tome_r, 0, 0, None, 0))
            ma = len(checkerboard(match.grid)[0])
            budget = min(range(ma + 1), key=lambda b: abs(_total(match, plans_for(budget=b)) - goal))
        elif isinstance(budget, float):
            budget = int(round(budget * patches))
        r = 0
    elif r == AUTO:
        goal = _total(match, _simulate(match, recipe.replace(method="tome"), limit, recipe.match_tome_r, 0, 0, None, 0))
        r = min(range(patches // 2 + 1), key=lambda x: abs(_total(match, plans_for(r=x)) - goal))
    plans = plans_for(r=r, budget=budget)
    if transition is None and method == "dfe_lgtm":
        transition = sum(1 for p in plans if p.kind == "local")
    resolved = dataclasses.replace(
        recipe,
        r=r if method != "tomato" else recipe.r,
        skip=skip,
        window=window if method == "dfe_lgtm" else recipe.window,
        transition=transition if method == "dfe_lgtm" else recipe.transition,
        budget=budget if method == "tomato" else recipe.budget,
    )
    problems = list(match.problems)
    for p in plans:
        if p.kind == "off":
            p.note = p.note or "not merged (see notes)"
    return Schedule(resolved, plans, match.batch, match.tokens, match.prefix, match.grid, match.width,
                    base, _total(match, plans), problems, model)
