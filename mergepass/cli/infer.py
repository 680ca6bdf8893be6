"""``python -m mergepass.infer``: logits or pooled features of every image in a folder, as Parquet.

    python -m mergepass.infer --model vit_small_patch14_dinov2 --checkpoint W.safetensors \\
        --images DIR --recipe tome_int8 --outputs features --out features.parquet [--engine ray --workers 4]

Every image under ``--images`` is read: those in the folder and in its subfolders, at any depth, in path
order (``labels.csv`` is not consulted; hidden files and folders, such as ``.ipynb_checkpoints``, are
ignored). An image that cannot be read is skipped and named on stderr.

The model is compiled once, here, into a package (``--package``, kept for reuse); the images then run
through it in this process (``--engine local``, the default, with a progress bar) or in a Ray Data actor
pool (``--engine ray``: each actor loads the package once and never compiles). int8 recipes calibrate on
the first ``--calib-images`` images. The Parquet file has one row per image: ``file`` and ``output``; an
existing ``--out`` is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import sys
import tempfile
from pathlib import Path

from ..eval import batch_inference as bi
from ..eval import data, models
from ..recipe import load
from .args import add_override_args, batch, check_img_size, check_out, model_parser, overrides_from, positive, run


def main(argv=None) -> int:
    p = model_parser("python -m mergepass.infer", __doc__)
    p.add_argument("--images", required=True, help="image folder: every image in it and its subfolders, hidden "
                   "ones excepted")
    p.add_argument("--recipe", default="tome_int8")
    p.add_argument("--outputs", choices=bi.OUTPUTS, default="logits")
    p.add_argument("--out", required=True, help="Parquet file to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--check-inputs", action="store_true",
                   help="stop, naming the image, if one gives NaN or inf values once preprocessed (static int8 "
                        "would return finite, meaningless outputs for it)")
    p.add_argument("--batch-size", type=batch, default=32)
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=positive, default=2, help="Ray actors (--engine ray)")
    p.add_argument("--calib-images", type=positive, default=64)
    p.add_argument("--package", default=None, help="where to keep the compiled package (default: a temporary file)")
    p.add_argument("--no-progress", action="store_true")
    add_override_args(p)
    args = p.parse_args(argv)
    return run(lambda: _run(args))


def _check_out(args) -> None:
    check_out(args.out)
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"--out {args.out} exists: pass --overwrite to replace it")


def _calibration(files: list[str], limit: int, prep: dict):
    """Calibration batches from the first ``limit`` readable images of ``files``."""
    _, x, _ = bi.read_images(files[:limit], prep)
    if not len(x):
        raise ValueError(f"none of the first {min(limit, len(files))} images could be read, for calibration")
    return data.batches(x, min(len(x), 8)) or [x]


def _say_skipped(files: list[str], names: list[str]) -> None:
    """Name each image that was not read, with why (one line each), after a count."""
    done = set(names)
    skipped = [f for f in files if f not in done]
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''}:", file=sys.stderr)
    for f in skipped:
        try:
            data.open_image(f)
            why = f"image {f} was not read"
        except ValueError as e:
            why = str(e)
        print(f"  {why}", file=sys.stderr)


def _run(args) -> int:
    _check_out(args)
    recipe = load(args.recipe, **overrides_from(args))
    kw = {"num_classes": 0} if "dinov2" in args.model else {}
    model = models.create(args.model, img_size=args.img_size, checkpoint=args.checkpoint, **kw)
    check_img_size(model, args.img_size)
    prep = data.data_config(model, args.img_size, crop_pct=0.875 if "dinov2" in args.model else None)
    files = [str(p) for p in data.find_images(args.images)]
    if not files:
        raise data.no_images(args.images)
    calib = _calibration(files, args.calib_images, prep) if recipe.quantize.enabled else None
    with tempfile.TemporaryDirectory() as tmp:
        package = bi.build_package(model, recipe, args.package or Path(tmp) / "model.pt2", img_size=args.img_size,
                                   calibration=calib, outputs=args.outputs)
        print(f"compiled {args.model} ({args.recipe}) into {package}", file=sys.stderr, flush=True)
        if args.engine == "ray":
            names, rows = bi.run_ray(package, files, prep, args.batch_size, args.workers,
                                     check_inputs=args.check_inputs)
        else:
            names, rows = bi.run_local(package, files, prep, args.batch_size, progress=not args.no_progress,
                                       check_inputs=args.check_inputs)
    _say_skipped(files, names)
    out = bi.write_parquet(names, rows, args.out)
    skipped = len(files) - len(names)
    print(f"wrote {len(names)} rows to {out}" + (f" ({skipped} unreadable images skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
