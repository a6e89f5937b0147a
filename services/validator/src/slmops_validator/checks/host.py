"""What this host is, and whether its latency stands for a device class.

A latency figure counts for a class only when the host has the class's architecture and every
ISA feature the class names (an AVX2-only box says nothing about AVX-512 VNNI INT8 kernels).
Otherwise the figures are kept as evidence and the gate is left to the on-device canary.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path
from typing import Any

from slmops.profiles import DeviceProfile


@cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # one processor is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def host_isa_features() -> set[str]:
    info = _cpuinfo()
    return set((info.get("flags") or info.get("features") or "").lower().split())


def host_stands_for(profile: DeviceProfile) -> str:
    """Empty when latency measured here counts for ``profile``'s class; else why not."""
    if not profile.latency_measurable_on_host:
        return f"{profile.name} hardware is not this machine's"
    arch = platform.machine()
    if arch != profile.cpu.arch:
        return f"this host is {arch}, the class {profile.cpu.arch}"
    missing = sorted({f.lower() for f in profile.cpu.isa_features} - host_isa_features())
    if missing:
        return f"this host lacks {', '.join(missing)}"
    return ""


def same_architecture(profile: DeviceProfile) -> bool:
    return platform.machine() == profile.cpu.arch


def host_summary(threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "cpu": _cpuinfo().get("model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count() or 0,
        "onnxruntime": ort.__version__,
        "threads": threads,
        "python": platform.python_version(),
    }
