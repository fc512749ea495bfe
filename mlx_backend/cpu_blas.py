"""The BLAS that MLX's CPU backend multiplies matrices with, in the engine process (Linux).

MLX's Linux CPU wheel (`mlx[cpu]` 0.32.4) links the reference BLAS, which multiplies a prompt's matrices at
about 3.5 GFLOP/s on a 2-core x86 VM where OpenBLAS does 165 (SmolLM2-135M in float32 there: prompts 10 ->
197 tok/s, decoding 7.9 -> 15.4; docs/benchmarks.md). MLX reaches `cblas_sgemm` through the dynamic linker, so a
BLAS preloaded into the engine process (LD_PRELOAD, in the engine's environment only: the gateway has no MLX)
takes those calls. On macOS MLX uses Accelerate and there is nothing to do.

No MLX here: the gateway imports this to build the engine's environment; `in_use` runs in the engine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

# Where distributions put OpenBLAS (Debian/Ubuntu: libopenblas0-pthread, or -openmp / -serial; Fedora/RHEL:
# openblas). `auto` takes the first that exists.
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def system_openblas(paths: tuple[str, ...] = OPENBLAS_PATHS) -> str | None:
    return next((p for p in paths if Path(p).is_file()), None)


def choose(setting: str, platform: str = sys.platform, paths: tuple[str, ...] = OPENBLAS_PATHS) -> str | None:
    """The library to preload into the engine for `setting` ("auto", "off" or a path), or None. A path that is
    not a file is a ValueError (the gateway refuses to start: a typo must not silently cost 20x)."""
    if setting == "off":
        return None
    if setting != "auto":
        if not Path(setting).is_file():
            raise ValueError(f"cpu_blas {setting!r} is not a file (give auto, off, or a BLAS library's path)")
        if ":" in setting or any(c.isspace() for c in setting):
            raise ValueError(f"cpu_blas {setting!r}: the dynamic linker would split a path at ':' or a space")
        return os.path.abspath(setting) if platform == "linux" else None  # a bare name would be searched for
    return system_openblas(paths) if platform == "linux" else None


def engine_env(setting: str, engine_cpus: int = 0, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What the engine's environment gets for `setting`: LD_PRELOAD with the chosen library first (an operator's
    own preloads kept after it), and OpenBLAS's threads: the engine's CPUs when it is pinned (`engine_cpus`), else
    all but one, so the gateway keeps a core. OpenBLAS's idle threads spin before they sleep: with every core
    theirs, the gateway's /metrics p99 reached 600 ms on 2 saturated cores. An operator's OPENBLAS_NUM_THREADS
    wins."""
    library = choose(setting)
    if library is None:
        return {}
    others = [p for p in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p and p != library]
    threads = engine_cpus or max(1, len(os.sched_getaffinity(0)) - 1)
    return {"LD_PRELOAD": ":".join([library, *others]),
            "OPENBLAS_NUM_THREADS": environ.get("OPENBLAS_NUM_THREADS", str(threads))}


def in_use() -> str:
    """In the engine, for its start log: the library whose `cblas_sgemm` this process resolves first (a preloaded
    one comes before MLX's own, which is loaded privately and not found here)."""
    path = _sgemm_library()
    if not path:
        return "MLX's reference BLAS (slow for prompts: install OpenBLAS, see cpu_blas in docs/configuration.md)"
    return path


def reference_in_use() -> bool:
    """In the engine (Linux): whether MLX's reference BLAS multiplies its matrices. It takes as long per row for
    a pass of several tokens as for several passes of one, so nothing that feeds tokens together pays there."""
    return not _sgemm_library()


def _sgemm_library() -> str:
    """The file `cblas_sgemm` resolves to in this process; "": MLX's own reference BLAS (or none found)."""
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    process = ctypes.CDLL(None)
    info = DlInfo()
    try:
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
        found = process.dladdr(address, ctypes.byref(info)) and info.dli_fname
    except AttributeError:  # no cblas_sgemm in the global scope (or no dladdr)
        found = False
    path = os.fsdecode(info.dli_fname) if found else ""
    return "" if "mlx_cpu.libs" in path else path
