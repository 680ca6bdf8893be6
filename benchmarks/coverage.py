"""The coverage table of docs/models.md: every family of mergepass.eval.zoo, merged or declined.

    python benchmarks/coverage.py --out docs/results/coverage.json
    python benchmarks/coverage.py --markdown docs/results/coverage.json   # the table for docs/models.md

For each family: the full-size model (random weights, its default input size) is planned with ToMe
r=16 (merged: the MACs ratio; declined: the reason), and a tiny one is compiled with ``tome_int8``
(r=2, eager lowering) to see whether int8 applies: how many of its linears are quantized, and the
output cosine against the FP32 model.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mergepass  # noqa: E402
from mergepass.cpu import machine  # noqa: E402
from mergepass.eval.zoo import CASES  # noqa: E402
from mergepass.fidelity import cosine  # noqa: E402
from mergepass.graph.match import is_linear  # noqa: E402


def full_size(case) -> dict:
    model, x = case.build(tiny=False)
    try:
        sched = mergepass.plan(model, x[:1], "tome", merge={"r": 16}, model_name=case.name)
    except ValueError as e:
        return {"status": "declined", "reason": str(e)}
    tokens = sched.blocks[0].tokens_in if sched.blocks else 0
    return {"status": "merged" if sched.merging else "matched, not merged", "blocks": len(sched.blocks),
            "tokens": tokens, "prefix": sched.prefix, "macs_ratio": round(sched.macs_ratio, 3)}


def tiny_int8(case) -> dict:
    model, x = case.build()
    be = mergepass.backend("tome_int8", merge={"r": 2}, lower="eager", calibration=[x])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            out = case.run(torch.compile(model, backend=be, dynamic=False), x)[0]
        except Exception as e:  # noqa: BLE001 - reported in the table
            return {"int8": f"error: {type(e).__name__}: {str(e)[:200]}"}
        ref = case.run(model, x)[0]
    quantized = [r.quantized for r in be.results if r.quantized is not None]
    if not quantized:
        return {"int8": "no"}
    linears = sum(sum(is_linear(n) for n in r.gm.graph.nodes) for r in be.results if r.quantized is not None)
    kept = sum(len(q.kept_fp32) for q in quantized)
    flat = (lambda t: t.reshape(t.shape[0], -1))
    return {"int8": "yes", "engine": quantized[0].engine, "linears_int8": linears - kept, "linears": linears,
            "int8_cosine": round(cosine(flat(out), flat(ref)).mean().item(), 4)}


def markdown(rows: list[dict]) -> str:
    """The docs/models.md table."""
    by_key = {c.key: c for c in CASES}
    out = ["| family | source | model (full size) | tokens | merged | MACs ratio, ToMe r=16 | int8 (tiny model) | construct / reason |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "merged":
            int8 = r.get("int8", "")
            if int8 == "yes":
                n, k = r["linears"], r["linears_int8"]
                int8 = "yes, all linears" if n == k else f"yes, {k} of {n} linears"
            out.append(f"| {r['family']} | {r['source']} | `{r['name']}` | {r['tokens']} | merged | "
                       f"{r['macs_ratio']:.3f} | {int8} | {r['construct']} |")
        else:
            out.append(f"| {r['family']} | {r['source']} | `{r['name']}` | | **declined** | | | "
                       f"{by_key[r['key']].reason} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the rows as JSON")
    p.add_argument("--only", nargs="*", default=None, help="case keys")
    p.add_argument("--markdown", default=None, help="print the table of a JSON written by --out, and stop")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["rows"]))
        return 0
    print(f"# {machine()}, {time.strftime('%Y-%m-%d')}", flush=True)
    rows = []
    for case in CASES:
        if args.only and case.key not in args.only:
            continue
        torch._dynamo.reset()
        t0 = time.time()
        row = {"key": case.key, "family": case.family, "source": case.source, "name": case.name,
               "construct": case.construct, **full_size(case)}
        if row["status"] == "merged":
            torch._dynamo.reset()
            row.update(tiny_int8(case))
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
