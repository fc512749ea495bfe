"""OpenAI Responses API wire types (`POST /v1/responses`, `GET /v1/responses/{id}`), as msgspec Structs.

Requests forbid unknown fields: a parameter we do not know is a 400 naming it. Input items and tools are
read as plain objects here and each kind is checked in `gateway/responses/convert.py` (message items may omit their
`type`, so msgspec cannot tell them apart by a tag); the Structs below describe them for the OpenAPI
document and are what the converter decodes each item into. This module imports neither MLX nor Litestar.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=1_000_000)]
ToolCallLimit = Annotated[int, Meta(le=1_000_000)]  # bounded: the engine's IPC carries 64-bit integers

# ---------------------------------------------------------------------------------------------------
# Input items (decoded one by one in gateway/responses/convert.py)


class InputText(Struct, tag="input_text", tag_field="type", forbid_unknown_fields=True):
    text: str


class OutputTextParam(Struct, tag="output_text", tag_field="type", forbid_unknown_fields=True):
    """An earlier reply's text, sent back as input."""

    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class RefusalParam(Struct, tag="refusal", tag_field="type", forbid_unknown_fields=True):
    refusal: str


class InputImage(Struct, tag="input_image", tag_field="type", forbid_unknown_fields=True):
    """An image for a vision model (user messages only): a base64 data URL, or file:// under --image-dir
    (gateway/serving/images.py); `file_id` (the Files API) is refused."""

    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None  # auto | low | high


class InputFile(Struct, tag="input_file", tag_field="type"):
    """Accepted by the decoder only so the error can say that files are not supported."""


class InputAudio(Struct, tag="input_audio", tag_field="type"):
    """Accepted by the decoder only so the error can say that audio is not supported."""


ContentPart = InputText | OutputTextParam | RefusalParam | InputImage | InputFile | InputAudio


class MessageItem(Struct, forbid_unknown_fields=True, kw_only=True):
    """A message; `type: "message"` may be left out. `id`/`status` come back with earlier output items."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    type: Literal["message"] = "message"
    id: str | None = None
    status: str | None = None
    phase: str | None = None  # commentary / final_answer, on earlier assistant items: nothing to render


class FunctionCallItem(Struct, tag="function_call", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """A call an earlier reply made: the assistant turn it belongs to gets it as a tool call."""

    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None
    namespace: str | None = None


class FunctionCallOutputItem(Struct, tag="function_call_output", tag_field="type", forbid_unknown_fields=True,
                             kw_only=True):
    """The result of a call, as a tool message."""

    call_id: str
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class SummaryTextParam(Struct, tag="summary_text", tag_field="type", forbid_unknown_fields=True):
    text: str


class ReasoningTextParam(Struct, tag="reasoning_text", tag_field="type", forbid_unknown_fields=True):
    text: str


class ReasoningItemParam(Struct, tag="reasoning", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """An earlier reply's reasoning: given to the assistant turn it precedes, for templates that render it."""

    summary: list[SummaryTextParam] = msgspec.field(default_factory=list)
    content: list[ReasoningTextParam] | None = None
    encrypted_content: str | None = None  # ours is never set; another server's is opaque to us: not read
    id: str | None = None
    status: str | None = None


