"""`mlx-gateway watchdog [options] [-- server command]`, `--status`, `--reset`."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from dataclasses import asdict
from types import FrameType

from gateway.logs import JsonFormatter, TextFormatter
from gateway.watchdog import probe
from gateway.watchdog.config import WatchdogConfig, build_parser, load_config
from gateway.watchdog.loop import Watchdog
from gateway.watchdog.process import LaunchdServer, ServerControl, SpawnServer, systemd_unit_in_charge
from gateway.watchdog.state import StateDir, read_status

log = logging.getLogger("mlx_gateway.watchdog")

EXIT_OK, EXIT_TROUBLE, EXIT_USAGE, EXIT_LOCKED, EXIT_NOT_OURS = 0, 1, 2, 3, 4


class _JsonWithFields(JsonFormatter):
    """The gateway's JSON lines plus the watchdog's event fields (event, pid, reason...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = json.loads(super().format(record))
        entry.update(getattr(record, "fields", None) or {})
        return json.dumps(entry, ensure_ascii=False)


def _configure_logging(json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonWithFields() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _ago(at: float | None) -> str:
    if at is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    return f"{stamp} ({time.time() - at:.0f}s ago)"


def status(config: WatchdogConfig, as_json: bool) -> int:
    """Print the watchdog's state and the server's health; exit 1 when something needs attention."""
    st = read_status(config.state_dir)
    code, body = probe.health(config.url, config.timeout_s)
    live = probe.live(config.url, config.timeout_s)
    trouble = not live or (st is not None and st.gave_up)
    if as_json:
        print(json.dumps({"watchdog": asdict(st) if st else None, "state_dir": str(config.state_dir),
                          "server": {"url": config.url, "live": live, "health_http": code, "health": body}},
                         indent=2))
        return EXIT_TROUBLE if trouble else EXIT_OK
    print(f"server:   {config.url}: " + ("live" if live else "NOT ANSWERING /health/live")
          + (f"; /health {code} {body.get('status')}" if body else ""))
    if body and body.get("reason"):
        print(f"          reason: {body['reason']}")
    if st is None:
        print(f"watchdog: no state in {config.state_dir} (never run with this --state-dir)")
        return EXIT_TROUBLE if trouble else EXIT_OK
    print(f"watchdog: {'running' if st.running else 'NOT RUNNING'} (last pid {st.watchdog_pid}), "
          f"state in {config.state_dir}")
    print(f"          last check {_ago(st.last_check_at)}: {st.last_check_result}")
    print(f"          server restarts in the last hour: {st.restarts_last_hour} "
          f"(budget {config.max_restarts} per {config.window_s:g}s)")
    if st.gave_up:
        print(f"GAVE UP:  {st.gave_up_reason}")
        print("          restarts are off. Fix the cause (see the server log), then run "
              "'mlx-gateway watchdog --reset'.")
    return EXIT_TROUBLE if trouble else EXIT_OK


def reset(config: WatchdogConfig) -> int:
    folder = StateDir(config.state_dir)
    marker = folder.gave_up()
    starts = len(folder.ledger.starts())
    folder.reset()
    print(f"cleared {'the give-up marker and ' if marker else ''}the restart ledger ({starts} starts) in "
          f"{config.state_dir}; a running watchdog resumes restarts at its next check")
    return EXIT_OK


def _server(config: WatchdogConfig) -> ServerControl:
    return LaunchdServer(config.launchd_job) if config.launchd_job else SpawnServer(config)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    if args.status:
        return status(config, args.json)
    if args.reset:
        return reset(config)
    _configure_logging(config.log_json)
    if not config.launchd_job and (owner := systemd_unit_in_charge()):
        log.error("%s: systemd is the restart authority for this server; a watchdog too would fight it. "
                  "Exiting (see docs/operations.md)", owner)
        return EXIT_NOT_OURS
    folder = StateDir(config.state_dir)
    if not folder.acquire_lock():
        log.error("another watchdog holds %s; exiting (one restart authority at a time)",
                  config.state_dir / "watchdog.lock")
        return EXIT_LOCKED
    watchdog = Watchdog(config, _server(config), folder)

    def on_signal(signum: int, _: FrameType | None) -> None:
        log.info("%s received", signal.Signals(signum).name)
        watchdog.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        watchdog.run()
    finally:
        folder.release_lock()
    return EXIT_OK
