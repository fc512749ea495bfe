"""The per-token timeline: off unless started, and when on, every process's records land in its own file."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_backend import timeline
from mlx_backend.contract import Delta, Finished
from mlx_backend.ipc import EngineSide


@pytest.fixture
def on(tmp_path: Path) -> Iterator[Path]:
    path = timeline.start(tmp_path, "engine")
    yield path
    timeline.stop()


def rows(path: Path) -> list[list[object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_it_is_off_unless_started() -> None:
    assert not timeline.ACTIVE
    before = timeline.sampled_ns, timeline.launched_ns
    timeline.mark_sampled()
    timeline.mark_launched()
    assert (timeline.sampled_ns, timeline.launched_ns) == before
    a, b = socket.socketpair()
    side = EngineSide(a)
    side.hold(Delta("r", "x", 1))
    assert side._traced == []  # nothing kept for the timeline
    a.close()
    b.close()


def test_records_go_to_one_file_per_process(on: Path) -> None:
    assert on.name == f"engine-{os.getpid()}.jsonl"
    timeline.record("Q", "r", 1, 5)
    timeline.flush()
    timeline.record("D", "r", 9)
    timeline.stop()
    assert rows(on) == [["Q", "r", 1, 5], ["D", "r", 9]]


def test_engine_frames_carry_the_step_stamps_and_the_running_token_count(on: Path) -> None:
    a, b = socket.socketpair()
    side = EngineSide(a)
    timeline.mark_launched()
    timeline.mark_sampled()
    side.hold(Delta("r", "x", 2))
    side.hold(Delta("r", "y", 1))
    side.hold(Finished("r", "stop", 1, 3, 0))
    side.flush()
    timeline.stop()
    frames = rows(on)
    assert [f[:4] for f in frames] == [["E", "r", 2, 2], ["E", "r", 3, 1]]  # tokens so far, tokens in the frame
    for _, _, _, _, launched, sampled, emitted, begin, end in frames:
        assert 0 < launched <= sampled <= emitted <= begin <= end  # type: ignore[operator]
    a.close()
    b.close()


def test_a_step_that_did_not_stamp_its_launch_says_so(on: Path) -> None:
    a, b = socket.socketpair()
    side = EngineSide(a)
    timeline.mark_launched()
    timeline.mark_sampled()  # a solo step: launched, then sampled
    side.hold(Delta("r", "x", 1))
    timeline.mark_sampled()  # a batch step: BatchGenerator launches inside, unseen
    side.hold(Delta("r", "y", 1))
    side.flush()
    timeline.stop()
    launched = [row[4] for row in rows(on)]
    assert launched[0] > 0 and launched[1] == 0
    a.close()
    b.close()
