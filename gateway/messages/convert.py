"""Between Anthropic's Messages API and the engine: a request -> `Generate`; the reply -> a `Message`, its
content blocks and its stream of events.

`system` is the first system message; `tool_use` blocks of an assistant turn are its tool calls (their ids
kept, so a `tool_result` finds its call); each `tool_result` block is a tool message; consecutive turns of
one role are combined, as Anthropic does. What we cannot honour is refused by name, before any work.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from gateway.errors import GatewayError, invalid, unsupported
from gateway.logs import request_id_var
from gateway.messages.wire import (
    ContentBlock,
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    CountTokensRequest,
    DocumentBlockParam,
    ImageBlockParam,
    InputJsonDelta,
    Message,
    MessageCreateRequest,
    MessageDelta,
    MessageDeltaEvent,
    MessageDeltaUsage,
    MessageParam,
    MessageStartEvent,
    MessageStopEvent,
    MessageUsage,
    PingEvent,
    RedactedThinkingBlockParam,
    SignatureDelta,
    StopReason,
    StreamEvent,
    TextBlock,
    TextBlockParam,
    TextDelta,
    ThinkingBlock,
    ThinkingBlockParam,
    ThinkingDelta,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
)
from gateway.messages.wire import ToolChoice as AnthropicToolChoice
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
from gateway.serving.reasoning import ANTHROPIC_EFFORTS, anthropic_control, effort_control
from gateway.serving.reply import Block, CallBlock, Closed, Grew, Opened, ReasoningBlock, Reply, Step
from mlx_backend.contract import ChatMessage, Finished, Generate, ImageInput, ToolCall

log = logging.getLogger("mlx_gateway")

# The chat fields engine errors name, as this API names them ("messages" is this API's name too).
ENGINE_FIELDS = {"response_format": "output_config.format"}

_TOOL_ID_PREFIX = "toolu_"  # Anthropic's; the engine's ids are "call_" + 24 alphanumerics


# ---------------------------------------------------------------------------------------------------
# Requests


def check_supported(req: MessageCreateRequest | CountTokensRequest) -> None:
    """Raise a 400 naming the first parameter we would otherwise have to ignore."""
    if req.thinking is not None:
        anthropic_control(req.thinking, None, 1 << 30)  # its shape (max_tokens is checked in to_generate)
    if req.mcp_servers:
        raise unsupported("mcp_servers", "MCP servers are not available")
    _check_context_management(req.context_management)
    if isinstance(req, MessageCreateRequest):
        if req.container is not None:
            raise unsupported("container", "code execution containers are not available")
        if req.diagnostics is not None:
            raise unsupported("diagnostics", "diagnostics are not available")
    if req.output_config is not None:
        effort_control(req.output_config.effort, "output_config.effort", ANTHROPIC_EFFORTS)


def _check_context_management(value: dict[str, Any] | None) -> None:
    """Edits that clear earlier thinking (`clear_thinking_*`, Claude Code's default) are accepted: they ask to
    drop earlier turns' reasoning from the prompt, which reasoning models' templates already do, and
    `keep: "all"` asks for nothing. Any other edit would change what the model sees: a 400 naming it."""
    if value is None:
        return
    edits = value.get("edits")
    if set(value) - {"edits"} or not isinstance(edits, list):
        raise invalid("context_management", 'context_management is {"edits": [...]}.')
    for i, edit in enumerate(edits):
        kind = edit.get("type") if isinstance(edit, dict) else None
        if not (isinstance(kind, str) and kind.startswith("clear_thinking_")):
            raise unsupported(f"context_management.edits[{i}]", f"the edit {kind!r} is not available (only "
                                                               "clear_thinking edits)")


def _system_text(system: str | list[TextBlockParam] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "\n\n".join(block.text for block in system)


def chat_messages(
    system: str | list[TextBlockParam] | None, messages: Sequence[MessageParam]
) -> tuple[ChatMessage, ...]:
    """The chat messages of a request: system first, then each turn's text, tool calls and tool results."""
    out: list[ChatMessage] = []
    text = _system_text(system)
    if text:
        out.append(ChatMessage("system", text))
    for i, message in enumerate(messages):
        for converted in _turn(message, f"messages[{i}]"):
            _append(out, converted)
    if messages and messages[-1].role == "assistant":
        raise unsupported("messages", "a last message from the assistant (prefill) is not supported: the reply "
                                      "always starts a new assistant turn")
    return tuple(out)


def _turn(message: MessageParam, param: str) -> list[ChatMessage]:
    if isinstance(message.content, str):
        return [ChatMessage(message.role, message.content)]
    if message.role == "system":
        # Kept where it is: the engine merges it into the first system turn where the template allows one only.
        parts: list[str] = []
        for j, block in enumerate(message.content):
            if not isinstance(block, TextBlockParam):
                raise invalid(f"{param}.content[{j}]", "A system message holds text blocks only.")
            parts.append(block.text)
        return [ChatMessage("system", "\n\n".join(parts))]
    out: list[ChatMessage] = []
    texts: list[str] = []
    calls: list[ToolCall] = []
    thoughts: list[str] = []
    shown: list[ImageInput] = []
    for j, block in enumerate(message.content):
        where = f"{param}.content[{j}]"
        if isinstance(block, TextBlockParam):
            texts.append(block.text)
        elif isinstance(block, ImageBlockParam) and message.role == "user":
            shown.append(images.from_anthropic_source(block.source, f"{where}.source"))
        elif isinstance(block, ThinkingBlockParam | RedactedThinkingBlockParam):
            if message.role != "assistant":
                raise invalid(where, "thinking blocks belong in assistant messages.")
            if isinstance(block, ThinkingBlockParam) and block.thinking:
                thoughts.append(block.thinking)  # redacted thinking is another server's secret: dropped
        elif isinstance(block, ToolUseBlockParam):
            if message.role != "assistant":
                raise invalid(where, "tool_use blocks belong in assistant messages.")
            calls.append(ToolCall(block.id, block.name, json.dumps(block.input)))
        elif isinstance(block, ToolResultBlockParam):
            if message.role != "user":
                raise invalid(where, "tool_result blocks belong in user messages.")
            if texts or shown:  # text before a result stays before it
                out.append(ChatMessage("user", "".join(texts), images=tuple(shown)))
                texts, shown = [], []
            out.append(ChatMessage("tool", _result_text(block, where), tool_call_id=block.tool_use_id))
        else:
            raise unsupported(where, _UNSUPPORTED_BLOCKS[type(block)])
    if message.role == "assistant":
        out.append(ChatMessage("assistant", "".join(texts), tool_calls=tuple(calls),
                               reasoning="\n\n".join(thoughts) or None))
    elif texts or shown:
        out.append(ChatMessage("user", "".join(texts), images=tuple(shown)))
    return out


_UNSUPPORTED_BLOCKS: dict[type, str] = {
    ImageBlockParam: "images are taken in user messages only",
    DocumentBlockParam: "document input is not available; send text",
}


def _result_text(block: ToolResultBlockParam, param: str) -> str:
    if isinstance(block.content, str):
        text = block.content
    else:
        parts = []
        for k, part in enumerate(block.content):
            if not isinstance(part, TextBlockParam):
                raise unsupported(f"{param}.content[{k}]", _UNSUPPORTED_BLOCKS[type(part)])
            parts.append(part.text)
        text = "".join(parts)
    # Chat templates have no error flag for a tool message: the model reads it in the text.
    return f"Error: {text}" if block.is_error else text


def _append(out: list[ChatMessage], message: ChatMessage) -> None:
    """Consecutive turns of one role are one turn (Anthropic's rule; many chat templates require it)."""
    last = out[-1] if out else None
    if last is not None and last.role == message.role and message.role in ("user", "assistant"):
        content = "\n\n".join(t for t in (last.content, message.content) if t)
        reasoning = "\n\n".join(t for t in (last.reasoning, message.reasoning) if t) or None
        out[-1] = ChatMessage(last.role, content, tool_calls=last.tool_calls + message.tool_calls,
                              reasoning=reasoning, images=last.images + message.images)
    else:
        out.append(message)


def client_tools(tools: list[dict[str, Any]] | None) -> list[FunctionTool]:
    found: list[FunctionTool] = []
    for i, raw in enumerate(tools or ()):
        param = f"tools[{i}]"
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in (None, "custom"):
            raise unsupported(param, f"the server tool {kind!r} is not available: this server runs local models "
                                     "and offers client tools (name, description, input_schema) only")
        tool = decode(raw, ToolParam, param)
        found.append(FunctionTool(tool.name, tool.description, tool.input_schema, tool.strict, param))
    return found


def tool_choice(choice: AnthropicToolChoice | None) -> tuple[ToolChoice, bool]:
    """Our tool choice and whether parallel calls are allowed."""
    if isinstance(choice, ToolChoiceNone):
        return ToolChoice("none"), True
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    if isinstance(choice, ToolChoiceAny):
        return ToolChoice("required"), parallel
    if isinstance(choice, ToolChoiceTool):
        return ToolChoice("function", choice.name, "tool_choice.name"), parallel
    return ToolChoice("auto"), parallel


def to_generate(
    req: MessageCreateRequest | CountTokensRequest, request_id: str, allow_faults: bool = False
) -> Generate:
    """The engine request; a count_tokens request becomes the request it counts (max_tokens aside)."""
    check_supported(req)
    messages = chat_messages(req.system, req.messages)
    choice, parallel = tool_choice(req.tool_choice)
    functions = client_tools(req.tools)
    tools = tool_fields(functions, choice, parallel)
    schema = req.output_config.format.schema if req.output_config and req.output_config.format else None
    constraint = json_constraint(schema, strict=True, param="output_config.format.schema") if schema else None
    if constraint is not None and functions:
        check_constraint_with_tools(functions, choice, "output_config.format")
    if isinstance(req, MessageCreateRequest):
        params = sampling_params(req.max_tokens, req.temperature, req.top_p, top_k=req.top_k,
                                 stop=req.stop_sequences)
        user = req.metadata.user_id if req.metadata else None
    else:
        params, user = sampling_params(1), None  # counting only: nothing is generated
    effort = req.output_config.effort if req.output_config else None
    reasoning = anthropic_control(req.thinking, effort, params.max_tokens if isinstance(req, MessageCreateRequest)
                                  else 1 << 30)
    return Generate(request_id=request_id, model=req.model, params=params, messages=messages,
                    constraint=constraint, fault=fault_of(user, allow_faults), **tools, reasoning=reasoning)


# ---------------------------------------------------------------------------------------------------
# Responses


def tool_use_id(engine_id: str) -> str:
    return _TOOL_ID_PREFIX + engine_id.removeprefix("call_")


def stop_reason(reply: Reply, finished: Finished) -> tuple[StopReason, str | None]:
    if finished.finish_reason == "tool_calls" or (finished.finish_reason == "stop" and reply.calls):
        return "tool_use", None
    if finished.finish_reason == "stop":
        return ("stop_sequence", finished.stop_sequence) if finished.stop_sequence else ("end_turn", None)
    return "max_tokens", None  # "length", and a drained request cut short


def _input(call: CallBlock) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):  # cut short by max_tokens: Anthropic's input must be an object
        log.info("tool call %s has arguments that are not a whole JSON object; sent as {}", call.id)
        return {}
    return value


