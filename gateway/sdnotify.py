"""systemd's notify protocol in stdlib: one datagram of `KEY=value` lines to `$NOTIFY_SOCKET`.

Every call is a no-op returning False outside systemd (no `$NOTIFY_SOCKET`), so callers never branch.
"""

from __future__ import annotations

import os
import socket


def _address(raw: str) -> str | None:
    # "@name" is Linux's abstract namespace, written with a leading NUL on the wire.
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # vsock:... and other forms systemd may pass are not worth supporting here


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1") as one datagram; True when it was sent."""
    raw = os.environ.get("NOTIFY_SOCKET", "")
    address = _address(raw)
    if address is None or not fields:
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError:
        return False  # systemd gone or socket unreachable: never take the server down for this
    return True


def ready() -> bool:
    return notify("READY=1", f"MAINPID={os.getpid()}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    # One line only: a newline would start a new field.
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_interval_s() -> float | None:
    """WatchdogSec in seconds when systemd expects pings from this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. inherited by a child)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
