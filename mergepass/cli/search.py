"""``python -m mergepass.search``: search a static per-block schedule on calibration images and
write it as a recipe TOML.

    python -m mergepass.search --model vit_small_patch14_dinov2 --checkpoint W.safetensors \
        --images DIR --search-images 64 --max-macs-ratio 0.6 --out searched.toml

Only the first ``--search-images`` images are read: keep the rest of the folder for reporting.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..eval.data import batches, data_config, load_images
from ..eval.evaluate import Features, load_model
from ..pipeline import plan
from ..recipe import load
from ..search.evolve import search_schedule
from .args import batch, check_img_size, check_out, model_parser, positive, run


def main(argv=None) -> int:
    p = model_parser("python -m mergepass.search", __doc__)
    p.add_argument("--images", required=True)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--search-images", type=positive, default=64, help="the first N images (the rest stay unseen)")
    p.add_argument("--batch", type=batch, default=16)
    p.add_argument("--recipe", default="tome", help="base recipe (its other fields are kept)")
    p.add_argument("--max-macs-ratio", type=float, default=None, help="MACs budget (default: ToMe at --match-r)")
    p.add_argument("--match-r", type=int, default=16, help="budget = the MACs ratio of constant ToMe r")
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--children", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="recipe TOML to write")
    args = p.parse_args(argv)
    return run(lambda: _run(args))


def _run(args) -> int:
    check_out(args.out)  # before the search, not after it
    load(args.recipe)  # a bad --recipe fails before the model is built
    model = load_model(args.model, args.checkpoint, args.img_size)
    check_img_size(model, args.img_size)
    target = Features(model).eval() if getattr(model, "num_classes", 1) == 0 else model
    cfg = data_config(model, args.img_size, crop_pct=args.crop_pct)
    x, _, _ = load_images(args.images, limit=args.search_images, **cfg)
    search = batches(x, args.batch) or [x]
    budget = args.max_macs_ratio or plan(target, search[0], "tome", merge={"r": args.match_r}).macs_ratio
    res = search_schedule(target, search, args.recipe, budget, iterations=args.iterations,
                          children=args.children, seed=args.seed, log=lambda s: print(s, flush=True))
    name = Path(args.out).stem
    recipe = res.recipe.replace(name=name, description=(
        f"per-block r searched for {args.model} at MACs ratio <= {budget:.3f} on the first {len(x)} images of "
        f"{Path(args.images).name} (python -m mergepass.search, seed {args.seed}); search score {res.score:.5f} "
        f"against {res.start_score:.5f} for constant r"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(recipe.to_toml())
    print(res.schedule.table())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