def signature_of(thinking: str) -> str:
    """A thinking block's signature: a digest of its text (Anthropic's are encrypted; nothing verifies ours)."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _block(block: Block) -> ContentBlock:
    if isinstance(block, CallBlock):
        return ToolUseBlock(tool_use_id(block.id), block.name, _input(block))
    if isinstance(block, ReasoningBlock):
        return ThinkingBlock(block.text, signature_of(block.text))
    return TextBlock(block.text)


def content_of(reply: Reply) -> list[ContentBlock]:
    return [_block(b) for b in reply.blocks]


def usage_of(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> MessageUsage:
    return MessageUsage(input_tokens=prompt_tokens - cached_tokens, output_tokens=output_tokens,
                        cache_read_input_tokens=cached_tokens)


def message(message_id: str, model: str, reply: Reply, finished: Finished) -> Message:
    reason, sequence = stop_reason(reply, finished)
    return Message(id=message_id, model=model, content=content_of(reply), stop_reason=reason,
                   stop_sequence=sequence,
                   usage=usage_of(finished.prompt_tokens, finished.cached_tokens, finished.completion_tokens))


class MessageStream:
    """Anthropic's events for one streamed message (see gateway/messages/wire.py for the order)."""

    def __init__(self, message_id: str, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        self.message_id = message_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens

    @staticmethod
    def _frames(*events: StreamEvent) -> list[bytes]:
        return [sse.named_event(str(e.__struct_config__.tag), e) for e in events]

    def opening(self) -> list[bytes]:
        start = Message(id=self.message_id, model=self.model, content=[], stop_reason=None, stop_sequence=None,
                        usage=usage_of(self.prompt_tokens, self.cached_tokens, 0))
        return self._frames(MessageStartEvent(start), PingEvent())

    def step(self, step: Step) -> list[bytes]:
        block = step.block
        if isinstance(step, Opened):
            opened: ContentBlock = (
                ToolUseBlock(tool_use_id(block.id), block.name, {}) if isinstance(block, CallBlock)
                else ThinkingBlock("", "") if isinstance(block, ReasoningBlock) else TextBlock(""))
            return self._frames(ContentBlockStartEvent(step.position, opened))
        if isinstance(step, Grew):
            delta: TextDelta | InputJsonDelta | ThinkingDelta = (
                InputJsonDelta(step.text) if isinstance(block, CallBlock)
                else ThinkingDelta(step.text) if isinstance(block, ReasoningBlock) else TextDelta(step.text))
            return self._frames(ContentBlockDeltaEvent(step.position, delta))
        assert isinstance(step, Closed)
        if isinstance(block, ReasoningBlock):  # the signature comes last, just before the block stops
            return self._frames(ContentBlockDeltaEvent(step.position, SignatureDelta(signature_of(block.text))),
                                ContentBlockStopEvent(step.position))
        return self._frames(ContentBlockStopEvent(step.position))

    def closing(self, reply: Reply, finished: Finished) -> list[bytes]:
        frames = [f for s in reply.finish() for f in self.step(s)]
        reason, sequence = stop_reason(reply, finished)
        usage = MessageDeltaUsage(output_tokens=finished.completion_tokens,
                                  input_tokens=finished.prompt_tokens - finished.cached_tokens,
                                  cache_read_input_tokens=finished.cached_tokens)
        return frames + self._frames(MessageDeltaEvent(MessageDelta(reason, sequence), usage), MessageStopEvent())

    def failure(self, reply: Reply, error: GatewayError) -> list[bytes]:
        return [sse.named_event("error", error.anthropic_body(request_id_var.get()))]
