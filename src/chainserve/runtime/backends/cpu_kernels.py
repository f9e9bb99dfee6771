"""Fused fp32 CPU kernels for the lean Llama layer and prepared GEMMs (issue 30, item 3 "an efficient step").

A decode iteration of a block server spent ~17 of its ~49 ms (SmolLM2, 30 blocks, 8 sessions, one
thread, this machine) outside the GEMMs: RoPE as six eager ops, the cache's page writes and its gather
of every row's history, sdpa, SiLU·mul, the residual adds and norms, and the Python between them; and
oneDNN's GEMMs took ~37 ms for weights read from memory in ~21. ``cpu_kernels.cpp`` does the same
arithmetic in these passes (``torch.ops.chainserve_cpu``):

- ``paged_decode_attention``: RoPE on a decode row's q and k, k and v into its page, and attention read
  straight from the row's pages (no gather, no mask: row r sees its positions 0..p);
- ``silu_mul``: SiLU(gate)·up of the merged gate/up GEMM's output;
- ``rms_norm``: the layer's input RMSNorm;
- ``add_rms_norm``: the residual add and the following RMSNorm;
- ``pack_panels`` and ``panel_linear``: a linear's weight packed once into panels of 32 output columns,
  and ``x Wᵀ + b`` streaming each panel once for up to 12 rows (:mod:`.prepared`).

No maintained library offers these for torch 2.13 on the CPU (Intel's extension stops at older torch,
vLLM's CPU kernels are built against its own torch), so they are built here, once per machine, with
torch's own C++ extension loader (a C++ compiler and ninja: the ``torch`` extra brings ninja) into
``~/.cache/chainserve/kernels/<key>`` (the key: the source, torch's version, the compiler flags and
the CPU's flags, since they are built for this CPU: ``-march=native``, and ``-ffast-math`` for the
vectorised ``expf``). The results match the eager ops up to float rounding (summation order), not bit
for bit (``tests/runtime/test_cpu_kernels.py``). Where the build fails (no compiler), or
``CHAINSERVE_CPU_KERNELS=0``, :func:`cpu_kernels` returns ``None`` and the lean layer keeps its eager
ops; the reason is logged once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

__all__ = ["FLAGS", "cpu_kernels", "kernels_key"]

log = logging.getLogger("chainserve.kernels")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
#: Compiler flags: vectorised for this CPU; fast-math lets GCC call glibc's vector ``expf``.
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffast-math")
#: Set to ``0`` to keep the lean layer on eager ops (A/B measurements, or a machine without a compiler).
DISABLE = "CHAINSERVE_CPU_KERNELS"


def kernels_key() -> str:
    """What the built library depends on: its source, torch, the flags and the CPU it is built for."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"{torch.__version__}|{' '.join(FLAGS)}|{platform.machine()}|{_cpu_flags()}".encode())
    return digest.hexdigest()[:16]


@functools.cache
def cpu_kernels():
    """``torch.ops.chainserve_cpu`` (built and loaded on the first call in a process), or ``None``
    where they are turned off or cannot be built (logged)."""
    if os.environ.get(DISABLE, "1") == "0":
        log.info("cpu kernels: off (%s=0), eager ops", DISABLE)
        return None
    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        log.warning("cpu kernels: not built for %s, eager ops", platform.machine())
        return None
    try:
        _build_and_load()
    except Exception as exc:  # a missing compiler or ninja: the eager ops still serve
        log.warning("cpu kernels: could not build (%s), eager ops", str(exc).strip().splitlines()[-1][:300])
        return None
    return torch.ops.chainserve_cpu


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    _ninja_on_path()
    key = kernels_key()
    build = Path.home() / ".cache" / "chainserve" / "kernels" / key
    build.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpp_extension.load(
        name=f"chainserve_cpu_{key}",
        sources=[str(SOURCE)],
        extra_cflags=list(FLAGS),
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    log.info("cpu kernels: loaded from %s in %.1f s", build, time.perf_counter() - started)


def _ninja_on_path() -> None:
    """torch's loader runs ``ninja``: the pip-installed one where none is on the PATH."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
