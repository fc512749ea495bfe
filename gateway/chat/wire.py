"""OpenAI wire types, as msgspec Structs ordered like OpenAI's reference.

Requests forbid unknown fields: a parameter we do not know is a 400 naming it, never silently ignored.
Parameters we know but do not support are declared so that `gateway/chat/convert.py`
(`check_chat_supported`, `check_completion_supported`) can name them.
This module imports neither MLX nor Litestar.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

# ---------------------------------------------------------------------------------------------------
# Requests

NonNegativeInt = Annotated[int, Meta(ge=0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]  # 0 keeps only the most likely token: greedy
MaxTokens = Annotated[int, Meta(ge=1, le=1_000_000)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
StopList = Annotated[list[str], Meta(max_length=4)]
Choices = Annotated[int, Meta(ge=1, le=128)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
CompletionLogprobs = Annotated[int, Meta(ge=0, le=5)]  # the legacy API's limit


class TextPart(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: str


class ImageUrl(Struct, forbid_unknown_fields=True):
    url: str  # a base64 data URL, or file:// under --image-dir; never fetched (gateway/serving/images.py)
    detail: str | None = None  # auto | low | high


class ImageUrlPart(Struct, tag="image_url", tag_field="type", forbid_unknown_fields=True):
    """An image for a vision model (user messages only)."""

    image_url: ImageUrl


class SystemMessage(Struct, tag="system", tag_field="role", forbid_unknown_fields=True):
    content: str | list[TextPart]
    name: str | UnsetType = UNSET


class DeveloperMessage(Struct, tag="developer", tag_field="role", forbid_unknown_fields=True):
    content: str | list[TextPart]
    name: str | UnsetType = UNSET


class UserMessage(Struct, tag="user", tag_field="role", forbid_unknown_fields=True):
    content: str | list[TextPart | ImageUrlPart]
    name: str | UnsetType = UNSET


class ToolCallFunction(Struct, forbid_unknown_fields=True):
    name: str
    arguments: str  # JSON text


class MessageToolCall(Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(Struct, tag="assistant", tag_field="role", forbid_unknown_fields=True):
    content: str | list[TextPart] | None = None
    name: str | UnsetType = UNSET
    refusal: str | UnsetType | None = UNSET
    tool_calls: list[MessageToolCall] | UnsetType | None = UNSET
    # The turn's reasoning, as this server (and vLLM, llama.cpp, LM Studio) returned it: shown to templates
    # that render earlier reasoning, dropped by the others. `reasoning` is the newer vLLM/OpenRouter name.
    reasoning_content: str | UnsetType | None = UNSET
    reasoning: str | UnsetType | None = UNSET


class ToolMessage(Struct, tag="tool", tag_field="role", forbid_unknown_fields=True):
    content: str | list[TextPart]
    tool_call_id: str


Message = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage


class FunctionDefinition(Struct, forbid_unknown_fields=True):
    name: str
    description: str | UnsetType = UNSET
    parameters: dict[str, Any] | UnsetType = UNSET  # a JSON Schema object
    strict: bool | None = None


class Tool(Struct, forbid_unknown_fields=True):
    type: str  # "function"; OpenAI's other kinds ("custom") are named in a 400
    function: FunctionDefinition | UnsetType = UNSET
    custom: dict[str, Any] | UnsetType = UNSET


class NamedFunction(Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(Struct, forbid_unknown_fields=True):
    type: str  # "function"; "allowed_tools" and "custom" are named in a 400
    function: NamedFunction | UnsetType = UNSET
    allowed_tools: dict[str, Any] | UnsetType = UNSET
    custom: dict[str, Any] | UnsetType = UNSET


class ResponseFormatText(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    pass


class ResponseFormatJsonObject(Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True):
    pass


class JsonSchemaSpec(Struct, forbid_unknown_fields=True):
    name: str
    description: str | UnsetType = UNSET
    schema: dict[str, Any] | UnsetType = UNSET
    strict: bool | None = None


class ResponseFormatJsonSchema(Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True):
    json_schema: JsonSchemaSpec


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema


class PredictionContent(Struct, tag="content", tag_field="type", forbid_unknown_fields=True):
    """Predicted Outputs: text the reply is likely to repeat (a file being edited). The server drafts tokens
    from it for speculative decoding: it changes the speed, never the output."""

    content: str | list[TextPart]


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    include_obfuscation: bool | UnsetType = UNSET  # accepted: we never add obfuscation padding


class ChatCompletionRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    model: str
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | UnsetType | None = UNSET
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    max_completion_tokens: MaxTokens | None = None
    max_tokens: MaxTokens | None = None
    n: Choices | None = None
    presence_penalty: Penalty = 0.0
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    stop: str | StopList | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | UnsetType = UNSET
    # Accepted and ignored: they change nothing a local server does (docs/api.md lists them).
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    # An extension (vLLM, llama.cpp, LM Studio): variables for the model's chat template, such as
    # {"enable_thinking": false} for Qwen3.
    chat_template_kwargs: dict[str, Any] | None = None
    prediction: PredictionContent | None = None
    # Fields OpenAI defines that change behaviour we do not offer: named in a 400 when set.
    audio: dict[str, Any] | UnsetType | None = UNSET
    modalities: list[str] | UnsetType | None = UNSET
    reasoning_effort: str | UnsetType | None = UNSET
    functions: list[dict[str, Any]] | UnsetType = UNSET
    function_call: str | dict[str, Any] | UnsetType = UNSET
    web_search_options: dict[str, Any] | UnsetType = UNSET
    store: bool | None = None


class CompletionRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    prompt: str | list[Any]  # OpenAI also allows token ids and batches; convert.py names what we refuse
    best_of: int | None = None
    echo: bool | None = None
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | UnsetType | None = UNSET
    logprobs: CompletionLogprobs | None = None
    max_tokens: MaxTokens | None = 16  # OpenAI's default for legacy completions
    n: Choices | None = None
    presence_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: str | StopList | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | UnsetType = UNSET


# ---------------------------------------------------------------------------------------------------
# Responses


class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class CompletionTokensDetails(Struct):
    reasoning_tokens: int = 0
    accepted_prediction_tokens: int = 0  # with a prediction: drafted tokens the reply kept
    rejected_prediction_tokens: int = 0  # and those it did not (computed, then dropped)


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = msgspec.field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails | UnsetType = UNSET  # a reasoning model's, when it thought


class TopLogprobEntry(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class LogprobEntry(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobEntry]


class ChoiceLogprobs(Struct):
    content: list[LogprobEntry] | None
    refusal: None = None


class AssistantReply(Struct):
    role: Literal["assistant"]
    content: str | None  # null when the reply is only tool calls
    refusal: None = None
    tool_calls: list[MessageToolCall] | UnsetType = UNSET  # absent when there are none
    reasoning_content: str | UnsetType = UNSET  # a reasoning model's thinking; absent when there is none


class ChatChoice(Struct):
    index: int
    message: AssistantReply
    logprobs: ChoiceLogprobs | None
    finish_reason: str


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | UnsetType = UNSET  # a string or absent, never null (OpenAI's spec)


class ChunkFunction(Struct, omit_defaults=True):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ChunkToolCall(Struct, omit_defaults=True, kw_only=True):
    """A piece of a streamed call: the first of a call has id, type and name; later ones add arguments."""

    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: ChunkFunction


class ChunkDelta(Struct, omit_defaults=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ChunkToolCall] | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET


class ChunkChoice(Struct):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | UnsetType = UNSET  # a string or absent, never null (OpenAI's spec)


class CompletionLogprobsBody(Struct):
    """The legacy API's shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobsBody | None
    finish_reason: str | None


class Completion(Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | UnsetType = UNSET  # absent from chunks but the usage chunk (the spec has no null here)
    system_fingerprint: str | UnsetType = UNSET  # a string or absent, never null (OpenAI's spec)


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Struct):
    error: ErrorDetail

