"""Prompt token ids for a request: chat messages (and tools) through the model's own chat template.

`encode_prompt` is what the batcher calls for every request: without tools it
renders exactly as before; with tools, or with earlier tool calls in the conversation, it converts the
messages to what chat templates expect (Hugging Face's convention) and passes the tool definitions as
`tools=`. A model whose template has no tool support is refused by name, never given a prompt that
silently drops the tools.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import Any

from mlx_backend.contract import ChatMessage, Generate
from mlx_backend.engine.reasoning import close_unwanted_reasoning, template_kwargs
from mlx_backend.engine.tools.request import ToolRequest
from mlx_backend.errors import EngineError, EngineErrorCode

_ALPHANUMERIC = string.ascii_letters + string.digits


def prompt_tokens(command: Generate, tokenizer: Any) -> list[int]:
    """A request's prompt, tools and all: what it runs with, and what CountPrompt counts (one function for
    both, so a count is exact). Raises EngineError as running the request would."""
    return encode_prompt(command, tokenizer, ToolRequest.from_command(command, tokenizer))


def encode_prompt(command: Generate, tokenizer: Any, tools: ToolRequest | None = None) -> list[int]:
    """Prompt token ids: chat messages through the model's template, a legacy prompt as is.

    `tools` is the request's ToolRequest (None when it has no tools); a conversation with earlier tool
    calls needs one too, for the template's sake (ToolRequest.from_command builds it for both).
    """
    param = "messages" if command.messages is not None else "prompt"
    if command.messages is not None:
        tokens = _encode_chat(command.messages, tokenizer, tools, template_kwargs(command, tokenizer))
        tokens = close_unwanted_reasoning(command, tokenizer, tokens)
    elif command.prompt is not None:
        tokens = list(tokenizer.encode(command.prompt))
    else:
        raise EngineError(EngineErrorCode.INVALID_REQUEST, "The request has neither messages nor a prompt.",
                          param)
    if not tokens:
        raise EngineError(EngineErrorCode.INVALID_REQUEST, f"The {param} is empty.", param)
    return tokens


def _encode_chat(messages: tuple[ChatMessage, ...], tokenizer: Any, tools: ToolRequest | None,
                 extra: dict[str, Any] | None = None) -> list[int]:
    extra = extra or {}
    if tools is None:
        dicts = [_plain(m) for m in messages]
        if not tokenizer.has_chat_template:
            # No template: a plain transcript the model can at least continue.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in dicts) + "assistant:"
            return list(tokenizer.encode(text))
        return _apply(tokenizer, dicts, extra)
    ids = _mistral_id if tools.family.mistral_ids else _same
    dicts = [_with_tools(m, i, ids) for i, m in enumerate(messages)]
    # tool_choice "none": the model is not shown the tools, so it has no reason to call one (the parser
    # drops any call markup anyway); earlier calls and results still render.
    kwargs = {"tools": tools.tools} if tools.choice != "none" and tools.tools else {}
    return _apply(tokenizer, dicts, extra | kwargs)


def _apply(tokenizer: Any, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> list[int]:
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))
    except Exception as exc:  # templates raise whatever they like (raise_exception, TypeError, ...)
        merged = one_system_turn(messages)
        if merged is not None:
            # System turns past the first (Claude Code's mid-conversation system messages, Codex's several
            # developer items) stay where they are wherever the template takes them; a template that allows
            # one system turn, first, gets them merged into it.
            return _apply(tokenizer, merged, kwargs)
        raise EngineError(
            EngineErrorCode.INVALID_REQUEST,
            f"The model's chat template rejected the messages: {_short(exc)}", "messages",
        ) from exc


def one_system_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The messages with every system message's text merged, in order, into one system message first (user
    turns that only a system message kept apart become one turn); None when they already have at most one
    system message, first."""
    systems = [m for m in messages if m["role"] == "system"]
    if not systems or (len(systems) == 1 and messages[0]["role"] == "system"):
        return None
    merged = {"role": "system", "content": "\n\n".join(m["content"] for m in systems if m["content"])}
    rest: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "system":
            continue
        if rest and message["role"] == rest[-1]["role"] == "user":  # were apart only by a system message
            rest[-1] = {**rest[-1], "content": f"{rest[-1]['content']}\n\n{message['content']}"}
        else:
            rest.append(message)
    return [merged, *rest]


def _plain(m: ChatMessage) -> dict[str, Any]:
    return (
        {"role": m.role, "content": _content(m)}
        | ({"name": m.name} if m.name is not None else {})
        | ({"tool_call_id": m.tool_call_id} if m.tool_call_id is not None else {})
        # An earlier turn's reasoning, under the names templates read: Qwen3 and GLM `reasoning_content`
        # (rendered for the turns after the last user message), gpt-oss `thinking` (kept for tool turns).
        | ({"reasoning_content": m.reasoning, "thinking": m.reasoning} if m.reasoning else {})
    )


def _content(m: ChatMessage) -> str | list[dict[str, str]]:
    """A message with images is a list of parts, the images first, as vision templates take them (Hugging Face's
    `{"type": "image"}` parts; the processor puts the pixels where each one renders: mlx_backend/engine/vision.py)."""
    if not m.images:
        return m.content
    return [{"type": "image"} for _ in m.images] + ([{"type": "text", "text": m.content}] if m.content else [])


def _with_tools(m: ChatMessage, index: int, ids: Any) -> dict[str, Any]:
    message = _plain(m)
    if m.tool_call_id is not None:
        message["tool_call_id"] = ids(m.tool_call_id)
    if m.tool_calls:
        # Hugging Face's convention, which the templates are written against: arguments as an object.
        # The key is present only when there are calls (Llama's template tests `'tool_calls' in message`).
        message["tool_calls"] = [
            {"id": ids(call.id), "type": "function",
             "function": {"name": call.name, "arguments": _arguments(call.arguments, index, j)}}
            for j, call in enumerate(m.tool_calls)
        ]
    return message


def _arguments(text: str, message: int, call: int) -> dict[str, Any]:
    param = f"messages[{message}].tool_calls[{call}].function.arguments"
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EngineError(EngineErrorCode.INVALID_REQUEST, f"{param} is not valid JSON: {exc}", param) from exc
    if not isinstance(value, dict):
        raise EngineError(EngineErrorCode.INVALID_REQUEST, f"{param} must be a JSON object.", param)
    return value


def _same(call_id: str) -> str:
    return call_id


def _mistral_id(call_id: str) -> str:
    """Mistral's templates want ids of exactly 9 alphanumerics. Ours ("call_" + 24) are mapped by a hash,
    the same way every turn, so a call and its result still match and a cached prompt prefix still hits."""
    if len(call_id) == 9 and call_id.isalnum() and call_id.isascii():
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    digits = []
    for _ in range(9):
        number, digit = divmod(number, len(_ALPHANUMERIC))
        digits.append(_ALPHANUMERIC[digit])
    return "".join(digits)


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