class FunctionToolParam(Struct, tag="function", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # OpenAI's default for function tools is true
    description: str | None = None
    defer_loading: bool | None = None  # for OpenAI's tool search; every tool is offered at once here


class NamespaceToolParam(Struct, tag="namespace", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """Function tools grouped under one name (Codex's sub-agent tools): each is offered to the model by its
    own name, and a call to it comes back as a function_call with `namespace` set, as OpenAI's does."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    tools: list[dict[str, Any]]  # function tools (decoded one by one, to name the one at fault)
    description: str | None = None


# ---------------------------------------------------------------------------------------------------
# Request


class FormatText(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    pass


class FormatJsonObject(Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True):
    pass


class FormatJsonSchema(Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True, kw_only=True,
                       omit_defaults=True):
    name: str
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


TextFormat = FormatText | FormatJsonObject | FormatJsonSchema


class TextConfig(Struct, forbid_unknown_fields=True):
    format: TextFormat | None = None
    verbosity: str | None = None  # "medium" (the default) only


class ResponseStreamOptions(Struct, forbid_unknown_fields=True):
    include_obfuscation: bool | None = None  # accepted: we never add obfuscation padding


class Reasoning(Struct, forbid_unknown_fields=True):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponseCreateRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    input: str | list[dict[str, Any]]  # a string, or message / function_call / function_call_output items
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[dict[str, Any]] | None = None  # function tools; built-in tools are refused by name
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    stream_options: ResponseStreamOptions | None = None
    store: bool | None = None  # default true: kept in memory for previous_response_id and GET
    previous_response_id: str | None = None
    # Accepted, and without effect on the output here (metadata is echoed back):
    metadata: dict[str, str] | None = None
    client_metadata: dict[str, Any] | None = None  # Codex's own ids (session, turn, window): metadata
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None  # "disabled" only
    include: list[str] | None = None  # none of the includable outputs exist here, but logprobs: refused
    # Fields OpenAI defines that change behaviour we do not offer: named in a 400 when set.
    background: bool | None = None
    reasoning: Reasoning | None = None
    top_logprobs: int | None = None
    max_tool_calls: ToolCallLimit | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    context_management: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------------------------------------------
# Response


class OutputText(Struct, tag="output_text", tag_field="type"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(Struct, tag="message", tag_field="type", kw_only=True):
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCall(Struct, tag="function_call", tag_field="type", kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus
    namespace: str | msgspec.UnsetType = msgspec.UNSET  # the namespace tool the function belongs to, if any


class ReasoningText(Struct, tag="reasoning_text", tag_field="type"):
    text: str


class SummaryText(Struct, tag="summary_text", tag_field="type"):
    text: str


class ReasoningItem(Struct, tag="reasoning", tag_field="type", kw_only=True):
    """A reasoning model's thinking, in full as `content` (no summary is made: `summary` stays empty, and
    there is no `encrypted_content`)."""

    id: str
    summary: list[SummaryText] = msgspec.field(default_factory=list)
    content: list[ReasoningText] = msgspec.field(default_factory=list)
    status: ItemStatus | None = None


OutputItem = OutputMessage | FunctionCall | ReasoningItem


class InputTokensDetails(Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # required by the spec; the prefix cache is written as a side effect, uncounted


class OutputTokensDetails(Struct):
    reasoning_tokens: int = 0


class ResponseUsage(Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Struct):
    reason: Literal["max_output_tokens"]


class ResponseError(Struct):
    code: str
    message: str


class ReasoningEcho(Struct):
    effort: str | None = None
    summary: str | None = None


class ResponseObject(Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    background: bool = False
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: ReasoningEcho = msgspec.field(default_factory=ReasoningEcho)
    service_tier: str = "default"
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | UnsetType = UNSET  # the spec has no null for these: left out until known
    user: str | UnsetType = UNSET
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class DeletedResponse(Struct):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# Streaming: `event: <type>` + `data: <event JSON>` pairs, each with a sequence_number from 0, in this order:
# response.created, response.in_progress; per output item output_item.added, (for reasoning)
# content_part.added, reasoning_text.delta..., reasoning_text.done, content_part.done, (for a message)
# content_part.added, output_text.delta..., output_text.done, content_part.done, (for a call)
# function_call_arguments.delta..., function_call_arguments.done, then output_item.done; last one of
# response.completed, response.incomplete (max_output_tokens) or response.failed.


class ResponseStateEvent(Struct, kw_only=True):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(Struct, kw_only=True):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(Struct, kw_only=True):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class OutputTextDeltaEvent(Struct, kw_only=True):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class OutputTextDoneEvent(Struct, kw_only=True):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class FunctionCallArgumentsDeltaEvent(Struct, kw_only=True):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(Struct, kw_only=True):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ReasoningTextDeltaEvent(Struct, kw_only=True):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningTextDoneEvent(Struct, kw_only=True):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str


StreamEvent = (
    ResponseStateEvent | OutputItemEvent | ContentPartEvent | OutputTextDeltaEvent | OutputTextDoneEvent
    | FunctionCallArgumentsDeltaEvent | FunctionCallArgumentsDoneEvent | ReasoningTextDeltaEvent
    | ReasoningTextDoneEvent
)
