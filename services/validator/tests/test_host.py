"""Whether this host's latency stands for a device class: architecture and ISA features."""

from __future__ import annotations

import platform

from slmops.hostinfo import isa_features
from slmops.profiles import DeviceProfile
from slmops_validator.checks.host import host_stands_for

_ARCH = platform.machine()


def _profile(arch: str, features: list[str], measurable: bool = True) -> DeviceProfile:
    other = "aarch64" if arch == "x86_64" else "x86_64"
    return DeviceProfile.model_validate({
        "name": "probe-class", "description": "a class for this test",
        "cpu": {"arch": arch if arch in ("x86_64", "aarch64") else other,
                "isa_features": features},
        "execution_providers": ["CPUExecutionProvider"],
        "latency_measurable_on_host": measurable, "ram_mb": 1024, "storage_mb": 1024,
        "precisions": ["fp32"], "opset_min": 13, "opset_max": 21,
        "budgets": {"max_size_mb": 10, "max_peak_memory_mb": 10}, "quality": {},
        "recipes": [{"name": "r", "passes": [{"name": "convert"}]}],
    })  # fmt: skip


def test_a_host_with_the_class_arch_and_features_stands_for_it() -> None:
    some = sorted(isa_features())[:2]
    assert host_stands_for(_profile(_ARCH, some)) == ""


def test_a_missing_isa_feature_is_named() -> None:
    why = host_stands_for(_profile(_ARCH, ["avx2", "no_such_feature_x"]))
    assert why.startswith("this host lacks")
    assert "no_such_feature_x" in why


def test_another_architecture_or_a_non_measurable_class_does_not_count() -> None:
    other = "aarch64" if _ARCH == "x86_64" else "x86_64"
    assert host_stands_for(_profile(other, [])) == f"this host is {_ARCH}, the class {other}"
    assert "not this machine's" in host_stands_for(_profile(_ARCH, [], measurable=False))
