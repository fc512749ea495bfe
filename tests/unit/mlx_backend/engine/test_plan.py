"""A request's plan, decided before any compute: what it is refused for, and how its choices are set up."""

from __future__ import annotations

import dataclasses
import time

import pytest

from mlx_backend.contract import ChatMessage, Constraint, Generate, SamplingParams
from mlx_backend.engine.logprobs import TokenText
from mlx_backend.engine.model_check import validate
from mlx_backend.engine.model_load import load
from mlx_backend.engine.plan import plan_request
from mlx_backend.engine.residency.models import CachedModel
from mlx_backend.errors import EngineError
from mlx_backend.registry import ModelRegistry
from tests.support import tiny_models as tm
from tests.support.tool_specs import specs

TOOLS = specs([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
HI = (ChatMessage("user", "hi"),)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CachedModel]:
    root = tmp_path_factory.mktemp("plan")
    tm.make_tiny_model(root / "words", context_length=64)
    tm.make_tiny_model(root / "qwen", chat_format="qwen2.5", context_length=2048)
    registry = ModelRegistry([root], None, False)
    loaded = {}
    for name in ("words", "qwen"):
        entry = registry.resolve(name)
        validate(entry)
        loaded[name] = CachedModel(entry, load(entry), 0, time.time(), time.monotonic())
    return loaded


def plan(models: dict[str, CachedModel], model: str, **fields: object) -> object:
    params = fields.pop("params", SamplingParams(max_tokens=8))
    command = Generate("r", model, params, **({"messages": HI} | fields))  # type: ignore[arg-type]
    return plan_request(command, models[model], TokenText(models[model].artifacts.tokenizer))


def refusal(models: dict[str, CachedModel], model: str, **fields: object) -> EngineError:
    with pytest.raises(EngineError) as refused:
        plan(models, model, **fields)
    return refused.value


def test_a_prompt_longer_than_the_context_is_refused_naming_it(models: dict[str, CachedModel]) -> None:
    error = refusal(models, "words", messages=(ChatMessage("user", "hello " * 100),))
    assert error.code == "context_length_exceeded" and error.param == "messages"


def test_a_logit_bias_naming_a_token_past_the_vocabulary_is_refused_naming_it(
    models: dict[str, CachedModel],
) -> None:
    size = len(models["words"].artifacts.tokenizer._tokenizer)
    error = refusal(models, "words", params=SamplingParams(max_tokens=8, logit_bias=((size, 1.0),)))
    assert error.code == "invalid_request" and error.param == "logit_bias" and str(size) in error.message
    request = plan(models, "words", params=SamplingParams(max_tokens=8, logit_bias=((size - 1, 1.0),)))
    assert len(request.choices[0].processors) == 1  # type: ignore[attr-defined]
    assert refusal(models, "words", params=SamplingParams(max_tokens=8, logit_bias=((-1, 1.0),))).param == "logit_bias"


def test_a_logit_bias_past_the_models_logits_is_refused_even_if_the_tokenizer_has_that_token(
    models: dict[str, CachedModel],
) -> None:
    words = models["words"]
    narrow = dataclasses.replace(words.artifacts, config={**words.artifacts.config, "vocab_size": 100})
    models_with_narrow = {"words": CachedModel(words.entry, narrow, 0, time.time(), time.monotonic())}
    error = refusal(models_with_narrow, "words", params=SamplingParams(max_tokens=8, logit_bias=((100, 1.0),)))
    assert error.param == "logit_bias" and "100 tokens" in error.message


def test_max_tokens_is_shortened_to_what_the_context_leaves(models: dict[str, CachedModel]) -> None:
    request = plan(models, "words", params=SamplingParams(max_tokens=10_000))
    assert request.max_tokens == 64 - len(request.tokens)  # type: ignore[attr-defined]


def test_tools_for_a_template_without_tool_support_are_refused_naming_the_model(
    models: dict[str, CachedModel],
) -> None:
    error = refusal(models, "words", tools=TOOLS)
    assert error.code == "invalid_request" and "'words' does not support tool calling" in error.message


def test_structured_output_and_a_forced_call_together_are_refused(models: dict[str, CachedModel]) -> None:
    error = refusal(models, "qwen", tools=TOOLS, tool_choice="required", constraint=Constraint("json_object"))
    assert error.param == "response_format"


def test_each_choice_gets_its_own_seed_processor_and_output(models: dict[str, CachedModel]) -> None:
    request = plan(models, "qwen", n=3, tools=TOOLS, tool_choice="required",
                   params=SamplingParams(max_tokens=8, temperature=1.0, seed=7))
    choices = request.choices  # type: ignore[attr-defined]
    assert [c.index for c in choices] == [0, 1, 2]
    assert len({id(c.sampler) for c in choices}) == 3 and len({id(c.constraint) for c in choices}) == 3
    assert all(c.processors[-1] is c.constraint for c in choices)  # the grammar masks last


def test_a_legacy_completion_keeps_the_space_its_first_token_starts_with(models: dict[str, CachedModel]) -> None:
    tokenizer = models["qwen"].artifacts.tokenizer
    (choice,) = plan(models, "qwen", messages=None, prompt="A list is").choices  # type: ignore[attr-defined]
    detokenizer = choice.output._detokenizer
    for token in tokenizer.encode(" not", add_special_tokens=False):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == " not"
