"""Where the time goes: per-forward time by kind of kernel for each contender, and the ratios.

    python benchmarks/breakdown.py --model vit_base_patch16_224 --batch 8 \
        --contenders int8 tome_int8 dfe_lgtm_int8 ov_int8 --rounds 6 --json out/breakdown.json

``ov_int8`` (OpenVINO + NNCF, ``mergepass[bench]``) is profiled by OpenVINO's own per-node counters
(``PERF_COUNT``), grouped the same way: int8 FullyConnected and Convolution -> int8 GEMM; its fused
attention (a Subgraph named after scaled_dot_product_attention, or MHA/SDPA/MatMul/Softmax nodes) ->
attention; the rest -> other kernels.

Kernels are grouped as int8 GEMM (oneDNN qlinear/qconv), attention (SDPA, mergepass's attention ops), merge (the fused merge
kernel, inductor kernels and aten ops that gather, scatter or sort), other kernels (norms,
quantize, adds, ...) and the Python wrapper between them. ``wall`` is the un-profiled median time
per forward; the difference to the kernel sum is overhead the profiler does not attribute (thread
wake-ups, allocation).
Ratios are the first contender's time over each contender's, per group.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from mergepass import compat
from mergepass.cpu import machine
from mergepass.eval import models
from mergepass.eval import peers
from mergepass.eval.evaluate import compile_spec
from mergepass.kernels.attention import KINDS as ATTENTION_KINDS
from mergepass.recipe import parse_spec

GROUPS = ("int8 GEMM", "attention", "merge", "other kernels", "wrapper")
ATTENTION_OPS = tuple(f"mergepass::{kind}_attention" for kind in ATTENTION_KINDS)
OV_ATTENTION = ("ScaledDotProductAttention", "MHA", "MatMul", "Softmax", "SDPA")


def ov_group(node_type: str, exec_type: str, name: str = "") -> str:
    """OpenVINO's nodes in this script's groups."""
    if node_type.startswith(("FullyConnected", "Convolution")):
        return "int8 GEMM" if "I8" in exec_type.upper() or "U8" in exec_type.upper() else "other kernels"
    return "attention" if node_type in OV_ATTENTION or "scaled_dot_product_attention" in name else "other kernels"


def profile_openvino(fn, x, iters: int) -> dict:
    """:func:`profile_one` for an OpenVINO peer built with ``profile=True``: its per-node times."""
    with torch.no_grad():
        fn(x)
        walls, sums = [], []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            walls.append(time.perf_counter() - t0)
            ms = defaultdict(float)
            for node_type, exec_type, name, t in fn.profile():
                ms[ov_group(node_type, exec_type, name)] += t
            sums.append(ms)
    return _row({g: statistics.median(m.get(g, 0.0) for m in sums) for g in GROUPS}, walls)


def _row(ms: dict, walls: list) -> dict:
    """ms per group, their sum, and the median un-profiled wall time per forward."""
    out = {g: ms.get(g, 0.0) for g in GROUPS}
    out["kernel sum"] = sum(out.values())
    out["wall"] = 1e3 * statistics.median(walls)
    return out


def group(key: str) -> str | None:
    if key.startswith("onednn::q"):
        return "int8 GEMM"
    if (key.startswith("aten::") and "scaled_dot_product" in key) or key in ATTENTION_OPS:
        return "attention"
    if key.startswith("## Call CompiledFxGraph"):
        return "wrapper"
    if key.startswith("mergepass::"):  # the fused merge kernel
        return "merge"
    if key.startswith("graph_") or key in ("aten::sort", "aten::scatter_reduce_", "aten::scatter_add_", "aten::bmm", "aten::topk"):
        return "merge" if key == "aten::bmm" or any(w in key for w in ("gather", "scatter", "sort")) else "other kernels"
    return None  # profiler bookkeeping, views, allocations


def jit(spec: str) -> str:
    """A recipe spec compiled by inductor's JIT, whose kernels the profiler sees one by one (the compile
    cache's AOTInductor packages call them from C++, out of the profiler's sight)."""
    return spec if spec in ("eager", "inductor") else spec + ("," if ":" in spec else ":") + "cache=false"


def profile_one(fn, x, iters: int) -> dict:
    """ms per forward by group, from ``iters`` profiled forwards after ``iters`` timed ones."""
    from torch.profiler import profile
    with torch.no_grad():
        fn(x)
        walls = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            walls.append(time.perf_counter() - t0)
        with profile() as prof:
            for _ in range(iters):
                fn(x)
    ms = defaultdict(float)
    for e in prof.key_averages():
        g = group(e.key)
        if g is not None:
            ms[g] += e.self_cpu_time_total / 1e3 / iters
    return _row(ms, walls)


def profile_interleaved(fns: dict, x, rounds: int, iters: int) -> dict:
    """Median over ``rounds`` of :func:`profile_one`, the contenders taking turns in each round
    (so drift on a noisy machine hits all of them alike)."""
    per = {spec: [] for spec in fns}
    for _ in range(rounds):
        for spec, fn in fns.items():
            per[spec].append((profile_openvino if hasattr(fn, "profile") else profile_one)(fn, x, iters))
    return {spec: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for spec, rs in per.items()}


def format_table(rows: dict, title: str) -> str:
    names = list(rows)
    base = rows[names[0]]
    cols = list(GROUPS) + ["kernel sum", "wall"]
    w = {n: max(16, len(n) + 2) for n in names}
    rw = {n: max(22, len(n) + 8) for n in names}
    head = f"{'ms per forward':<16}" + "".join(f"{n:>{w[n]}}" for n in names)
    head += "".join(f"{'ratio ' + n:>{rw[n]}}" for n in names[1:])
    lines = [title, head]
    for c in cols:
        line = f"{c:<16}" + "".join(f"{rows[n][c]:>{w[n]}.1f}" for n in names)
        line += "".join(f"{(base[c] / rows[n][c] if rows[n][c] else float('nan')):>{rw[n]}.2f}" for n in names[1:])
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--contenders", nargs="+", default=["int8", "tome_int8"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="real weights")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    inductor_config.cpp.enable_kernel_profile = True  # names each generated C++ kernel in the profile
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kw = {"num_classes": 0} if (args.checkpoint and "dinov2" in args.model) else {}
    model = models.create(args.model, img_size=args.img_size, checkpoint=args.checkpoint, **kw).eval()
    size = args.img_size or models.input_size(model)
    x = torch.randn(args.batch, 3, size, size)
    calibration = [torch.randn(args.batch, 3, size, size) for _ in range(2)]
    fns = {}
    for spec in args.contenders:
        if spec.startswith("ov_"):
            fns[spec] = peers.openvino_peer(model, x, calibration, int8=spec.startswith("ov_int8"),
                                            merge=peers.merge_recipe(*parse_spec(spec)), profile=True)
        else:
            fns[spec], _ = compile_spec(model, jit(spec), calibration)
        with torch.no_grad(), compat.recompile_limit_patch(64):  # one forward, compiled once per contender
            fns[spec](x)
        print(f"  compiled {spec}")
    rows = profile_interleaved(fns, x, args.rounds, args.iters)
    table = format_table(rows, f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, "
                               f"median of {args.rounds} interleaved rounds x {args.iters} profiled forwards, "
                               f"{machine()}")
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(model=args.model, batch=args.batch, rows=rows), indent=1))
        Path(args.json).with_suffix(".txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
