"""`mlx-gateway service print | install | uninstall | templates`."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from gateway.service import launchd, systemd
from gateway.service.spec import SERVER_LABEL, SYSTEMD_UNIT, TEMPLATE, WATCHDOG_LABEL, ServiceSpec

REPO_MAC_DIR = Path(__file__).resolve().parents[2] / "docker-less-mac"


def _platform_default() -> str:
    return "macos" if sys.platform == "darwin" else "linux"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-gateway service", description="Generate, install or remove launchd/systemd service files.")
    actions = parser.add_subparsers(dest="action", required=True)
    for name, text in (("print", "print the files that install would write"),
                       ("install", "write the files and start the service"),
                       ("uninstall", "stop the service and remove its files")):
        p = actions.add_parser(name, help=text, description=text,
                               epilog="Arguments after '--' are passed to 'mlx-gateway serve'.")
        p.add_argument("--platform", choices=("macos", "linux"), default=_platform_default(),
                       help="launchd (macos) or systemd user units (linux); default: this machine's")
        p.add_argument("--daemon", action="store_true",
                       help="macOS: LaunchDaemons that start at boot (server as --user, watchdog as root)")
        p.add_argument("--user", default=os.environ.get("SUDO_USER") or None,
                       help="macOS --daemon: the user the server runs as (default: $SUDO_USER or you)")
        if name != "uninstall":
            p.add_argument("--python", default=sys.executable, help="the Python with mlx-gateway installed")
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=11435)
            p.add_argument("--drain-timeout", type=float, default=30.0,
                           help="seconds streams may finish on stop; stop deadlines are set above it")
            p.add_argument("serve_args", nargs="*", help=argparse.SUPPRESS)
        if name != "print":
            p.add_argument("--dry-run", action="store_true",
                           help="say what would be written and run; do nothing")
            p.add_argument("--no-start", action="store_true",
                           help="write or remove files only; run no launchctl/systemctl")
    t = actions.add_parser("templates", help="write the reference plists in docker-less-mac/ (placeholders)")
    t.add_argument("--out", type=Path, default=REPO_MAC_DIR)
    t.add_argument("--check", action="store_true", help="exit 1 if the files differ from the generator")
    return parser


def _spec(args: argparse.Namespace) -> ServiceSpec:
    user = args.user or ServiceSpec().user
    home = pwd.getpwnam(user).pw_dir if args.user else str(Path.home())
    if not hasattr(args, "python"):  # uninstall: only the paths matter
        return ServiceSpec(user=user, home=home)
    return ServiceSpec(python=args.python, home=home, user=user, host=args.host, port=args.port,
                       drain_timeout_s=args.drain_timeout, serve_args=tuple(args.serve_args))


def _files(spec: ServiceSpec, platform: str, daemon: bool) -> dict[Path, bytes]:
    return launchd.files(spec, daemon) if platform == "macos" else systemd.files(spec)


def _domain(daemon: bool) -> str:
    return "system" if daemon else f"gui/{os.getuid()}"


def install_commands(platform: str, daemon: bool, files: dict[Path, bytes]) -> list[list[str]]:
    if platform == "linux":
        return [["systemctl", "--user", "daemon-reload"],
                ["systemctl", "--user", "enable", "--now", SYSTEMD_UNIT]]
    domain = _domain(daemon)
    server, watchdog = list(files)
    # bootout first so a reinstall picks up the new files; the server before the watchdog, which watches it.
    return [*uninstall_commands(platform, daemon),
            ["launchctl", "bootstrap", domain, str(server)],
            ["launchctl", "bootstrap", domain, str(watchdog)]]


def uninstall_commands(platform: str, daemon: bool) -> list[list[str]]:
    if platform == "linux":
        return [["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT]]
    domain = _domain(daemon)
    # The watchdog first: it must not restart the server we are about to stop.
    return [["launchctl", "bootout", f"{domain}/{WATCHDOG_LABEL}"],
            ["launchctl", "bootout", f"{domain}/{SERVER_LABEL}"]]


def _run_all(commands: list[list[str]], must: bool) -> int:
    worst = 0
    for argv in commands:
        if shutil.which(argv[0]) is None:
            print(f"skipped (no {argv[0]} here): {' '.join(argv)}")
            continue
        print("+ " + " ".join(argv))
        code = subprocess.run(argv, check=False).returncode
        if code and must and "bootout" not in argv and "disable" not in argv:  # not loaded yet is fine
            worst = code
    return worst


def _print_files(files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        print(f"# {path}\n{data.decode()}")


def install(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if args.daemon and spec.user == "root":
        print("refusing to run the server as root: pass --user NAME (or install with sudo from your account)",
              file=sys.stderr)
        return 2
    files = _files(spec, args.platform, args.daemon)
    commands = [] if args.no_start else install_commands(args.platform, args.daemon, files)
    if args.dry_run:
        _print_files(files)
        for argv in commands:
            print("would run: " + " ".join(argv))
        return 0
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)  # launchd refuses group- or world-writable property lists
        print(f"wrote {path}")
    if args.platform == "macos":
        launchd.log_dir(spec, args.daemon).mkdir(parents=True, exist_ok=True)
        server_logs = launchd.server_log_dir(spec)
        server_logs.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:  # sudo for a daemon: the server runs as the user and must own its logs
            user = pwd.getpwnam(spec.user)
            os.chown(server_logs, user.pw_uid, user.pw_gid)
    code = _run_all(commands, must=True)
    if args.platform == "linux":
        print("To keep it running after you log out: loginctl enable-linger " + spec.user)
    return 1 if code else 0


def uninstall(args: argparse.Namespace) -> int:
    spec = _spec(args)
    files = _files(spec, args.platform, args.daemon)
    commands = [] if args.no_start else uninstall_commands(args.platform, args.daemon)
    if args.dry_run:
        for argv in commands:
            print("would run: " + " ".join(argv))
        for path in files:
            print(f"would remove: {path}")
        return 0
    _run_all(commands, must=False)
    for path in files:
        if path.exists():
            path.unlink()
            print(f"removed {path}")
    if args.platform == "linux" and not args.no_start:
        _run_all([["systemctl", "--user", "daemon-reload"]], must=False)
    return 0


def template_files(out: Path) -> dict[Path, bytes]:
    """The reference plists committed in docker-less-mac/, generated with placeholder paths."""
    found: dict[Path, bytes] = {}
    for daemon, folder in ((False, "LaunchAgents"), (True, "LaunchDaemons")):
        for path, data in launchd.files(TEMPLATE, daemon).items():
            found[out / folder / path.name] = data
    return found


def templates(args: argparse.Namespace) -> int:
    files = template_files(args.out)
    if args.check:
        stale = [p for p, data in files.items() if not p.exists() or p.read_bytes() != data]
        for path in stale:
            print(f"{path} is out of date: run 'mlx-gateway service templates'", file=sys.stderr)
        return 1 if stale else 0
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path}")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "print":
        _print_files(_files(_spec(args), args.platform, args.daemon))
        return 0
    if args.action == "install":
        return install(args)
    if args.action == "uninstall":
        return uninstall(args)
    return templates(args)
