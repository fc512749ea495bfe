"""Service files checked by the tools that read them, and the Mac scripts run against a fake launchctl.

- systemd: `systemd-analyze verify` (system and --user managers) must print nothing: it exits 0 even on
  unknown keys and bad values, so silence is the pass condition.
- launchd: no plutil on Linux; plistlib parses the files (tests/unit/service) and a fake `plutil -lint`
  does the same for the scripts. The committed plists must equal what the code generates.
- Scripts: shellcheck, then install.sh / start.sh / uninstall.sh in a throwaway HOME, recording each
  launchctl call.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.service import launchd, systemd
from gateway.service.cli import REPO_MAC_DIR, template_files
from gateway.service.spec import ServiceSpec

SCRIPTS = sorted(REPO_MAC_DIR.glob("*.sh"))


def test_committed_plists_are_what_the_code_generates() -> None:
    for path, data in template_files(REPO_MAC_DIR).items():
        assert path.exists(), f"missing {path}: run 'python -m gateway.service templates'"
        assert path.read_bytes() == data, f"{path} is stale: run 'python -m gateway.service templates'"
        plistlib.loads(data)


def _verify(unit_text: str, tmp_path: Path, user: bool) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = tmp_path / "mlx-gateway.service"
    unit.write_text(unit_text)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    # --user needs a runtime folder even to verify a file; --man=no skips checking Documentation= pages.
    argv = ["systemd-analyze", *(["--user"] if user else []), "--man=no", "verify", str(unit)]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.mark.parametrize("user", [False, True], ids=["system-manager", "user-manager"])
def test_systemd_analyze_verify_is_silent(tmp_path: Path, user: bool) -> None:
    spec = ServiceSpec(python=sys.executable, serve_args=("--models-dir", str(tmp_path / "my models")))
    done = _verify(systemd.server_unit(spec), tmp_path, user)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    unit = systemd.server_unit(ServiceSpec(python=sys.executable))
    broken = unit.replace("KillMode=mixed", "KillMode=gently").replace("WatchdogSec=", "WatchdogSecs=")
    done = _verify(broken, tmp_path, user=False)
    assert done.returncode == 0  # warnings only: silence, not the exit code, is the pass condition
    assert "ignoring: gently" in done.stderr
    assert "Unknown key 'WatchdogSecs' in section [Service]" in done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout
    assert os.access(script, os.X_OK)


FAKE_LAUNCHCTL = r"""#!/usr/bin/env bash
# Records each call; keeps the set of loaded labels in a file, like launchd would.
echo "$*" >> "$FAKE_DIR/calls"
loaded="$FAKE_DIR/loaded"; touch "$loaded"
label() { basename "${1%.plist}"; }
case "$1" in
  print) grep -qx "${2##*/}" "$loaded" || exit 113 ;;
  bootstrap) grep -qx "$(label "$3")" "$loaded" && exit 5; label "$3" >> "$loaded" ;;
  bootout) grep -qx "${2##*/}" "$loaded" || exit 113; grep -vx "${2##*/}" "$loaded" > "$loaded.new" || true
           mv "$loaded.new" "$loaded" ;;
  kickstart) target="${*: -1}"; grep -qx "${target##*/}" "$loaded" || exit 113 ;;
  *) exit 64 ;;
