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
from msgspec import UNSET

from gateway.errors import GatewayError, invalid, unsupported
from gateway.responses.wire import (
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
    NamespaceToolParam,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    OutputTextParam,
    OutputTokensDetails,
    ReasoningEcho,
    ReasoningItem,
    ReasoningItemParam,
    ReasoningText,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    ResponseCreateRequest,
    ResponseError,
    ResponseObject,
    ResponseStateEvent,
    ResponseUsage,
    StreamEvent,
)
from gateway.serving import images, sse
from gateway.serving.convert import (
    FunctionTool,
    ToolChoice,
    check_constraint_with_tools,
    decode,
    fault_of,
    json_constraint,
    sampling_params,
    tool_fields,
)
from gateway.serving.reasoning import SUMMARIES, effort_control
from gateway.serving.reply import Block, CallBlock, Grew, Opened, ReasoningBlock, Reply, Step, TextBlock
from mlx_backend.contract import ChatMessage, Constraint, Finished, Generate, ImageInput, ToolCall

_NOT_INPUT = {
    "item_reference": "item references are not supported: send the items themselves, or previous_response_id",
}
_HARMFUL_INCLUDES = {"message.output_text.logprobs": "log probabilities are not returned"}


# ---------------------------------------------------------------------------------------------------
# Requests


def check_supported(req: ResponseCreateRequest) -> None:
    """Raise a 400 naming the first parameter we would otherwise have to ignore."""
    if req.background:
        raise unsupported("background", "responses run in the foreground only")
    if req.reasoning is not None:
        effort_control(req.reasoning.effort, "reasoning.effort")
        for name in ("summary", "generate_summary"):
            value = getattr(req.reasoning, name)
            if value is not None and value not in SUMMARIES:
                raise invalid(f"reasoning.{name}", f"reasoning.{name} must be one of "
                                                   f"{', '.join(map(repr, SUMMARIES))}, not {value!r}.")
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
            shown = _images(item.content, f"{param}.content") if item.role == "user" else ()
            text = _text(item.content, f"{param}.content", images_shown=bool(shown))
            if item.role == "assistant":
                turn.add_text(text, messages)
            else:
                turn.flush(messages)
                role = "system" if item.role in ("system", "developer") else "user"
                messages.append(ChatMessage(role, text, images=shown))
        elif kind == "function_call":
            call = decode(raw, FunctionCallItem, param)
            turn.calls.append(ToolCall(call.call_id, call.name, call.arguments))
        elif kind == "reasoning":
            thought = decode(raw, ReasoningItemParam, param)
            turn.add_reasoning(_reasoning_text(thought), messages)
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
    reasoning: list[str] = field(default_factory=list)

    def add_text(self, text: str, messages: list[ChatMessage]) -> None:
        if self.calls:  # text after calls opens the next turn
            self.flush(messages)
        self.texts.append(text)

    def add_reasoning(self, text: str, messages: list[ChatMessage]) -> None:
        if self.calls or self.texts:  # reasoning comes first in a turn: after text or calls it opens the next
            self.flush(messages)
        if text:
            self.reasoning.append(text)

    def flush(self, messages: list[ChatMessage]) -> None:
        if self.texts or self.calls or self.reasoning:
            messages.append(ChatMessage("assistant", "\n\n".join(self.texts), tool_calls=tuple(self.calls),
                                        reasoning="\n\n".join(self.reasoning) or None))
        self.texts, self.calls, self.reasoning = [], [], []


def _reasoning_text(item: ReasoningItemParam) -> str:
    """The full reasoning text when the item has it, else its summary (never the encrypted content)."""
    if item.content:
        return "".join(part.text for part in item.content)
    return "\n\n".join(part.text for part in item.summary)


def _images(content: str | list[ContentPart], param: str) -> tuple[ImageInput, ...]:
    """A user message's images (gateway/serving/images.py decides what is taken)."""
    if isinstance(content, str):
        return ()
    found = []
    for j, part in enumerate(content):
        if not isinstance(part, InputImage):
            continue
        if part.file_id is not None:
            raise images.refused(f"{param}[{j}].file_id", "The Files API is not available: send the image as a "
                                                           "base64 data URL in image_url.")
        if part.image_url is None:
            raise images.refused(f"{param}[{j}].image_url", "An input_image needs image_url (a base64 data URL).")
        found.append(images.from_url(part.image_url, f"{param}[{j}].image_url", part.detail))
    return tuple(found)


def _text(content: str | list[ContentPart], param: str, images_shown: bool = False) -> str:
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for j, part in enumerate(content):
        if isinstance(part, InputText | OutputTextParam):
            parts.append(part.text)
        elif isinstance(part, InputImage) and images_shown:
            continue  # taken by _images
        elif isinstance(part, InputImage):
            raise unsupported(f"{param}[{j}]", "images are taken in user messages only")
        elif isinstance(part, InputFile | InputAudio):
            kind = {InputImage: "image", InputFile: "file", InputAudio: "audio"}[type(part)]
            raise unsupported(f"{param}[{j}]", f"{kind} input is not available; send text")
        else:
            parts.append(part.refusal)
    return "".join(parts)


