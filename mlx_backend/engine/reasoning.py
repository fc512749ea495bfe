"""Reasoning models: which markup a model thinks in, the controls mapped onto its chat template, the reply
split into reasoning and content as it streams, and the thinking budget.

Two kinds of markup, read from the model's own tokenizer and template:
- "think": a block between two markers (`<think>` ... `</think>`: Qwen3, Qwen3-Thinking-2507, DeepSeek-R1,
  GLM-4.5/4.6, MiniMax-M2; mlx-lm's TokenizerWrapper finds the markers in the vocabulary). Some templates
  open the block in the generation prompt (Qwen3-Thinking-2507, DeepSeek-R1): the reply starts inside it.
- "harmony": OpenAI's format for gpt-oss, messages on channels:
  `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>`,
  a tool call as `<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>{...}<|call|>`
  (the recipient may also follow the channel). Analysis is reasoning, final (and commentary without a
  recipient, a preamble) is content, a call to `functions.NAME` is handed to the tool-call parser as the
  JSON call object it stands for (`HARMONY_CALL_START` ... `HARMONY_CALL_END`).

Controls (`ReasoningControl`), per template: `enabled` becomes `enable_thinking` for a template that reads
it (Qwen3, GLM); a template that opens the block in the prompt and cannot be told to skip it gets the block
closed right there (its end marker appended to the prompt), as it is whenever the output is held to a
grammar; `effort` becomes `reasoning_effort` for a template that reads it (gpt-oss); `budget_tokens` is
enforced while decoding (`ThinkingBudget` forces the end markup once the budget is spent). A model with
no reasoning markup ignores them all and answers as it always does.
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
import jinja2.meta

from mlx_backend.contract import Generate, ReasoningControl

HARMONY_CALL_START = "<tool_call>"  # what a harmony call becomes for the tool-call parser (HERMES' markers)
HARMONY_CALL_END = "</tool_call>"
_HARMONY_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>")
_HARMONY_FINAL = "<|channel|>final<|message|>"


@dataclass(frozen=True)
class ReasoningFormat:
    kind: Literal["think", "harmony"]
    start: str = ""  # think: the opening marker
    end: str = ""  # think: the closing marker
    template_reads: frozenset[str] = frozenset()  # the controls the chat template reads

    def splitter(self, inside: bool) -> ThinkSplitter | HarmonySplitter:
        if self.kind == "harmony":
            return HarmonySplitter()
        return ThinkSplitter(self.start, self.end, inside)

    @property
    def closing(self) -> str:
        """What ends the reasoning when the engine must end it (a budget spent, thinking turned off)."""
        # harmony: the analysis message ends and the next one starts; the model picks its channel (the
        # answer, or a call), as a forced call's grammar does.
        return "<|end|><|start|>assistant" if self.kind == "harmony" else self.end


def detect_reasoning(tokenizer: Any) -> ReasoningFormat | None:
    """The reasoning markup of a loaded mlx-lm TokenizerWrapper, or None for a model that does not think
    (cached per tokenizer)."""
    try:
        return _cache[tokenizer]
    except (KeyError, TypeError):
        pass
    found = _detect(tokenizer)
    with contextlib.suppress(TypeError):  # not weak-referenceable (a test double): not cached
        _cache[tokenizer] = found
    return found


_cache: weakref.WeakKeyDictionary[Any, ReasoningFormat | None] = weakref.WeakKeyDictionary()
_env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
_CONTROLS = ("enable_thinking", "reasoning_effort", "thinking")


def _detect(tokenizer: Any) -> ReasoningFormat | None:
    template = _template_text(tokenizer)
    if not template:
        return None
    reads = _variables(template)
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in _HARMONY_TOKENS) and "<|channel|>" in template:
        return ReasoningFormat("harmony", template_reads=reads)
    start, end = getattr(tokenizer, "think_start", None), getattr(tokenizer, "think_end", None)
    if isinstance(start, str) and isinstance(end, str) and end in template:
        return ReasoningFormat("think", start, end, reads)
    return None


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(t for t in template.values() if isinstance(t, str))
    return template if isinstance(template, str) else ""


def _variables(template: str) -> frozenset[str]:
    try:
        found = jinja2.meta.find_undeclared_variables(_env.parse(template))
    except jinja2.TemplateSyntaxError:  # e.g. transformers' {% generation %} tag: fall back to the text
        found = {name for name in _CONTROLS if re.search(rf"\b{name}\b", template)}
    return frozenset(name for name in _CONTROLS if name in found)


# ---------------------------------------------------------------------------------------------------
# The prompt


def template_kwargs(command: Generate, tokenizer: Any) -> dict[str, Any]:
    """The chat-template variables for this request: its reasoning controls as the template understands
    them, then the client's own chat_template_kwargs (which win)."""
    kwargs: dict[str, Any] = {}
    fmt = detect_reasoning(tokenizer)
    control = _effective(command, fmt)
    if fmt is not None and control is not None:
        if control.enabled is not None:
            for name in ("enable_thinking", "thinking"):
                if name in fmt.template_reads:
                    kwargs[name] = control.enabled
        effort = control.effort or ("low" if control.enabled is False else None)
        if effort is not None and "reasoning_effort" in fmt.template_reads:
            kwargs["reasoning_effort"] = effort
    if command.template_kwargs:
        extra = json.loads(command.template_kwargs)
        if isinstance(extra, dict):
            kwargs.update(extra)
    return kwargs


