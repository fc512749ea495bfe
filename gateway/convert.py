"""Between the OpenAI wire and the engine: requests -> `Generate`, engine events -> responses and chunks.

Unsupported parameters are refused here, by name, before any work: a user never gets a silent surprise.
"""

from __future__ import annotations

import time

from msgspec import UNSET

from gateway.errors import invalid, unsupported
from gateway.protocol import (
    AssistantMessage,
    AssistantReply,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    DeveloperMessage,
    ImageUrlPart,
    Message,
    PromptTokensDetails,
    TextPart,
    ToolMessage,
    Usage,
)
from mlx_backend.types import ChatMessage, Finished, Generate, SamplingParams

FAULT_PREFIX = "fault:"  # test-only: `user: "fault:abort"` injects an engine fault (settings.test_faults)


# ---------------------------------------------------------------------------------------------------
# Requests


def check_chat_supported(req: ChatCompletionRequest) -> None:
    """Raise a 400 naming the first parameter we would otherwise have to ignore."""
    if req.n not in (None, 1):
        raise unsupported("n", "only one choice per request (n=1)")
    if req.logprobs:
        raise unsupported("logprobs", "log probabilities are not returned")
    if req.top_logprobs not in (UNSET, None, 0):
        raise unsupported("top_logprobs", "log probabilities are not returned")
    if req.logit_bias not in (UNSET, None) and req.logit_bias:
        raise unsupported("logit_bias", "logit bias is not applied")
    if req.tools not in (UNSET, None) and req.tools:
        raise unsupported("tools", "tool calling is not available yet")
    if req.tool_choice not in (UNSET, None, "none", "auto"):
        raise unsupported("tool_choice", "tool calling is not available yet")
    if req.functions is not UNSET and req.functions:
        raise unsupported("functions", "function calling is not available")
    if req.function_call not in (UNSET, None, "none", "auto"):
        raise unsupported("function_call", "function calling is not available")
    if req.response_format is not UNSET and req.response_format.get("type", "text") != "text":
        raise unsupported("response_format", "only {'type': 'text'} is available")
    if req.audio not in (UNSET, None):
        raise unsupported("audio", "audio output is not available")
    if req.modalities not in (UNSET, None) and list(req.modalities) != ["text"]:
        raise unsupported("modalities", "only text output is available")
    if req.prediction not in (UNSET, None):
        raise unsupported("prediction", "predicted outputs are not available")
    if req.reasoning_effort not in (UNSET, None):
        raise unsupported("reasoning_effort", "reasoning controls are not available")
    if req.web_search_options is not UNSET:
        raise unsupported("web_search_options", "this server never goes to the network")
    if req.store:
        raise unsupported("store", "completions are never stored")
    for i, message in enumerate(req.messages):
        if isinstance(message, AssistantMessage) and message.tool_calls is not UNSET and message.tool_calls:
            raise unsupported(f"messages[{i}].tool_calls", "tool calling is not available yet")


def check_completion_supported(req: CompletionRequest) -> None:
    if req.n not in (None, 1):
        raise unsupported("n", "only one choice per request (n=1)")
    if req.best_of not in (None, 1):
        raise unsupported("best_of", "only best_of=1")
    if req.echo:
        raise unsupported("echo", "the prompt is not echoed")
    if req.logprobs not in (None, 0):
        raise unsupported("logprobs", "log probabilities are not returned")
    if req.logit_bias not in (UNSET, None) and req.logit_bias:
        raise unsupported("logit_bias", "logit bias is not applied")
    if req.suffix:
        raise unsupported("suffix", "insertion (suffix) is not available")
    if not isinstance(req.prompt, str):
        if not req.prompt or not all(isinstance(p, str) for p in req.prompt):
            raise unsupported("prompt", "token-id prompts are not accepted; send text")
        if len(req.prompt) != 1:
            raise unsupported("prompt", "only one prompt per request")


