"""Which family a loaded model's tool calls belong to, read from its tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlx_backend.engine.tools import detect_family, families
from mlx_backend.engine.tools.families import mentions_tools
from tests.support import tiny_models
from tests.unit.mlx_backend.engine.tools.conftest import load


@pytest.mark.parametrize(("fmt", "family"), [("qwen2.5", families.HERMES), ("qwen3", families.HERMES),
                                             ("llama3.1", families.LLAMA3_JSON), ("mistral", families.MISTRAL_JSON)])
def test_the_real_templates_are_recognised(tokenizers: dict[str, Any], fmt: str, family: families.Family) -> None:
    assert detect_family(tokenizers[fmt]) == families.Detection(family, "")


def _edited(source: Path, destination: Path, **changes: Any) -> Any:
    tiny_models.copy_model(source, destination)
    config_path = destination / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return load(destination)


def test_a_template_that_never_uses_tools_has_no_tool_support(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    plain = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    detection = detect_family(_edited(model_dirs["qwen2.5"], tmp_path / "m", chat_template=plain))
    assert detection == families.Detection(None, "its chat template does not use tools")


def test_a_model_without_a_template_has_no_tool_support(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = load(tiny_models.remove_chat_template(tiny_models.copy_model(model_dirs["llama3.1"], tmp_path / "m")))
    assert detect_family(tokenizer) == families.Detection(None, "it has no chat template")


def test_a_template_with_tools_in_an_unknown_format_is_named_as_such(tmp_path: Path) -> None:
    # The default tiny template shows tools as JSON, but no model writes calls in a format we know.
    tokenizer = load(tiny_models.make_tiny_model(tmp_path / "m"))
    assert detect_family(tokenizer).family is None
    assert "not one this server can read" in detect_family(tokenizer).reason


def test_mistral_s_newer_layout_is_told_apart_by_its_template(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    template = tiny_models.chat_template("mistral").replace('"[TOOL_CALLS]["', '"[TOOL_CALLS]" + name + "[ARGS]"')
    assert "[ARGS]" in template
    assert detect_family(_edited(model_dirs["mistral"], tmp_path / "m", chat_template=template)).family \
        is families.MISTRAL_ARGS


def test_mlx_lm_s_other_parsers_come_for_free(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    detection = detect_family(_edited(model_dirs["qwen2.5"], tmp_path / "m", tool_parser_type="pythonic"))
    family = detection.family
    assert family is not None
    assert (family.name, family.start, family.end, family.body) == (
        "mlx:pythonic", "<|tool_call_start|>", "<|tool_call_end|>", "delimited")
    assert not family.can_force


def test_tools_are_found_in_the_template_s_code_not_its_text() -> None:
    assert mentions_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert mentions_tools("{%- if not tools is defined %}{%- set tools = none %}{%- endif %}{{ tools }}")
    assert not mentions_tools("You have no tools. {{ messages }}")
    assert mentions_tools("{% generation %}{{ tools }}{% endgeneration %}")  # transformers' own tag: text fallback