def _effective(command: Generate, fmt: ReasoningFormat | None) -> ReasoningControl | None:
    """A reply held to a JSON grammar (response_format) has no room for thinking: thinking is off."""
    if fmt is not None and command.constraint is not None:
        return ReasoningControl(enabled=False)
    return command.reasoning


def close_unwanted_reasoning(command: Generate, tokenizer: Any, tokens: list[int]) -> list[int]:
    """A prompt that opens the reasoning block when thinking is off (or the reply is held to a grammar,
    which expects the reply to start outside it): the block is closed in the prompt itself. For harmony,
    a reply held to response_format starts on the final channel."""
    fmt = detect_reasoning(tokenizer)
    if fmt is None or command.messages is None:
        return tokens
    wants_off = (command.reasoning is not None and command.reasoning.enabled is False) or command.constraint
    if fmt.kind == "harmony":
        if command.constraint is not None:
            return tokens + list(tokenizer.encode(_HARMONY_FINAL, add_special_tokens=False))
        return tokens
    if (wants_off or _forced_tools(command)) and opens_reasoning(fmt, tokenizer, tokens):
        return tokens + list(tokenizer.encode(fmt.end + "\n\n", add_special_tokens=False))
    return tokens


def _forced_tools(command: Generate) -> bool:
    # A forced call's grammar lets the model think first only from a block it opens itself.
    return bool(command.tools) and command.tool_choice in ("required", "function")


def opens_reasoning(fmt: ReasoningFormat | None, tokenizer: Any, tokens: list[int]) -> bool:
    """Whether the prompt leaves the reply inside a reasoning block (its last opening marker is after its
    last closing one)."""
    if fmt is None or fmt.kind != "think":
        return False
    start = tokenizer.encode(fmt.start, add_special_tokens=False)
    end = tokenizer.encode(fmt.end, add_special_tokens=False)
    return _rfind(tokens, start) > _rfind(tokens, end)


def _rfind(tokens: list[int], sequence: list[int]) -> int:
    width = len(sequence)
    for i in range(len(tokens) - width, -1, -1):
        if tokens[i:i + width] == sequence:
            return i
    return -1


# ---------------------------------------------------------------------------------------------------
# Splitting the reply


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""  # harmony calls come through here as HARMONY_CALL_START {json} HARMONY_CALL_END


