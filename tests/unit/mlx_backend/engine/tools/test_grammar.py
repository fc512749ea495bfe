"""The forcing grammars, driven token by token through llguidance with each tiny family's tokenizer:
they compile (special tokens by id), accept the family's own markup around arguments that fit the tool's
schema, refuse wrong names and arguments, and everything they allow reads back as calls."""

from __future__ import annotations

import functools
import json
import random
import re
from typing import Any

import jsonschema
import llguidance
import llguidance.hf
import numpy as np
import pytest

from mlx_backend.engine.tools import ToolRequest, families
from mlx_backend.engine.tools.families import Family
from mlx_backend.engine.tools.parse import parse_reply
from mlx_backend.engine.tools.request import CALL_LIMIT
from mlx_backend.grammar import NESTING_LIMIT, STRING_LIMIT

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
    {"type": "function", "function": {"name": "noop"}},  # no parameters: an empty object
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD, "noop": {"type": "object", "additionalProperties": False}}
FAMILY_OF = {"qwen2.5": families.HERMES, "qwen3": families.HERMES, "llama3.1": families.LLAMA3_JSON,
             "mistral": families.MISTRAL_JSON}
# Mistral's newer layout, on the Nemo tokenizer ([ARGS] is then plain text, [TOOL_CALLS] still a token).
CASES = [("qwen2.5", families.HERMES), ("qwen3", families.HERMES), ("llama3.1", families.LLAMA3_JSON),
         ("mistral", families.MISTRAL_JSON), ("mistral", families.MISTRAL_ARGS)]


def request(family: Family, choice: str = "required", name: str | None = None, parallel: bool = True,
            tools: list[dict[str, Any]] = TOOLS) -> ToolRequest:
    return ToolRequest(family, tools, choice, name, parallel)


@functools.cache
def _lltokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    return llguidance.hf.from_tokenizer(tokenizer._tokenizer)


def matcher(tokenizer: Any, grammar: str) -> llguidance.LLMatcher:
    m = llguidance.LLMatcher(_lltokenizer(tokenizer), llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def accepts(tokenizer: Any, grammar: str, text: str) -> bool:
    m = matcher(tokenizer, grammar)
    return m.consume_tokens(list(tokenizer.encode(text, add_special_tokens=False))) and m.is_accepting()


def call_text(family: Family, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """Calls written exactly as the forcing grammars lay them out (the chat templates' own layout)."""
    if family is families.HERMES:
        blocks = (f'<tool_call>\n{{"name": "{n}", "arguments": {json.dumps(a)}}}\n</tool_call>' for n, a in calls)
        return "\n".join(blocks)
    if family is families.LLAMA3_JSON:
        return "".join(f'{{"name": "{n}", "parameters": {json.dumps(a)}}}' for n, a in calls)
    if family is families.MISTRAL_JSON:
        return "[TOOL_CALLS][" + ", ".join(f'{{"name": "{n}", "arguments": {json.dumps(a)}}}' for n, a in calls) + "]"
    return "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}" for n, a in calls)


def grammar(tokenizers: dict[str, Any], fmt: str, req: ToolRequest) -> str:
    g = req.grammar(tokenizers[fmt])
    assert g is not None
    return g


GOOD = [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2}), ("noop", {}),
        ("get_weather", {"city": "Oslo", "unit": "c"})]
BAD = [
    ("delete_all", {}),  # not a tool
    ("get_weather", {}),  # a required argument missing
    ("get_weather", {"city": 7}),  # wrong type
    ("get_weather", {"city": "Rome", "country": "IT"}),  # not allowed by additionalProperties
    ("get_weather", {"city": "Rome", "unit": "k"}),  # not in the enum
    ("add", {"a": 1, "b": 200}),  # out of range
    ("noop", {"x": 1}),  # a tool without parameters takes none
]


