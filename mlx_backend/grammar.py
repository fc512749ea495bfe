"""Constraints (`contract.Constraint`) as llguidance grammars, and the cheap check the gateway runs on them.

This module imports neither MLX nor a tokenizer, so the gateway process can call `validate` to turn a schema
we cannot enforce into a 400 before any compute. The engine compiles the same grammar against the model's
tokenizer (`mlx_backend/engine/constrained.py`).

What is enforced, for every JSON kind (json_object, json_schema, `json_value_for_lark` in a Lark grammar):
- the output is one JSON value and nothing else: no whitespace before it, none after it; the model's EOS
  is the only token allowed once it is complete, so the request ends with finish_reason "stop";
- at most `WHITESPACE_LIMIT` whitespace characters wherever JSON allows whitespace: enough to pretty-print,
  and a model cannot run into the endless stream of newlines that unbounded JSON modes are known for;
- json_schema with strict=True: every keyword is enforced; a keyword llguidance cannot enforce (e.g.
  `unevaluatedProperties`, a `pattern` with look-around, an unknown `format`) makes the schema invalid;
- json_schema with strict=False (OpenAI's default, where the schema is guidance and no promise): the same,
  except unsupported keywords and formats are ignored, so the output is valid JSON that follows the schema
  as far as it can be enforced. A schema that is broken (not JSON, `"type": "objekt"`, unsatisfiable) is
  refused either way;
- objects are closed: an object schema that lists `properties` and leaves `additionalProperties` out gets
  no keys beyond those (`closed_objects`; JSON Schema would allow them, but nobody declared them). Object
  properties come in the schema's order.
- every construct ends (`bounded`): what the schema leaves unbounded gets a limit (the `*_LIMIT` constants
  below, docs/api.md "Structured output"), so a model that repeats itself (a number of endless digits, a
  string or a list that goes on) is made to close it. A keyword in the schema (maxLength, maxItems,
  maxProperties, minimum/maximum, multipleOf) overrides the limit where it stands. Values the schema leaves
  open (`{}`, json_object mode) nest at most NESTING_LIMIT deep. Not bounded: recursion through `$ref`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from llguidance import LLMatcher

from mlx_backend.contract import Constraint

# Whitespace is matched once per place JSON allows it, so the bound holds there ("\n" + 20 spaces is
# indent=4 at depth 5).
WHITESPACE_LIMIT = 24
_WHITESPACE = rf"[\x20\x0A\x0D\x09]{{1,{WHITESPACE_LIMIT}}}"

# Limits for what a schema leaves unbounded; the schema's own keyword wins where it has one.
STRING_LIMIT = 4096  # characters of a string without maxLength (nor enum, const)
ARRAY_LIMIT = 256  # items of an array without maxItems
PROPERTY_LIMIT = 64  # keys of an object without maxProperties whose keys the schema does not list
KEY_LIMIT = 128  # characters of such an object's keys
NUMBER_LIMIT = 2**53 - 1  # |x| of a number without minimum/maximum: the integers a double holds exactly
DECIMALS = 6  # digits after the point of a number without multipleOf (no exponent then)
NESTING_LIMIT = 6  # levels of a value the schema leaves open ({}, true, json_object mode's values)

_ANY = "mlx_gateway_any"  # $defs names of the bounded "any JSON value", one per nesting level
_KEY_PATTERN = f"^.{{0,{KEY_LIMIT}}}$"


class ConstraintError(ValueError):
    """A constraint that cannot be enforced; `message` names the problem in words a client can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _options(strict: bool) -> dict[str, Any]:
    # Overrides, not defaults: an "x-guidance" key in a client's schema must not undo the whitespace bound
    # or make a strict schema lenient.
    return {"whitespace_pattern": _WHITESPACE, "lenient": not strict}


