"""CPU placement: the engine on CPUs of its own, the gateway on the rest; refused when it cannot be had."""

from __future__ import annotations

import os
import sys

import pytest

from gateway.placement import parse_cpus, pin_this_process, plan
from gateway.settings import Settings

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sched_setaffinity is Linux's")


def test_cpu_lists_read_like_taskset() -> None:
    assert parse_cpus("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpus(" 5 ") == {5}
    for bad in ("", "3-1", "a", "-1", "1-"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_no_setting_no_placement() -> None:
    assert plan("") is None
    assert plan("  ") is None


@linux_only
def test_the_gateway_gets_every_allowed_cpu_the_engine_does_not() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    placement = plan(str(allowed[0]))
    assert placement == (frozenset({allowed[0]}), frozenset(allowed[1:]))


@linux_only
def test_impossible_placements_are_refused_at_start() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="no CPU for the gateway"):
        plan(",".join(map(str, allowed)))
    with pytest.raises(ValueError, match="may not use"):
        plan(str(max(allowed) + 1000))
    with pytest.raises(ValueError, match="engine_cpus"):
        Settings(engine_cpus="nonsense").check()


@linux_only
def test_pinning_this_process_moves_every_thread() -> None:
    import threading
    from pathlib import Path

    before = os.sched_getaffinity(0)
    started = threading.Event()
    done = threading.Event()
    thread = threading.Thread(target=lambda: (started.set(), done.wait(5)))
    thread.start()
    started.wait(5)
    target = frozenset({min(before)})
    try:
        pin_this_process(target)
        for task in Path("/proc/self/task").iterdir():
            assert os.sched_getaffinity(int(task.name)) == target
    finally:
        done.set()
        thread.join()
        pin_this_process(frozenset(before))
