"""What the protocol converters share: function tools, tool choice and structured output onto a `Generate`
(one mapping for every API), sampling parameters, and decoding a request's sub-objects with errors that
name them.

Chat completions, the Responses API and Anthropic's Messages API say the same things in three shapes. Each
protocol layer reads its shape into the plain values here (`FunctionTool`, `ToolChoice`) and gets the
`Generate` fields from `tool_fields`; structured output becomes a `Constraint` through `json_constraint`.
So the engine sees one convention (typed `ToolSpec`s, carried across the process boundary as they are),
and the checks that need no model (names unique, a named tool among the tools, a schema that can be
enforced) are made once, here, before any work, with the parameter path of the API the client speaks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, TypeVar

import msgspec

from gateway.errors import ErrorKind, GatewayError, invalid, unsupported
from mlx_backend import grammar
from mlx_backend.contract import Constraint, SamplingParams, ToolSpec

T = TypeVar("T")

ChoiceMode = Literal["auto", "none", "required", "function"]


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object; None: the tool takes no arguments
    strict: bool | None = None  # True: arguments are held to the schema even when the model chooses to call
    param: str = "tools[0]"  # where the tool is in the request, for errors (e.g. "tools[2].function" in chat)


@dataclass(frozen=True)
class ToolChoice:
    mode: ChoiceMode = "auto"  # "required": some tool must be called; "function": the one named
    name: str | None = None
    param: str = "tool_choice"  # where the chosen name is in the request, for errors


class ToolFields(TypedDict):
    """Keyword arguments for `Generate`."""

    tools: tuple[ToolSpec, ...]
    tool_choice: str
    tool_choice_name: str | None
    parallel_tool_calls: bool


def tool_fields(tools: Sequence[FunctionTool], choice: ToolChoice, parallel: bool = True) -> ToolFields:
    """The Generate fields for these tools; a 400 naming the parameter when they cannot work together."""
    names: set[str] = set()
    for tool in tools:
        if not tool.name:
            raise invalid(f"{tool.param}.name", "A tool's name must not be empty.")
        if tool.name in names:
            raise invalid(f"{tool.param}.name", f"The tool name {tool.name!r} is used by another tool too.")
        if not _travels(tool.parameters):
            raise invalid(f"{tool.param}.parameters", "The tool's parameters hold an integer beyond 64 bits.")
        names.add(tool.name)
    if choice.mode in ("required", "function") and not tools:
        raise invalid(choice.param, "A tool choice that forces a call needs tools.")
    if choice.mode == "function" and choice.name not in names:
        raise invalid(choice.param, f"The tool choice names {choice.name!r}, which is not one of the tools.")
    return ToolFields(
        tools=tuple(ToolSpec(t.name, t.description, t.parameters, t.strict) for t in tools),
        tool_choice=choice.mode,
        tool_choice_name=choice.name if choice.mode == "function" else None,
        parallel_tool_calls=parallel,
    )


def _travels(value: object) -> bool:
    """Whether the engine's IPC (msgpack: 64-bit integers) can carry it; JSON allows integers of any size."""
    try:
        msgspec.msgpack.encode(value)
    except OverflowError:
        return False
    return True


def check_constraint_with_tools(tools: Sequence[FunctionTool], choice: ToolChoice, param: str) -> None:
    """Structured output holds the whole reply to a JSON grammar, which leaves no room for a tool call (and
    the engine refuses it next to a forced or strict call's grammar): tools that could be called and an
    output format are refused together, in the client's API (`param` names its output format)."""
    if tools and choice.mode != "none":
        raise unsupported(param, "structured output cannot be combined with tools the model may call; send "
                                 "one of the two (or tool choice none)")


def json_constraint(schema: dict[str, Any] | None, *, strict: bool, param: str) -> Constraint:
    """Output held to a JSON Schema (None: any JSON object); a 400 naming `param` if it cannot be enforced."""
    constraint = (
        Constraint("json_object") if schema is None else Constraint("json_schema", json.dumps(schema), strict)
    )
    problem = grammar.validate(constraint)
    if problem is not None:
        raise invalid(param, problem)
    return constraint


