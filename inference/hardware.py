"""What this CPU can compute fast: its model name and the vector/matrix instruction sets that decide it.

Backend choice (engines.select), training precision (inference.train) and every benchmark table depend on
these flags: a CPU with bf16 units (AVX512-BF16, AMX-BF16) runs bf16 several times faster than fp32, one
without them gains nothing from it. Read from /proc/cpuinfo (Linux); elsewhere the flags are unknown (empty).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# Flags that change how fast the U-Net's convolutions and matmuls can run, in the order they are printed.
SPEED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def speed_flags(self) -> list[str]:
        """The flags of SPEED_FLAGS this CPU has (what benchmark tables and cache keys record)."""
        return [f for f in SPEED_FLAGS if f in self.flags]

    @property
    def bf16_units(self) -> bool:
        """Native bf16 dot products (AVX512-BF16 or AMX); without them bf16 is emulated and slower than fp32."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def int8_units(self) -> bool:
        """Native int8 dot products (VNNI or AMX-INT8)."""
        return any(f in self.flags for f in INT8_FLAGS)

    def describe(self) -> str:
        return f"{self.model} ({' '.join(self.speed_flags) or 'no AVX2/AVX-512 flags'})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags from /proc/cpuinfo's text."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return CpuInfo(model or platform.processor() or platform.machine(), flags)


@functools.cache
def cpu_info() -> CpuInfo:
    path = Path("/proc/cpuinfo")
    if path.is_file():
        return parse_cpuinfo(path.read_text(errors="replace"))
    return CpuInfo(platform.processor() or platform.machine(), frozenset())
