"""Check mergepass's speed floors (ratios over eager FP32, over int8, over the int8 of before bf16
around the GEMMs and int8 attention, over ONNX Runtime's int8, and over OpenVINO + NNCF int8, alone
and with ToMe patched in) and say which hold.

    python benchmarks/targets.py                        # ViT-B/16: speed.py at batch 8 and 1
    python benchmarks/targets.py --model vit_small_patch14_dinov2
    python benchmarks/targets.py --from-json docs/results/speed_vit_b16_zen3_2026-11-23.json
    python benchmarks/targets.py --pareto-json docs/results/pareto_prune_zen5_2026-12-06.json

Timing runs ``benchmarks/speed.py`` with the contenders the floors name, all in one process, and
reads its JSON; ``--from-json`` reads earlier speed.py outputs instead (each file checked on its own:
ratios never mix runs). A floor that names two contenders holds when either does, and a contender counts under
any spelling of its recipe (``tome_int8`` is ``tome_int8:merge.r=16``); a floor whose contenders a run did not
time is "not measured". The floors over eager and over int8 assume int8 dot products (VNNI or AMX), and those over
the earlier int8 also AVX512-BF16 or AMX (see ``gemm_peak.py``): on a CPU that speed.py recorded without them
they "do not apply". The floors over a peer engine apply on every CPU.

Speed counts beside fidelity: ``--pareto-json`` reads ``pareto.py`` outputs (real weights, held-out images) and checks
the frontier floors, such as "at mean CLS cosine >= 0.990, the fastest mergepass point is >= 1.3x the fastest OpenVINO
point". Only rows timed the same way are compared (all by the ``--speed-json`` run pareto.py was given, when any was).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mergepass.cpu import BF16_ISAS, INT8_ISAS

MERGED = ("dfe_lgtm_int8", "tome_int8")
INT8 = ("int8", "int8:quantize.pt2e.attention=int8")  # defaults, and with the opt-in int8 attention (AMX)
# int8 as it was before bf16 around the GEMMs and int8 attention: old and new in one run
BASELINE_INT8 = "int8:quantize.pt2e.rest=fp32,quantize.pt2e.attention=float"


@dataclass(frozen=True)
class Need:
    """A CPU feature a floor was set for: one of ``names`` in the ``key`` field of speed.py's ``cpu`` record."""
    key: str
    names: tuple[str, ...]
    says: str
    label: str  # as mergepass.cpu.machine() names it

    def missing(self, cpu: dict) -> str | None:
        got = cpu.get(self.key)
        return None if got is None or got in self.names else f"needs {self.says} ({self.label}: {got})"


VNNI_OR_AMX = Need("int8_isa", tuple(name for _, name in INT8_ISAS), "VNNI or AMX", "int8 ISA")
NATIVE_BF16 = Need("bf16_isa", tuple(name for _, name in BF16_ISAS), "AVX512-BF16 or AMX", "bf16")


@dataclass(frozen=True)
class Floor:
    batch: int
    contenders: tuple[str, ...]  # the floor holds if any of them reaches it
    over: str
    ratio: float
    needs: tuple[Need, ...] = ()  # on a CPU without these the floor does not apply (a ratio over a peer always does)

    def describe(self) -> str:
        return f"batch {self.batch}: {' or '.join(self.contenders)} >= {self.ratio}x over {self.over}"

    def not_for(self, cpu: dict) -> str | None:
        """Why the floor does not apply on the CPU speed.py recorded (None: it applies, or the CPU is unknown)."""
        return next(filter(None, (n.missing(cpu) for n in self.needs)), None)


# against OpenVINO + NNCF int8 (what a CPU user picks instead), alone and with ToMe patched in at the same r
OPENVINO = tuple(Floor(b, c, over, ratio) for b in (8, 1) for c, over, ratio in (
    (("int8",), "ov_int8", 1.05),
    (("tome_int8:merge.r=16",), "ov_int8", 1.6),
    (("tome_int8:merge.r=16",), "ov_int8_tome:merge.r=16", 1.25),
    (("tome_int8:merge.r=8",), "ov_int8_tome:merge.r=8", 1.25),
    (("tome_int8:merge.r=12",), "ov_int8_tome:merge.r=12", 1.25)))

