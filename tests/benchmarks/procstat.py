"""Per-thread scheduler figures of a process from /proc (Linux), and the machine's physical cores.

`snapshot(pid)` reads each thread's schedstat (nanoseconds on a CPU, nanoseconds runnable but waiting for
one, timeslices) and its voluntary/involuntary switches and migrations; `delta` subtracts two snapshots
and groups threads by name (the MLX thread is the engine's main thread, named after the process).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class ThreadStat:
    cpu_ns: int = 0  # on a CPU
    runqueue_ns: int = 0  # runnable, waiting for a CPU
    slices: int = 0
    voluntary: int = 0  # switches: blocked (I/O, sleep, a lock, the device)
    involuntary: int = 0  # switches: preempted
    migrations: int = 0
    threads: int = 1

    def __sub__(self, other: ThreadStat) -> ThreadStat:
        return ThreadStat(*[getattr(self, f.name) - getattr(other, f.name) for f in fields(self)][:-1],
                          threads=self.threads)

    def __add__(self, other: ThreadStat) -> ThreadStat:
        return ThreadStat(*[getattr(self, f.name) + getattr(other, f.name) for f in fields(self)])


def _thread(task: Path) -> tuple[str, ThreadStat] | None:
    try:
        name = (task / "comm").read_text().strip()
        exec_ns, wait_ns, slices = (int(x) for x in (task / "schedstat").read_text().split()[:3])
        stat = ThreadStat(exec_ns, wait_ns, slices)
        for line in (task / "sched").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "nr_voluntary_switches":
                stat.voluntary = int(value)
            elif key == "nr_involuntary_switches":
                stat.involuntary = int(value)
            elif key == "se.nr_migrations":
                stat.migrations = int(value)
        return name, stat
    except (OSError, ValueError):
        return None


def snapshot(pid: int) -> dict[int, tuple[str, ThreadStat]]:
    out: dict[int, tuple[str, ThreadStat]] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            got = _thread(task)
            if got is not None:
                out[int(task.name)] = got
    return out


def delta(before: dict[int, tuple[str, ThreadStat]], after: dict[int, tuple[str, ThreadStat]],
          main_tid: int | None = None) -> dict[str, ThreadStat]:
    """Per thread name (the main thread as "main"), what happened between the snapshots; "all" sums them."""
    groups: dict[str, ThreadStat] = {}
    total = ThreadStat(threads=0)
    for tid, (name, stat) in after.items():
        base = before.get(tid, (name, ThreadStat()))[1]
        change = stat - base
        key = "main" if tid == main_tid else name
        groups[key] = groups[key] + change if key in groups else change
        total = total + change
    groups["all"] = total
    return groups


def physical_cores() -> list[list[int]]:
    """CPUs grouped by physical core (SMT siblings together), in order; one group per CPU if unknown."""
    allowed = sorted(os.sched_getaffinity(0))
    groups: dict[str, list[int]] = {}
    for cpu in allowed:
        try:
            key = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            key = str(cpu)
        groups.setdefault(key, []).append(cpu)
    return list(groups.values())
