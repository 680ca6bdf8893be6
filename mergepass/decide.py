"""Choices that depend on the CPU, made by measuring on the machine that runs them.

Each candidate is timed once (interleaved rounds, fastest round) on the caller's own shapes; the fastest one whose
measured error stays inside the caller's budget is chosen (of candidates within :data:`TIE` of its time, the one
with the smallest error), and the decision is kept on disk, keyed by the
question, the shapes, the CPU (model and flags), the thread count and the versions. A later compile reads it
back and times nothing, so its choice is deterministic; a process asking while another times the same question
waits for that one's decision. Where nothing can be measured (one candidate can run,
or the question has no timing), the decision says it is a default, not a measurement.

Decisions live in :func:`decisions_dir`; ``python -m mergepass.cache`` lists them and ``--clear`` removes them
with the compile cache, so that the next compile measures again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import torch

from . import cpu

Timer = Callable[[Mapping[str, Callable[[], object]]], Mapping[str, float]]
FORMAT = 1


def version() -> str:
    """mergepass's installed version (part of every key: decisions and compile-cache entries alike)."""
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        return installed("mergepass")
    except PackageNotFoundError:
        return "unknown"


def decisions_dir() -> Path:
    """``$MERGEPASS_DECISIONS_DIR``, else ``mergepass-decisions/`` in inductor's cache directory: apart from the
    compile cache, so that a compile cache moved elsewhere does not time the machine again."""
    env = os.environ.get("MERGEPASS_DECISIONS_DIR")
    if env:
        return Path(env)
    from .compat import inductor_cache_dir
    return Path(inductor_cache_dir()) / "mergepass-decisions"


TIE = 0.03  # candidates whose times are within this fraction of the fastest are tied


@dataclass
class Candidate:
    """One way to do the thing: ``run`` (zero arguments; returns a tensor when errors are compared) or
    ``why_not`` it cannot run here."""

    run: Optional[Callable[[], object]] = None
    why_not: str = ""


@dataclass
class Decision:
    """What was chosen and on what evidence."""

    question: str
    choice: str
    times_ms: dict[str, float] = field(default_factory=dict)   # fastest round's time per call, by candidate
    errors: dict[str, float] = field(default_factory=dict)     # 1 - cosine against the reference
    declined: dict[str, str] = field(default_factory=dict)     # candidate -> why it was not chosen
    measured: bool = True
    budget: Optional[float] = None
    machine: str = ""
    reused: bool = False                                       # read back from disk, nothing timed

    def line(self) -> str:
        """One line for the schedule table and ``MERGEPASS_VERBOSE``."""
        if not self.measured:
            why = "; ".join(f"{k}: {v}" for k, v in self.declined.items())
            return f"{self.question}: {self.choice} (a default to verify, not measured{': ' + why if why else ''})"
        times = ", ".join(f"{k} {v:.3g} ms" + (f" (err {self.errors[k]:.1e})" if k in self.errors else "")
                          for k, v in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
        out = [f"{self.question}: {self.choice} (measured on {self.machine}: {times}"
               + ("; kept decision" if self.reused else "") + ")"]
        out += [f"{k} not chosen: {v}" for k, v in self.declined.items()]
        return "; ".join(out)


def interleaved(fns: Mapping[str, Callable[[], object]], rounds: int, iters: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument function, one value per round; every round calls every function
    in turn, so machine noise hits each alike."""
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            per_round[name].append((time.perf_counter() - t0) / iters)
    return per_round


def interleaved_best(fns: Mapping[str, Callable[[], object]], budget_s: float = 1.0,
                     rounds: int = 7) -> dict[str, float]:
    """Fastest round's seconds per call of each function: one warm-up call (one-time packing, allocation, page
    faults), then :func:`interleaved` rounds sized to fit ``budget_s`` in all. The minimum, not the median:
    another process on the machine only ever adds time, and a decision is kept for every later compile."""
    first = interleaved(fns, 2)  # the warm-up round, then one timed call each
    iters = max(1, int(budget_s / rounds / max(sum(v[-1] for v in first.values()), 1e-6)))
    return {name: min(v) for name, v in interleaved(fns, rounds, iters).items()}


def _error(out, want) -> float:
    a, b = out.detach().double().flatten(), want.detach().double().flatten()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float(1 - torch.nn.functional.cosine_similarity(a, b, 0).clamp(max=1))


def key_of(question: str, facts: Mapping) -> str:
    """The on-disk key: the question, the caller's facts (shapes, dtypes, sources), the CPU, threads, versions."""
    what = {"format": FORMAT, "question": question, "facts": dict(facts), "cpu": cpu.cpu_id(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "mergepass": version()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _read(path: Path) -> Optional[Decision]:
    try:
        if path.is_symlink():
            return None
        d = json.loads(path.read_text())
        return Decision(**{**d, "reused": True})
    except (OSError, ValueError, TypeError):
        return None


def _write(path: Path, decision: Decision) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: v for k, v in asdict(decision).items() if k != "reused"}, indent=1))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:
        pass  # an unwritable cache costs a later compile one more measurement, nothing else


