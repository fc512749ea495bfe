#!/usr/bin/env bash
# Install mlx-gateway as launchd services: the server and the watchdog that restarts it within a budget.
#
# Usage: docker-less-mac/install.sh [--daemon] [-- serve options, e.g. --models-dir ~/models]
#   default   user agents in ~/Library/LaunchAgents (domain gui/$UID): start at login, run as you
#   --daemon  LaunchDaemons in /Library/LaunchDaemons (domain system): start at boot; run with sudo;
#             the server runs as $SUDO_USER (UserName), the watchdog as root (it kickstarts the server)
# Environment: MLX_GATEWAY_PYTHON, the Python that has mlx-gateway installed (default: python3 on PATH).
# Reinstalling replaces the running services. See docs/operations.md.
set -euo pipefail

daemon=0
if [[ "${1:-}" == "--daemon" ]]; then daemon=1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi

python="${MLX_GATEWAY_PYTHON:-$(command -v python3 || true)}"
if [[ -z "$python" ]] || ! "$python" -c "import gateway.cli" 2>/dev/null; then
  echo "install.sh: no Python with mlx-gateway installed; set MLX_GATEWAY_PYTHON=/path/to/venv/bin/python" >&2
  exit 1
fi

flags=()
if ((daemon)); then
  if [[ $(id -u) -ne 0 ]]; then echo "install.sh --daemon: run it with sudo" >&2; exit 1; fi
  domain=system
  dir=/Library/LaunchDaemons
  flags=(--daemon)
else
  domain="gui/$(id -u)"
  dir="$HOME/Library/LaunchAgents"
fi

# bootout returns before the job is gone; bootstrap too soon fails with "Input/output error".
wait_gone() {
  for _ in $(seq 1 100); do
    launchctl print "$domain/$1" >/dev/null 2>&1 || return 0
    sleep 0.1
  done
  echo "install.sh: $domain/$1 is still loaded after bootout" >&2
  return 1
}

# Replace what runs now. The watchdog first, so it does not restart the server being replaced.
for label in io.mlx-gateway.watchdog io.mlx-gateway.server; do
  launchctl bootout "$domain/$label" 2>/dev/null || true
  wait_gone "$label"
done

# The plists come from the same generator the tests compare with docker-less-mac/Launch*/.
"$python" -m gateway.service install --platform macos ${flags[@]+"${flags[@]}"} --python "$python" \
  --no-start -- "$@"

for label in io.mlx-gateway.server io.mlx-gateway.watchdog; do
  plutil -lint "$dir/$label.plist" >/dev/null
  launchctl bootstrap "$domain" "$dir/$label.plist"
done

echo "mlx-gateway installed in $domain. Check it with: $python -m gateway.watchdog --status"