FLOORS_BY_MODEL = {
    "vit_base_patch16_224": (
        Floor(8, ("int8",), "eager", 3.5, (VNNI_OR_AMX,)),
        Floor(8, MERGED, "eager", 7.0, (VNNI_OR_AMX,)),
        Floor(8, MERGED, "int8", 2.0, (VNNI_OR_AMX,)),
        Floor(1, MERGED, "eager", 5.0, (VNNI_OR_AMX,)),
        Floor(1, MERGED, "int8", 2.0, (VNNI_OR_AMX,)),
        Floor(8, INT8, BASELINE_INT8, 1.35, (VNNI_OR_AMX, NATIVE_BF16)),
        Floor(8, ("int8",), "ort_int8", 1.0),       # at least as fast as ONNX Runtime's int8
        *OPENVINO,
    ),
    "vit_small_patch14_dinov2": (
        Floor(8, INT8, BASELINE_INT8, 1.7, (VNNI_OR_AMX, NATIVE_BF16)),
        Floor(8, MERGED, "int8", 1.6, (VNNI_OR_AMX,)),
        Floor(8, ("int8",), "ort_int8", 1.0),
        *OPENVINO,
    ),
}
FLOORS = FLOORS_BY_MODEL["vit_base_patch16_224"]


@dataclass(frozen=True)
class Frontier:
    """Among the contenders at mean CLS cosine >= ``mean``, the fastest mergepass one over the fastest peer engine's
    (contenders named ``peer*``)."""
    mean: float
    ratio: float
    peer: str = "ov_"

    def describe(self) -> str:
        return f"at mean CLS cosine >= {self.mean:.3f}: fastest mergepass >= {self.ratio}x fastest {self.peer}*"


FRONTIERS = (Frontier(0.990, 1.3),)  # against OpenVINO + NNCF, alone or with ToMe, at any r
PEERS = ("ov_", "ort_")  # contenders run by another engine: never counted as mergepass points


def status(value, floor: float, not_for: str | None = None) -> str:
    """How a measured ratio (None: not measured) stands against its floor, on a CPU it applies to."""
    if not_for:
        return f"does not apply: {not_for}"
    return "not measured" if value is None else ("met" if value >= floor else "NOT MET")


@functools.cache
def _recipe(spec: str):
    """The recipe a contender spec runs; None for what is not a mergepass recipe (eager, the peers) or no longer loads
    (then only its spelling counts)."""
    import warnings
    from mergepass.recipe import available, load, parse_spec
    try:
        name, overrides = parse_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an old run's spec in the flat layout
            return load(name, **overrides) if name in available() else None
    except (ValueError, TypeError):
        return None


def timed(ms: dict[tuple[int, str], float], batch: int, spec: str) -> float | None:
    """``spec``'s median at ``batch``: timed under that name, or under another spelling of the same recipe
    (a floor's ``tome_int8`` is the run's ``tome_int8:merge.r=16``)."""
    if (batch, spec) in ms:
        return ms[(batch, spec)]
    want = _recipe(spec)
    if want is None:
        return None
    return next((m for (b, c), m in ms.items() if b == batch and _recipe(c) == want), None)


def comparable(rows: list[dict]) -> list[dict]:
    """The pareto.py rows timed alike: those speed.py timed, when any were (their speedups share one run), else all."""
    by_speed = [r for r in rows if r.get("timed_by") == "speed.py"]
    return by_speed or rows


