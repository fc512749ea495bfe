"""How the bundled real model arrives: the build step puts the pinned GGUF beside the package, `serve` converts
it once into the cache for this machine's backend, and anything else (a missing or different file) is said
plainly instead of serving something unexpected. No MLX here: the conversion itself is test_gguf's and
test_smollm2's."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_backend import smollm2
from mlx_backend.smollm2 import build_backend
from tests.support.real_model import smollm2_gguf


@pytest.fixture
def empty_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No GGUF installed, an empty cache."""
    monkeypatch.setenv("MLX_GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLX_GATEWAY_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(smollm2, "BUNDLED_GGUF", tmp_path / "package" / smollm2.GGUF_NAME)
    (tmp_path / "package").mkdir()
    return tmp_path


@pytest.mark.parametrize(("platform", "machine", "dtype"), [
    ("darwin", "arm64", "quantized"), ("linux", "x86_64", "float32"), ("linux", "aarch64", "float32"),
])
def test_4_bit_on_apple_silicon_float32_on_mlxs_cpu_backend(monkeypatch: pytest.MonkeyPatch, platform: str,
                                                           machine: str, dtype: str) -> None:
    monkeypatch.setattr(smollm2.sys, "platform", platform)
    monkeypatch.setattr(smollm2.platform, "machine", lambda: machine)
    assert smollm2.default_dtype() == dtype


def test_without_a_gguf_nothing_is_offered_and_nothing_is_fetched(empty_machine: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "fetch_gguf", lambda dest: pytest.fail("serve must never touch the network"))
    assert smollm2.find_gguf() is None
    assert smollm2.prepare() is None
    assert smollm2.converted_folder() is None


def test_a_gguf_that_is_not_the_pinned_one_is_refused(empty_machine: Path) -> None:
    other = empty_machine / smollm2.GGUF_NAME
    other.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(smollm2.SmolLM2Unavailable, match="sha256"):
        smollm2.convert(other)


def test_the_gguf_is_found_where_the_install_put_it(empty_machine: Path) -> None:
    smollm2.BUNDLED_GGUF.write_bytes(b"GGUF")
    assert smollm2.find_gguf() == smollm2.BUNDLED_GGUF


def test_the_build_step_bundles_the_pinned_gguf_from_a_local_copy(empty_machine: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_GATEWAY_SMOLLM2_GGUF", str(smollm2_gguf()))
    monkeypatch.setattr(smollm2, "fetch_gguf", lambda dest: pytest.fail("a local copy needs no download"))
    build_backend.bundle_gguf()
    assert smollm2.sha256_of(smollm2.BUNDLED_GGUF) == smollm2.GGUF_SHA256


def test_the_build_step_can_be_told_to_bundle_nothing(empty_machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_GATEWAY_SKIP_SMOLLM2", "1")
    build_backend.bundle_gguf()
    assert not smollm2.BUNDLED_GGUF.exists()


def test_a_failed_download_stops_the_build_naming_the_way_out(empty_machine: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(dest: Path) -> Path:
        raise smollm2.SmolLM2Unavailable("could not download it: offline")

    monkeypatch.setattr(smollm2, "fetch_gguf", offline)
    with pytest.raises(SystemExit, match="MLX_GATEWAY_SKIP_SMOLLM2=1"):
        build_backend.bundle_gguf()


def test_the_package_ships_provenance_license_and_template() -> None:
    for name in (*smollm2.SHIPPED_FILES, smollm2.CHAT_TEMPLATE):
        assert (smollm2.HERE / name).is_file(), name
    provenance = (smollm2.HERE / "PROVENANCE.md").read_text()
    assert smollm2.WHEEL_SHA256 in provenance and smollm2.GGUF_SHA256 in provenance and "Apache" in provenance
