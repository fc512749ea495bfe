"""Between the Responses API and the engine: a request -> `Generate`; the reply -> a response object, its
output items and its stream of typed events.

Input items become chat messages: `message` items by role (developer reads as system), an assistant
message and the `function_call` items after it one assistant turn with tool calls, `function_call_output`
a tool message. `instructions` is the first system message (never carried over from a previous response,
as in OpenAI's API). What we cannot honour is refused by name, before any work.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gateway import sse
from gateway.convert_shared import (
    FunctionTool,
    ToolChoice,
    check_constraint_with_tools,
    decode,
    fault_of,
    json_constraint,
    sampling_params,
    tool_fields,
)
from gateway.errors import GatewayError, invalid, unsupported
from gateway.protocol_responses import (
    ContentPart,
    ContentPartEvent,
    FormatJsonObject,
    FormatJsonSchema,
    FunctionCall,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolParam,
    IncompleteDetails,
    InputAudio,
    InputFile,
    InputImage,
    InputText,
    InputTokensDetails,
    ItemStatus,
    MessageItem,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    OutputTextParam,
    OutputTokensDetails,
    ResponseCreateRequest,
    ResponseError,
    ResponseObject,
    ResponseStateEvent,
    ResponseUsage,
    StreamEvent,
)
from gateway.reply import Block, CallBlock, Grew, Opened, Reply, Step, TextBlock
from mlx_backend.types import ChatMessage, Constraint, Finished, Generate, ToolCall

_NOT_INPUT = {
    "reasoning": "reasoning items are not accepted (this server never makes them)",
    "item_reference": "item references are not supported: send the items themselves, or previous_response_id",
}
_HARMFUL_INCLUDES = {"message.output_text.logprobs": "log probabilities are not returned"}


# ---------------------------------------------------------------------------------------------------
# Requests


def check_supported(req: ResponseCreateRequest) -> None:
    """Raise a 400 naming the first parameter we would otherwise have to ignore."""
    if req.background:
        raise unsupported("background", "responses run in the foreground only")
    if req.reasoning is not None and (req.reasoning.effort not in (None, "none") or req.reasoning.summary
                                      or req.reasoning.generate_summary):
        raise unsupported("reasoning", "reasoning controls are not available")
    if req.top_logprobs:
        raise unsupported("top_logprobs", "log probabilities are not returned")
    if req.max_tool_calls is not None and req.max_tool_calls < 1:
        raise invalid("max_tool_calls", "max_tool_calls must be at least 1.")
    if req.conversation is not None:
        raise unsupported("conversation", "the Conversations API is not available; use previous_response_id")
    if req.prompt is not None:
        raise unsupported("prompt", "stored prompt templates are not available")
    if req.context_management:
        raise unsupported("context_management", "context compaction is not available")
    if req.truncation == "auto":
        raise unsupported("truncation", "only 'disabled': an input longer than the context is a 400")
    for name in req.include or ():
        if name in _HARMFUL_INCLUDES:
            raise unsupported("include", f"{name!r}: {_HARMFUL_INCLUDES[name]}")
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise unsupported("text.verbosity", "only 'medium'")


def input_messages(value: str | list[dict[str, Any]]) -> tuple[ChatMessage, ...]:
    """The chat messages of a request's `input`."""
    if isinstance(value, str):
        return (ChatMessage("user", value),)
    messages: list[ChatMessage] = []
    turn = _AssistantTurn()
    for i, raw in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(raw, dict):
            raise invalid(param, f"'{param}' must be an object (a message or a function call item).")
        kind = raw.get("type", "message")
        if kind == "message":
            item = decode(raw, MessageItem, param)
            text = _text(item.content, f"{param}.content")
            if item.role == "assistant":
                turn.add_text(text, messages)
            else:
                turn.flush(messages)
                messages.append(ChatMessage("system" if item.role in ("system", "developer") else "user", text))
        elif kind == "function_call":
            call = decode(raw, FunctionCallItem, param)
            turn.calls.append(ToolCall(call.call_id, call.name, call.arguments))
        elif kind == "function_call_output":
            result = decode(raw, FunctionCallOutputItem, param)
            turn.flush(messages)
            messages.append(ChatMessage("tool", _text(result.output, f"{param}.output"), tool_call_id=result.call_id))
        elif isinstance(kind, str) and kind in _NOT_INPUT:
            raise unsupported(param, _NOT_INPUT[kind])
        else:
            raise unsupported(f"{param}.type", f"input items of type {kind!r} are not supported (only message, "
                                               "function_call and function_call_output)")
    turn.flush(messages)
    return tuple(messages)


@dataclass
class _AssistantTurn:
    """An assistant message and the function calls after it: one assistant turn."""

    texts: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)

    def add_text(self, text: str, messages: list[ChatMessage]) -> None:
        if self.calls:  # text after calls opens the next turn
            self.flush(messages)
        self.texts.append(text)

    def flush(self, messages: list[ChatMessage]) -> None:
        if self.texts or self.calls:
            messages.append(ChatMessage("assistant", "\n\n".join(self.texts), tool_calls=tuple(self.calls)))
        self.texts, self.calls = [], []


