"""The watchdog against real processes, with intervals shortened by its settings.

Each scenario runs `python -m gateway.watchdog` as its own process. The kill -9 and SIGSTOP scenarios run
against both the stand-in server (cheap, crashable) and the real `mlx-gateway serve` on a tiny model.
Every process a test starts is killed in teardown, and teardown fails if one survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.server import free_port

STAND_IN = Path(__file__).resolve().parent.parent / "unit" / "watchdog" / "stand_in_server.py"


@dataclass(frozen=True)
class Timing:
    interval: float
    timeout: float
    misses: int
    stop_timeout: float
    start_timeout: float


STAND_IN_TIMING = Timing(interval=1.0, timeout=0.5, misses=2, stop_timeout=5.0, start_timeout=10.0)
REAL_TIMING = Timing(interval=2.0, timeout=1.0, misses=2, stop_timeout=15.0, start_timeout=60.0)


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def health_ok(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + "/health", timeout=1).status_code == 200
    return False


@dataclass
class Harness:
    root: Path
    command: list[str]
    match: str
    timing: Timing
    port: int
    max_restarts: int = 5
    watchdogs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def crash_file(self) -> Path:
        return self.root / "crash-at-start"

    @property
    def watchdog_log(self) -> Path:
        return self.root / "watchdog.log"

    def watchdog_argv(self, *extra: str) -> list[str]:
        t = self.timing
        return [sys.executable, "-m", "gateway.watchdog", "--url", self.url, "--interval", str(t.interval),
                "--timeout", str(t.timeout), "--misses", str(t.misses), "--stop-timeout", str(t.stop_timeout),
                "--start-timeout", str(t.start_timeout), "--max-restarts", str(self.max_restarts), "--window", "3600",
                "--state-dir", str(self.state_dir), "--server-log", str(self.root / "server.log"),
                "--process-match", self.match, "--log-json", *extra]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", "STAND_IN_STARTS_FILE": str(self.root / "starts"),
                "STAND_IN_CRASH_FILE": str(self.crash_file)}

    def start_watchdog(self) -> subprocess.Popen[bytes]:
        with self.watchdog_log.open("ab") as log:
            proc = subprocess.Popen([*self.watchdog_argv(), "--", *self.command], stdout=log,
                                    stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        self.watchdogs.append(proc)
        return proc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.watchdog_argv(*args)], capture_output=True, text=True, timeout=30,
                              env=self.env(), check=False)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        if not self.watchdog_log.exists():
            return []
        found = []
        for line in self.watchdog_log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                    found.append(entry)
        return found

    def server_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.state_dir / "server.pid").read_text())
            return pid if psutil.pid_exists(pid) else None
        return None

    def starts(self) -> int:
        path = self.root / "starts"
        return len(path.read_text().split()) if path.exists() else 0

    def spawned_pids(self) -> list[int]:
        return [e["pid"] for e in self.events("spawned")]

    def explain(self) -> str:
        def tail(path: Path, n: int) -> str:
            return path.read_text(errors="replace")[-n:] if path.exists() else ""

        server_log = tail(self.root / "server.log", 3000)
        return f"--- watchdog log\n{tail(self.watchdog_log, 6000)}\n--- server log\n{server_log}"

    def cleanup(self) -> None:
        for proc in self.watchdogs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in self.spawned_pids():  # servers run in their own sessions: their group is theirs
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGCONT)
                    os.killpg(pid, signal.SIGKILL)
        survivors = wait_for_no_survivors(self.root, set(self.spawned_pids()))
        assert not survivors, f"processes left behind: {survivors}"


def wait_for_no_survivors(root: Path, groups: set[int]) -> list[str]:
    """Live processes in a server's process group (engine children too) or naming the test's folder."""
    def survivors() -> list[str]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            with contextlib.suppress(psutil.Error, OSError):
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(proc.info["cmdline"] or [])
                if os.getpgid(proc.info["pid"]) in groups or str(root) in cmd:
                    found.append(f"{proc.info['pid']}: {cmd[:160]}")
        return found

    deadline = time.monotonic() + 10
    while (left := survivors()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def real_server_available() -> bool:
    done = subprocess.run([sys.executable, "-c", "import gateway.cli, gateway.serve"], capture_output=True,
                          check=False)
    return done.returncode == 0


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[Harness]:
    port = free_port()
    harness = Harness(tmp_path, [sys.executable, str(STAND_IN), "--port", str(port)], "stand_in_server",
                      STAND_IN_TIMING, port)
    yield harness
    harness.cleanup()


@pytest.fixture(params=["stand-in", "real"])
def any_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    port = free_port()
    if request.param == "stand-in":
        harness = Harness(tmp_path, [sys.executable, str(STAND_IN), "--port", str(port)], "stand_in_server",
                          STAND_IN_TIMING, port)
    else:
        if not real_server_available():
            pytest.skip("gateway.cli / gateway.serve cannot be imported yet")
        models_dir: Path = request.getfixturevalue("models_dir")
        command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--no-hf-cache",
                   "--models-dir", str(models_dir), "--drain-timeout-s", "2"]
        harness = Harness(tmp_path, command, "gateway.cli", REAL_TIMING, port)
    yield harness
    harness.cleanup()


def start_and_wait_healthy(h: Harness) -> tuple[int, float]:
    """Start the watchdog with no server running: it starts one. Returns (pid, seconds to /health 200)."""
    began = time.monotonic()
    h.start_watchdog()
    try:
        wait_for("the first /health 200", lambda: health_ok(h.url), h.timing.start_timeout + 10, 0.1)
        wait_for("the watchdog to see it", lambda: h.events("recovered"), 10)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{h.explain()}") from None
    took = time.monotonic() - began
    pid = wait_for("the pid file", h.server_pid, 5)
    return pid, took


@pytest.mark.slow
def test_kill_9_is_restarted_within_one_interval_plus_start_time(any_server: Harness) -> None:
    h = any_server
    old, start_time = start_and_wait_healthy(h)
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for("/health to fail", lambda: not health_ok(h.url), 5, 0.01)
    bound = h.timing.interval + start_time + 2.0  # 2 s: a probe in flight, process start jitter
    try:
        wait_for("a new healthy server", lambda: h.server_pid() not in (None, old) and health_ok(h.url),
                 bound, 0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{h.explain()}") from None
    took = time.monotonic() - killed_at
    assert took <= bound
    wait_for("the recovery to be logged", lambda: len(h.events("recovered")) == 2, 5)
    restart = h.events("restart")[-1]
    assert restart["reason"] == "the server process is not running"
    # Each step is logged, in order: no stop (nothing left to stop), a spawn, the recovery.
    names = [e.get("event") for e in h.events()]
    after = names[len(names) - 1 - names[::-1].index("restart"):]
    assert [n for n in after if n in ("stopped", "spawned", "recovered")] == ["spawned", "recovered"]
    assert len(h.spawned_pids()) == 2  # the first start and the one restart


@pytest.mark.slow
def test_sigstop_is_detected_after_the_misses_then_killed_and_restarted(any_server: Harness) -> None:
    h = any_server
    old, _ = start_and_wait_healthy(h)
    os.kill(old, signal.SIGSTOP)
    stopped_at = time.monotonic()
    t = h.timing
    bound = t.misses * (t.interval + t.timeout) + t.stop_timeout + t.start_timeout
    try:
        wait_for("a new healthy server", lambda: h.server_pid() not in (None, old) and health_ok(h.url),
                 bound, 0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{h.explain()}") from None
    detected = time.monotonic() - stopped_at
    misses = [e for e in h.events("miss") if e["pid"] == old]
    restart = h.events("restart")[-1]
    assert len(misses) == t.misses - 1, h.explain()  # the last miss is the restart itself
    assert restart["reason"].startswith(f"hung: pid {old} alive but /health/live missed {t.misses} checks")
    assert detected >= (t.misses - 1) * t.interval  # not before the configured misses
    stopped = h.events("stopped")[-1]
    assert stopped["pid"] == old
    assert stopped["how"] == "exited after SIGTERM"  # SIGCONT let the stopped server drain and exit
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_crash_at_every_start_gives_up_after_five_restarts_then_reset_allows_one(stand_in: Harness) -> None:
    h = stand_in
    h.crash_file.touch()
    h.start_watchdog()
    marker = h.state_dir / "gave-up.json"
    try:
        wait_for("the give-up marker", marker.exists, 15 * h.timing.interval, 0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{h.explain()}") from None
    time.sleep(3 * h.timing.interval)  # no more starts after giving up
    assert h.starts() == 6, h.explain()  # the first start, then the budget of 5 restarts
    assert len(h.events("first_start")) == 1 and len(h.events("restart")) == 5
    gave_up = h.events("gave_up")
    assert len(gave_up) == 1
    assert "the server process is not running; 5 restarts in the window (budget 5)" in gave_up[0]["message"]
    assert "--reset" in gave_up[0]["message"] and gave_up[0]["level"] == "critical"
    assert len(h.events("restart_failed")) == 6
    assert "exited with code 1" in h.events("restart_failed")[0]["reason"]
    status = h.cli("--status")
    assert status.returncode == 1 and "GAVE UP" in status.stdout

    h.crash_file.unlink()  # the human fixes the cause, then resets
    reset = h.cli("--reset")
    assert reset.returncode == 0 and "cleared the give-up marker" in reset.stdout
    wait_for("the server after --reset", lambda: health_ok(h.url), 3 * h.timing.interval + 5, 0.1)
    time.sleep(3 * h.timing.interval)
    assert h.starts() == 7, h.explain()
    assert not marker.exists()
    assert h.cli("--status").returncode == 0


@pytest.mark.slow
def test_a_restarted_watchdog_keeps_counting_and_only_one_runs(stand_in: Harness) -> None:
    h = stand_in
    h.crash_file.touch()
    first = h.start_watchdog()
    wait_for("two starts", lambda: h.starts() >= 2, 10 * h.timing.interval, 0.02)
    first.kill()
    first.wait(5)
    status = json.loads(h.cli("--status", "--json").stdout)
    counted = status["watchdog"]["restarts_last_hour"]  # the first start is not among them
    assert counted in (1, 2)  # a second may be on the ledger, recorded just before its spawn
    assert status["watchdog"]["running"] is False

    restarts_before = len(h.events("restart"))
    second = h.start_watchdog()
    wait_for("the second watchdog to take the lock", lambda: len(h.events("watchdog_started")) == 2, 10)
    extra = h.start_watchdog()  # another one at the same time must refuse
    assert extra.wait(10) == 3
    wait_for("the give-up marker", (h.state_dir / "gave-up.json").exists, 15 * h.timing.interval, 0.1)
    time.sleep(2 * h.timing.interval)
    assert second.poll() is None  # gave up, but keeps running to report and to resume after --reset
    assert h.starts() <= 6, h.explain()
    ledger = json.loads((h.state_dir / "restarts.json").read_text())
    assert [s.get("counted", True) for s in ledger["starts"]] == [False] + [True] * 5
    # The new watchdog continued the count; it did not start again from zero.
    second_starts = [e["start"] for e in h.events("restart")[restarts_before:]]
    assert second_starts == list(range(counted + 1, 6))


@pytest.mark.slow
def test_a_budget_of_three_restarts_three_kill_9s_and_gives_up_at_the_fourth(stand_in: Harness) -> None:
    """The budget counts restarts after failures; the first start of the server is not one of them."""
    h = stand_in
    h.max_restarts = 3
    pid, _ = start_and_wait_healthy(h)
    for n in (1, 2, 3):
        os.kill(pid, signal.SIGKILL)
        try:
            pid = wait_for(f"restart {n}", lambda old=pid: (new := h.server_pid()) not in (None, old)
                           and health_ok(h.url) and new, 3 * h.timing.interval + 10, 0.05)
            # The watchdog saw it come back: the next kill is of a server it knows is up.
            wait_for(f"recovery {n} logged", lambda n=n: len(h.events("recovered")) == n + 1, 10)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{h.explain()}") from None
    os.kill(pid, signal.SIGKILL)
    marker = h.state_dir / "gave-up.json"
    try:
        wait_for("the give-up marker", marker.exists, 3 * h.timing.interval + 5, 0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{h.explain()}") from None
    time.sleep(2 * h.timing.interval)
    assert h.starts() == 4 and not health_ok(h.url), h.explain()
    assert [e["start"] for e in h.events("restart")] == [1, 2, 3]
    assert h.events("restart_failed") == []
    assert "3 restarts in the window (budget 3)" in h.events("gave_up")[0]["message"]
    assert json.loads(h.cli("--status", "--json").stdout)["watchdog"]["restarts_last_hour"] == 3
