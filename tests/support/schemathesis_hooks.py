"""schemathesis hooks (SCHEMATHESIS_HOOKS=tests.support.schemathesis_hooks): fuzzed bodies reach generation.

`map_body`: a random `model` string is a 404 before any other field is judged, so it names the served model;
and a valid token limit above 16 (n above 2) is lowered to it, so hundreds of fuzzed generations stay fast. Only values
already valid are changed (a string model, an integer limit), so the negative cases keep their meaning.
`filter_body`: leaves out bodies that break the rules the document states in words because JSON Schema cannot.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis

SERVED_MODEL = "tiny"
EMBEDDING_MODEL = "embedder"  # a tiny BERT (tests.support.tiny_embedding_models), 64 dimensions, 512 tokens
EMBEDDING_DIMENSIONS = 64
SERVED_VOCABULARY = 512  # tests.support.tiny_models' default: logit_bias may name only its token ids
MAX_TOKENS = 16
MAX_CHOICES = 2
_CAPS = {"max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS, "max_output_tokens": MAX_TOKENS,
         "n": MAX_CHOICES}


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    if not isinstance(body, dict):
        return body
    body = _within_64_bits(body)
    if isinstance(body.get("model"), str):
        embeddings = ctx.operation is not None and ctx.operation.path == "/v1/embeddings"
        body["model"] = EMBEDDING_MODEL if embeddings else SERVED_MODEL
    for limit, most in _CAPS.items():
        value = body.get(limit)
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # 8.0 is 8
        if integral and not isinstance(value, bool) and value > most:
            body[limit] = most
    thinking = body.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if isinstance(budget, int | float) and not isinstance(budget, bool) and budget >= MAX_TOKENS:  # 8.0 too
        body["thinking"] = {**thinking, "budget_tokens": MAX_TOKENS - 1}  # below the capped max_tokens
    return body


def _forces_a_call(choice: Any) -> bool:
    """tool_choice values that force a call: "required", a named function or tool, Anthropic's any / tool."""
    return choice == "required" or (isinstance(choice, dict) and choice.get("type") in ("function", "any", "tool"))


@schemathesis.hook
def filter_body(ctx: Any, body: Any) -> bool:
    """Rules the document states in words because JSON Schema cannot say them (gateway/openapi.py, each route's
    requestBody description): a Messages request ends with a user turn (no assistant prefill); a tool_choice
    that forces a call needs tools, and one that names a tool names one of them; tool-call arguments are JSON;
    structured output goes with no callable tools; logit_bias names tokens of the model; top_logprobs needs
    logprobs (chat); previous_response_id names a stored response; tool names are unique; a thinking budget is
    less than max_tokens; an image is a real PNG, JPEG, GIF or WebP sent to a vision model; a tool's parameters
    hold no integer beyond 64 bits; embeddings: `dimensions` is the model's own (it is no Matryoshka model), and
    token ids need tiktoken's cl100k_base file, which the fuzzed server has not."""
    if not isinstance(body, dict):
        return True
    path = ctx.operation.path if ctx.operation is not None else ""
    if path == "/v1/embeddings":
        given = body.get("input")
        token_ids = isinstance(given, list) and any(not isinstance(v, str) for v in given)
        return not token_ids and body.get("dimensions") in (None, EMBEDDING_DIMENSIONS)
    if path.startswith("/v1/messages") and isinstance(body.get("messages"), list):
        last = body["messages"][-1] if body["messages"] else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            return False
    choice, tools = body.get("tool_choice"), body.get("tools")
    if _forces_a_call(choice) and not tools:
        return False
    names = [_tool_name(t) for t in tools] if isinstance(tools, list) else []
    if len(names) != len(set(map(str, names))):
        return False
    named = _named(choice)
    if named is not None and named not in {_tool_name(t) for t in tools or ()}:
        return False
    fmt = body.get("text", {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") != "text" and tools and choice != "none":
        return False
    output = body.get("output_config")  # Anthropic's structured output
    none = choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none")
    if isinstance(output, dict) and output.get("format") is not None and tools and not none:
        return False
    thinking, limit = body.get("thinking"), body.get("max_tokens")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (limit, budget))
    if numbers and not budget < limit:  # type: ignore[operator]  # 8.0 is a valid integer to the server too
        return False  # thinking.budget_tokens must be less than max_tokens
    if body.get("previous_response_id") is not None:  # names a stored response: none is, in a fuzzing run
        return False
    if path == "/v1/chat/completions" and body.get("top_logprobs") is not None and body.get("logprobs") is not True:
        return False
    bias = body.get("logit_bias")
    if isinstance(bias, dict) and any(k.isdigit() and int(k) >= SERVED_VOCABULARY for k in bias):
        return False
    if _has_huge_integer(body.get("tools")):  # the engine's IPC carries 64-bit integers
        return False
    if _has_image(body):  # an image must be real image bytes, for a vision model; the fuzzed model reads text
        return False
    return all(_is_json(a) for a in _arguments(body))


def _within_64_bits(node: Any) -> Any:
    """Integers anywhere travel to the engine as msgpack, 64-bit: one beyond is a 400 by rule, so a fuzzed one is
    brought to the nearest bound, keeping the case (tool parameters are filtered instead: `_has_huge_integer`)."""
    if isinstance(node, dict):
        return {k: v if k == "parameters" else _within_64_bits(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_within_64_bits(v) for v in node]
    if isinstance(node, int) and not isinstance(node, bool):
        return max(-(2**63), min(node, 2**63 - 1))
    if isinstance(node, float) and node.is_integer() and not -(2**63) <= node < 2**63:  # read as an integer
        return float(2**62) if node > 0 else float(-(2**62))
    return node


def _has_huge_integer(node: Any) -> bool:
    if isinstance(node, list):
        return any(_has_huge_integer(v) for v in node)
    if isinstance(node, dict):
        return any(_has_huge_integer(v) for v in node.values())
    return isinstance(node, int) and not -(2**63) <= node < 2**64


_IMAGE_PARTS = ("image_url", "input_image", "image")


def _has_image(node: Any) -> bool:
    if isinstance(node, list):
        return any(_has_image(v) for v in node)
    if not isinstance(node, dict):
        return False
    return node.get("type") in _IMAGE_PARTS or any(_has_image(v) for v in node.values())


def _named(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return None
    function = choice.get("function")
    return function.get("name") if isinstance(function, dict) else choice.get("name")


def _tool_name(tool: Any) -> Any:
    if not isinstance(tool, dict):
        return None
    function = tool.get("function")
    return function.get("name") if isinstance(function, dict) else tool.get("name")


def _arguments(node: Any) -> list[Any]:
    """Every `arguments` string of a tool call anywhere in the body."""
    if isinstance(node, list):
        return [a for v in node for a in _arguments(v)]
    if not isinstance(node, dict):
        return []
    found = [node["arguments"]] if isinstance(node.get("arguments"), str) else []
    return found + [a for k, v in node.items() if k != "arguments" for a in _arguments(v)]


def _is_json(text: str) -> bool:
    """Tool-call arguments: JSON text of an object ("" is taken as {})."""
    if text == "":
        return True
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
