"""schemathesis, every check, over every operation of openapi/openapi.json, against a real server with a key,
its fuzzed bodies naming a served model (tests/support/schemathesis_hooks.py) so generation is fuzzed too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import StartServer

OPENAPI = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
KEY = "sk-schemathesis"


def test_schemathesis_finds_no_failure_and_no_500(start_server: StartServer, models_dir: Path,
                                                  tmp_path: Path) -> None:
    server = start_server("--models-dir", str(models_dir), "--api-key", KEY)
    server.wait_ready()
    cli = shutil.which("schemathesis") or shutil.which("st")
    assert cli, "schemathesis is installed by `pip install -e .[test]`"
    result = subprocess.run(
        [cli, "run", str(OPENAPI), "--url", server.base_url, "--checks", "all",
         "--header", f"Authorization: Bearer {KEY}",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "40", "--workers", "2",
         "--seed", "20261125", "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert " 500" not in output.split("SUMMARY")[-1]
    assert server.health().json()["engine"]["restarts"] == 0, "the fuzzing must not have cost an engine"
    sys.stdout.write(output[-600:])