def _text(content: str | list[ContentPart], param: str) -> str:
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for j, part in enumerate(content):
        if isinstance(part, InputText | OutputTextParam):
            parts.append(part.text)
        elif isinstance(part, InputImage | InputFile | InputAudio):
            kind = {InputImage: "image", InputFile: "file", InputAudio: "audio"}[type(part)]
            raise unsupported(f"{param}[{j}]", f"{kind} input is not available; send text")
        else:
            parts.append(part.refusal)
    return "".join(parts)


def function_tools(tools: list[dict[str, Any]] | None) -> list[FunctionTool]:
    found: list[FunctionTool] = []
    for i, raw in enumerate(tools or ()):
        param = f"tools[{i}]"
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind != "function":
            raise unsupported(param, f"the built-in tool {kind!r} is not available: this server runs local "
                                     "models and offers function tools only")
        tool = decode(raw, FunctionToolParam, param)
        # The Responses API's function tools are strict unless they say otherwise.
        found.append(FunctionTool(tool.name, tool.description, tool.parameters,
                                  True if tool.strict is None else tool.strict, param))
    return found


def tool_choice(value: str | dict[str, Any] | None) -> ToolChoice:
    if value is None or value == "auto":
        return ToolChoice("auto")
    if value in ("none", "required"):
        return ToolChoice("none" if value == "none" else "required")
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if not isinstance(name, str) or set(value) - {"type", "name"}:
            raise invalid("tool_choice", 'A function tool choice is {"type": "function", "name": "..."}.')
        return ToolChoice("function", name, "tool_choice.name")
    if isinstance(value, dict) and value.get("type") == "allowed_tools":
        raise unsupported("tool_choice", "allowed_tools is not supported; send only the tools the model may use")
    if isinstance(value, dict):
        raise unsupported("tool_choice", f"the built-in tool {value.get('type')!r} is not available")
    raise invalid("tool_choice", f"tool_choice must be 'auto', 'none', 'required' or a function, not {value!r}.")


def output_constraint(req: ResponseCreateRequest) -> Constraint | None:
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, FormatJsonObject):
        return json_constraint(None, strict=True, param="text.format")
    if isinstance(fmt, FormatJsonSchema):
        return json_constraint(fmt.schema, strict=bool(fmt.strict), param="text.format.schema")
    return None


def to_generate(
    req: ResponseCreateRequest,
    request_id: str,
    history: tuple[ChatMessage, ...],
    new_input: tuple[ChatMessage, ...],
    default_max_tokens: int,
    allow_faults: bool = False,
) -> Generate:
    """The engine request: instructions, then the earlier turns (previous_response_id), then the input."""
    check_supported(req)
    instructions = (ChatMessage("system", req.instructions),) if req.instructions else ()
    messages = instructions + history + new_input
    if not messages:
        raise invalid("input", "The input is empty.")
    functions, choice = function_tools(req.tools), tool_choice(req.tool_choice)
    tools = tool_fields(functions, choice, req.parallel_tool_calls is not False)
    constraint = output_constraint(req)
    if constraint is not None and functions:
        check_constraint_with_tools(functions, choice, "text.format")
    return Generate(
        request_id=request_id, model=req.model, messages=messages,
        params=sampling_params(req.max_output_tokens or default_max_tokens, req.temperature, req.top_p),
        constraint=constraint, fault=fault_of(req.user, allow_faults), max_tool_calls=req.max_tool_calls, **tools,
    )


# ---------------------------------------------------------------------------------------------------
# Responses


def new_response(req: ResponseCreateRequest, request_id: str, store: bool) -> ResponseObject:
    """The response as it starts (in progress, no output): what every later state is made from."""
    text: dict[str, Any] = {"format": msgspec.to_builtins(req.text.format) if req.text and req.text.format
                            else {"type": "text"}, "verbosity": "medium"}
    return ResponseObject(
        id=f"resp_{request_id}", created_at=int(time.time()), status="in_progress",
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, model=req.model, output=[],
        parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
        store=store, temperature=1.0 if req.temperature is None else req.temperature, text=text,
        tool_choice=req.tool_choice if req.tool_choice is not None else "auto", tools=list(req.tools or ()),
        top_p=1.0 if req.top_p is None else req.top_p, user=req.user, metadata=dict(req.metadata or {}),
        service_tier=req.service_tier if req.service_tier not in (None, "auto") else "default",
    )


def _complete(reason: str) -> bool:
    return reason in ("stop", "tool_calls")


def item_id(response_id: str, block: Block, position: int) -> str:
    prefix = "msg" if isinstance(block, TextBlock) else "fc"
    return f"{prefix}_{response_id.removeprefix('resp_')}_{position}"


def output_item(response_id: str, block: Block, position: int, status: ItemStatus) -> OutputItem:
    if isinstance(block, TextBlock):
        return OutputMessage(id=item_id(response_id, block, position), status=status,
                             content=[OutputText(block.text)])
    return FunctionCall(id=item_id(response_id, block, position), call_id=block.id, name=block.name,
                        arguments=block.arguments, status=status)


