#!/usr/bin/env bash
# Stop mlx-gateway's launchd services and remove their plists. Logs and the watchdog's state stay.
#
# Usage: docker-less-mac/uninstall.sh [--daemon]   (--daemon: the LaunchDaemons; run it with sudo)
set -euo pipefail

if [[ "${1:-}" == "--daemon" ]]; then
  if [[ $(id -u) -ne 0 ]]; then echo "uninstall.sh --daemon: run it with sudo" >&2; exit 1; fi
  domain=system
  dir=/Library/LaunchDaemons
else
  domain="gui/$(id -u)"
  dir="$HOME/Library/LaunchAgents"
fi

# The watchdog first: it would otherwise restart the server we are stopping. bootout sends SIGTERM and
# waits up to the plist's ExitTimeOut, so the server drains its requests before it exits.
for label in io.mlx-gateway.watchdog io.mlx-gateway.server; do
  if launchctl bootout "$domain/$label" 2>/dev/null; then
    echo "stopped $domain/$label"
  fi
  rm -f "$dir/$label.plist"
done

echo "removed. Logs stay in ~/Library/Logs/mlx-gateway (and /Library/Logs/mlx-gateway for daemons);"
echo "the watchdog's restart ledger stays in its state folder (see docs/operations.md)."
