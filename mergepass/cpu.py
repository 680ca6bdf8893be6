"""What the host CPU offers: the fused kernel's build and the int8 activation range depend on it."""
from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_id() -> str:
    """Architecture, model and flags: equal only for CPUs that can run each other's -march=native builds."""
    return " ".join([platform.machine(), platform.processor(), *sorted(cpu_flags())])