@pytest.mark.parametrize(("fmt", "family"), CASES, ids=lambda c: getattr(c, "name", c))
@pytest.mark.parametrize("parallel", [True, False])
def test_required_accepts_each_tool_s_call_and_refuses_wrong_ones(tokenizers: dict[str, Any], fmt: str,
                                                                  family: Family, parallel: bool) -> None:
    tokenizer, g = tokenizers[fmt], grammar(tokenizers, fmt, request(family, parallel=parallel))
    for call in GOOD:
        assert accepts(tokenizer, g, call_text(family, [call])), call
    for call in BAD:
        assert not accepts(tokenizer, g, call_text(family, [call])), call
    assert not accepts(tokenizer, g, "I would rather not.")  # required: a call, not text
    two = call_text(family, GOOD[:2])
    # Two calls only when parallel calls are on and the family's template can render them (not Llama's).
    assert accepts(tokenizer, g, two) == (parallel and family is not families.LLAMA3_JSON)


@pytest.mark.parametrize(("fmt", "family"), CASES, ids=lambda c: getattr(c, "name", c))
def test_a_named_function_is_the_only_call_allowed(tokenizers: dict[str, Any], fmt: str, family: Family) -> None:
    tokenizer, g = tokenizers[fmt], grammar(tokenizers, fmt, request(family, "function", "add"))
    assert accepts(tokenizer, g, call_text(family, [("add", {"a": 3, "b": 4})]))
    assert not accepts(tokenizer, g, call_text(family, [("get_weather", {"city": "Paris"})]))
    assert not accepts(tokenizer, g, call_text(family, [("add", {"a": 3})]))


@pytest.mark.parametrize(("fmt", "family"), CASES, ids=lambda c: getattr(c, "name", c))
def test_the_grammar_forces_the_marker_as_its_special_token(tokenizers: dict[str, Any], fmt: str,
                                                           family: Family) -> None:
    tokenizer = tokenizers[fmt]
    m = matcher(tokenizer, grammar(tokenizers, fmt, request(family, "function", "add")))
    forced = m.compute_ff_tokens()
    if family is families.LLAMA3_JSON:
        assert tokenizer.decode(forced).startswith('{"name": "add", "parameters": {')
    elif tokenizer.has_thinking:  # think first, or call: the two tokens are all there is to choose from
        allowed = np.nonzero(np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little"))[0]
        assert set(allowed.tolist()) == {tokenizer.convert_tokens_to_ids(t) for t in (family.start, "<think>")}
    else:
        assert forced[0] == tokenizer.convert_tokens_to_ids(family.start)  # the token, not its spelling
        # Spelled out in ordinary tokens, the marker is refused: a model must emit the token it was trained on.
        spelled = [t for ch in family.start for t in tokenizer.encode(ch, add_special_tokens=False)]
        assert matcher(tokenizer, grammar(tokenizers, fmt, request(family))).validate_tokens(spelled) == 0


STRICT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},  # not strict: any object
]


@pytest.mark.parametrize(("fmt", "family"), CASES, ids=lambda c: getattr(c, "name", c))
def test_auto_with_strict_tools_lets_text_through_and_holds_a_started_call_to_its_schema(
        tokenizers: dict[str, Any], fmt: str, family: Family) -> None:
    tokenizer, g = tokenizers[fmt], grammar(tokenizers, fmt, request(family, "auto", tools=STRICT_TOOLS))
    assert accepts(tokenizer, g, "The weather is fine, no need to look it up.")
    assert accepts(tokenizer, g, call_text(family, [("get_weather", {"city": "Paris"})]))
    assert not accepts(tokenizer, g, call_text(family, [("get_weather", {"town": "Paris"})]))
    assert accepts(tokenizer, g, call_text(family, [("add", {"anything": ["goes"]})]))
    assert not accepts(tokenizer, g, call_text(family, [("nope", {})]))
    if family is families.LLAMA3_JSON:
        assert not accepts(tokenizer, g, '{"answer": 42}')  # a reply that opens with "{" is a call
    else:
        assert accepts(tokenizer, g, "Let me check.\n" + call_text(family, [("get_weather", {"city": "Rome"})]))


