"""Anthropic Messages API wire types (`POST /v1/messages`, `/v1/messages/count_tokens`), as msgspec Structs.

Requests forbid unknown fields, so a parameter we do not know is a 400 naming it. Fields Anthropic defines
that would change the output in ways we cannot honour are declared so that `gateway/messages/convert.py` can name
them. This module imports neither MLX nor Litestar.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

UnitInterval = Annotated[float, Meta(ge=0.0, le=1.0)]  # Anthropic's range for temperature and top_p
TopK = Annotated[int, Meta(ge=0)]  # 0: no limit
MaxTokens = Annotated[int, Meta(ge=1, le=1_000_000)]

# ---------------------------------------------------------------------------------------------------
# Request content blocks


class TextBlockParam(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: str
    cache_control: dict[str, Any] | None = None  # accepted: the prefix cache is automatic
    citations: list[dict[str, Any]] | None = None  # citations an earlier reply carried: not shown to the model


class ImageBlockParam(Struct, tag="image", tag_field="type", forbid_unknown_fields=True):
    """An image for a vision model (user messages): `source` base64 (gateway/serving/images.py; a url is refused)."""

    source: dict[str, Any]
    cache_control: dict[str, Any] | None = None  # accepted: the prefix cache is automatic


class DocumentBlockParam(Struct, tag="document", tag_field="type"):
    """Accepted by the decoder only so the error can say that documents are not supported."""

    source: dict[str, Any]


class ToolUseBlockParam(Struct, tag="tool_use", tag_field="type", forbid_unknown_fields=True):
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None
    caller: dict[str, Any] | None = None  # who made the call (direct for client tools): nothing to render


class ToolResultBlockParam(Struct, tag="tool_result", tag_field="type", forbid_unknown_fields=True):
    tool_use_id: str
    content: str | list[TextBlockParam | ImageBlockParam | DocumentBlockParam] = ""
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


class ThinkingBlockParam(Struct, tag="thinking", tag_field="type", forbid_unknown_fields=True):
    """An earlier reply's thinking: given to the assistant turn, for templates that render it. The signature
    is not verified (ours is a digest of the text, not a secret)."""

    thinking: str = ""
    signature: str | None = None
    cache_control: dict[str, Any] | None = None


class RedactedThinkingBlockParam(Struct, tag="redacted_thinking", tag_field="type", forbid_unknown_fields=True):
    """Another server's encrypted thinking: accepted, and dropped (nothing here can read it)."""

    data: str = ""
    cache_control: dict[str, Any] | None = None


ContentBlockParam = (
    TextBlockParam | ImageBlockParam | DocumentBlockParam | ToolUseBlockParam | ToolResultBlockParam
    | ThinkingBlockParam | RedactedThinkingBlockParam
)


class MessageParam(Struct, forbid_unknown_fields=True):
    """`system`: a system message in the conversation (Claude Code's beta mid-conversation-system), text only."""

    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlockParam]


# ---------------------------------------------------------------------------------------------------
# Tools, tool choice, output format


