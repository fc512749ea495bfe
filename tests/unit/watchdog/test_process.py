"""Finding, stopping and starting the server, against real child processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.watchdog.config import WatchdogConfig
from gateway.watchdog.process import (
    LaunchdServer,
    SpawnServer,
    StartError,
    exists,
    stop,
    unit_from_cgroup,
)

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"]
# Ignores SIGTERM, and leaves a grandchild in its process group (like an engine process).
STUBBORN = [sys.executable, "-c",
            "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print(child.pid, flush=True); time.sleep(120)"]


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def start(procs: list[subprocess.Popen[bytes]], argv: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)
    procs.append(proc)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().decode().strip()


def reaper(proc: subprocess.Popen[bytes]) -> object:
    return lambda: proc.poll()


def test_sigterm_is_enough_for_a_well_behaved_server(spawn: list[subprocess.Popen[bytes]]) -> None:
    proc, _ = start(spawn, SLEEPER)
    assert exists(proc.pid)
    began = time.monotonic()
    assert stop(proc.pid, 10, reaper(proc)) == "exited after SIGTERM"  # type: ignore[arg-type]
    assert time.monotonic() - began < 5
    assert proc.returncode == -signal.SIGTERM
    assert not exists(proc.pid)


def test_a_stopped_process_gets_sigcont_to_act_on_sigterm(spawn: list[subprocess.Popen[bytes]]) -> None:
    proc, _ = start(spawn, SLEEPER)
    os.kill(proc.pid, signal.SIGSTOP)
    assert stop(proc.pid, 10, reaper(proc)) == "exited after SIGTERM"  # type: ignore[arg-type]


def test_sigkill_after_the_deadline_takes_the_whole_group(spawn: list[subprocess.Popen[bytes]]) -> None:
    proc, grandchild = start(spawn, STUBBORN)
    began = time.monotonic()
    how = stop(proc.pid, 0.5, reaper(proc))  # type: ignore[arg-type]
    assert how == "still there 0.5s after SIGTERM: sent SIGKILL"
    assert 0.5 <= time.monotonic() - began < 5
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while exists(int(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not exists(int(grandchild))


def test_never_signals_a_group_it_does_not_lead(spawn: list[subprocess.Popen[bytes]]) -> None:
    # Same group as this test process: killing the group would kill pytest.
    proc = subprocess.Popen(SLEEPER, stdout=subprocess.DEVNULL)
    try:
        assert stop(proc.pid, 10, reaper(proc)) == "exited after SIGTERM"  # type: ignore[arg-type]
    finally:
        proc.kill()
        proc.wait(5)


def test_a_zombie_does_not_exist(spawn: list[subprocess.Popen[bytes]]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 5
    while exists(proc.pid) and time.monotonic() < deadline:  # exits, unreaped: a zombie
        time.sleep(0.05)
    assert not exists(proc.pid)
    proc.wait(5)


def test_gone_already() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(5)
    assert stop(proc.pid, 1, lambda: None) == "already gone"


def config(tmp_path: Path, command: list[str], match: str = "gateway") -> WatchdogConfig:
    return WatchdogConfig(state_dir=tmp_path, server_log=tmp_path / "server.log", process_match=match,
                          command=tuple(command))


def test_spawn_detaches_appends_output_and_passes_the_pid_file(tmp_path: Path) -> None:
    script = ("import os, time; from pathlib import Path; "
              "Path(os.environ['MLX_GATEWAY_PID_FILE']).write_text(str(os.getpid())); "
              "print('state', os.environ['MLX_GATEWAY_WATCHDOG_STATE_DIR'], os.getsid(0) == os.getpid(), "
              "flush=True); time.sleep(120)")
    (tmp_path / "server.log").write_text("earlier\n")
    server = SpawnServer(config(tmp_path, [sys.executable, "-c", script], match="MLX_GATEWAY_PID_FILE"))
    server.start()
    try:
        deadline = time.monotonic() + 10
        while "state" not in (tmp_path / "server.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "server.log").read_text() == f"earlier\nstate {tmp_path} True\n"
        pid = server.pid()
        assert pid is not None and (tmp_path / "server.pid").read_text() == str(pid)
    finally:
        assert pid is not None
        stop(pid, 5, server.reap)
    assert server.pid() is None
    assert server.exit_note() == f"pid {pid} killed by SIGTERM"


def test_spawn_of_a_missing_program_is_a_start_error(tmp_path: Path) -> None:
    with pytest.raises(StartError, match="cannot run"):
        SpawnServer(config(tmp_path, [str(tmp_path / "no-such-program")])).start()


def test_a_stale_pid_file_naming_a_stranger_is_ignored(tmp_path: Path,
                                                       spawn: list[subprocess.Popen[bytes]]) -> None:
    stranger, _ = start(spawn, SLEEPER)  # its command line does not contain "gateway"
    (tmp_path / "server.pid").write_text(f"{stranger.pid}\n")
    assert SpawnServer(config(tmp_path, ["true"])).pid() is None
    assert SpawnServer(config(tmp_path, ["true"], match="time.sleep")).pid() == stranger.pid
    (tmp_path / "server.pid").write_text("garbage")
    assert SpawnServer(config(tmp_path, ["true"])).pid() is None


def test_unit_from_cgroup() -> None:
    ours = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/mlx-gateway.service\n"
    assert unit_from_cgroup(ours) == "systemd unit mlx-gateway.service"
    terminal = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/vte-spawn-1.scope\n"
    assert unit_from_cgroup(terminal) is None
    other = "0::/system.slice/ssh.service\n"
    assert unit_from_cgroup(other) is None
    v1 = "12:pids:/user.slice\n1:name=systemd:/system.slice/mlx-gateway.service\n"
    assert unit_from_cgroup(v1) == "systemd unit mlx-gateway.service"


FAKE_LAUNCHCTL = """#!/bin/sh
echo "$@" >> "{calls}"
case "$1" in
  print) [ -f "{pid}" ] || exit 113
         printf 'gui/501/io.mlx-gateway.server = {{\\n\\tstate = running\\n'
         printf '\\tpid = %s\\n\\tlast exit code = 1\\n}}\\n' "$(cat "{pid}")" ;;
  kickstart) exit {kickstart_rc} ;;
esac
"""


def fake_launchctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kickstart_rc: int = 0) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "launchctl"
    script.write_text(FAKE_LAUNCHCTL.format(calls=tmp_path / "calls", pid=tmp_path / "pid",
                                            kickstart_rc=kickstart_rc))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "calls"


def test_launchd_mode_asks_launchd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_launchctl(tmp_path, monkeypatch)
    server = LaunchdServer("io.mlx-gateway.server")
    target = f"gui/{os.getuid()}/io.mlx-gateway.server" if os.getuid() else "system/io.mlx-gateway.server"
    assert server.target == target
    assert server.pid() is None  # not running: launchctl print has no pid
    (tmp_path / "pid").write_text(str(os.getpid()))
    assert server.pid() == os.getpid()
    server.start()
    assert server.exit_note() == "launchd: last exit code = 1"
    assert calls.read_text().splitlines()[-2] == f"kickstart -k {target}"


def test_launchd_refusal_is_a_start_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_launchctl(tmp_path, monkeypatch, kickstart_rc=113)
    with pytest.raises(StartError, match="exited 113"):
        LaunchdServer("io.mlx-gateway.server").start()