class ThinkSplitter:
    """A reply's text, piece by piece, into reasoning and content. The markers may arrive cut anywhere (a
    marker split across tokens): a piece's tail that could be the start of one is held back until it is
    decided. Newlines just inside the block and whitespace right after it are markup, not text."""

    def __init__(self, start: str, end: str, inside: bool) -> None:
        self._start = start
        self._end = end
        self.inside = inside
        self._buf = ""
        self._fresh = inside  # just entered the current state: its leading whitespace is dropped
        self._held_newlines = ""  # reasoning's trailing newlines: sent only if more reasoning follows

    def feed(self, text: str) -> Split:
        out = Split()
        self._buf += text
        while self._buf:
            marker = self._end if self.inside else self._start
            if marker[0] not in self._buf:  # the common case: plain text, nothing to hold back
                self._emit(self._buf, out)
                self._buf = ""
                break
            at = self._buf.find(marker)
            if at < 0:
                keep = _partial_suffix(self._buf, marker)
                self._emit(self._buf[:len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                break
            self._emit(self._buf[:at], out)
            self._buf = self._buf[at + len(marker):]
            self.inside = not self.inside
            self._fresh = True
            self._held_newlines = ""
        return out

    def finish(self) -> Split:
        out = Split()
        rest, self._buf = self._buf, ""
        self._emit(rest, out)
        return out

    def _emit(self, text: str, out: Split) -> None:
        if self._fresh:
            text = text.lstrip("\n") if self.inside else text.lstrip()
            if not text:
                return
            self._fresh = False
        if self.inside:
            body = text.rstrip("\n")
            if body:
                out.reasoning += self._held_newlines + body
                self._held_newlines = ""
            self._held_newlines += text[len(body):]
        else:
            out.content += text


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest tail of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class HarmonySplitter:
    """A gpt-oss reply (harmony messages after the prompt's `<|start|>assistant`) into reasoning, content and
    calls. Headers are read whole (they are a few tokens); bodies stream."""

    def __init__(self) -> None:
        self.inside = False  # in an analysis body (for the budget and the token count)
        self._buf = ""
        self._state: Literal["header", "body"] = "header"
        self._body: Literal["reasoning", "content", "call", "drop"] = "content"

    def feed(self, text: str) -> Split:
        out = Split()
        self._buf += text
        while self._buf:
            if self._state == "header":
                at = self._buf.find("<|message|>")
                if at < 0:
                    break
                self._open(self._buf[:at], out)
                self._buf = self._buf[at + len("<|message|>"):]
                self._state = "body"
                continue
            if "<" not in self._buf:  # the common case: plain text, nothing to hold back
                self._body_text(self._buf, out)
                self._buf = ""
                break
            ends = [(self._buf.find(m), m) for m in ("<|end|>", "<|call|>", "<|return|>", "<|start|>")]
            found = [(at, m) for at, m in ends if at >= 0]
            if not found:
                keep = max(_partial_suffix(self._buf, m) for _, m in ends)
                self._body_text(self._buf[:len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                break
            at, marker = min(found)
            self._body_text(self._buf[:at], out)
            self._close(out)
            self._buf = self._buf[at + (0 if marker == "<|start|>" else len(marker)):]
        return out

    def finish(self) -> Split:
        """The end of the reply (EOS is `<|return|>` or `<|call|>`, which never reach the text)."""
        out = Split()
        if self._state == "body":
            self._body_text(self._buf, out)
            self._close(out)
        self._buf = ""
        return out

    def _open(self, header: str, out: Split) -> None:
        """`header`: what came before `<|message|>`, e.g. `<|channel|>analysis` or
        `<|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json`."""
        channel = re.search(r"<\|channel\|>\s*(\w+)", header)
        recipient = re.search(r"to=functions\.([^\s<]+)", header)
        name = channel.group(1) if channel else "final"
        if recipient:
            self._body = "call"
            out.content += HARMONY_CALL_START + json.dumps({"name": recipient.group(1)})[:-1] + ', "arguments": '
        elif name == "analysis":
            self._body = "reasoning"
        elif re.search(r"\bto=", header):
            self._body = "drop"  # a built-in tool's call (browser, python): not offered here
        else:
            self._body = "content"
        self.inside = self._body == "reasoning"

    def _body_text(self, text: str, out: Split) -> None:
        if self._body == "reasoning":
            out.reasoning += text
        elif self._body in ("content", "call"):
            out.content += text

    def _close(self, out: Split) -> None:
        if self._state == "body" and self._body == "call":
            out.content += "}" + HARMONY_CALL_END
        self._state = "header"
        self._body = "content"
        self.inside = False


# ---------------------------------------------------------------------------------------------------
# The budget


class ForcedTokens:
    """A logits processor that, once given tokens to force, allows only the next of them at each step; with
    none to force it leaves the logits alone."""

    def __init__(self, tokens: list[int] | None = None) -> None:
        self._forced: list[int] = list(tokens or ())

    def __call__(self, tokens: Any, logits: Any) -> Any:
        if not self._forced:
            return logits
        import mlx.core as mx  # the engine's MLX thread only; this module stays importable without MLX

        token = self._forced.pop(0)
        return mx.where(mx.arange(logits.shape[-1]) == token, logits, -mx.inf)


class ThinkingBudget(ForcedTokens):
    """Forces the reasoning's end markup, token by token, once the choice's output (mlx_backend/engine/choice.py)
    says the budget is spent."""

    def __init__(self, budget: int, closing: list[int]) -> None:
        super().__init__()
        self.budget = budget
        self._closing = closing
        self.spent = False  # the end has been (or is being) forced: never again

    def spend(self) -> None:
        if not self.spent:
            self.spent = True
            self._forced = list(self._closing)


def budget_processor(command: Generate, tokenizer: Any) -> ThinkingBudget | None:
    """The budget of a chat request that set one, for a model that thinks."""
    control = command.reasoning
    fmt = detect_reasoning(tokenizer)
    if control is None or control.budget_tokens is None or fmt is None or command.messages is None:
        return None
    return ThinkingBudget(control.budget_tokens, list(tokenizer.encode(fmt.closing, add_special_tokens=False)))