@pytest.mark.parametrize("fmt", ["qwen2.5", "qwen3", "llama3.1", "mistral"])
def test_nothing_is_constrained_without_strict_tools_or_with_none(tokenizers: dict[str, Any], fmt: str) -> None:
    family = FAMILY_OF[fmt]
    assert request(family, "auto").grammar(tokenizers[fmt]) is None
    assert request(family, "none").grammar(tokenizers[fmt]) is None
    assert request(family, "none", tools=STRICT_TOOLS).grammar(tokenizers[fmt]) is None


def test_schemas_with_definitions_keep_their_references(tokenizers: dict[str, Any]) -> None:
    """Pydantic-made schemas (LangChain's tools) refer to "#/$defs/...": they must still resolve."""
    parameters = {"type": "object", "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                         "required": ["x"], "additionalProperties": False}},
                  "properties": {"p": {"$ref": "#/$defs/Point"}}, "required": ["p"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "plot", "parameters": parameters}}]
    for fmt, family in CASES:
        g = grammar(tokenizers, fmt, request(family, tools=tools))
        assert accepts(tokenizers[fmt], g, call_text(family, [("plot", {"p": {"x": 1}})]))
        assert not accepts(tokenizers[fmt], g, call_text(family, [("plot", {"p": {"x": "one"}})]))


# ---- everything a grammar allows, the parser reads back as valid calls -----------------------------------


def sample(tokenizer: Any, g: str, rng: random.Random, max_tokens: int = 300) -> str | None:
    """A random walk through the tokens the grammar allows (ending soon where it may), decoded."""
    m = matcher(tokenizer, g)
    tokens: list[int] = []
    closers = _closers(tokenizer)
    while len(tokens) < max_tokens:
        if m.is_accepting() and (m.is_stopped() or rng.random() < 0.5):
            return str(tokenizer.decode(tokens))
        forced = m.compute_ff_tokens()
        if forced:
            choice = forced[0]
        else:
            allowed = np.nonzero(np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8),
                                               bitorder="little"))[0]
            allowed = [int(t) for t in allowed if t not in tokenizer.eos_token_ids]
            ending = [t for t in allowed if t in closers]
            choice = rng.choice(ending if ending and rng.random() < 0.6 else allowed)
        assert m.consume_token(choice), m.get_error()
        tokens.append(choice)
    return None


@functools.cache
def _closers(tokenizer: Any) -> frozenset[int]:
    """Tokens that end strings, numbers or containers: the walk leans on them to finish."""
    return frozenset(i for i in range(len(tokenizer)) if any(c in tokenizer.decode([i]) for c in '"}],0123456789'))


@pytest.mark.parametrize(("fmt", "family"), CASES, ids=lambda c: getattr(c, "name", c))
@pytest.mark.parametrize("parallel", [True, False])
def test_every_forced_reply_reads_back_as_calls_that_fit_their_schemas(tokenizers: dict[str, Any], fmt: str,
                                                                       family: Family, parallel: bool) -> None:
    tokenizer = tokenizers[fmt]
    req = request(family, parallel=parallel)
    g = grammar(tokenizers, fmt, req)
    rng = random.Random(f"{fmt}{family.name}{parallel}")
    finished = 0
    for _ in range(12):
        text = sample(tokenizer, g, rng)
        if text is None:
            continue
        finished += 1
        reply = parse_reply(req.parser(), text)
        assert _without_thinking(reply.content) == "" and reply.dropped == 0, text
        assert reply.calls and (len(reply.calls) == 1 or parallel), text
        for call in reply.calls:
            assert call.complete
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert finished >= 6


def _without_thinking(content: str) -> str:
    """Reasoning is not split from content (yet): a forced reply's content is at most its think block."""
    return re.sub(r"^<think>.*</think>", "", content, flags=re.DOTALL)


