"""Engine events -> OpenAI's chat and legacy-completion responses and stream chunks.

A streamed request sends each Delta as it comes; a non-streamed one folds the same Deltas, per choice, into
`FoldedChoice`s, so both answer with the same text, tool calls and logprobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from msgspec import UNSET, UnsetType

from gateway.chat.wire import (
    AssistantReply,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ChunkFunction,
    ChunkToolCall,
    Completion,
    CompletionChoice,
    CompletionLogprobsBody,
    CompletionTokensDetails,
    LogprobEntry,
    MessageToolCall,
    PromptTokensDetails,
    ToolCallFunction,
    TopLogprobEntry,
    Usage,
)
from gateway.serving.reply import Reply
from mlx_backend.contract import Delta, TokenLogprob, ToolCallDelta, join_pieces


class ResponseMeta:
    """What every chunk and response of one request shares."""

    def __init__(self, response_id: str, model: str) -> None:
        self.id = response_id
        self.model = model
        self.created = int(time.time())


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int = 0,
             predicted: tuple[int, int] | None = None) -> Usage:
    """`predicted`: (accepted, rejected) draft tokens, for a request that sent a prediction."""
    details: CompletionTokensDetails | UnsetType = UNSET
    if reasoning_tokens or predicted is not None:
        accepted, rejected = predicted or (0, 0)
        details = CompletionTokensDetails(reasoning_tokens, accepted, rejected)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        completion_tokens_details=details,
    )


def public_finish_reason(reason: str) -> str:
    """OpenAI clients know stop/length/tool_calls; an engine-side abort (drain deadline) reads as truncation."""
    return reason if reason in ("stop", "length", "tool_calls") else "length"


@dataclass
class FoldedChoice:
    """One choice's Deltas, gathered for a non-streamed answer (its tool calls as a Reply gathers them)."""

    index: int
    text: list[str] = field(default_factory=list)
    reply: Reply = field(default_factory=Reply)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"
    reasoning: list[str] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.reasoning.append(delta.reasoning)
        self.logprobs.extend(delta.logprobs)
        self.reply.add_calls(delta.tool_calls)

    def tool_calls(self) -> list[MessageToolCall]:
        return [MessageToolCall(id=c.id, function=ToolCallFunction(c.name, c.arguments or "{}"))
                for c in self.reply.calls]


class Folder:
    """Every choice of one request, by index."""

    def __init__(self) -> None:
        self.choices: dict[int, FoldedChoice] = {}

    def add(self, delta: Delta) -> None:
        self.choice(delta.index).add(delta)

    def choice(self, index: int) -> FoldedChoice:
        return self.choices.setdefault(index, FoldedChoice(index))

    def ordered(self) -> list[FoldedChoice]:
        return [self.choices[i] for i in sorted(self.choices)]


# -- logprobs -------------------------------------------------------------------------------------------


def _entry(logprob: TokenLogprob) -> LogprobEntry:
    return LogprobEntry(
        token=logprob.token, logprob=logprob.logprob, bytes=list(logprob.token_bytes),
        top_logprobs=[TopLogprobEntry(t.token, t.logprob, list(t.token_bytes)) for t in logprob.top],
    )


def chat_logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...], wanted: bool) -> ChoiceLogprobs | None:
    return ChoiceLogprobs(content=[_entry(lp) for lp in logprobs]) if wanted else None


def completion_logprobs(
    logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...], wanted: bool, offset: int = 0
) -> CompletionLogprobsBody | None:
    """The legacy shape; `offset` is where these tokens' text starts in the choice's text."""
    if not wanted:
        return None
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobsBody(
        tokens=[lp.token for lp in logprobs], token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{t.token: t.logprob for t in lp.top} for lp in logprobs], text_offset=offsets,
    )


# -- chat -----------------------------------------------------------------------------------------------


def chat_completion(meta: ResponseMeta, choices: list[FoldedChoice], usage: Usage, logprobs: bool) -> ChatCompletion:
    return ChatCompletion(
        id=meta.id, created=meta.created, model=meta.model, usage=usage,
        choices=[ChatChoice(index=c.index, message=_reply(c), logprobs=chat_logprobs(c.logprobs, logprobs),
                            finish_reason=public_finish_reason(c.finish_reason)) for c in choices],
    )


def _reply(choice: FoldedChoice) -> AssistantReply:
    calls = choice.tool_calls()
    text = "".join(choice.text)
    reasoning = "".join(choice.reasoning) or UNSET
    if calls:
        return AssistantReply(role="assistant", content=text or None, tool_calls=calls, reasoning_content=reasoning)
    return AssistantReply(role="assistant", content=text, reasoning_content=reasoning)


def chat_chunk(meta: ResponseMeta, choice: ChunkChoice) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[choice])


def chat_opening_chunk(meta: ResponseMeta, index: int) -> ChatCompletionChunk:
    return chat_chunk(meta, ChunkChoice(index=index, delta=ChunkDelta(role="assistant", content="")))


def chat_delta_chunk(meta: ResponseMeta, delta: Delta, logprobs: bool) -> ChatCompletionChunk | None:
    if not delta.text and not delta.tool_calls and not delta.logprobs and not delta.reasoning:
        return None
    body = ChunkDelta(content=delta.text if delta.text or not (delta.tool_calls or delta.reasoning) else UNSET,
                      tool_calls=_chunk_calls(delta.tool_calls) if delta.tool_calls else UNSET,
                      reasoning_content=delta.reasoning or UNSET)
    return chat_chunk(meta, ChunkChoice(index=delta.index, delta=body,
                                        logprobs=chat_logprobs(delta.logprobs, logprobs)))


def _chunk_calls(pieces: tuple[ToolCallDelta, ...]) -> list[ChunkToolCall]:
    """One entry per call in this chunk (pieces of one call that came together are joined): a call's first
    piece names it (id, type, name), later pieces only add argument text."""
    return [ChunkToolCall(index=p.index, id=p.id, type="function", function=ChunkFunction(p.name or "", p.arguments))
            if p.id is not None else ChunkToolCall(index=p.index, function=ChunkFunction(arguments=p.arguments))
            for p in join_pieces(pieces)]


def chat_closing_chunk(meta: ResponseMeta, index: int, finish_reason: str) -> ChatCompletionChunk:
    return chat_chunk(meta, ChunkChoice(index=index, delta=ChunkDelta(),
                                        finish_reason=public_finish_reason(finish_reason)))


def chat_usage_chunk(meta: ResponseMeta, usage: Usage) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage)


# -- legacy completions -----------------------------------------------------------------------------------


def completion(meta: ResponseMeta, choices: list[FoldedChoice], usage: Usage, logprobs: bool) -> Completion:
    return Completion(
        id=meta.id, created=meta.created, model=meta.model, usage=usage,
        choices=[CompletionChoice(index=c.index, text="".join(c.text),
                                  logprobs=completion_logprobs(c.logprobs, logprobs),
                                  finish_reason=public_finish_reason(c.finish_reason)) for c in choices],
    )


def completion_chunk(meta: ResponseMeta, index: int, text: str, logprobs: CompletionLogprobsBody | None = None,
                     finish_reason: str | None = None) -> Completion:
    return Completion(id=meta.id, created=meta.created, model=meta.model,
                      choices=[CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                finish_reason=finish_reason)])


def completion_usage_chunk(meta: ResponseMeta, usage: Usage) -> Completion:
    return Completion(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage)
