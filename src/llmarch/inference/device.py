"""What this CPU can do, for the inference defaults: the compute dtype and the thread count.

* bfloat16 is only faster than float32 where the CPU computes it natively (x86 AVX512-BF16 or
  AMX, Arm's BF16 extension); elsewhere every bfloat16 product is converted to float32 and
  back, which costs more than reading the wider weights. :func:`auto_dtype` picks accordingly.
* PyTorch's CPU kernels scale with physical cores, not hyper-threads: :func:`physical_cores`.
* glibc keeps freed memory for reuse, resident: :func:`release_free_memory` returns it;
  :func:`resident_bytes` says how much memory the process holds.
"""

from __future__ import annotations

import os
from functools import cache

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX512-BF16, AMX) and aarch64 (BF16)


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bfloat16(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def auto_dtype(device: str | torch.device = "cpu", flags: frozenset[str] | None = None) -> tuple[torch.dtype, str]:
    """(compute dtype, the reason in a few words) for ``device``."""
    kind = torch.device(device).type
    if kind != "cpu":
        return torch.bfloat16, f"bfloat16 on {kind}"
    if native_bfloat16(flags):
        return torch.bfloat16, "bfloat16: the CPU computes it natively"
    return torch.float32, "float32: the CPU has no native bfloat16"


@cache
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    cores: dict[int, tuple[str, str]] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu, phys = None, "0"
            for line in f:
                key, _, value = (s.strip() for s in line.partition(":"))
                if key == "processor":
                    cpu, phys = int(value), "0"
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu is not None:
                    cores[cpu] = (phys, value)
    except (OSError, ValueError):
        cores = {}
    seen = {cores[c] for c in allowed if c in cores}
    return max(1, len(seen) if seen else len(allowed))


@cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the C allocator's freed memory to the system (glibc's ``malloc_trim``, about a
    millisecond for a loaded model's heap; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory (``/proc/self/statm``, about 10 microseconds); 0 where it
    cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0
