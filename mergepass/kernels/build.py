"""Building mergepass's C++ kernels on first use with ``torch.utils.cpp_extension`` (cached on disk)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

from ..cpu import cpu_id


def source_digest(*sources: Path) -> str:
    """A short digest of kernel sources: a decision timed on one version of a kernel is not kept for another."""
    h = hashlib.sha256()
    for s in sources:
        h.update(Path(s).read_bytes())
    return h.hexdigest()[:16]


def build_extension(stem: str, sources: Sequence[Path]) -> Optional[str]:
    """Compile and load ``sources`` as library ``stem``; ``None`` when loaded, else why not (no compiler,
    no headers, a build error: the caller then uses its reference path)."""
    import logging
    import warnings
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # "no CUDA runtime" noise, for this build only
    try:
        from torch.utils.cpp_extension import load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # -march=native: a cached build must never be loaded on a different CPU, so the name says which
            cpu = hashlib.sha1(cpu_id().encode()).hexdigest()[:10]
            load(name=f"{stem}_{cpu}", sources=[str(s) for s in sources], is_python_module=False,
                 extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip()
        return f"{type(e).__name__}: {msg.splitlines()[-1] if msg else ''}"
    finally:
        log.setLevel(level)
    return None
