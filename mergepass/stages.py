"""How long each stage of a compile takes. Each stage is logged as it ends (logger ``mergepass.stages``),
said on stderr with ``MERGEPASS_VERBOSE=1`` (long stages with a progress bar), and kept for
``benchmarks/compile_time.py``."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Iterable, Iterator, Optional

log = logging.getLogger("mergepass.stages")
_DONE: list[tuple[str, float]] = []


def verbose() -> bool:
    return os.environ.get("MERGEPASS_VERBOSE", "0").strip().lower() not in ("", "0", "false", "no", "off")


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - start
        _DONE.append((name, took))
        log.info("%s: %.2f s", name, took)
        if verbose():
            print(f"mergepass: {name}: {took:.1f} s", file=sys.stderr, flush=True)


def progress(items: Iterable, what: str, total: Optional[int] = None) -> Iterable:
    """``items``, with a progress bar under ``MERGEPASS_VERBOSE=1``."""
    if not verbose():
        return items
    from tqdm import tqdm
    return tqdm(items, desc=f"mergepass: {what}", total=total, leave=False, file=sys.stderr)


def done() -> list[tuple[str, float]]:
    """(stage, seconds) for every stage finished so far in this process, oldest first."""
    return list(_DONE)


def clear() -> None:
    _DONE.clear()
