"""Random small ViT architectures x random recipes: the pass must either match the eager reference
of its own schedule, or decline (warning) and reproduce the unmerged model. Never raise.

    python tests/fuzz_vits.py --cases 200        # the long run; CI runs a few seeds via test_fuzz.py
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))

import mergepass  # noqa: E402
from reference import reference_forward  # noqa: E402


@dataclass
class Arch:
    """A small timm ViT: every construct the matcher must handle or decline. With ``position`` "rope"
    (EVA) or "relpos", ``qk_norm`` picks the variant instead: an absolute embedding beside RoPE, or a
    bias-table (not MLP) relative position."""

    heads: int
    head_dim: int
    patch: int
    grid: int
    depth: int
    mlp_ratio: float
    num_classes: int
    distilled: bool
    cls: bool
    reg: int
    token_pool: bool
    init_values: Optional[float]
    qk_norm: bool
    fused: bool
    batch: int
    position: str = "absolute"  # "absolute" | "rope" (EVA) | "relpos" (relative position bias)

    def build(self):
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos

        from mergepass.eval.zoo import perturb_constants
        img = self.patch * self.grid
        kw = dict(img_size=img, patch_size=self.patch, embed_dim=self.heads * self.head_dim, depth=self.depth,
                  num_heads=self.heads, mlp_ratio=self.mlp_ratio, num_classes=self.num_classes,
                  init_values=self.init_values)
        pool = "token" if (self.cls and self.token_pool) else "avg"
        if self.position == "rope":
            model = Eva(class_token=self.cls, num_reg_tokens=self.reg, global_pool=pool, use_rot_pos_emb=True,
                        use_abs_pos_emb=self.qk_norm, **kw)
        elif self.position == "relpos":
            model = VisionTransformerRelPos(class_token=self.cls, global_pool=pool,
                                            rel_pos_type="bias" if self.qk_norm else "mlp", **kw)
        elif self.distilled:
            model = VisionTransformerDistilled(global_pool="token", qk_norm=self.qk_norm, **kw)
        else:
            model = VisionTransformer(class_token=self.cls, reg_tokens=self.reg, global_pool=pool,
                                      qk_norm=self.qk_norm, **kw)
        for blk in model.blocks:
            blk.attn.fused_attn = self.fused
        perturb_constants(model)  # zero bias tables and tiny layer scales would hide position errors
        return model.eval(), torch.randn(self.batch, 3, img, img)


def random_case(seed: int):
    """(arch, recipe method, overrides) for one seed."""
    rng = random.Random(seed)
    position = rng.choice(["absolute", "absolute", "rope", "relpos"])
    distilled = position == "absolute" and rng.random() < 0.15
    arch = Arch(heads=rng.choice([1, 2, 4]), head_dim=rng.choice([8, 16, 24]), patch=rng.choice([8, 14, 16]),
                grid=rng.randint(2, 7), depth=rng.randint(1, 4), mlp_ratio=rng.choice([2.0, 4.0]),
                num_classes=rng.choice([0, 10]), distilled=distilled, cls=True if distilled else rng.random() < 0.75,
                reg=0 if distilled else rng.choice([0, 0, 1, 4]), token_pool=rng.random() < 0.6,
                init_values=rng.choice([None, None, 0.1]), qk_norm=rng.random() < 0.25, fused=rng.random() < 0.7,
                batch=rng.choice([1, 2]), position=position)
    if position == "relpos":
        arch.reg = 0  # timm's relative-position ViT has no register tokens
    method = rng.choice(["tome", "tome", "dfe", "dfe_lgtm", "tomato"])
    over = dict(r=rng.randint(0, 6), prop_attn=rng.random() < 0.8)
    if method in ("dfe", "dfe_lgtm"):
        over["skip"] = rng.randint(0, arch.depth)
    if method == "dfe_lgtm":
        over["window"] = rng.randint(2, 4)
        over["transition"] = rng.choice(["auto", 1, 2])
    if method == "tomato":
        over = dict(budget=rng.randint(0, arch.grid * arch.grid // 2 + 2), prop_attn=over["prop_attn"])
    else:
        over["protect"] = rng.choice([0, 0, 1, 2])
    return arch, method, over


def check(arch: Arch, method: str, over: dict, seed: int = 0) -> str:
    """'merged', 'unmerged' (the schedule merges nothing) or 'declined' (a MergepassWarning and no
    merging); AssertionError on an output that differs from the eager reference or the plain model."""
    torch.manual_seed(seed)
    model, x = arch.build()
    desc = f"{arch} | {method} {over}"
    torch._dynamo.reset()
    be = mergepass.backend(method, lower="eager", merge=over)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = torch.compile(model, backend=be, dynamic=False, fullgraph=True)(x)
        plain = model(x)
    warned = any(issubclass(w.category, mergepass.MergepassWarning) for w in caught)
    sched = be.schedule
    if sched is None or not sched.merging:
        assert torch.allclose(out, plain, rtol=1e-5, atol=1e-5), f"unmerged output differs: {desc}"
        return "declined" if warned else "unmerged"
    with torch.no_grad():
        ref = reference_forward(model, x, sched, prop_attn=sched.merge.prop_attn)
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    assert err <= 1e-4, f"merged output differs from the reference (rel {err:.2e}): {desc}"
    return "merged"


def expected_outcome(arch: Arch, method: str, over: dict) -> str:
    """What ``check`` must return for a fuzzed timm ViT (a family the matcher supports): 'unmerged' for a
    recipe that asks for no merging, 'declined' (noted) for a ``skip`` (ToMato: ``merge_block``) past the last
    block, else 'merged'."""
    amount = over.get("budget" if method == "tomato" else "r", 0)
    if isinstance(amount, float):  # ToMato's fraction of the patch tokens, rounded as it rounds it
        amount = int(round(amount * arch.grid * arch.grid))
    skip = over.get("merge_block" if method == "tomato" else "skip", 0)
    if not amount:
        return "unmerged"
    if skip != "auto" and skip >= arch.depth:
        return "declined"
    return "merged"


def run_case(seed: int) -> str:
    arch, method, over = random_case(seed)
    return check(arch, method, over, seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--start", type=int, default=0)
    args = p.parse_args(argv)
    counts = {"merged": 0, "unmerged": 0, "declined": 0, "failed": 0}
    t0 = time.time()
    for seed in range(args.start, args.start + args.cases):
        try:
            counts[run_case(seed)] += 1
        except Exception as e:  # noqa: BLE001 - the fuzz reports every failure
            counts["failed"] += 1
            print(f"FAIL seed={seed}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    print(f"fuzz: {args.cases} cases in {time.time() - t0:.0f} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"{args.cases - counts['failed']} passed, {counts['failed']} failed")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
