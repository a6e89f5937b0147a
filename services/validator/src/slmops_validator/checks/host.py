"""What this host is, and whether its latency stands for a device class.

A latency figure counts for a class only when the host has the class's architecture and every
ISA feature the class names (an AVX2-only box says nothing about AVX-512 VNNI INT8 kernels).
Otherwise the figures are kept as evidence and the gate is left to the on-device canary.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from slmops import hostinfo
from slmops.profiles import DeviceProfile


def host_stands_for(profile: DeviceProfile) -> str:
    """Empty when latency measured here counts for ``profile``'s class; else why not."""
    if not profile.latency_measurable_on_host:
        return f"{profile.name} hardware is not this machine's"
    arch = hostinfo.arch()
    if arch != profile.cpu.arch:
        return f"this host is {arch}, the class {profile.cpu.arch}"
    missing = sorted({f.lower() for f in profile.cpu.isa_features} - hostinfo.isa_features())
    if missing:
        return f"this host lacks {', '.join(missing)}"
    return ""


def same_architecture(profile: DeviceProfile) -> bool:
    return hostinfo.arch() == profile.cpu.arch


def host_summary(threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "cpu": hostinfo.cpu_model(),
        "cores": os.cpu_count() or 0,
        "onnxruntime": ort.__version__,
        "threads": threads,
        "python": platform.python_version(),
    }
