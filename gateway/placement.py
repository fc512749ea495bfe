"""Optional CPU placement (Linux): the engine process on CPUs of its own, the gateway on the others.

Why one might: the engine's MLX thread is the critical path of every token. When it writes a step's
frames, the kernel wakes the gateway (and the gateway wakes Granian's thread, which wakes the client),
and may run them on the engine's own CPU, pre-empting it or making it wait to run again when its device
work completes. Disjoint CPUs rule that out. Off by default: on the 2-core CPU test machine it removed the
engine's pre-emptions and changed no throughput (docs/benchmarks.md); the GPU measurement decides.
Never for the CPU backend with few cores: there the engine needs every core for the model itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def parse_cpus(text: str) -> frozenset[int]:
    """ "0-3,8" -> {0, 1, 2, 3, 8}; raises ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        low, high = int(first), int(last) if dash else int(first)
        if low < 0 or high < low:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError("no CPUs given")
    return frozenset(cpus)


def plan(engine_cpus: str) -> tuple[frozenset[int], frozenset[int]] | None:
    """(engine CPUs, gateway CPUs) for the setting, or None when it is empty. Raises ValueError when it
    cannot be honoured: not Linux, CPUs this process may not use, or none left for the gateway."""
    if not engine_cpus.strip():
        return None
    if not sys.platform.startswith("linux"):
        raise ValueError("engine_cpus needs Linux (sched_setaffinity)")
    engine = parse_cpus(engine_cpus)
    allowed = frozenset(os.sched_getaffinity(0))
    if not engine <= allowed:
        raise ValueError(f"engine_cpus names CPUs this process may not use: {sorted(engine - allowed)}")
    gateway = allowed - engine
    if not gateway:
        raise ValueError("engine_cpus leaves no CPU for the gateway")
    return engine, gateway


def pin_this_process(cpus: frozenset[int]) -> None:
    """Every thread of this process (threads started later inherit their creator's mask)."""
    tasks = Path("/proc/self/task")
    tids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)
