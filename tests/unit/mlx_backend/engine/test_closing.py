"""The closing reserve: a constrained output that max_tokens cuts still parses, because in the last tokens of
the budget the grammar closes what is open. The random models here are pushed into the bad cases with a bias
that bans every token holding a quote, a brace or a bracket: they can never close anything themselves, so
whatever closes was closed by the reserve."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm.sample_utils import greedy_sampler

from mlx_backend.contract import ChatMessage, Constraint, Generate, SamplingParams
from mlx_backend.engine.constrained import RESERVE_MARGIN, ConstraintProcessor
from mlx_backend.engine.sampling import SeededSampler
from mlx_backend.engine.tools import ToolRequest
from tests.support import tiny_models as tm
from tests.support.tool_specs import specs
from tests.unit.mlx_backend.engine.test_constrained import VOCAB, WIDTH, Loaded, run_batch, run_solo

pytestmark = pytest.mark.slow

CAPITAL = {  # what a client asks for "What is the capital of France? Answer in JSON."
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                   "population_millions": {"type": "number"}},
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class NoClosers:
    """A logits processor (before the grammar's) that pushes every token holding `"`, `}` or `]` down by 100,
    as OpenAI's logit_bias -100 does: the model never picks one while anything else is allowed."""

    def __init__(self, loaded: Loaded) -> None:
        bias = [0.0] * WIDTH  # the logits' width (both models here have WIDTH embedding rows)
        for token in range(min(WIDTH, len(loaded.tokenizer._tokenizer))):
            if any(ch in loaded.tokenizer.decode([token]) for ch in '"}]'):
                bias[token] = -100.0
        self.bias = mx.array(bias)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        return logits + self.bias


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    path = tmp_path_factory.mktemp("models") / "bpe"
    return Loaded(tm.make_tiny_model(path, tokenizer="bpe", vocab_size=WIDTH, tokenizer_vocab_size=VOCAB))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    path = tmp_path_factory.mktemp("models") / "qwen3"
    return Loaded(tm.make_tiny_model(path, chat_format="qwen3", vocab_size=WIDTH, context_length=4096))


def processor(loaded: Loaded, constraint: Constraint, max_tokens: int) -> ConstraintProcessor:
    return loaded.compiler.processor(constraint, max_tokens)


def capital(max_tokens: int) -> tuple[Constraint, int]:
    return Constraint("json_schema", json.dumps(CAPITAL), strict=True), max_tokens


@pytest.mark.parametrize("max_tokens", [60, 90, 200])
def test_a_strict_schema_cut_by_max_tokens_still_parses_and_validates(bpe: Loaded, max_tokens: int) -> None:
    ban = NoClosers(bpe)
    runs = []
    for how in ("solo", "batch"):
        p = processor(bpe, *capital(max_tokens))
        request = (bpe.prompt(), [ban, p], greedy_sampler)
        solo = how == "solo"
        tokens, _ = run_solo(bpe, request, max_tokens) if solo else run_batch(bpe, [request], max_tokens)[0]
        assert len(tokens) <= max_tokens and p.closed_by_reserve and p.error is None
        value = json.loads(bpe.text(tokens))
        jsonschema.validate(value, CAPITAL)
        runs.append(tokens)
    assert runs[0] == runs[1]  # the solo path and the batch agree token for token


def test_the_reserve_leaves_the_model_free_until_the_end(bpe: Loaded) -> None:
    # The close takes the last tokens only: the model wrote its own text until then.
    max_tokens = 120
    p = processor(bpe, Constraint("json_object"), max_tokens)
    tokens, _ = run_solo(bpe, (bpe.prompt(), [NoClosers(bpe), p], greedy_sampler), max_tokens)
    text = bpe.text(tokens)
    assert isinstance(json.loads(text), dict)
    assert len(tokens) >= max_tokens - RESERVE_MARGIN - 8  # a plan of a few tokens, the margin, EOS
    assert len(text) > 40


def test_a_required_property_the_model_had_not_reached_is_still_written(bpe: Loaded) -> None:
    # 60 tokens are enough for the keys, not for the model to reach them: it is still writing "city" (it cannot
    # close a string itself). The reserve closes "city" in time, writes the other keys, and lets the model
    # pick what fits in the budget left; what it cannot write (a string, with quotes banned) is the
    # shortest value.
    p = processor(bpe, *capital(60))
    tokens, _ = run_solo(bpe, (bpe.prompt(), [NoClosers(bpe), p], greedy_sampler), 60)
    value = json.loads(bpe.text(tokens))
    jsonschema.validate(value, CAPITAL)
    assert len(value["city"]) > 0 and value["country"] == ""  # what the model wrote is kept
    assert p.closed_by_reserve


def test_without_a_budget_there_is_no_reserve(bpe: Loaded) -> None:
    p = bpe.compiler.processor(*capital(40)[:1])
    tokens, reason = run_solo(bpe, (bpe.prompt(), [NoClosers(bpe), p], greedy_sampler), 40)
    assert reason == "length" and not p.closed_by_reserve
    with pytest.raises(json.JSONDecodeError):
        json.loads(bpe.text(tokens))


def test_sampled_outputs_close_too(bpe: Loaded) -> None:
    ban = NoClosers(bpe)
    processors = [processor(bpe, *capital(80)) for _ in range(4)]
    requests = [(bpe.prompt(), [ban, p], SeededSampler(1.0, 1.0, seed=seed)) for seed, p in enumerate(processors)]
    for tokens, _ in run_batch(bpe, requests, 80):
        jsonschema.validate(json.loads(bpe.text(tokens)), CAPITAL)


def forced_call(loaded: Loaded, max_tokens: int, choice: str = "function") -> tuple[str, ConstraintProcessor]:
    command = Generate("r", "m", SamplingParams(max_tokens), messages=(ChatMessage("user", "Weather in Paris?"),),
                       tools=specs([WEATHER_TOOL]), tool_choice=choice,
                       tool_choice_name="get_weather" if choice == "function" else None)
    request = ToolRequest.from_command(command, loaded.tokenizer)
    assert request is not None
    grammar = request.grammar(loaded.tokenizer)
    assert grammar is not None
    p = processor(loaded, Constraint("lark", grammar), max_tokens)
    prompt = list(loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}],
                                                       tools=[WEATHER_TOOL], add_generation_prompt=True))
    tokens, _ = run_solo(loaded, (prompt, [NoClosers(loaded), p], greedy_sampler), max_tokens)
    return str(loaded.tokenizer.decode(tokens)), p


