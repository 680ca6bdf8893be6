"""How much faster int8 GEMMs are than FP32 ones on this CPU: the ceiling for ``int8`` over eager.

    python benchmarks/gemm_peak.py --batch 8

Times ViT-B/16's four linear shapes (qkv, proj, fc1, fc2; M = batch x 197 tokens) as FP32
``F.linear`` (what eager runs) and as oneDNN ``qlinear_pointwise`` (what the int8 recipes' graphs
run), interleaved. A ViT-B forward is almost all linears, so ``int8`` over eager cannot exceed the
summed ratio by much. Without VNNI (AVX2 only) oneDNN multiplies u8 x s8 with ``vpmaddubsw`` and
the ratio stays near 2; AVX-512 VNNI and AMX lift it well above that.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Optional

import torch

from mergepass.cpu import machine
from mergepass.eval.timing import interleaved

VIT_B_LINEARS = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}


def _fp32(m: int, k: int, n: int):
    x, w = torch.randn(m, k), torch.randn(n, k)
    return lambda: torch.nn.functional.linear(x, w)


def _int8(m: int, k: int, n: int, x: Optional[torch.Tensor] = None, w: Optional[torch.Tensor] = None):
    """oneDNN's u8 x s8 linear (x_scale 0.02, w_scale 0.01, zero points 0) with FP32 output."""
    x = torch.randint(0, 128, (m, k), dtype=torch.uint8) if x is None else x  # 7 bits: no saturation
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8) if w is None else w
    packed = torch.ops.onednn.qlinear_prepack(w, (m, k))
    w_scale, w_zp = torch.full((n,), 0.01), torch.zeros(n, dtype=torch.long)
    return lambda: torch.ops.onednn.qlinear_pointwise.default(
        x, 0.02, 0, packed, w_scale, w_zp, None, 1.0, 0, torch.float32, "none", [], "")


def time_shapes(batch: int, tokens: int = 197, rounds: int = 7, iters: int = 5,
                linears: dict = VIT_B_LINEARS) -> list[dict]:
    m = batch * tokens
    rows = []
    for name, (k, n) in linears.items():
        fns = {"fp32": _fp32(m, k, n), "int8": _int8(m, k, n)}
        for f in fns.values():
            f()
        med = {kind: statistics.median(ts) for kind, ts in interleaved(fns, rounds, iters).items()}
        ops = 2 * m * k * n
        rows.append(dict(name=name, m=m, k=k, n=n, fp32_ms=1e3 * med["fp32"], int8_ms=1e3 * med["int8"],
                         fp32_gflops=ops / med["fp32"] / 1e9, int8_gops=ops / med["int8"] / 1e9))
    return rows


def format_table(rows: list[dict], title: str) -> str:
    out = [title, f"{'linear':<6}{'M x K x N':>18}{'fp32 ms':>9}{'int8 ms':>9}{'GFLOP/s':>9}{'GOP/s':>8}"
                  f"{'int8 x':>8}"]
    for r in rows:
        out.append(f"{r['name']:<6}{r['m']:>8} x{r['k']:>4} x{r['n']:>4}{r['fp32_ms']:>9.2f}{r['int8_ms']:>9.2f}"
                   f"{r['fp32_gflops']:>9.0f}{r['int8_gops']:>8.0f}{r['fp32_ms'] / r['int8_ms']:>8.2f}")
    # each block runs each linear once, so the plain sums weigh the shapes as a forward does
    fp32, int8 = sum(r["fp32_ms"] for r in rows), sum(r["int8_ms"] for r in rows)
    out.append(f"all: fp32 {fp32:.1f} ms, int8 {int8:.1f} ms -> int8 GEMMs {fp32 / int8:.2f}x faster than fp32")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = time_shapes(a.batch, rounds=a.rounds)
    print(format_table(rows, f"ViT-B/16 linears, batch {a.batch}, {torch.get_num_threads()} threads, "
                             f"{machine()}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
