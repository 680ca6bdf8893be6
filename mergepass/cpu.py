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


def int8_isa() -> str:
    """The CPU's fastest int8 dot-product instructions: 'AMX', 'AVX-512 VNNI', 'AVX-VNNI', or 'none'
    (int8 GEMMs then gain only ~2x over FP32, see benchmarks/gemm_peak.py); '?' without /proc/cpuinfo."""
    flags = cpu_flags()
    if not flags:
        return "?"
    for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI")):
        if flag in flags:
            return name
    return "none"
