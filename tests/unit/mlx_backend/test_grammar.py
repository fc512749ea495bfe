"""The gateway's check of a constraint, with no tokenizer and no MLX: None for what can be enforced, a readable
reason for what cannot; and the llguidance grammar each kind becomes."""

from __future__ import annotations

import json
import subprocess
import sys
from enum import StrEnum
from typing import Any, Literal

import pytest
from jsonschema import Draft202012Validator
from llguidance import LLMatcher
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel

from mlx_backend.contract import Constraint
from mlx_backend.grammar import (
    ARRAY_LIMIT,
    DECIMALS,
    KEY_LIMIT,
    NESTING_LIMIT,
    NUMBER_LIMIT,
    PROPERTY_LIMIT,
    STRING_LIMIT,
    WHITESPACE_LIMIT,
    bounded,
    closed_objects,
    grammar_for,
    json_value_for_lark,
    validate,
)


def schema(value: Any, *, strict: bool = False) -> Constraint:
    return Constraint("json_schema", json.dumps(value), strict=strict)


class Colour(StrEnum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    postcode: str | None = None


class Person(BaseModel):
    name: str
    age: int
    colour: Colour
    kind: Literal["employee", "contractor"]
    addresses: list[Address]
    manager: Person | None = None  # recursive, through $defs/$ref


class Order(BaseModel):
    id: int
    items: list[str]
    buyer: Person
    total: float | None = None


# -- what the SDKs send ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [Address, Person, Order])
def test_pydantic_schemas_are_accepted_strict_as_the_openai_sdk_sends_them(model: type[BaseModel]) -> None:
    # client.beta.chat.completions.parse / LangChain's with_structured_output(method="json_schema")
    sent = to_strict_json_schema(model)
    assert "$defs" in sent or model is Address
    assert validate(schema(sent, strict=True)) is None


@pytest.mark.parametrize("model", [Address, Person, Order])
def test_pydantic_schemas_are_accepted_as_pydantic_writes_them(model: type[BaseModel]) -> None:
    assert validate(schema(model.model_json_schema())) is None


def test_json_object_needs_no_source() -> None:
    assert validate(Constraint("json_object")) is None


# -- what is refused, and how it is said -------------------------------------------------------------------


def test_a_misspelt_type_is_named() -> None:
    message = validate(schema({"type": "objekt"}))
    assert message is not None
    assert "objekt" in message and "JSON schema" in message


def test_a_broken_schema_is_refused_strict_or_not() -> None:
    for strict in (True, False):
        message = validate(schema({"type": "array", "minItems": 5, "maxItems": 3}, strict=strict))
        assert message is not None and "minItems" in message


def test_an_unsupported_keyword_is_named_in_strict_mode_with_the_way_out() -> None:
    message = validate(schema({"type": "object", "unevaluatedProperties": False}, strict=True))
    assert message is not None
    assert "unevaluatedProperties" in message
    assert "strict: false" in message


def test_non_strict_mode_ignores_unsupported_keywords_and_formats() -> None:
    assert validate(schema({"type": "object", "unevaluatedProperties": False})) is None
    assert validate(schema({"type": "string", "format": "no-such-format"})) is None
    assert validate(schema({"type": "string", "format": "no-such-format"}, strict=True)) is not None


def test_a_lookaround_pattern_is_named() -> None:
    message = validate(schema({"type": "string", "pattern": "(?=a)b"}, strict=True))
    assert message is not None and "look-around" in message


def test_a_remote_ref_is_refused() -> None:
    message = validate(schema({"$ref": "https://example.com/schema.json"}))
    assert message is not None and "example.com" in message


def test_source_that_is_not_json_or_not_a_schema() -> None:
    assert validate(Constraint("json_schema", "{not json")) == (
        "The JSON schema is not valid JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)."
    )
    assert validate(Constraint("json_schema", "[1, 2]")) == "The JSON schema must be an object or a boolean, not list."
    assert validate(Constraint("json_schema", "false")) == "The JSON schema is `false`: no output satisfies it."
    assert validate(Constraint("json_schema", "true")) is None  # any JSON value


def test_a_bad_lark_grammar_is_named() -> None:
    message = validate(Constraint("lark", "start: missing_rule"))
    assert message is not None
    assert message.startswith("The grammar is invalid") and "missing_rule" in message
    assert validate(Constraint("lark", "  ")) == "The grammar is empty."


def test_special_tokens_in_a_lark_grammar_wait_for_the_tokenizer() -> None:
    # Which special tokens exist depends on the model: the engine checks them when it compiles.
    assert validate(Constraint("lark", 'start: <|tool|> "x"')) is None


# -- the grammars -------------------------------------------------------------------------------------------


def test_the_whitespace_bound_cannot_be_undone_from_the_schema() -> None:
    grammar = json.loads(grammar_for(schema({"type": "object", "x-guidance": {"whitespace_flexible": True}})))
    (entry,) = grammar["grammars"]
    # llguidance applies overrides after the schema's own x-guidance
    assert f"{{1,{WHITESPACE_LIMIT}}}" in json.dumps(entry)


def test_json_for_lark_embeds_the_same_options() -> None:
    text = json_value_for_lark({"type": "object", "properties": {"city": {"type": "string"}}}, strict=True)
    assert text.startswith("%json {")
    assert json.loads(text.removeprefix("%json "))["x-guidance"]["lenient"] is False
    grammar = f'start: "<tool_call>" {text} "</tool_call>"'
    assert validate(Constraint("lark", grammar)) is None
    assert LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_lark(grammar)) == (False, [])