def usage_of(finished: Finished) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=finished.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=finished.cached_tokens),
        output_tokens=finished.completion_tokens,
        output_tokens_details=OutputTokensDetails(),
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


def _output(response_id: str, reply: Reply, last: ItemStatus) -> list[OutputItem]:
    """The reply's items: every one complete but the last, which is `last`."""
    final = len(reply.blocks) - 1
    return [output_item(response_id, block, i, last if i == final else "completed")
            for i, block in enumerate(reply.blocks)]


def finished_response(base: ResponseObject, reply: Reply, finished: Finished) -> ResponseObject:
    complete = _complete(finished.finish_reason)
    return msgspec.structs.replace(
        base, status="completed" if complete else "incomplete", usage=usage_of(finished),
        output=_output(base.id, reply, "completed" if complete else "incomplete"),
        incomplete_details=None if complete else IncompleteDetails("max_output_tokens"),
    )


def turn_of(reply: Reply) -> ChatMessage:
    """The reply as the assistant turn a continuation (previous_response_id) shows the model."""
    return ChatMessage("assistant", reply.text,
                       tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in reply.calls))


class ResponseStream:
    """The typed events of one streamed response, with their sequence numbers (see protocol_responses)."""

    def __init__(self, base: ResponseObject, on_done: Callable[[ResponseObject, Reply], None]) -> None:
        self.base = base
        self._on_done = on_done
        self._numbers = itertools.count()
        self._last_status: ItemStatus = "completed"

    def _frames(self, *events: StreamEvent) -> list[bytes]:
        return [sse.named_event(e.type, e) for e in events]

    def _state(self, kind: Any, response: ResponseObject) -> ResponseStateEvent:
        return ResponseStateEvent(type=kind, sequence_number=next(self._numbers), response=response)

    def opening(self) -> list[bytes]:
        return self._frames(self._state("response.created", self.base),
                            self._state("response.in_progress", self.base))

    def step(self, step: Step) -> list[bytes]:
        if isinstance(step, Opened):
            return self._frames(*self._opened(step.position, step.block))
        if isinstance(step, Grew):
            return self._frames(self._grew(step.position, step.block, step.text))
        return self._frames(*self._closed(step.position, step.block))

    def _opened(self, at: int, block: Block) -> list[StreamEvent]:
        item_at = item_id(self.base.id, block, at)
        if isinstance(block, CallBlock):
            call = FunctionCall(id=item_at, call_id=block.id, name=block.name, arguments="", status="in_progress")
            return [self._item("response.output_item.added", at, call)]
        message = OutputMessage(id=item_at, status="in_progress", content=[])
        return [self._item("response.output_item.added", at, message), self._part("response.content_part.added",
                                                                                   at, item_at, "")]

    def _grew(self, at: int, block: Block, text: str) -> StreamEvent:
        item_at = item_id(self.base.id, block, at)
        number = next(self._numbers)
        if isinstance(block, CallBlock):
            return FunctionCallArgumentsDeltaEvent(sequence_number=number, item_id=item_at, output_index=at,
                                                   delta=text)
        return OutputTextDeltaEvent(sequence_number=number, item_id=item_at, output_index=at, content_index=0,
                                    delta=text)

    def _closed(self, at: int, block: Block) -> list[StreamEvent]:
        item = output_item(self.base.id, block, at, self._last_status)
        if isinstance(block, CallBlock):
            done: list[StreamEvent] = [FunctionCallArgumentsDoneEvent(
                sequence_number=next(self._numbers), item_id=item.id, output_index=at, name=block.name,
                arguments=block.arguments)]
        else:
            done = [OutputTextDoneEvent(sequence_number=next(self._numbers), item_id=item.id, output_index=at,
                                        content_index=0, text=block.text),
                    self._part("response.content_part.done", at, item.id, block.text)]
        return [*done, self._item("response.output_item.done", at, item)]

    def _item(self, kind: Any, at: int, item: OutputItem) -> OutputItemEvent:
        return OutputItemEvent(type=kind, sequence_number=next(self._numbers), output_index=at, item=item)

    def _part(self, kind: Any, at: int, item_at: str, text: str) -> ContentPartEvent:
        return ContentPartEvent(type=kind, sequence_number=next(self._numbers), item_id=item_at, output_index=at,
                                content_index=0, part=OutputText(text))

    def closing(self, reply: Reply, finished: Finished) -> list[bytes]:
        self._last_status = "completed" if _complete(finished.finish_reason) else "incomplete"
        frames = [f for s in reply.finish() for f in self.step(s)]
        response = finished_response(self.base, reply, finished)
        self._on_done(response, reply)
        kind = "response.completed" if response.status == "completed" else "response.incomplete"
        return frames + self._frames(self._state(kind, response))

    def failure(self, reply: Reply, error: GatewayError) -> list[bytes]:
        """The block being written stays open (no done events): the failed response lists it incomplete."""
        failed = msgspec.structs.replace(
            self.base, status="failed", output=_output(self.base.id, reply, "incomplete"),
            error=ResponseError(error.kind.value.code or "server_error", error.message),
        )
        return self._frames(self._state("response.failed", failed))