@pytest.mark.parametrize("choice", ["function", "required"])
def test_a_forced_call_cut_by_max_tokens_closes_its_arguments_and_its_markup(qwen3: Loaded, choice: str) -> None:
    text, p = forced_call(qwen3, 80, choice)
    assert p.closed_by_reserve
    assert text.removesuffix("<|im_end|>").endswith("</tool_call>")
    body = text[text.index("<tool_call>") + len("<tool_call>"):text.index("</tool_call>")]
    call: dict[str, Any] = json.loads(body)
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)


def test_a_reasoning_model_still_thinking_is_made_to_call(qwen3: Loaded) -> None:
    # Qwen3 may think before a forced call; with the budget running out, the think block closes and the call
    # is written (with the shortest arguments the schema allows) rather than the budget ending mid-thought.
    text, p = forced_call(qwen3, 60)
    assert p.closed_by_reserve
    if "<think>" in text:
        assert "</think>" in text
    body = text[text.index("<tool_call>") + len("<tool_call>"):text.index("</tool_call>")]
    assert json.loads(body)["name"] == "get_weather"


def test_the_plan_is_what_the_grammar_allows(bpe: Loaded) -> None:
    p = processor(bpe, *capital(400))
    matcher = p._matcher
    prefix = bpe.tokenizer.encode('{"city": "Par', add_special_tokens=False)
    assert matcher.consume_tokens(prefix)
    plan = bpe.compiler.closer.plan(matcher, 64)
    assert matcher.validate_tokens(plan) == len(plan)  # the matcher itself is untouched by planning
    value = json.loads(bpe.text(prefix + plan))
    assert value == {"city": "Par", "country": "", "population_millions": 0}