def test_json_for_lark_accepts_boolean_schemas() -> None:
    assert validate(Constraint("lark", f"start: {json_value_for_lark(True)}")) is None


def test_validate_imports_no_mlx() -> None:
    # The gateway imports this module; MLX must never load in the gateway process.
    code = (
        "import sys, mlx_backend.grammar as g, mlx_backend.contract as t;"
        "assert g.validate(t.Constraint('json_object')) is None;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'numpy', 'transformers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_objects_are_closed_unless_the_schema_says_otherwise() -> None:
    from mlx_backend.grammar import closed_objects

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "object", "additionalProperties": True,
                                                     "properties": {}}},
              "$defs": {"D": {"type": "object", "properties": {"e": {"type": "string"}}}},
              "enum_holder": {"enum": [{"properties": {}}]}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["additionalProperties"] is True  # said otherwise: kept
    assert closed["$defs"]["D"]["additionalProperties"] is False
    assert closed["enum_holder"] == {"enum": [{"properties": {}}]}  # values are data, not schemas


# -- every construct ends ------------------------------------------------------------------------------------


def test_what_a_schema_leaves_unbounded_gets_a_limit() -> None:
    sent = {"type": "object", "properties": {"s": {"type": "string"}, "n": {"type": "number"},
                                             "i": {"type": "integer"}, "a": {"type": "array"}, "o": {"type": "object"},
                                             "any": {}}}
    limited = Draft202012Validator(bounded(closed_objects(sent)))
    fine = {"s": "x" * STRING_LIMIT, "n": -(2**53 - 1) + 0.125, "i": 2**53 - 1, "a": [0] * ARRAY_LIMIT,
            "o": {f"k{i}": i for i in range(PROPERTY_LIMIT)}, "any": {"k" * KEY_LIMIT: [[None]]}}
    assert limited.is_valid(fine)
    for key, value in [("s", "x" * (STRING_LIMIT + 1)), ("n", 1.0 + 10.0**-(DECIMALS + 1)), ("n", 2.0**53),
                       ("i", -(2**53)), ("a", [0] * (ARRAY_LIMIT + 1)),
                       ("o", {f"k{i}": i for i in range(PROPERTY_LIMIT + 1)}), ("o", {"k" * (KEY_LIMIT + 1): 1})]:
        assert not limited.is_valid({**fine, key: value}), key
    deep: Any = None
    for _ in range(NESTING_LIMIT):
        deep = [deep]
    assert not limited.is_valid({**fine, "any": deep})
    assert Draft202012Validator(sent).is_valid({**fine, "any": deep})  # only the limits are new


def test_the_schema_s_own_keywords_win_over_the_limits() -> None:
    sent = {"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 10 * STRING_LIMIT},
        "n": {"type": "number", "minimum": 0, "multipleOf": 0.5},
        "a": {"type": "array", "items": {"type": "integer", "maximum": 10**30}, "maxItems": 1000},
        "e": {"enum": ["red", "green"]}, "c": {"const": "x"}}}
    schema = bounded(closed_objects(sent))
    properties = schema["properties"]
    assert properties["s"] == sent["properties"]["s"]
    assert properties["n"] == {**sent["properties"]["n"], "maximum": NUMBER_LIMIT}  # only the open side
    assert properties["a"]["maxItems"] == 1000 and properties["a"]["items"]["maximum"] == 10**30
    assert properties["e"] == sent["properties"]["e"] and properties["c"] == sent["properties"]["c"]
    assert Draft202012Validator(schema).is_valid({"s": "x" * (5 * STRING_LIMIT), "n": 2.5, "a": [10**29] * 999})


def test_json_object_mode_is_a_bounded_object() -> None:
    grammar = json.loads(grammar_for(Constraint("json_object")))
    (source,) = grammar["grammars"]
    limited = Draft202012Validator(source["json_schema"])
    assert limited.is_valid({"a": [1, "two", {"three": None}], "b": True})
    assert not limited.is_valid([1])  # an object, as json_object mode promises
    assert not limited.is_valid({"a": 1e300})
    assert validate(Constraint("json_object")) is None


def test_pydantic_schemas_stay_enforceable_once_bounded() -> None:
    for model in (Address, Person, Order):
        assert validate(schema(to_strict_json_schema(model), strict=True)) is None
        assert validate(schema(model.model_json_schema(), strict=True)) is None


def test_a_lower_bound_beyond_a_limit_moves_the_limit() -> None:
    sent = {"type": "object", "properties": {
        "essay": {"type": "string", "minLength": 10 * STRING_LIMIT}, "list": {"type": "array", "minItems": 1000},
        "big": {"type": "integer", "minimum": 10**20}, "small": {"type": "number", "maximum": -1e16}}}
    constraint = schema(sent, strict=True)
    assert validate(constraint) is None
    limited = Draft202012Validator(bounded(closed_objects(sent)))
    assert limited.is_valid({"essay": "x" * (10 * STRING_LIMIT), "list": [0] * 1000, "big": 10**20 + 1,
                             "small": -2e16})
