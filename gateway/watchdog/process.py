"""Finding, stopping and starting the server process.

Two ways to start it, one way to stop it:
- `SpawnServer`: run the server command detached (own session, output appended to a log file). Linux
  without systemd, or anywhere by hand.
- `LaunchdServer`: `launchctl kickstart -k` of the server's launchd job, so the server keeps its plist's
  environment and log paths; launchd itself never restarts it (no KeepAlive), the watchdog does.
- `stop`: SIGTERM to the server (it drains), SIGKILL to its whole process group after a deadline, like
  systemd's KillMode=mixed: the gateway stops its own engine child in order while draining.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gateway.watchdog.config import WatchdogConfig

log = logging.getLogger("mlx_gateway.watchdog")


class StartError(Exception):
    """The server could not even be launched (missing executable, launchctl refused)."""


class ServerControl(Protocol):
    def pid(self) -> int | None:
        """The running server's pid, or None when none runs."""

    def start(self) -> None:
        """Launch a new server; raise StartError when that is impossible."""

    def exit_note(self) -> str:
        """What is known about how the last started server ended, for the log."""

    def reap(self) -> None:
        """Collect exited children of ours so they do not linger as zombies."""


# -- facts about a pid


def exists(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return _state(pid) != "Z"


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]  # the name in parentheses may hold spaces
    except (OSError, IndexError):
        pass
    if sys.platform.startswith("linux"):
        return None
    out = _run(["ps", "-o", "stat=", "-p", str(pid)])
    return (out or "").strip()[:1] or None


def command_line(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        pass
    out = _run(["ps", "-ww", "-o", "command=", "-p", str(pid)])
    return (out or "").strip() or None


def managed_by_systemd(pid: int) -> str | None:
    """'systemd unit mlx-gateway.service' when our unit owns this pid (Linux cgroups), else None."""
    try:
        return unit_from_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None


def systemd_unit_in_charge(unit: str = "mlx-gateway.service") -> str | None:
    """'systemd user unit X is enabled/active' when systemd already restarts the server, else None."""
    if shutil.which("systemctl") is None:
        return None
    for verb, good in (("is-active", ("active", "activating", "reloading")), ("is-enabled", ("enabled",))):
        state = (_run(["systemctl", "--user", verb, unit], timeout_s=5) or "").strip()
        if state in good:
            return f"systemd user unit {unit} is {state}"
    return None


def unit_from_cgroup(text: str) -> str | None:
    for line in text.splitlines():
        units = [part for part in line.rsplit(":", 1)[-1].split("/") if part.endswith(".service")]
        if units and units[-1].startswith("mlx-gateway"):
            return f"systemd unit {units[-1]}"
    return None


def _run(argv: list[str], timeout_s: float = 10.0) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def read_pid_file(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 1 else None


# -- stopping


def stop(pid: int, timeout_s: float, reap: Callable[[], None]) -> str:
    """SIGTERM (+SIGCONT, so a stopped process can act on it), SIGKILL the group after the deadline."""
    try:
        leader = os.getpgid(pid) == pid  # never signal a group we did not make (e.g. a login shell's)
    except ProcessLookupError:
        return "already gone"
    _signal(pid, signal.SIGTERM, group=False)
    _signal(pid, signal.SIGCONT, group=leader)
    if _wait_gone(pid, timeout_s, reap):
        how = "exited after SIGTERM"
    else:
        _signal(pid, signal.SIGKILL, group=leader)
        _wait_gone(pid, 5.0, reap)
        how = f"still there {timeout_s:g}s after SIGTERM: sent SIGKILL"
    if leader:
        _signal(pid, signal.SIGKILL, group=True)  # whatever the server left behind in its group
    return how


def _signal(pid: int, signum: signal.Signals, *, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout_s: float, reap: Callable[[], None]) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        reap()
        if not exists(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# -- the two ways to start


class SpawnServer:
    def __init__(self, config: WatchdogConfig) -> None:
        self.config = config
        self._children: list[subprocess.Popen[bytes]] = []
        self._last_exit: str = "no server started by this watchdog yet"

    def reap(self) -> None:
        for child in list(self._children):
            code = child.poll()
            if code is not None:
                self._children.remove(child)
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                self._last_exit = f"pid {child.pid} {how}"
                log.info("server %s", self._last_exit,
                         extra={"fields": {"event": "exited", "pid": child.pid, "code": code}})

    def pid(self) -> int | None:
        self.reap()
        pid = read_pid_file(self.config.pid_path)
        if pid is not None and exists(pid) and self._is_server(pid):
            return pid
        running = [c.pid for c in self._children if c.poll() is None]
        return running[-1] if running else None

    def _is_server(self, pid: int) -> bool:
        # A pid file can outlive its process (a crash, a reboot): never signal a stranger that reused the pid.
        if any(c.pid == pid for c in self._children):
            return True
        cmd = command_line(pid)
        if cmd is None:
            return True  # cannot tell (no /proc, no ps): trust the pid file
        if self.config.process_match in cmd:
            return True
        log.warning("pid file %s names pid %d, which is not the server (%s); ignoring it",
                    self.config.pid_path, pid, cmd[:200])
        return False

    def start(self) -> None:
        config = self.config
        if (pid := read_pid_file(config.pid_path)) is not None and not exists(pid):
            config.pid_path.unlink(missing_ok=True)
        config.server_log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               # The server writes the pid file we read, and exports our state as metrics.
               "MLX_GATEWAY_PID_FILE": str(config.pid_path),
               "MLX_GATEWAY_WATCHDOG_STATE_DIR": str(config.state_dir)}
        try:
            with config.server_log_path.open("ab") as out:
                child = subprocess.Popen(list(config.command), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as exc:
            raise StartError(f"cannot run {config.command[0]!r}: {exc}") from exc
        self._children.append(child)
        log.info("spawned pid %d: %s (output appended to %s)", child.pid, " ".join(config.command),
                 config.server_log_path, extra={"fields": {"event": "spawned", "pid": child.pid}})

    def exit_note(self) -> str:
        self.reap()
        return self._last_exit


_PID_LINE = re.compile(r"^\s*pid = (\d+)\s*$", re.MULTILINE)


def launchd_target(label: str) -> str:
    # root manages LaunchDaemons (system domain); a user's watchdog, that user's LaunchAgents.
    return f"system/{label}" if os.getuid() == 0 else f"gui/{os.getuid()}/{label}"


class LaunchdServer:
    def __init__(self, label: str) -> None:
        self.target = launchd_target(label)

    def reap(self) -> None:
        pass  # launchd is the parent, and reaps

    def pid(self) -> int | None:
        # launchd's word, not a pid file: nothing a user can write decides what a root watchdog signals.
        out = _run(["launchctl", "print", self.target])
        match = _PID_LINE.search(out or "")
        if match is None:
            return None
        pid = int(match.group(1))
        return pid if exists(pid) else None

    def start(self) -> None:
        try:
            done = subprocess.run(["launchctl", "kickstart", "-k", self.target], capture_output=True,
                                  text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StartError(f"launchctl kickstart {self.target}: {exc}") from exc
        if done.returncode != 0:
            raise StartError(f"launchctl kickstart {self.target} exited {done.returncode}: "
                             f"{(done.stderr or done.stdout).strip()}")
        log.info("kickstarted %s", self.target, extra={"fields": {"event": "spawned"}})

    def exit_note(self) -> str:
        out = _run(["launchctl", "print", self.target]) or ""
        match = re.search(r"last exit (?:code|reason) = .+", out)
        return f"launchd: {match.group(0).strip()}" if match else "launchd: no exit recorded"
