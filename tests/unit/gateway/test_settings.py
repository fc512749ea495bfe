"""Settings: flag over environment over default, and unsafe combinations refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import Settings, parse_settings


def test_defaults_bind_loopback_on_11435() -> None:
    settings = parse_settings([], env={})
    assert (settings.host, settings.port) == ("127.0.0.1", 11435)
    assert settings.offers_demo_model  # no models dir: the demo model is offered


def test_models_dir_is_repeatable_and_env_is_path_separated(tmp_path: Path) -> None:
    settings = parse_settings(["--models-dir", str(tmp_path / "a"), "--models-dir", str(tmp_path / "b")], env={})
    assert settings.models_dirs == (tmp_path / "a", tmp_path / "b")
    assert not settings.offers_demo_model
    from_env = parse_settings([], env={"MLX_GATEWAY_MODELS_DIRS": f"{tmp_path / 'a'}:{tmp_path / 'c'}"})
    assert from_env.models_dirs == (tmp_path / "a", tmp_path / "c")


def test_flags_win_over_environment() -> None:
    settings = parse_settings(["--port", "9000"], env={"MLX_GATEWAY_PORT": "8000", "MLX_GATEWAY_HOST": "::1"})
    assert settings.port == 9000 and settings.host == "::1"


def test_booleans_accept_flags_and_env_words() -> None:
    assert parse_settings(["--no-hf-cache"], env={}).hf_cache is False
    assert parse_settings([], env={"MLX_GATEWAY_LOG_JSON": "yes"}).log_json is True


def test_bad_values_name_the_setting() -> None:
    with pytest.raises(ValueError, match="port"):
        parse_settings([], env={"MLX_GATEWAY_PORT": "eleven"})


def test_public_bind_needs_a_key_or_an_explicit_flag() -> None:
    with pytest.raises(ValueError, match="API key"):
        Settings(host="0.0.0.0").check()
    Settings(host="0.0.0.0", api_key="k").check()
    Settings(host="0.0.0.0", allow_public=True).check()
    Settings(host="localhost").check()
    Settings(host="::1").check()


def test_every_setting_is_documented() -> None:
    import dataclasses

    doc = (Path(__file__).resolve().parents[3] / "docs" / "configuration.md").read_text()
    for field in dataclasses.fields(Settings):
        assert f"MLX_GATEWAY_{field.name.upper()}" in doc, field.name


@pytest.mark.parametrize(("field", "value"), [("max_running", 0), ("max_queue", -1), ("prefill_gather_steps", -1),
                                            ("prefill_batch", -1)])
def test_counts_out_of_range_are_refused_naming_the_setting(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value}).check()  # type: ignore[arg-type]
