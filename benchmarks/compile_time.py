"""Where compile time goes: each recipe compiled in a fresh process, cold (empty inductor and mergepass
caches) and warm (a second process on the same caches), split into mergepass's stages and inductor's.

    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/compile_time.py --model vit_small_patch14_dinov2 \\
        --img-size 224 --recipes tome int8 tome_int8 --batch 8

Each row is one process: "first output" is the time from torch.compile to the first result (capture,
every stage, the first run); "capture+run" is what the named stages leave (dynamo's trace, guards, the
first call). Int8 rows run twice: with the compile cache (AOTInductor packages, the default) and
without it (``MERGEPASS_CACHE=0``: inductor's JIT compile, as before the cache), so one run gives the
before and after. Random weights: compile time does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch, timm
import mergepass
from mergepass import stages
from torch._dynamo.utils import compilation_time_metrics
name, img, batch, recipe = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
m = timm.create_model(name, pretrained=False, img_size=img).eval()
g = torch.Generator().manual_seed(1)
calib = [torch.randn(batch, 3, img, img, generator=g) for _ in range(4)]
x = torch.randn(batch, 3, img, img, generator=g)
be = mergepass.backend(recipe, calibration=calib if "int8" in recipe else None)
start = time.perf_counter()
with torch.no_grad():
    torch.compile(m, backend=be, dynamic=False)(x)
total = time.perf_counter() - start
inductor = {k: sum(v) for k, v in compilation_time_metrics.items() if sum(v) >= 0.2}
print("RESULT " + json.dumps({"total": total, "stages": stages.done(), "inductor": inductor,
                               "cached": [r.cached for r in be.results]}))
"""

# inductor's own timers (torch._dynamo.utils.compilation_time_metrics) grouped as the table shows them
LOWERING = ("GraphLowering.run",)
CODEGEN = ("Scheduler.__init__", "Scheduler.codegen", "GraphLowering.codegen")


def run_child(model: str, img: int, batch: int, recipe: str, env: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, model, str(img), str(batch), recipe], env=env,
                         capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeError(f"{recipe} failed:\n{res.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def row(label: str, r: dict) -> dict:
    st: dict = {}
    for name, sec in r["stages"]:
        st[name] = st.get(name, 0.0) + sec
    ind = r["inductor"]
    lowering = sum(ind.get(k, 0.0) for k in LOWERING)
    codegen = sum(ind.get(k, 0.0) for k in CODEGEN)
    compile_s = st.get("inductor: AOTInductor package", 0.0) + st.get("inductor: compile", 0.0)
    named = sum(st.values())
    return {"run": label, "first output": r["total"], "capture+run": r["total"] - named,
            "match+merge": st.get("match, schedule and merge", 0.0),
            "merge kernel": st.get("fused merge kernel: build or load", 0.0), "attention op": st.get("attention ops", 0.0),
            "cache lookup": st.get("compile cache: key and lookup", 0.0),
            "export+prepare": st.get("int8: export and prepare", 0.0), "calibrate": st.get("int8: calibrate", 0.0),
            "convert": st.get("int8: convert", 0.0), "inductor passes": lowering, "codegen": codegen,
            "C++ build+rest": max(compile_s - lowering - codegen, 0.0), "cached": any(r["cached"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--recipes", nargs="+", default=["tome", "int8", "tome_int8"])
    p.add_argument("--no-jit", action="store_true", help="skip the MERGEPASS_CACHE=0 rows")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    from mergepass.cpu import machine
    print(f"# {machine()}; TORCHINDUCTOR_COMPILE_THREADS={os.environ.get('TORCHINDUCTOR_COMPILE_THREADS', 'unset')}")
    print(f"# {args.model} at {args.img_size} px, batch {args.batch}; seconds")
    rows = []
    for recipe in args.recipes:
        modes = [("cache", {})]
        if "int8" in recipe and not args.no_jit:
            modes.append(("jit", {"MERGEPASS_CACHE": "0"}))
        for mode, extra in modes:
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, **extra, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"),
                       "TORCH_EXTENSIONS_DIR": str(Path(tmp) / "extensions")}
                env.pop("MERGEPASS_CACHE_DIR", None)
                for when in ("cold", "warm"):
                    r = row(f"{recipe} {mode} {when}", run_child(args.model, args.img_size, args.batch, recipe, env))
                    rows.append(r)
                    print(" | ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                          flush=True)
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