# Tools OpenAI runs on its own servers. Clients (Codex) declare them by default; none can run here, so the
# model is not offered them and answers without them (docs/api.md). Forcing one (tool_choice) is a 400.
HOSTED_TOOLS = frozenset({
    "web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11", "file_search",
    "code_interpreter", "image_generation", "mcp", "tool_search",
})


def function_tools(tools: list[dict[str, Any]] | None) -> list[FunctionTool]:
    """The function tools offered to the model: top-level ones and those inside namespace tools."""
    found: list[FunctionTool] = []
    for i, raw in enumerate(tools or ()):
        param = f"tools[{i}]"
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind == "namespace":
            namespace = decode(raw, NamespaceToolParam, param)
            found.extend(_function_tool(inner, f"{param}.tools[{j}]") for j, inner in enumerate(namespace.tools))
        elif kind in HOSTED_TOOLS:
            continue
        elif kind != "function":
            raise unsupported(param, f"the built-in tool {kind!r} is not available: this server runs local "
                                     "models and offers function tools (alone or in namespaces) only")
        else:
            found.append(_function_tool(raw, param))
    return found


def _function_tool(raw: Any, param: str) -> FunctionTool:
    if not isinstance(raw, dict) or raw.get("type") != "function":
        kind = raw.get("type") if isinstance(raw, dict) else None
        raise unsupported(param, f"tools of type {kind!r} are not available inside a namespace (only functions)")
    tool = decode(raw, FunctionToolParam, param)
    # The Responses API's function tools are strict unless they say otherwise.
    return FunctionTool(tool.name, tool.description, tool.parameters, True if tool.strict is None else tool.strict,
                        param)


def namespaces_of(tools: list[dict[str, Any]] | None) -> dict[str, str]:
    """Function name -> the namespace tool it belongs to (its calls name it, as OpenAI's do)."""
    return {inner["name"]: raw["name"] for raw in tools or () if isinstance(raw, dict) and raw.get("type") ==
            "namespace" for inner in raw.get("tools") or () if isinstance(inner, dict) and "name" in inner}


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
    if isinstance(value, dict) and value.get("type") in HOSTED_TOOLS:
        raise unsupported("tool_choice", f"the built-in tool {value.get('type')!r} cannot run here: a tool "
                                         "choice may force a function tool only")
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
    if choice.mode == "required" and not functions and req.tools:
        raise unsupported("tool_choice", "'required' forces a call, but the only tools are built-in tools that "
                                         "cannot run here")
    tools = tool_fields(functions, choice, req.parallel_tool_calls is not False)
    constraint = output_constraint(req)
    if constraint is not None and functions:
        check_constraint_with_tools(functions, choice, "text.format")
    return Generate(
        request_id=request_id, model=req.model, messages=messages,
        params=sampling_params(req.max_output_tokens or default_max_tokens, req.temperature, req.top_p),
        constraint=constraint, fault=fault_of(req.user, allow_faults), max_tool_calls=req.max_tool_calls, **tools,
        reasoning=effort_control(req.reasoning.effort if req.reasoning else None, "reasoning.effort"),
    )


# The chat fields engine errors name, as this API names them (a function_call item's arguments are the
# arguments of a chat assistant message's tool call, numbered as the engine numbers its messages).
ENGINE_FIELDS = {r"messages\[\d+\]\.tool_calls\[\d+\]\.function\.arguments": "input (a function_call item's arguments)",
                 "messages": "input", "response_format": "text.format"}


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
        tool_choice=req.tool_choice if req.tool_choice is not None else "auto", tools=echo_tools(req.tools),
        top_p=1.0 if req.top_p is None else req.top_p, user=UNSET if req.user is None else req.user,
        metadata=dict(req.metadata or {}),
        service_tier=req.service_tier if req.service_tier not in (None, "auto") else "default",
        reasoning=ReasoningEcho(req.reasoning.effort, req.reasoning.summary or req.reasoning.generate_summary)
        if req.reasoning else ReasoningEcho(),
    )


def echo_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The tools as the response lists them: a function tool's `strict` and `parameters` are required (nullable)
    there, and strict is what we applied (true unless the request said false, as OpenAI's default)."""
    return [{**t, "parameters": t.get("parameters"), "strict": t.get("strict") is not False}
            if t.get("type") == "function" else t for t in tools or ()]


def _complete(reason: str) -> bool:
    return reason in ("stop", "tool_calls")


def item_id(response_id: str, block: Block, position: int) -> str:
    prefix = "msg" if isinstance(block, TextBlock) else "rs" if isinstance(block, ReasoningBlock) else "fc"
    return f"{prefix}_{response_id.removeprefix('resp_')}_{position}"


def output_item(response_id: str, block: Block, position: int, status: ItemStatus,
                namespaces: dict[str, str] | None = None) -> OutputItem:
    if isinstance(block, TextBlock):
        return OutputMessage(id=item_id(response_id, block, position), status=status,
                             content=[OutputText(block.text)])
    if isinstance(block, ReasoningBlock):
        return ReasoningItem(id=item_id(response_id, block, position), status=status,
                             content=[ReasoningText(block.text)])
    return FunctionCall(id=item_id(response_id, block, position), call_id=block.id, name=block.name,
                        arguments=block.arguments, status=status,
                        namespace=(namespaces or {}).get(block.name, msgspec.UNSET))


def _failure_code(error: GatewayError) -> str:
    """The spec's ResponseErrorCode for a failed response: ours is in the message, the code is one of its enum."""
    return "rate_limit_exceeded" if error.status == 429 else "server_error"


def usage_of(finished: Finished) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=finished.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=finished.cached_tokens),
        output_tokens=finished.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=finished.reasoning_tokens),
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