def sampling_params(
    max_tokens: int,
    temperature: float | None = None,
    top_p: float | None = None,
    *,
    top_k: int | None = None,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logprobs: int | None = None,
    logit_bias: object = None,
) -> SamplingParams:
    """The one reading of every API's sampling parameters, in chat's terms (top_p 0 is greedy, a missing
    temperature is 1.0); `logit_bias` is OpenAI's {"token id": bias} object, checked here."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=sampling_temperature(temperature, top_p),
        top_p=top_p if top_p else 1.0,
        top_k=top_k or 0,
        seed=seed,
        stop=stops_of(stop),
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logprobs=logprobs,
        logit_bias=logit_bias_of(logit_bias),
    )


def sampling_temperature(temperature: float | None, top_p: float | None) -> float:
    if top_p == 0:
        return 0.0  # only the most likely token survives a top_p of 0: that is greedy decoding
    return 1.0 if temperature is None else temperature


def logit_bias_of(bias: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias, {"token id": bias in [-100, 100]}, as sorted (id, bias) pairs. Whether each id is a
    token of the model is the engine's to check (it has the tokenizer)."""
    if not isinstance(bias, dict):
        return ()
    pairs = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and str(int(key)) == key and int(key) < 2**31):
            raise invalid("logit_bias", f"logit_bias keys are token ids (decimal integers), not {key!r}")
        if not -100 <= value <= 100:
            raise invalid("logit_bias", f"logit_bias values lie between -100 and 100; token {key} has {value}")
        if value:
            pairs.append((int(key), float(value)))
    return tuple(sorted(pairs))


def stops_of(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(s == "" for s in stops):
        raise invalid("stop", "stop strings must not be empty")
    return stops


def in_api_terms(error: GatewayError, fields: Mapping[str, str]) -> GatewayError:
    """An engine error that names a chat field (the engine sees chat messages and chat's names), naming the
    field of the client's API instead: `fields` maps a pattern of chat's name to the API's. The param is the
    API's top-level field; the message says the same."""
    for pattern, name in fields.items():
        if error.param is not None and re.match(pattern + r"\b", error.param):
            message = error.message
            for chat, ours in fields.items():
                message = re.sub(r"\b" + chat + r"\b", ours, message)
            return GatewayError(error.kind, message, name.split(" ")[0])
    return error


FAULT_PREFIX = "fault:"  # test-only: `user: "fault:abort"` injects an engine fault (settings.test_faults)


def fault_of(user: object, allow_faults: bool) -> str | None:
    """Test-only fault injection through the user field (settings.test_faults)."""
    if allow_faults and isinstance(user, str) and user.startswith(FAULT_PREFIX):
        return user[len(FAULT_PREFIX):]
    return None


_AT = re.compile(r" - at `\$(.*)`$")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def decode(value: Any, kind: type[T], param: str) -> T:
    """`value` (part of a request read as plain JSON) as `kind`; a 400 naming the field when it is not."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise invalid_field(exc, param) from None


def invalid_field(exc: msgspec.ValidationError, param: str) -> GatewayError:
    """msgspec's error as a 400 naming the field (`param` is where the decoded value sits; "" for the body)."""
    message = str(exc)
    at = _AT.search(message)
    path = (param + (at.group(1) if at else "")).lstrip(".")
    detail = message[:at.start()] if at else message
    unknown = _UNKNOWN.search(detail)
    if unknown:
        name = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return GatewayError(ErrorKind.UNSUPPORTED_PARAMETER, f"Unrecognized request argument supplied: {name}", name)
    if not path:
        return GatewayError(ErrorKind.INVALID_REQUEST, f"Invalid request body: {detail}")
    return invalid(path, f"Invalid value for '{path}': {detail}")