def decide(question: str, facts: Mapping, candidates: Mapping[str, Candidate], *, default: str,
           reference: Optional[Callable[[], torch.Tensor]] = None, budget: Optional[float] = None, timer: Optional[Timer] = None,
           keep: bool = True) -> Decision:
    """The fastest candidate that can run and, with a ``reference`` (a function giving the exact result), whose
    output's error against it (1 - cosine) is at most ``budget``. ``default`` is chosen when none can be timed (it must be
    able to run). ``timer`` maps functions to seconds per call (tests fake it)."""
    path = decisions_dir() / f"{key_of(question, facts)}.json"
    kept = _reusable(path, candidates) if keep else None
    if kept is not None:
        return _said(kept)
    if not keep:
        return _said(_measure(question, candidates, default, reference, budget, timer))
    with _only_one_timing(path):  # another process timing the same question waits, then reads its decision
        kept = _reusable(path, candidates)
        if kept is not None:
            return _said(kept)
        decision = _measure(question, candidates, default, reference, budget, timer)
        if decision.measured:
            _write(path, decision)
    return _said(decision)


def _reusable(path: Path, candidates: Mapping[str, Candidate]) -> Optional[Decision]:
    kept = _read(path)
    return kept if kept is not None and kept.choice in candidates and not candidates[kept.choice].why_not else None


@contextlib.contextmanager
def _only_one_timing(path: Path, wait_s: float = 600.0) -> Iterator[None]:
    """Hold ``path``'s lock file while timing: two processes compiling at once would disturb each other's timings
    and both measure. Where the lock cannot be had (an unwritable folder, a holder stuck past ``wait_s``), time
    anyway."""
    from filelock import FileLock, Timeout
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_suffix(".lock")), timeout=wait_s)
        lock.acquire()
    except (OSError, Timeout):
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _measure(question: str, candidates: Mapping[str, Candidate], default: str,
             reference: Optional[Callable[[], torch.Tensor]], budget: Optional[float],
             timer: Optional[Timer]) -> Decision:
    declined = {name: c.why_not for name, c in candidates.items() if c.why_not}
    runnable = {name: c.run for name, c in candidates.items() if not c.why_not and c.run is not None}
    if default not in runnable:
        raise ValueError(f"{question}: the default {default!r} cannot run ({declined.get(default, 'no candidate')})")
    if len(runnable) < 2:
        return Decision(question, default, declined=declined, measured=False, machine=cpu.machine())
    errors = {}
    if reference is not None and budget is not None:
        want = reference()
        errors = {name: _error(fn(), want) for name, fn in runnable.items()}
        for name, err in errors.items():
            if not err <= budget:
                declined[name] = f"error {err:.1e} over the budget {budget:.1e}"
    seconds = (timer or interleaved_best)(runnable)
    times = {name: 1e3 * s for name, s in seconds.items()}
    eligible = [n for n in times if n not in declined]
    if not eligible:
        return Decision(question, default, times, errors, declined, True, budget, cpu.machine())
    fastest = min(eligible, key=lambda n: times[n])
    # times this close are one within timing noise: the most faithful of them is kept, and the same every run
    tied = [n for n in eligible if times[n] <= times[fastest] * (1.0 + TIE)]
    choice = min(tied, key=lambda n: (errors.get(n, 0.0), times[n]))
    if choice != fastest:
        declined[fastest] = f"within {TIE:.0%} of {choice}'s time (timing noise), with a larger error"
    return Decision(question, choice, times, errors, declined, True, budget, cpu.machine())


def _said(decision: Decision) -> Decision:
    from .stages import verbose
    if verbose():
        print(f"mergepass: {decision.line()}", file=sys.stderr, flush=True)
    return decision


def kept() -> list[Decision]:
    """Every decision on disk."""
    root = decisions_dir()
    found = [_read(p) for p in sorted(root.glob("*.json"))] if root.is_dir() else []
    return [d for d in found if d is not None]


def forget() -> int:
    """Delete every kept decision; returns how many there were."""
    n = len(kept())
    shutil.rmtree(decisions_dir(), ignore_errors=True)
    return n


__all__ = ["Candidate", "Decision", "decide", "decisions_dir", "forget", "interleaved", "interleaved_best", "key_of", "kept", "version"]
