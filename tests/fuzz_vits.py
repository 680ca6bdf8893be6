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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import mergepass  # noqa: E402
from reference import reference_forward  # noqa: E402


def random_case(seed: int):
    """(model, images, recipe name, overrides, description) for one seed."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer
    rng = random.Random(seed)
    heads = rng.choice([1, 2, 4])
    dim = heads * rng.choice([8, 16, 24])
    patch = rng.choice([8, 14, 16])
    grid = rng.randint(2, 7)
    img = patch * grid
    distilled = rng.random() < 0.15
    cls = True if distilled else rng.random() < 0.75
    kw = dict(img_size=img, patch_size=patch, embed_dim=dim, depth=rng.randint(1, 4), num_heads=heads,
              mlp_ratio=rng.choice([2.0, 4.0]), num_classes=rng.choice([0, 10]),
              class_token=cls, reg_tokens=0 if distilled else rng.choice([0, 0, 1, 4]),
              global_pool="token" if (cls and rng.random() < 0.6) else "avg",
              init_values=rng.choice([None, None, 0.1]), qk_norm=rng.random() < 0.25)
    if distilled:
        kw.pop("reg_tokens"), kw.pop("class_token")
        kw["global_pool"] = "token"
    torch.manual_seed(seed)
    model = (VisionTransformerDistilled if distilled else VisionTransformer)(**kw).eval()
    fused = rng.random() < 0.7
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    method = rng.choice(["tome", "tome", "dfe", "dfe_lgtm", "tomato"])
    over = dict(r=rng.randint(0, 6), prop_attn=rng.random() < 0.8)
    if method in ("dfe", "dfe_lgtm"):
        over["skip"] = rng.randint(0, kw["depth"])
    if method == "dfe_lgtm":
        over["window"] = rng.randint(2, 4)
        over["transition"] = rng.choice(["auto", 1, 2])
    if method == "tomato":
        over = dict(budget=rng.randint(0, grid * grid // 2 + 2), prop_attn=over["prop_attn"])
    x = torch.randn(rng.choice([1, 2]), 3, img, img)
    desc = (f"seed={seed} {'distilled ' if distilled else ''}dim={dim} heads={heads} depth={kw['depth']} "
            f"patch={patch} grid={grid} cls={cls} reg={kw.get('reg_tokens', 0)} pool={kw['global_pool']} "
            f"ls={kw['init_values']} qknorm={kw['qk_norm']} fused={fused} | {method} {over}")
    return model, x, method, over, desc


def run_case(seed: int) -> str:
    """'merged', 'unmerged' (schedule merges nothing) or 'declined'; AssertionError on a wrong output."""
    model, x, method, over, desc = random_case(seed)
    torch._dynamo.reset()
    be = mergepass.backend(method, lower="eager", **over)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = torch.compile(model, backend=be, dynamic=False, fullgraph=True)(x)
        plain = model(x)
    declined = [w for w in caught if issubclass(w.category, mergepass.MergepassWarning)]
    sched = be.schedule
    if sched is None or not sched.merging:
        assert torch.allclose(out, plain, rtol=1e-5, atol=1e-5), f"unmerged output differs: {desc}"
        return "declined" if declined else "unmerged"
    with torch.no_grad():
        ref = reference_forward(model, x, sched, prop_attn=sched.recipe.prop_attn)
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    assert err <= 1e-4, f"merged output differs from the reference (rel {err:.2e}): {desc}"
    return "declined" if declined else "merged"


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