class ToolParam(Struct, forbid_unknown_fields=True, kw_only=True):
    """A client tool (the model calls it, the client runs it). Server tools (`bash_...`, `web_search_...`)
    have a versioned `type` and are refused by name in convert_anthropic."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    strict: bool | None = None  # true: the input always follows input_schema (enforced with a grammar)
    cache_control: dict[str, Any] | None = None


class ToolChoiceAuto(Struct, tag="auto", tag_field="type", forbid_unknown_fields=True):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(Struct, tag="any", tag_field="type", forbid_unknown_fields=True):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(Struct, tag="tool", tag_field="type", forbid_unknown_fields=True):
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(Struct, tag="none", tag_field="type", forbid_unknown_fields=True):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class JsonSchemaFormat(Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True):
    schema: dict[str, Any]


class OutputConfig(Struct, forbid_unknown_fields=True):
    format: JsonSchemaFormat | None = None  # structured output: the reply is JSON valid against the schema
    effort: str | None = None  # low | medium | high | xhigh | max: reaches templates that read an effort


class Metadata(Struct, forbid_unknown_fields=True):
    user_id: str | None = None


# ---------------------------------------------------------------------------------------------------
# Requests


class MessageCreateRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    max_tokens: MaxTokens
    system: str | list[TextBlockParam] | None = None
    temperature: UnitInterval | None = None
    top_p: UnitInterval | None = None
    top_k: TopK | None = None
    stop_sequences: Annotated[list[str], Meta(max_length=64)] | None = None
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None  # ToolParam or a server tool: told apart by `type`
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    # Accepted, and without effect on the output here:
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    inference_geo: str | None = None
    speed: str | None = None
    # {"type": "enabled", "budget_tokens": N} | {"type": "adaptive"} | {"type": "disabled"}
    thinking: dict[str, Any] | None = None
    # Fields Anthropic defines that change behaviour we do not offer: named in a 400 when set.
    container: str | dict[str, Any] | None = None
    mcp_servers: list[dict[str, Any]] | None = None
    context_management: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None


class CountTokensRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    system: str | list[TextBlockParam] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None
    speed: str | None = None
    thinking: dict[str, Any] | None = None
    mcp_servers: list[dict[str, Any]] | None = None
    context_management: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------
# Responses


# Fields Anthropic's spec marks required but nullable are sent as null (typed `None`), never left out: typed
# clients read them (tests/integration/test_wire_conformance.py holds every body to Anthropic's own schema).


class TextBlock(Struct, tag="text", tag_field="type"):
    text: str
    citations: None = None  # required, nullable: we never cite


class DirectCaller(Struct, tag="direct", tag_field="type"):
    """Who made a tool call: always the model, for a client tool (`{"type": "direct"}`)."""


class ToolUseBlock(Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]
    caller: DirectCaller = msgspec.field(default_factory=DirectCaller)  # required, never null


class ThinkingBlock(Struct, tag="thinking", tag_field="type"):
    """A reasoning model's thinking. The signature is this server's digest of the text, not verified when
    the block comes back."""

    thinking: str
    signature: str


ContentBlock = TextBlock | ToolUseBlock | ThinkingBlock

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageUsage(Struct):
    """Anthropic's accounting: input_tokens excludes the prompt tokens read from the (prefix) cache."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation: None = None  # the required-but-nullable rest: no cache writes by TTL, no geo, no tiers
    inference_geo: None = None
    output_tokens_details: None = None
    server_tool_use: None = None
    service_tier: None = None
    speed: None = None


class Message(Struct, kw_only=True):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: MessageUsage
    container: None = None  # required, nullable: no container tools
    diagnostics: None = None
    stop_details: None = None


class CountTokensResponse(Struct):
    input_tokens: int


# Streaming: `event: <type>` + `data: <event JSON>` pairs, in this order: message_start, ping, then per
# block content_block_start, content_block_delta..., content_block_stop; then message_delta, message_stop.


class MessageStartEvent(Struct, tag="message_start", tag_field="type"):
    message: Message


class PingEvent(Struct, tag="ping", tag_field="type"):
    pass


class ContentBlockStartEvent(Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: ContentBlock


class TextDelta(Struct, tag="text_delta", tag_field="type"):
    text: str


class InputJsonDelta(Struct, tag="input_json_delta", tag_field="type"):
    partial_json: str


class ThinkingDelta(Struct, tag="thinking_delta", tag_field="type"):
    thinking: str


class SignatureDelta(Struct, tag="signature_delta", tag_field="type"):
    signature: str


class ContentBlockDeltaEvent(Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: TextDelta | InputJsonDelta | ThinkingDelta | SignatureDelta


class ContentBlockStopEvent(Struct, tag="content_block_stop", tag_field="type"):
    index: int


class MessageDelta(Struct):
    stop_reason: StopReason | None
    stop_sequence: str | None
    container: None = None  # required, nullable
    stop_details: None = None


class MessageDeltaUsage(Struct):
    """Cumulative counts at the end of the stream."""

    output_tokens: int
    input_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    output_tokens_details: None = None  # required, nullable
    server_tool_use: None = None


class MessageDeltaEvent(Struct, tag="message_delta", tag_field="type"):
    delta: MessageDelta
    usage: MessageDeltaUsage


class MessageStopEvent(Struct, tag="message_stop", tag_field="type"):
    pass


StreamEvent = (
    MessageStartEvent | PingEvent | ContentBlockStartEvent | ContentBlockDeltaEvent | ContentBlockStopEvent
    | MessageDeltaEvent | MessageStopEvent
)


# ---------------------------------------------------------------------------------------------------
# Errors: the body of every non-2xx answer of these routes, and the `error` event of a failed stream


class AnthropicErrorDetail(Struct):
    type: str  # invalid_request_error, authentication_error, not_found_error, rate_limit_error, ...
    message: str


class AnthropicErrorResponse(Struct, tag="error", tag_field="type"):
    error: AnthropicErrorDetail
    request_id: str | None = None
