#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian/Ubuntu or macOS machine, then runs them.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive for real: Prometheus (server + promtool), shellcheck, systemd-analyze,
# Chromium (headless, to render and screenshot the status page), OpenBLAS (the engine's CPU BLAS).
if command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
  command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  # OpenBLAS: the engine's CPU matrix products (mlx_backend/cpu_blas.py); its tests check the real preload
  python3 -c "import sys; from mlx_backend.cpu_blas import system_openblas; sys.exit(not system_openblas())" \
    || missing+=(libopenblas0-pthread)
  if ((${#missing[@]})); then
    SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

python3 -m pip install -q -e ".[test,vision]"  # vision: mlx-vlm, for the image tests (tests/integration/test_vision.py)

# The coding agents tests/integration/test_agent_clis.py drives (Codex CLI, Claude Code, opencode), at the
# exact versions pinned in tests/agent_clis/package.json (each pins its platform binaries exactly), into that
# folder only (nothing global). Claude Code 2.1.197 is the last release that runs on node 18 and 20.
if command -v npm >/dev/null 2>&1; then
  npm install --prefix tests/agent_clis --no-package-lock --no-audit --no-fund --loglevel=error >/dev/null
fi

# The real trained model (SmolLM2-135M-Instruct) converted once per machine, before servers race to it.
python3 -c "from tests.support.real_model import ensure_smollm2; ensure_smollm2()"
exec python3 -m pytest "$@"
