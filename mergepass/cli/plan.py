"""``python -m mergepass.plan --model vit_base_patch16_224 [--recipe tome] [--r 16]``: print a schedule."""
from __future__ import annotations

import sys

import torch

from ..eval import models
from ..eval.data import batches, data_config, load_images
from ..pipeline import plan
from .args import add_override_args, batch, check_img_size, overrides_from, parser, positive, run


def main(argv=None) -> int:
    p = parser("python -m mergepass.plan", __doc__)
    p.add_argument("--model", required=True, help="timm model name (or tv:NAME for torchvision)")
    p.add_argument("--recipe", default="tome", help="recipe name, path or 'none'")
    p.add_argument("--img-size", type=positive, default=None)
    p.add_argument("--batch", type=batch, default=8)
    p.add_argument("--checkpoint", default=None, help="weights for quality-aware auto-scheduling")
    p.add_argument("--target-speedup", type=float, default=0.0, help="auto: predicted speedup to reach")
    p.add_argument("--max-macs-ratio", type=float, default=0.0, help="auto: merged/unmerged MACs at most")
    p.add_argument("--min-cosine", type=float, default=0.0, help="auto: quality floor (needs --images)")
    p.add_argument("--images", default=None, help="calibration images for the quality floor")
    p.add_argument("--calib-images", type=positive, default=16)
    add_override_args(p)
    args = p.parse_args(argv)
    return run(lambda: _run(args))


def _run(args) -> int:
    model = models.create(args.model, img_size=args.img_size, checkpoint=args.checkpoint)
    size = args.img_size or models.input_size(model)
    check_img_size(model, size)
    x = torch.randn(args.batch, 3, size, size)
    over = overrides_from(args)
    auto = {k: getattr(args, k) for k in ("target_speedup", "max_macs_ratio", "min_cosine") if getattr(args, k)}
    if auto:
        over.update(search=auto, merge={**over.get("merge", {}), "method": "auto"})
    calibration = None
    if args.images:
        imgs, _, _ = load_images(args.images, limit=args.calib_images, **data_config(model, size))
        calibration = batches(imgs, args.batch) or [imgs]
    sched = plan(model, x if calibration is None else calibration[0], args.recipe, model_name=args.model,
                 calibration=calibration, **over)
    print(sched.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
