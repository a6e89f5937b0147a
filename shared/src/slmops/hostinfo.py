"""What this machine is: architecture, CPU model, ISA features, memory.

The validator asks whether its host stands for a device class; a gateway declares the same
facts when it registers. Read once from /proc/cpuinfo (empty elsewhere).
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path


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


def arch() -> str:
    return platform.machine()


def isa_features() -> set[str]:
    """Lower-case CPU flags (x86 ``flags``, ARM ``Features``)."""
    info = _cpuinfo()
    return set((info.get("flags") or info.get("features") or "").lower().split())


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def ram_mb() -> int:
    import psutil

    return int(psutil.virtual_memory().total / 2**20)