def test_a_reasoning_model_may_think_before_a_forced_call(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["qwen3"]
    for req in (request(families.HERMES), request(families.HERMES, "auto", tools=STRICT_TOOLS)):
        g = grammar(tokenizers, "qwen3", req)
        call = call_text(families.HERMES, [("get_weather", {"city": "Paris"})])
        assert accepts(tokenizer, g, "<think>\nThe user wants the weather.\n</think>\n\n" + call)
        assert accepts(tokenizer, g, call)
    assert not accepts(tokenizer, grammar(tokenizers, "qwen3", request(families.HERMES)), "<think>\nhm\n</think>No.")
    # A model without think tokens gets no think rule: the call must come first.
    assert "think" not in grammar(tokenizers, "qwen2.5", request(families.HERMES))


# -- forced calls end ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "family"), [c for c in CASES if c[1] is not families.LLAMA3_JSON],
                         ids=lambda c: getattr(c, "name", c))
def test_a_named_function_is_called_exactly_once_even_with_parallel_calls_on(tokenizers: dict[str, Any], fmt: str,
                                                                             family: Family) -> None:
    tokenizer, g = tokenizers[fmt], grammar(tokenizers, fmt, request(family, "function", "add", parallel=True))
    once = [("add", {"a": 3, "b": 4})]
    assert accepts(tokenizer, g, call_text(family, once))
    assert not accepts(tokenizer, g, call_text(family, once * 2))


@pytest.mark.parametrize(("fmt", "family"), [c for c in CASES if c[1] is not families.LLAMA3_JSON],
                         ids=lambda c: getattr(c, "name", c))
@pytest.mark.parametrize("limit", [None, 3])
def test_required_stops_at_max_tool_calls_or_the_default_limit(tokenizers: dict[str, Any], fmt: str, family: Family,
                                                              limit: int | None) -> None:
    bound = limit or CALL_LIMIT
    forced = ToolRequest(family, TOOLS, "required", None, True, limit)
    tokenizer, g = tokenizers[fmt], grammar(tokenizers, fmt, forced)
    calls = [("add", {"a": i, "b": i}) for i in range(bound + 1)]
    assert accepts(tokenizer, g, call_text(family, calls[:bound]))
    assert not accepts(tokenizer, g, call_text(family, calls))
    strict_auto = ToolRequest(family, [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS], "auto",
                              None, True, limit)
    g = grammar(tokenizers, fmt, strict_auto)
    assert accepts(tokenizer, g, call_text(family, calls[:bound]))
    assert not accepts(tokenizer, g, call_text(family, calls))


def test_forced_arguments_are_bounded_where_the_schema_is_not(tokenizers: dict[str, Any]) -> None:
    # A string, a number and an open object with no limits of their own: each ends at the grammar's limit.
    free = {"type": "object", "properties": {"note": {"type": "string"}, "n": {"type": "number"}, "extra": {}},
            "required": ["note", "n", "extra"]}
    tools = [{"type": "function", "function": {"name": "log", "parameters": free}}]
    tokenizer = tokenizers["qwen2.5"]
    g = grammar(tokenizers, "qwen2.5", request(families.HERMES, "function", "log", tools=tools))
    arguments = {"note": "x" * STRING_LIMIT, "n": 1.5, "extra": [[{"a": None}]]}
    assert accepts(tokenizer, g, call_text(families.HERMES, [("log", arguments)]))
    too_long = {**arguments, "note": "x" * (STRING_LIMIT + 1)}
    assert not accepts(tokenizer, g, call_text(families.HERMES, [("log", too_long)]))
    assert not accepts(tokenizer, g, call_text(families.HERMES, [("log", {**arguments, "n": 1.0 + 2**-30})]))
    deep: Any = 1
    for _ in range(NESTING_LIMIT + 1):
        deep = [deep]
    assert not accepts(tokenizer, g, call_text(families.HERMES, [("log", {**arguments, "extra": deep})]))