def _output(base: ResponseObject, reply: Reply, last: ItemStatus) -> list[OutputItem]:
    """The reply's items: every one complete but the last, which is `last`."""
    final = len(reply.blocks) - 1
    namespaces = namespaces_of(base.tools)
    return [output_item(base.id, block, i, last if i == final else "completed", namespaces)
            for i, block in enumerate(reply.blocks)]


def finished_response(base: ResponseObject, reply: Reply, finished: Finished) -> ResponseObject:
    complete = _complete(finished.finish_reason)
    return msgspec.structs.replace(
        base, status="completed" if complete else "incomplete", usage=usage_of(finished),
        output=_output(base, reply, "completed" if complete else "incomplete"),
        incomplete_details=None if complete else IncompleteDetails("max_output_tokens"),
    )


def turn_of(reply: Reply) -> ChatMessage:
    """The reply as the assistant turn a continuation (previous_response_id) shows the model."""
    return ChatMessage("assistant", reply.text,
                       tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in reply.calls),
                       reasoning=reply.reasoning or None)


class ResponseStream:
    """The typed events of one streamed response, with their sequence numbers (see gateway/responses/wire.py)."""

    def __init__(self, base: ResponseObject, on_done: Callable[[ResponseObject, Reply], None]) -> None:
        self.base = base
        self._on_done = on_done
        self._numbers = itertools.count()
        self._last_status: ItemStatus = "completed"
        self._namespaces = namespaces_of(base.tools)

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
            call = FunctionCall(id=item_at, call_id=block.id, name=block.name, arguments="", status="in_progress",
                                namespace=self._namespaces.get(block.name, msgspec.UNSET))
            return [self._item("response.output_item.added", at, call)]
        if isinstance(block, ReasoningBlock):
            thought = ReasoningItem(id=item_at, status="in_progress")
            return [self._item("response.output_item.added", at, thought),
                    self._part("response.content_part.added", at, item_at, ReasoningText(""))]
        message = OutputMessage(id=item_at, status="in_progress", content=[])
        return [self._item("response.output_item.added", at, message), self._part("response.content_part.added",
                                                                                   at, item_at, OutputText(""))]

    def _grew(self, at: int, block: Block, text: str) -> StreamEvent:
        item_at = item_id(self.base.id, block, at)
        number = next(self._numbers)
        if isinstance(block, CallBlock):
            return FunctionCallArgumentsDeltaEvent(sequence_number=number, item_id=item_at, output_index=at,
                                                   delta=text)
        if isinstance(block, ReasoningBlock):
            return ReasoningTextDeltaEvent(sequence_number=number, item_id=item_at, output_index=at, content_index=0,
                                           delta=text)
        return OutputTextDeltaEvent(sequence_number=number, item_id=item_at, output_index=at, content_index=0,
                                    delta=text)

    def _closed(self, at: int, block: Block) -> list[StreamEvent]:
        item = output_item(self.base.id, block, at, self._last_status, self._namespaces)
        if isinstance(block, CallBlock):
            done: list[StreamEvent] = [FunctionCallArgumentsDoneEvent(
                sequence_number=next(self._numbers), item_id=item.id, output_index=at, name=block.name,
                arguments=block.arguments)]
        elif isinstance(block, ReasoningBlock):
            done = [ReasoningTextDoneEvent(sequence_number=next(self._numbers), item_id=item.id, output_index=at,
                                           content_index=0, text=block.text),
                    self._part("response.content_part.done", at, item.id, ReasoningText(block.text))]
        else:
            done = [OutputTextDoneEvent(sequence_number=next(self._numbers), item_id=item.id, output_index=at,
                                        content_index=0, text=block.text),
                    self._part("response.content_part.done", at, item.id, OutputText(block.text))]
        return [*done, self._item("response.output_item.done", at, item)]

    def _item(self, kind: Any, at: int, item: OutputItem) -> OutputItemEvent:
        return OutputItemEvent(type=kind, sequence_number=next(self._numbers), output_index=at, item=item)

    def _part(self, kind: Any, at: int, item_at: str, part: OutputText | ReasoningText) -> ContentPartEvent:
        return ContentPartEvent(type=kind, sequence_number=next(self._numbers), item_id=item_at, output_index=at,
                                content_index=0, part=part)

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
            self.base, status="failed", output=_output(self.base, reply, "incomplete"),
            error=ResponseError(_failure_code(error), error.message),
        )
        return self._frames(self._state("response.failed", failed))
