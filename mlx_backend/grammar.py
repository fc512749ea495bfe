"""Constraints (`types.Constraint`) as llguidance grammars, and the cheap check the gateway runs on them.

This module imports neither MLX nor a tokenizer, so the gateway process can call `validate` to turn a schema
we cannot enforce into a 400 before any compute. The engine compiles the same grammar against the model's
tokenizer (`mlx_backend/constrained.py`).

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
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from llguidance import LLMatcher

from mlx_backend.types import Constraint

# Whitespace is matched once per place JSON allows it, so the bound holds there ("\n" + 20 spaces is
# indent=4 at depth 5).
WHITESPACE_LIMIT = 24
_WHITESPACE = rf"[\x20\x0A\x0D\x09]{{1,{WHITESPACE_LIMIT}}}"
_ANY_OBJECT = '{"type": "object"}'


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
        return LLMatcher.grammar_from_json_schema(_ANY_OBJECT, overrides=_options(strict=True))  # type: ignore[arg-type]
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
    return "%json " + json.dumps({**schema, "x-guidance": options})


def _read_schema(source: str) -> str:
    try:
        schema = json.loads(source)
    except ValueError as exc:
        raise ConstraintError(f"The JSON schema is not valid JSON: {exc}.") from None
    if schema is True:
        return "{}"  # the same schema, in the form llguidance applies options to
    if schema is False:
        raise ConstraintError("The JSON schema is `false`: no output satisfies it.")
    if not isinstance(schema, dict):
        raise ConstraintError(f"The JSON schema must be an object or a boolean, not {type(schema).__name__}.")
    return json.dumps(closed_objects(schema))


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