@functools.lru_cache(maxsize=256)  # agents send the same schema with every request
def grammar_for(constraint: Constraint) -> str:
    """The llguidance grammar (a JSON text) for `constraint`, not yet checked: `validate` checks it.
    Raises ConstraintError when the source cannot even be read (not JSON, not a schema)."""
    if constraint.kind == "json_object":
        any_object = json.dumps(bounded({"type": "object"}))
        return LLMatcher.grammar_from_json_schema(any_object, overrides=_options(strict=True))  # type: ignore[arg-type]
    if constraint.kind == "json_schema":
        source = _read_schema(constraint.source)
        try:
            return LLMatcher.grammar_from_json_schema(source, overrides=_options(constraint.strict))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConstraintError(f"The JSON schema cannot be read: {exc}.") from None
    if constraint.kind == "lark":
        if not constraint.source.strip():
            raise ConstraintError("The grammar is empty.")
        return LLMatcher.grammar_from_lark(constraint.source)
    raise ConstraintError(f"Unknown constraint kind {constraint.kind!r}.")


@functools.lru_cache(maxsize=256)
def validate(constraint: Constraint) -> str | None:
    """None if `constraint` can be enforced, else a readable reason (for a 400). No tokenizer needed, well
    under a millisecond for typical schemas; special tokens in a Lark grammar are checked only when the
    engine compiles it against the model's tokenizer."""
    try:
        grammar = grammar_for(constraint)
    except ConstraintError as exc:
        return exc.message
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return None
    return describe_error(constraint, messages[0] if messages else "unknown error")


def describe_error(constraint: Constraint, detail: str) -> str:
    """llguidance's message, said in terms of what the client sent."""
    detail = detail.strip()
    if constraint.kind == "lark":
        return f"The grammar is invalid: {detail}"
    message = f"The JSON schema cannot be enforced: {detail}"
    if constraint.kind == "json_schema" and constraint.strict and _is_unsupported(detail):
        message += " (with strict: false, keywords that cannot be enforced are ignored)"
    return message


def json_value_for_lark(schema: Mapping[str, Any] | bool, *, strict: bool = True) -> str:
    """`%json {...}` for a Lark grammar (e.g. a forced tool call's arguments), with the same whitespace
    bound and strictness as a json_schema constraint."""
    if schema is False:
        raise ConstraintError("The JSON schema is `false`: no output satisfies it.")
    if schema is True:
        schema = {}
    options = {**schema.get("x-guidance", {}), **_options(strict)}
    return "%json " + json.dumps({**bounded(closed_objects(dict(schema))), "x-guidance": options})


def _read_schema(source: str) -> str:
    try:
        schema = json.loads(source)
    except ValueError as exc:
        raise ConstraintError(f"The JSON schema is not valid JSON: {exc}.") from None
    if schema is True:
        return json.dumps(bounded({}))  # the same schema, in the form llguidance applies options to
    if schema is False:
        raise ConstraintError("The JSON schema is `false`: no output satisfies it.")
    if not isinstance(schema, dict):
        raise ConstraintError(f"The JSON schema must be an object or a boolean, not {type(schema).__name__}.")
    return json.dumps(bounded(closed_objects(schema)))


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that lists its `properties` and
    says nothing of others (XGrammar's strict mode, vLLM's default, does the same). JSON Schema would allow
    extra keys there, but an output that adds keys nobody declared serves no client, and a model inventing
    them (schemas from pydantic and LangChain leave objects open) can run out of tokens doing it. The output
    still validates against the schema as written."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: value if key in ("const", "enum", "default", "examples") else closed_objects(value)
              for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed and "patternProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def _is_unsupported(detail: str) -> bool:
    """Whether llguidance's message is about a keyword it cannot enforce (not a broken schema)."""
    return any(marker in detail for marker in ("Unimplemented keys", "Unknown format", "not supported"))


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# Not `not` nor `if`: a bound inside them would widen what the schema allows, not narrow it.
_SCHEMAS = ("additionalProperties", "items", "contains", "then", "else", "unevaluatedProperties", "unevaluatedItems",
            "additionalItems")
_ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$comment", "deprecated", "readOnly",
                          "writeOnly", "$schema", "$id"})