def check_frontier(rows: list[dict], frontiers=FRONTIERS) -> list[dict]:
    """One row per frontier floor: the fastest mergepass and peer contenders above its line, and their ratio."""
    rows = [r for r in comparable(rows) if r.get("speedup") and r.get("cls_cos_mean") is not None]
    out = []
    for f in frontiers:
        ok = [r for r in rows if r["cls_cos_mean"] >= f.mean]
        ours = [r for r in ok if not r["contender"].startswith(PEERS)]
        peers = [r for r in ok if r["contender"].startswith(f.peer)]
        best = max(ours, key=lambda r: r["speedup"], default=None)
        peer = max(peers, key=lambda r: r["speedup"], default=None)
        value = best["speedup"] / peer["speedup"] if best and peer else None
        out.append(dict(floor=f.describe(), best=best and best["contender"], peer=peer and peer["contender"],
                        ratio=value, status=status(value, f.ratio)))
    return out


def medians(results: list[dict]) -> dict[tuple[int, str], float]:
    """(batch, contender) -> median ms, from speed.py's JSON (a list of {batch, rows})."""
    return {(r["batch"], row["contender"]): row["median_ms"] for r in results for row in r["rows"]}


def check(ms: dict[tuple[int, str], float], floors=FLOORS, cpu: dict | None = None) -> list[dict]:
    """One row per floor: the best measured ratio among its contenders (None if not measured); ``cpu``, speed.py's
    record of the CPU, says which floors apply."""
    out = []
    for f in floors:
        base = timed(ms, f.batch, f.over)
        times = {c: timed(ms, f.batch, c) for c in f.contenders}
        ratios = {c: base / t for c, t in times.items() if base and t}
        best = max(ratios, key=ratios.get) if ratios else None
        value = ratios[best] if best else None
        out.append(dict(floor=f.describe(), best=best, ratio=value,
                        status=status(value, f.ratio, f.not_for(cpu or {}))))
    return out


def format_check(rows: list[dict]) -> str:
    def got(r):  # rounded down, so that a ratio just under its floor never prints as the floor itself
        if r["ratio"] is None:
            return "-"
        who = f"{r['best']} / {r['peer']}" if r.get("peer") else r["best"]
        return f"{math.floor(r['ratio'] * 100) / 100:.2f}x ({who})"
    width, shown = max(len(r["floor"]) for r in rows) + 2, [got(r) for r in rows]
    middle = max(len("measured"), *map(len, shown)) + 2
    lines = [f"{'floor':<{width}}{'measured':<{middle}}status"]
    lines += [f"{r['floor']:<{width}}{g:<{middle}}{r['status']}" for r, g in zip(rows, shown)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-json", nargs="+", default=None, help="speed.py JSON outputs to check")
    p.add_argument("--model", default="vit_base_patch16_224", choices=sorted(FLOORS_BY_MODEL))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--json", default=None, help="keep the timing run's speed.py JSON here")
    p.add_argument("--pareto-json", nargs="+", default=None,
                   help="pareto.py outputs (fidelity and speed) to check the frontier floors on; times nothing")
    a = p.parse_args(argv)
    if a.pareto_json:
        for f in a.pareto_json:
            print(f"{f}\n{format_check(check_frontier(json.loads(Path(f).read_text())))}\n")
        if not a.from_json:
            return 0
    files = a.from_json
    if files is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import speed
        out = a.json or str(Path(tempfile.mkdtemp()) / "speed.json")
        floors = FLOORS_BY_MODEL[a.model]
        batches = sorted({f.batch for f in floors}, reverse=True)
        contenders = sorted({c for f in floors for c in (*f.contenders, f.over)} - {"eager"})
        size = ["--img-size", "224"] if "dinov2" in a.model else []
        speed.main(["--model", a.model, *size, "--batch", *map(str, batches), "--contenders", "eager", *contenders,
                    "--rounds", str(a.rounds), "--iters", str(a.iters), "--json", out])
        files = [out]
    for f in files:
        results = json.loads(Path(f).read_text())
        floors = FLOORS_BY_MODEL.get(results[0].get("model", a.model), FLOORS)
        cpu = results[0].get("cpu", {})
        print(f"{f}\n{cpu.get('machine', 'CPU: not recorded')}\n{format_check(check(medians(results), floors, cpu))}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
