"""A request's tool calling, decided once: the model's family, the tools, tool_choice, parallel calls.

`ToolRequest.from_command` checks what the gateway sent (the tools themselves were checked there) against
what the model can do, and raises an EngineError (invalid_request, so a 400) naming the model when it
cannot; then the batcher asks it for the prompt (render.encode_prompt), the grammar that forces calls (for
the constrained-decoding processor) and the parser that reads calls out of the generated text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlx_backend.contract import Generate, ToolSpec
from mlx_backend.engine.tools.families import Family, detect_family
from mlx_backend.engine.tools.grammar import tool_grammar
from mlx_backend.engine.tools.stream import ToolCallParser, new_call_id
from mlx_backend.errors import EngineError, EngineErrorCode

CHOICES = ("auto", "none", "required", "function")
# The most calls one reply may make when the request sets no max_tool_calls and parallel calls are on:
# a forced or strict call's grammar must end, and a model that repeats a call would otherwise call until
# max_tokens (docs/api.md, "Tool calling").
CALL_LIMIT = 8


@dataclass(frozen=True)
class ToolRequest:
    family: Family
    tools: list[dict[str, Any]]  # OpenAI tool definitions, as the chat template is given them
    choice: str  # "auto" | "none" | "required" | "function"
    function: str | None  # the named function when choice is "function"
    parallel: bool
    max_calls: int | None = None  # the request's bound (max_tool_calls), if it set one

    @property
    def call_limit(self) -> int:
        """The most calls this reply may make: one for a named function, without parallel calls, or where
        the family's template renders one per turn; else the request's bound, else CALL_LIMIT."""
        if self.choice == "function" or not self.parallel or self.family.max_calls == 1:
            return 1
        return self.max_calls if self.max_calls is not None else CALL_LIMIT

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]

    @property
    def strict(self) -> bool:
        """Some tool asks for strict schema adherence: with "auto", a call that starts is constrained."""
        return any(tool["function"].get("strict") is True for tool in self.tools)

    @classmethod
    def from_command(cls, command: Generate, tokenizer: Any) -> ToolRequest | None:
        """None when the request neither offers tools nor carries earlier tool calls."""
        tools = [_openai_tool(spec) for spec in command.tools]
        history = any(m.tool_calls for m in command.messages or ())
        choice = command.tool_choice
        if choice not in CHOICES:
            raise _invalid(f"tool_choice must be one of {', '.join(CHOICES)}, not {choice!r}.", "tool_choice")
        if not tools and choice in ("required", "function"):
            raise _invalid(f"tool_choice {_choice_text(command)} needs tools.", "tool_choice")
        if not tools and not history:
            return None
        if command.messages is None:
            raise _invalid("Tools can only be used with chat messages.", "tools")
        detection = detect_family(tokenizer)
        if detection.family is None:
            raise _invalid(f"The model '{command.model}' does not support tool calling: {detection.reason}.",
                           "tools" if tools else "messages")
        family = detection.family
        if choice == "function" and command.tool_choice_name not in {t["function"]["name"] for t in tools}:
            raise _invalid(f"tool_choice names the function {command.tool_choice_name!r}, which is not one "
                           "of the tools.", "tool_choice")
        if choice in ("required", "function") and not family.can_force:
            raise _invalid(f"tool_choice {_choice_text(command)} is not supported for the model "
                           f"'{command.model}': its tool-call format ({family.name}) cannot be forced.",
                           "tool_choice")
        if command.max_tool_calls is not None and command.max_tool_calls < 1:
            raise _invalid("max_tool_calls must be at least 1.", "max_tool_calls")
        return cls(family, tools, choice, command.tool_choice_name if choice == "function" else None,
                   command.parallel_tool_calls, command.max_tool_calls)

    def parser(self, new_id: Callable[[], str] = new_call_id) -> ToolCallParser:
        """A parser for one reply. With tool_choice "none" (or no tools, only earlier calls), it drops call
        markup and sends no calls."""
        names = [self.function] if self.choice == "function" and self.function else self.names
        return ToolCallParser(self.family, names, tools=self.tools, parallel=self.parallel,
                              suppress=self.choice == "none" or not self.tools, new_id=new_id,
                              max_calls=1 if self.choice == "function" else self.max_calls,
                              drop_repeats=self.choice == "required")

    def grammar(self, tokenizer: Any) -> str | None:
        """The Lark grammar (llguidance syntax) that constrains this reply, or None when nothing does
        (tool_choice "none", or "auto" without a strict tool)."""
        if self.choice == "none" or (self.choice == "auto" and not self.strict) or not self.tools:
            return None
        named = self.choice == "function"
        functions = [t["function"] for t in self.tools if not named or t["function"]["name"] == self.function]
        return tool_grammar(self.family, functions, self.choice in ("required", "function"), self.call_limit,
                            tokenizer)


def _openai_tool(spec: ToolSpec) -> dict[str, Any]:
    """A tool as OpenAI's chat `tools` list holds it: what chat templates are given."""
    function: dict[str, Any] = {"name": spec.name}
    if spec.description is not None:
        function["description"] = spec.description
    if spec.parameters is not None:
        function["parameters"] = spec.parameters
    if spec.strict is not None:
        function["strict"] = spec.strict
    return {"type": "function", "function": function}


def _choice_text(command: Generate) -> str:
    return f"{{function: {command.tool_choice_name!r}}}" if command.tool_choice == "function" else repr(
        command.tool_choice)


def _invalid(message: str, param: str) -> EngineError:
    return EngineError(EngineErrorCode.INVALID_REQUEST, message, param)
