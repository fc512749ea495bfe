#!/usr/bin/env bash
# Start, or restart, the installed mlx-gateway services now.
#
# Usage: docker-less-mac/start.sh [--daemon]   (--daemon: the LaunchDaemons; run it with sudo)
# A start by hand does not count against the watchdog's restart budget. If the watchdog gave up, it
# keeps its hands off until you run: mlx-gateway watchdog --reset
set -euo pipefail

if [[ "${1:-}" == "--daemon" ]]; then
  if [[ $(id -u) -ne 0 ]]; then echo "start.sh --daemon: run it with sudo" >&2; exit 1; fi
  domain=system
else
  domain="gui/$(id -u)"
fi

for label in io.mlx-gateway.server io.mlx-gateway.watchdog; do
  if ! launchctl print "$domain/$label" >/dev/null 2>&1; then
    echo "start.sh: $domain/$label is not installed; run docker-less-mac/install.sh first" >&2
    exit 1
  fi
done

# -k: stop the running server first (SIGTERM, so it drains), then start it again.
launchctl kickstart -k "$domain/io.mlx-gateway.server"
# The watchdog keeps running if it already is; started if it is not.
launchctl kickstart "$domain/io.mlx-gateway.watchdog"
echo "started. Check it with: mlx-gateway status"
