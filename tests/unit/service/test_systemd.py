"""The systemd user unit's text: the keys systemd needs, in the sections where systemd reads them."""

from __future__ import annotations

import configparser
import shlex

from gateway.service import systemd
from gateway.service.spec import ServiceSpec

SPEC = ServiceSpec(python="/opt/venv/bin/python", home="/home/ada", user="ada", drain_timeout_s=20)


def sections(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def test_unit_keys() -> None:
    unit = sections(systemd.server_unit(SPEC))
    assert unit.sections() == ["Unit", "Service", "Install"]
    # The restart budget lives in [Unit]; in [Service] systemd ignores it.
    assert (unit["Unit"]["StartLimitBurst"], unit["Unit"]["StartLimitIntervalSec"]) == ("5", "3600")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert int(service["TimeoutStopSec"]) > SPEC.drain_timeout_s
    assert service["KillMode"] == "mixed"
    assert shlex.split(service["ExecStart"]) == SPEC.serve_argv()
    assert unit["Install"]["WantedBy"] == "default.target"


def test_exec_start_escapes_what_systemd_would_expand() -> None:
    spec = ServiceSpec(python="/opt/my venv/bin/python", serve_args=("--api-key", 'a%b$c"d'))
    exec_start = sections(systemd.server_unit(spec))["Service"]["ExecStart"]
    assert exec_start.startswith('"/opt/my venv/bin/python" -m gateway.cli serve')
    assert exec_start.endswith('--api-key "a%%b$$c\\"d"')


def test_file_goes_where_the_user_manager_looks() -> None:
    assert [str(p) for p in systemd.files(SPEC)] == ["/home/ada/.config/systemd/user/mlx-gateway.service"]
