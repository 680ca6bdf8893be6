"""What the host CPU offers: the fused kernel's build, the int8 activation range and every reported
figure depend on it."""
from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Optional


@functools.cache
def _cpuinfo(key: str) -> Optional[str]:
    """The value of the first /proc/cpuinfo line starting with ``key`` ('' if none; None without the file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith(key)), "")
    return line.partition(":")[2].strip()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_id() -> str:
    """Architecture, model and flags: equal only for CPUs that can run each other's -march=native builds."""
    return " ".join([platform.machine(), platform.processor(), *sorted(cpu_flags())])


# (flag, name), fastest first: what int8_isa() and bf16_isa() report, and what a recorded figure is checked against
INT8_ISAS = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"))
BF16_ISAS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))


def _fastest(isas: tuple[tuple[str, str], ...]) -> str:
    flags = cpu_flags()
    if not flags:
        return "?"
    return next((name for flag, name in isas if flag in flags), "none")


def int8_isa() -> str:
    """The CPU's fastest int8 dot-product instructions: 'AMX', 'AVX-512 VNNI', 'AVX-VNNI', or 'none'
    (int8 GEMMs then gain only ~2x over FP32, see benchmarks/gemm_peak.py); '?' without /proc/cpuinfo."""
    return _fastest(INT8_ISAS)


def bf16_isa() -> str:
    """The CPU's bf16 arithmetic: 'AMX-BF16', 'AVX512-BF16', or 'none' (bf16 is then emulated and slow);
    '?' without /proc/cpuinfo."""
    return _fastest(BF16_ISAS)


def vendor() -> str:
    """'AuthenticAMD', 'GenuineIntel', ... as /proc/cpuinfo names it ('' where there is none)."""
    return _cpuinfo("vendor_id") or ""


def model_name() -> str:
    """The CPU model as /proc/cpuinfo names it."""
    name = _cpuinfo("model name")
    if name is None:
        return platform.processor() or platform.machine()
    return name or platform.machine()


def machine() -> str:
    """One line for every figure: CPU model, int8 and bf16 instructions, torch version."""
    import torch
    return f"CPU: {model_name()}, int8 ISA: {int8_isa()}, bf16: {bf16_isa()}, torch {torch.__version__}"