def _text(content: str | list[TextPart] | list[TextPart | ImageUrlPart] | None, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for j, part in enumerate(content):
        if isinstance(part, ImageUrlPart):
            raise unsupported(f"{param}[{j}]", "image input is not available; send text parts")
        parts.append(part.text)
    return "".join(parts)


def _to_engine_message(message: Message, index: int) -> ChatMessage:
    param = f"messages[{index}].content"
    if isinstance(message, DeveloperMessage):  # OpenAI's newer name for the system role
        return ChatMessage(role="system", content=_text(message.content, param))
    if isinstance(message, ToolMessage):
        return ChatMessage(role="tool", content=_text(message.content, param), tool_call_id=message.tool_call_id)
    name = message.name if message.name is not UNSET else None
    role = {"SystemMessage": "system", "UserMessage": "user", "AssistantMessage": "assistant"}
    return ChatMessage(role=role[type(message).__name__], content=_text(message.content, param), name=name)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(s == "" for s in stops):
        raise invalid("stop", "stop strings must not be empty")
    return stops


def _temperature(temperature: float | None, top_p: float | None) -> float:
    if top_p == 0:
        return 0.0  # only the most likely token survives a top_p of 0: that is greedy decoding
    return 1.0 if temperature is None else temperature


def _fault(user: object, allow_faults: bool) -> str | None:
    if allow_faults and isinstance(user, str) and user.startswith(FAULT_PREFIX):
        return user[len(FAULT_PREFIX):]
    return None


def chat_to_generate(
    req: ChatCompletionRequest, request_id: str, default_max_tokens: int, allow_faults: bool = False
) -> Generate:
    check_chat_supported(req)
    if req.max_tokens is not None and req.max_completion_tokens is not None and (
        req.max_tokens != req.max_completion_tokens
    ):
        raise invalid("max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one")
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_temperature(req.temperature, req.top_p),
        top_p=1.0 if not req.top_p else req.top_p,
        seed=req.seed,
        stop=_stops(req.stop),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )
    messages = tuple(_to_engine_message(m, i) for i, m in enumerate(req.messages))
    return Generate(request_id=request_id, model=req.model, params=params, messages=messages,
                    fault=_fault(req.user, allow_faults))


def completion_to_generate(req: CompletionRequest, request_id: str, allow_faults: bool = False) -> Generate:
    check_completion_supported(req)
    prompt = req.prompt if isinstance(req.prompt, str) else str(req.prompt[0])
    params = SamplingParams(
        max_tokens=req.max_tokens or 16,
        temperature=_temperature(req.temperature, req.top_p),
        top_p=1.0 if not req.top_p else req.top_p,
        seed=req.seed,
        stop=_stops(req.stop),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )
    return Generate(request_id=request_id, model=req.model, params=params, prompt=prompt,
                    fault=_fault(req.user, allow_faults))


# ---------------------------------------------------------------------------------------------------
# Responses


def usage_of(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished.cached_tokens),
    )


def public_finish_reason(reason: str) -> str:
    """OpenAI clients know stop/length; an engine-side abort (drain deadline) reads as truncation."""
    return reason if reason in ("stop", "length") else "length"


class ResponseMeta:
    """What every chunk and response of one request shares."""

    def __init__(self, request_id: str, model: str) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())


def chat_completion(meta: ResponseMeta, text: str, finished: Finished) -> ChatCompletion:
    return ChatCompletion(
        id=meta.id, created=meta.created, model=meta.model, usage=usage_of(finished),
        choices=[ChatChoice(index=0, message=AssistantReply(role="assistant", content=text), logprobs=None,
                            finish_reason=public_finish_reason(finished.finish_reason))],
    )


def chat_chunk(meta: ResponseMeta, delta: ChunkDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=meta.id, created=meta.created, model=meta.model,
        choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
    )


def chat_usage_chunk(meta: ResponseMeta, finished: Finished) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[],
                               usage=usage_of(finished))


def completion(meta: ResponseMeta, text: str, finished: Finished) -> Completion:
    return Completion(
        id=meta.id, created=meta.created, model=meta.model, usage=usage_of(finished),
        choices=[CompletionChoice(index=0, text=text, logprobs=None,
                                  finish_reason=public_finish_reason(finished.finish_reason))],
    )


def completion_chunk(meta: ResponseMeta, text: str, finish_reason: str | None = None) -> Completion:
    return Completion(id=meta.id, created=meta.created, model=meta.model,
                      choices=[CompletionChoice(index=0, text=text, logprobs=None, finish_reason=finish_reason)])


def completion_usage_chunk(meta: ResponseMeta, finished: Finished) -> Completion:
    return Completion(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage_of(finished))
