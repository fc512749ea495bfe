"""Each API's reasoning controls -> the engine's one `ReasoningControl` (mlx_backend/engine/reasoning.py maps that
onto what the model's chat template understands).

Chat says `reasoning_effort` (and, as vLLM, llama.cpp and LM Studio do, `chat_template_kwargs`); the
Responses API `reasoning: {effort, summary}`; Anthropic's Messages API `thinking: {type, budget_tokens}` and
`output_config.effort`. An effort of "none" (or thinking "disabled") asks for an answer without thinking;
the other efforts ask for thinking, and reach templates that read an effort (gpt-oss: low, medium, high).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import invalid
from mlx_backend.contract import ReasoningControl

# OpenAI's efforts (chat, Responses) and Anthropic's (output_config.effort) -> the three a template knows.
_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
OPENAI_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
ANTHROPIC_EFFORTS = ("low", "medium", "high", "xhigh", "max")
SUMMARIES = ("auto", "concise", "detailed", "none")
# Template variables the server renders from the request itself: chat_template_kwargs may not set them.
SERVER_TEMPLATE_KEYS = ("messages", "tools", "add_generation_prompt", "documents", "tokenize")


def effort_control(
    effort: str | None, param: str, allowed: tuple[str, ...] = OPENAI_EFFORTS
) -> ReasoningControl | None:
    """An effort word as a control; None when none was sent. An unknown word is a 400 naming `param`."""
    if effort is None:
        return None
    if effort not in allowed:
        raise invalid(param, f"{param} must be one of {', '.join(map(repr, allowed))}, not {effort!r}.")
    if effort == "none":
        return ReasoningControl(enabled=False)
    return ReasoningControl(enabled=True, effort=_EFFORTS[effort])


def template_kwargs_of(kwargs: dict[str, Any] | None, param: str = "chat_template_kwargs") -> str | None:
    """chat_template_kwargs as the JSON text the engine passes to the template."""
    if not kwargs:
        return None
    for key in kwargs:
        if key in SERVER_TEMPLATE_KEYS:
            raise invalid(f"{param}.{key}", f"{param} cannot set {key!r}: the server renders it from the request.")
    return json.dumps(kwargs)


def with_template_switch(control: ReasoningControl | None, kwargs: dict[str, Any] | None) -> ReasoningControl | None:
    """`enable_thinking` (or `thinking`) in chat_template_kwargs switches thinking for every template, also
    one that never reads it (DeepSeek-R1's opens its reasoning in the prompt: the engine closes it there)."""
    switch = next((kwargs[k] for k in ("enable_thinking", "thinking") if kwargs and isinstance(kwargs.get(k), bool)),
                  None)
    if switch is None or (control is not None and control.enabled is not None):
        return control
    return ReasoningControl(enabled=switch, effort=control.effort if control else None,
                            budget_tokens=control.budget_tokens if control else None)


def anthropic_control(thinking: dict[str, Any] | None, effort: str | None, max_tokens: int) -> ReasoningControl | None:
    """Anthropic's `thinking` ({"type": "enabled", "budget_tokens": N} | {"type": "adaptive"} |
    {"type": "disabled"}) and `output_config.effort`."""
    control = effort_control(effort, "output_config.effort", ANTHROPIC_EFFORTS)
    if thinking is None:
        return control
    kind = thinking.get("type")
    unknown = set(thinking) - {"type", "budget_tokens", "display"}
    if unknown:
        raise invalid(f"thinking.{sorted(unknown)[0]}", f"thinking has no field {sorted(unknown)[0]!r}.")
    if thinking.get("display") not in (None, "summarized"):
        raise invalid("thinking.display", "thinking.display may only be 'summarized' here (the thinking is shown "
                                          "in full); 'omitted' is not supported.")
    if kind == "disabled":
        return ReasoningControl(enabled=False)
    if kind not in ("enabled", "adaptive"):
        raise invalid("thinking.type", f"thinking.type must be 'enabled', 'adaptive' or 'disabled', not {kind!r}.")
    budget = thinking.get("budget_tokens")
    if isinstance(budget, float) and budget.is_integer():  # 8.0 is 8, as JSON Schema (and the strict decoder) say
        budget = int(budget)
    if kind == "enabled":
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise invalid("thinking.budget_tokens", "thinking of type 'enabled' needs budget_tokens, a positive "
                                                    "integer.")
        if budget >= max_tokens:
            raise invalid("thinking.budget_tokens", "thinking.budget_tokens must be less than max_tokens.")
    elif budget is not None:
        raise invalid("thinking.budget_tokens", "budget_tokens belongs to thinking of type 'enabled'.")
    return ReasoningControl(enabled=True, effort=control.effort if control else None, budget_tokens=budget)
