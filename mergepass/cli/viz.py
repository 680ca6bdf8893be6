"""``python -m mergepass.viz``: merge maps, which patches ended up in the same token.

    python -m mergepass.viz --model vit_small_patch14_dinov2 --checkpoint W.safetensors \
        --image IMG.jpg --recipe dfe_lgtm --out merged.png [--per-block]
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..eval import models
from ..eval.merge_maps import render
from ..recipe import load
from .args import add_override_args, check_img_size, check_out, model_parser, overrides_from, run


def main(argv=None) -> int:
    p = model_parser("python -m mergepass.viz", __doc__)
    p.add_argument("--image", required=True)
    p.add_argument("--recipe", default="tome")
    p.add_argument("--per-block", action="store_true")
    p.add_argument("--out", default="merged.png")
    add_override_args(p)
    args = p.parse_args(argv)
    return run(lambda: _run(args))


def _run(args) -> int:
    check_out(args.out)  # before the model is built and traced
    if not load(args.recipe, **overrides_from(args)).merges:
        raise ValueError(f"nothing to draw: recipe {args.recipe!r} does not merge")
    if not Path(args.image).exists():
        raise FileNotFoundError(f"image not found: {args.image}")
    kw = {"num_classes": 0} if "dinov2" in args.model else {}
    model = models.create(args.model, img_size=args.img_size, checkpoint=args.checkpoint, **kw)
    check_img_size(model, args.img_size)
    out = render(args.image, model, args.recipe, args.out, args.img_size, args.per_block, **overrides_from(args))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