esac
"""

FAKE_PLUTIL = f"""#!/usr/bin/env bash
[ "$1" = -lint ] || exit 64
exec {sys.executable} -c 'import plistlib, sys; plistlib.loads(open(sys.argv[1], "rb").read())' "$2"
"""


@pytest.fixture
def mac(tmp_path: Path) -> dict[str, str]:
    """An environment with a fake launchctl and plutil first on PATH and a throwaway HOME."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("launchctl", FAKE_LAUNCHCTL), ("plutil", FAKE_PLUTIL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    return {**os.environ, "HOME": str(home), "FAKE_DIR": str(tmp_path), "MLX_GATEWAY_PYTHON": sys.executable,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def run_script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO_MAC_DIR / name), *args], capture_output=True, text=True,
                          timeout=120, env=env, check=False)


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_DIR"]) / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_install_start_uninstall_with_launchctl(mac: dict[str, str]) -> None:
    uid, home = os.getuid(), Path(mac["HOME"])
    agents = home / "Library" / "LaunchAgents"
    models = str(home / "models")

    done = run_script("install.sh", mac, "--", "--models-dir", models)
    assert done.returncode == 0, done.stderr
    expected = launchd.files(ServiceSpec(python=sys.executable, home=str(home),
                                         serve_args=("--models-dir", models)))
    assert {p: p.read_bytes() for p in agents.iterdir()} == expected
    boot = [c for c in calls(mac) if c.startswith("bootstrap")]
    assert boot == [f"bootstrap gui/{uid} {agents}/io.mlx-gateway.server.plist",
                    f"bootstrap gui/{uid} {agents}/io.mlx-gateway.watchdog.plist"]

    # Reinstalling boots out what runs, the watchdog before the server, then bootstraps anew.
    before = len(calls(mac))
    assert run_script("install.sh", mac).returncode == 0
    again = [c.split()[0] + " " + c.split()[-1].rsplit("/", 1)[-1] for c in calls(mac)[before:]
             if c.split()[0] in ("bootout", "bootstrap")]
    assert again == ["bootout io.mlx-gateway.watchdog", "bootout io.mlx-gateway.server",
                     "bootstrap io.mlx-gateway.server.plist", "bootstrap io.mlx-gateway.watchdog.plist"]

    before = len(calls(mac))
    done = run_script("start.sh", mac)
    assert done.returncode == 0, done.stderr
    assert [c for c in calls(mac)[before:] if c.startswith("kickstart")] == [
        f"kickstart -k gui/{uid}/io.mlx-gateway.server", f"kickstart gui/{uid}/io.mlx-gateway.watchdog"]

    before = len(calls(mac))
    done = run_script("uninstall.sh", mac)
    assert done.returncode == 0, done.stderr
    assert calls(mac)[before:] == [f"bootout gui/{uid}/io.mlx-gateway.watchdog",
                                   f"bootout gui/{uid}/io.mlx-gateway.server"]
    assert list(agents.iterdir()) == []

    done = run_script("start.sh", mac)
    assert done.returncode == 1 and "not installed" in done.stderr


def test_install_needs_a_python_with_mlx_gateway(mac: dict[str, str]) -> None:
    done = run_script("install.sh", {**mac, "MLX_GATEWAY_PYTHON": "/nonexistent/python"})
    assert done.returncode == 1 and "MLX_GATEWAY_PYTHON" in done.stderr
    assert calls(mac) == []


def test_daemon_scripts_need_root(mac: dict[str, str]) -> None:
    fake_id = Path(mac["FAKE_DIR"]) / "bin" / "id"
    fake_id.write_text("#!/bin/sh\necho 501\n")  # not root, whoever runs the tests
    fake_id.chmod(0o755)
    for name in ("install.sh", "start.sh", "uninstall.sh"):
        done = run_script(name, mac, "--daemon")
        assert done.returncode == 1 and "sudo" in done.stderr


def test_linux_install_runs_systemctl_user(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/calls"\n')
    (bin_dir / "systemctl").chmod(0o755)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    service = [sys.executable, "-m", "gateway.service"]
    done = subprocess.run([*service, "install", "--platform", "linux"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "home" / ".config" / "systemd" / "user" / "mlx-gateway.service"
    assert "Type=notify" in unit.read_text()
    assert "loginctl enable-linger" in done.stdout
    done = subprocess.run([*service, "uninstall", "--platform", "linux"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert not unit.exists()
    assert (tmp_path / "calls").read_text().splitlines() == [
        "--user daemon-reload", "--user enable --now mlx-gateway.service",
        "--user disable --now mlx-gateway.service", "--user daemon-reload"]
