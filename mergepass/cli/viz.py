"""``python -m mergepass.viz``: merge maps, which patches ended up in the same token.

    python -m mergepass.viz --model vit_small_patch14_dinov2 --checkpoint W.safetensors \
        --image IMG.jpg --recipe dfe_lgtm --out merged.png [--per-block]
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..eval import models
from ..eval.merge_maps import render
from .args import add_override_args, model_parser, overrides_from


def main(argv=None) -> int:
    p = model_parser("python -m mergepass.viz", __doc__)
    p.add_argument("--image", required=True)
    p.add_argument("--recipe", default="tome")
    p.add_argument("--per-block", action="store_true")
    p.add_argument("--out", default="merged.png")
    add_override_args(p)
    args = p.parse_args(argv)
    kw = {"num_classes": 0} if "dinov2" in args.model else {}
    try:
        model = models.create(args.model, img_size=args.img_size, checkpoint=args.checkpoint, **kw)
        if not Path(args.image).exists():
            raise FileNotFoundError(f"image not found: {args.image}")
        out = render(args.image, model, args.recipe, args.out, args.img_size, args.per_block, **overrides_from(args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
