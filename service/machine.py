"""What machine a figure was measured on: every benchmark and report states it (no third-party imports)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def describe_machine() -> dict[str, object]:
    """CPU model, cores, memory, relevant SIMD flags, OS and Python version.

    Returns:
        A JSON-safe dict: ``cpu``, ``cores``, ``memory_gib``, ``cpu_flags``, ``os``, ``python``.
    """
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    mem = _proc_field("/proc/meminfo", "MemTotal")
    flags_line = _proc_field("/proc/cpuinfo", "flags") or ""
    present = set(flags_line.split())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem.split()[0]) / 1024**2, 1) if mem else None,
        "cpu_flags": " ".join(f for f in _FLAGS if f in present),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def machine_line(m: dict[str, object] | None = None) -> str:
    """A one-line description, e.g. ``AMD EPYC, 2 cores, 23.5 GiB, avx2 avx512f``."""
    m = m or describe_machine()
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['cpu_flags'] or 'no AVX flags'}, {m['os']}"