def bounded(schema: Any) -> Any:
    """The schema with a limit on every construct it leaves unbounded (the `*_LIMIT` constants): strings,
    arrays, numbers, the keys of open objects, and the depth of values it leaves open, which become a
    reference to a bounded "any JSON value" in `$defs`. Every output valid here is valid for the schema as
    written. Expects a schema whose objects are closed where it lists properties (`closed_objects`)."""
    used: set[int] = set()
    result = _bound(schema, used)
    if not used:
        return result
    if not isinstance(result, dict) or ("$ref" in result and len(result) == 1):
        result = {"allOf": [result]}  # a root that is only a reference: give it room for $defs
    definitions = dict(result.get("$defs", {}))
    for level in range(max(used) + 1):
        definitions[f"{_ANY}{level}"] = _any_value(level)
    return {**result, "$defs": definitions}


def _bound(schema: Any, used: set[int], level: int = NESTING_LIMIT - 1) -> Any:
    if schema is True or (isinstance(schema, dict) and set(schema) <= _ANNOTATIONS):
        used.add(level)
        return {"$ref": f"#/$defs/{_ANY}{level}"}
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _bound(value, used) for name, value in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_bound(value, used) for value in out[key]]
    for key in _SCHEMAS:
        if key in out and out[key] is not False:
            out[key] = [_bound(v, used) for v in out[key]] if isinstance(out[key], list) else _bound(out[key], used)
    if "enum" in out or "const" in out:
        return out
    types = out.get("type")
    kinds = set(types) if isinstance(types, list) else {types} if isinstance(types, str) else set()
    if kinds & {"number", "integer"}:
        _bound_number(out, integer="number" not in kinds)
    if "string" in kinds:
        out.setdefault("maxLength", max(STRING_LIMIT, _number(out.get("minLength"))))
    if "array" in kinds:
        out.setdefault("maxItems", max(ARRAY_LIMIT, _number(out.get("minItems"))))
        if "items" not in out and "prefixItems" not in out:
            used.add(level)
            out["items"] = {"$ref": f"#/$defs/{_ANY}{level}"}
    if "object" in kinds:
        _bound_object(out, used, level)
    return out


def _bound_number(schema: dict[str, Any], integer: bool) -> None:
    # A bound the schema gives on one side beyond the limit moves the other side's limit with it.
    low = _number(schema.get("minimum", schema.get("exclusiveMinimum")))
    high = _number(schema.get("maximum", schema.get("exclusiveMaximum")))
    if "minimum" not in schema and "exclusiveMinimum" not in schema:
        schema["minimum"] = min(-NUMBER_LIMIT, 10 * high)
    if "maximum" not in schema and "exclusiveMaximum" not in schema:
        schema["maximum"] = max(NUMBER_LIMIT, 10 * low)
    if not integer and "multipleOf" not in schema:
        schema["multipleOf"] = 10.0**-DECIMALS


def _bound_object(schema: dict[str, Any], used: set[int], level: int) -> None:
    extra = schema.get("additionalProperties", True)
    if extra is False:
        return
    schema.setdefault("maxProperties", max(PROPERTY_LIMIT, _number(schema.get("minProperties")),
                                           len(schema.get("required", ()))))
    if "properties" in schema or "patternProperties" in schema:
        return  # listed keys are bounded; the names of extra keys here are not (no propertyNames in llguidance)
    if extra is True:
        used.add(level)
        extra = {"$ref": f"#/$defs/{_ANY}{level}"}
    schema["patternProperties"] = {_KEY_PATTERN: extra}
    schema["additionalProperties"] = False


def _number(value: Any) -> float:
    """A keyword's number, 0 if it is absent or not a number (llguidance reports a broken schema)."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _any_value(level: int) -> dict[str, Any]:
    """Any JSON value, bounded, nesting at most `level` more containers."""
    value: dict[str, Any] = {"type": ["string", "number", "boolean", "null"]}
    if level > 0:
        inner = {"$ref": f"#/$defs/{_ANY}{level - 1}"}
        value = {"type": [*value["type"], "array", "object"], "items": inner,
                 "patternProperties": {_KEY_PATTERN: inner}, "additionalProperties": False}
    bounded_value: dict[str, Any] = _bound(value, set())  # each kind's limits; every part is given
    return bounded_value
