"""The engine's CPU BLAS (mlx_backend/cpu_blas.py): on Linux, `auto` preloads the system's OpenBLAS into the
engine process, whose matrix products then come from it (the same values as MLX's reference BLAS, within
float32 rounding); `off` and macOS leave MLX's own; a path that is not a file stops the gateway before it
starts; an operator's own LD_PRELOAD is kept. CI installs OpenBLAS (tests/run.sh), so the real preload runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import Settings
from mlx_backend import cpu_blas

REPO = Path(__file__).resolve().parents[3]


def test_auto_takes_the_first_openblas_that_exists_on_linux_only(tmp_path: Path) -> None:
    missing, present = str(tmp_path / "none.so.0"), tmp_path / "libopenblas.so.0"
    present.write_bytes(b"")
    assert cpu_blas.choose("auto", "linux", (missing, str(present))) == str(present)
    assert cpu_blas.choose("auto", "linux", (missing,)) is None
    assert cpu_blas.choose("auto", "darwin", (str(present),)) is None  # MLX uses Accelerate on a Mac
    assert cpu_blas.choose("off", "linux", (str(present),)) is None


def test_a_given_path_must_be_a_file_and_is_used_on_linux(tmp_path: Path) -> None:
    library = tmp_path / "libmyblas.so"
    library.write_bytes(b"")
    assert cpu_blas.choose(str(library), "linux") == str(library)
    assert cpu_blas.choose(str(library), "darwin") is None
    with pytest.raises(ValueError, match="is not a file"):
        cpu_blas.choose(str(tmp_path / "typo.so"), "linux")
    split = tmp_path / "a:b.so"
    split.write_bytes(b"")
    with pytest.raises(ValueError, match="split"):
        cpu_blas.choose(str(split), "linux")


def test_the_gateway_refuses_to_start_with_a_cpu_blas_that_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cpu_blas"):
        Settings(cpu_blas=str(tmp_path / "missing.so")).check()
    Settings(cpu_blas="off").check()
    Settings(cpu_blas="auto").check()


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_the_engine_environment_preloads_the_library_first_and_keeps_the_operators(tmp_path: Path) -> None:
    library = tmp_path / "libopenblas.so.0"
    library.write_bytes(b"")
    env = cpu_blas.engine_env(str(library), environ={"LD_PRELOAD": f"/opt/a.so {library}:/opt/b.so"})
    assert env["LD_PRELOAD"] == f"{library}:/opt/a.so:/opt/b.so"
    assert cpu_blas.engine_env("off", environ={"LD_PRELOAD": "/opt/a.so"}) == {}


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_openblas_leaves_the_gateway_a_core_unless_told_otherwise(tmp_path: Path) -> None:
    library = tmp_path / "libopenblas.so.0"
    library.write_bytes(b"")
    cores = len(os.sched_getaffinity(0))
    assert cpu_blas.engine_env(str(library), environ={})["OPENBLAS_NUM_THREADS"] == str(max(1, cores - 1))
    assert cpu_blas.engine_env(str(library), engine_cpus=3, environ={})["OPENBLAS_NUM_THREADS"] == "3"  # pinned
    mine = {"OPENBLAS_NUM_THREADS": "6"}
    assert cpu_blas.engine_env(str(library), engine_cpus=3, environ=mine)["OPENBLAS_NUM_THREADS"] == "6"


def _in_a_process(env: dict[str, str]) -> dict[str, object]:
    """What a fresh interpreter with `env` (as the engine is started) reports: the BLAS it multiplies with, and
    a product of two fixed matrices as MLX computes it."""
    script = (
        "import json, mlx.core as mx; from mlx_backend import cpu_blas\n"
        "a = mx.arange(64 * 96, dtype=mx.float32).reshape(64, 96) / 1000\n"
        "b = mx.cos(mx.arange(96 * 80, dtype=mx.float32).reshape(96, 80))\n"
        "print(json.dumps({'blas': cpu_blas.in_use(), 'product': (a @ b).tolist()}))\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", script], env={**environ, **env}, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.skipif(sys.platform != "linux", reason="MLX's reference BLAS is its Linux wheel's")
def test_with_auto_the_engine_multiplies_with_openblas_and_gets_the_same_products() -> None:
    library = cpu_blas.system_openblas()
    assert library is not None, "no OpenBLAS on this machine: tests/run.sh installs libopenblas0-pthread"
    fast = _in_a_process(cpu_blas.engine_env("auto"))
    reference = _in_a_process(cpu_blas.engine_env("off"))
    assert fast["blas"] == library
    assert str(reference["blas"]).startswith("MLX's reference BLAS")
    flat = [[x for row in result["product"] for x in row] for result in (fast, reference)]  # type: ignore[attr-defined]
    assert flat[0] == pytest.approx(flat[1], rel=1e-4, abs=1e-4)
    assert flat[0] != flat[1]  # MLX's products did come from the other library: its float32 roundings differ
