"""Install llama-cpp-python, the peer the generation benchmark measures us against.

Not in ``make install``: pip compiles llama.cpp from source (~10 minutes on 2 cores). Built
for this host's x86 vector extensions, explicitly, without AMX: a native build (-march=native)
enables ggml's AMX matmul kernels on CPUs that report AMX, and on the virtual machines here they
crash with SIGSEGV in ``ggml_backend_amx_mul_mat`` on the first prompt (AVX-512 VNNI kernels are
what llama.cpp then uses, as on any AVX-512 server without AMX).

    python -m bench.install_llama_cpp   # no-op when the pinned version is already importable
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"


def cmake_args() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""  # ARM: the native build has no AMX to avoid
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = {
        "GGML_AVX": "avx",
        "GGML_AVX2": "avx2",
        "GGML_FMA": "fma",
        "GGML_F16C": "f16c",
        "GGML_BMI2": "bmi2",
        "GGML_AVX_VNNI": "avx_vnni",
        "GGML_AVX512": "avx512f",
        "GGML_AVX512_VBMI": "avx512vbmi",
        "GGML_AVX512_VNNI": "avx512_vnni",
        "GGML_AVX512_BF16": "avx512_bf16",
    }
    options = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF"]
    options += [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for opt, flag in wanted.items()]
    return " ".join(options)


def main() -> None:
    try:
        if importlib.metadata.version("llama-cpp-python") == VERSION:
            return
    except importlib.metadata.PackageNotFoundError:
        pass
    env = {**os.environ, "CMAKE_ARGS": cmake_args(), "FORCE_CMAKE": "1"}
    print(f"building llama-cpp-python {VERSION} (about 10 minutes on 2 cores)...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-cache-dir", f"llama-cpp-python=={VERSION}"],
        check=True, env=env,
    )  # fmt: skip


if __name__ == "__main__":
    main()
