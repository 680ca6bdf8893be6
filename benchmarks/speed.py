"""Time every contender in one process with interleaved rounds; print ratios over eager FP32.

    python benchmarks/speed.py --model vit_base_patch16_224 --batch 8 \
        --contenders eager inductor tome tome:merge.r=8 --rounds 10 --json out/speed.json

Contenders: ``eager``, ``inductor`` (plain torch.compile), or a mergepass recipe name with optional
``:table.field=value,...`` overrides (``tome:merge.r=8,lower.target=eager``; ``guards=skip-modules``: dynamo's guards
on the model's modules skipped, ``cache=false``: without the compile cache). Ratios use the median of per-round times; the spread is the
min-max of the per-round ratios. Machines here are noisy: compare ratios from one run only.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mergepass import compat
from mergepass.eval import peers
from mergepass.eval.evaluate import compile_spec
from mergepass.eval.timing import interleaved
from mergepass.recipe import parse_spec


def time_contenders(model, x, specs, rounds=10, iters=3, calibration=None, log=print):
    fns, compile_s, schedules = {}, {}, {}
    with torch.no_grad():
        for spec in specs:
            why = peers.available(spec) if parse_spec(spec)[0] in peers.PEERS else None
            if why:
                log(f"  skip  {spec:<28} {why}")
                continue
            t0 = time.perf_counter()
            fn, be = compile_spec(model, spec, calibration)
            # every contender compiles the same forward: past dynamo's 8 compiles per frame, a later one
            # would run eagerly without a word, and a later graph capture would find no graph
            with compat.recompile_limit_patch(64):
                fn(x)  # compile + first run
            compile_s[spec] = time.perf_counter() - t0
            fn(x)
            fns[spec] = fn
            if be is not None and be.schedule is not None:
                schedules[spec] = be.schedule
            log(f"  ready {spec:<28} compile+first run {compile_s[spec]:7.1f} s")
        per_round = interleaved({spec: functools.partial(fn, x) for spec, fn in fns.items()}, rounds, iters)
    return per_round, compile_s, schedules


def summarize(per_round, compile_s, schedules, base="eager", others=("int8", "ort_int8", "ov_int8")):
    """One row per contender: median time, speedup over ``base`` (median ratio and the per-round spread)
    and, for each of ``others`` that ran, the speedup over it."""
    rows = []
    med = {k: statistics.median(v) for k, v in per_round.items()}
    for spec, ts in per_round.items():
        ratios = [b / t for b, t in zip(per_round[base], ts)]
        s = schedules.get(spec)
        rows.append(dict(contender=spec, median_ms=1e3 * med[spec], speedup=med[base] / med[spec],
                         spread=(min(ratios), max(ratios)), compile_s=compile_s[spec],
                         over={o: med[o] / med[spec] for o in others if o in med},
                         macs_ratio=s.macs_ratio if s else None,
                         final_tokens=s.final_tokens if s else None))
    return rows


def format_table(rows, title: str) -> str:
    others = list(rows[0].get("over", {})) if rows else []
    out = [title, f"{'contender':<30}{'median ms':>10}{'x eager':>9}{'spread':>15}"
                  + "".join(f"{'x ' + o:>11}" for o in others) + f"{'compile s':>10}{'MACs':>7}"]
    for r in rows:
        macs = f"{r['macs_ratio']:.2f}" if r["macs_ratio"] is not None else "-"
        out.append(f"{r['contender']:<30}{r['median_ms']:>10.1f}{r['speedup']:>9.2f}"
                   f"{r['spread'][0]:>7.2f}-{r['spread'][1]:<7.2f}"
                   + "".join(f"{r['over'][o]:>11.2f}" for o in others)
                   + f"{r['compile_s']:>10.1f}{macs:>7}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--contenders", nargs="+", default=["eager", "inductor", "tome"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--checkpoint", default=None, help="real weights (int8 fp32-exclusions depend on them)")
    p.add_argument("--images", default=None, help="calibration images (default: random tensors)")
    p.add_argument("--json", default=None, help="write results here (and the table next to it)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mergepass.eval import models
    from mergepass.cpu import bf16_isa, int8_isa, machine
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = {"num_classes": 0} if (args.checkpoint and "dinov2" in args.model) else {}
    model = models.create(args.model, img_size=args.img_size, checkpoint=args.checkpoint, **kw)
    size = args.img_size or models.input_size(model)
    specs = args.contenders if "eager" in args.contenders else ["eager"] + args.contenders
    results, tables = [], []
    for bsz in args.batch:
        torch._dynamo.reset()
        x = torch.randn(bsz, 3, size, size)
        if args.images:
            from mergepass.eval.data import batches, data_config, load_images
            calib = batches(load_images(args.images, limit=64, **data_config(model, size))[0], bsz)
        else:
            calib = [torch.randn(bsz, 3, size, size) for _ in range(2)]
        print(f"{args.model} batch {bsz}: compiling {len(specs)} contenders", flush=True)
        per_round, compile_s, schedules = time_contenders(model, x, specs, args.rounds, args.iters, calib)
        rows = summarize(per_round, compile_s, schedules)
        table = format_table(rows, f"{args.model}, batch {bsz}, {torch.get_num_threads()} threads, "
                                   f"{args.rounds} interleaved rounds x {args.iters} iters, {machine()}")
        print(table, flush=True)
        tables.append(table)
        results.append(dict(model=args.model, batch=bsz, rows=rows,  # the CPU: which floors apply (targets.py)
                            cpu=dict(machine=machine(), int8_isa=int8_isa(), bf16_isa=bf16_isa())))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        out.with_suffix(".txt").write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
