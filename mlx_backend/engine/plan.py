"""From a Generate command and its loaded model to what the batcher runs: the prompt's tokens, the token
budget, and per choice its sampler, logits processors (penalties, then any grammar) and output bookkeeping.

Everything a request can be refused for is decided here, before any compute: a prompt longer than the
context, a logit_bias naming a token the model does not have, tools the model's template cannot take, a
tool_choice its format cannot force, a grammar that does not compile against the tokenizer. Each is an
EngineError naming the parameter (a 400 at the gateway).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import msgspec
from mlx_lm.sample_utils import LogitsProcessor, Sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

from mlx_backend.contract import Constraint, Generate, SamplingParams
from mlx_backend.engine import faults
from mlx_backend.engine.choice import ChoiceOutput
from mlx_backend.engine.constrained import ConstraintError, ConstraintProcessor, compiler_for
from mlx_backend.engine.logprobs import TokenText, token_logprob
from mlx_backend.engine.reasoning import ForcedTokens, budget_processor, detect_reasoning, opens_reasoning
from mlx_backend.engine.residency.models import CachedModel
from mlx_backend.engine.sampling import make_logits_processors, make_sampler
from mlx_backend.engine.stops import StopMatcher
from mlx_backend.engine.tools import ToolRequest, encode_prompt
from mlx_backend.errors import EngineError, EngineErrorCode


@dataclass
class ChoicePlan:
    index: int
    sampler: Sampler
    processors: list[LogitsProcessor]
    constraint: ConstraintProcessor | None  # also the last of `processors`; asked after each token
    output: ChoiceOutput


@dataclass
class RequestPlan:
    tokens: list[int]
    max_tokens: int
    choices: list[ChoicePlan]
    pixels: Any = None  # a vision model's processed images and their model inputs (mlx_backend/engine/vision.py)
    prediction: list[int] = field(default_factory=list)  # the request's predicted output, as tokens


def plan_request(
    command: Generate, cached: CachedModel, token_text: TokenText, allow_faults: bool = False,
    prompt: list[int] | None = None,
) -> RequestPlan:
    """`prompt`: the prompt's tokens when the caller made them (a vision model's, its images' tokens in)."""
    tokenizer: Any = cached.artifacts.tokenizer
    param = "messages" if command.messages is not None else "prompt"
    tools = ToolRequest.from_command(command, tokenizer)
    tokens = prompt if prompt is not None else encode_prompt(command, tokenizer, tools)
    context = cached.artifacts.context_length
    if context is not None and len(tokens) >= context:
        raise EngineError(
            EngineErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"This model's maximum context length is {context} tokens, but the prompt "
            f"{'' if param == 'prompt' else f'({param}) '}is {len(tokens)} tokens, leaving no room for a "
            "completion. Shorten the input.",
            param,
        )
    # A request may not run past the context: max_tokens is clamped to what is left after the prompt
    # (the request then ends with "length" there) rather than refused, as OpenAI-compatible servers do.
    max_tokens = max(1, command.params.max_tokens)
    if context is not None:
        max_tokens = min(max_tokens, context - len(tokens))
    _check_logit_bias(command.params, cached)
    constraint, constraint_param = _constraint(command, tools, tokenizer)
    logprob_of = (
        functools.partial(_logprob, params=command.params, text=token_text)
        if command.params.logprobs is not None else None
    )
    thinks = detect_reasoning(tokenizer) if command.messages is not None else None
    starts_inside = opens_reasoning(thinks, tokenizer, tokens)
    choices = []
    for index in range(max(1, command.n)):
        params = _params_of_choice(command.params, index)
        processors = make_logits_processors(params, len(tokens))
        processor = None
        if constraint is not None:
            try:
                processor = compiler_for(tokenizer).processor(constraint, max_tokens)
            except ConstraintError as exc:
                raise EngineError(EngineErrorCode.INVALID_REQUEST, exc.message, constraint_param) from exc
            processors.append(processor)  # last: it masks what the penalties left
        budget = budget_processor(command, tokenizer)
        if budget is not None:
            processors.append(budget)  # after the grammar: its forced markup is the one token allowed
        emitted = faults.emitted_text(command.fault) if allow_faults else None
        if emitted is not None:
            processors.append(ForcedTokens(list(tokenizer.encode(emitted, add_special_tokens=False))))
        detokenizer = _detokenizer(tokenizer, continues_prompt=command.messages is None)
        output = ChoiceOutput(command.request_id, index, detokenizer, StopMatcher(params.stop),
                              tools.parser() if tools else None, logprob_of,
                              thinks.splitter(starts_inside) if thinks else None, budget)
        choices.append(ChoicePlan(index, make_sampler(params), processors, processor, output))
    prediction = list(tokenizer.encode(command.prediction, add_special_tokens=False)) if command.prediction else []
    return RequestPlan(tokens, max_tokens, choices, prediction=prediction)


class _KeepLeadingSpace(BPEStreamingDetokenizer):
    def _maybe_trim_space(self, current_text: str) -> str:
        return current_text


def _detokenizer(tokenizer: Any, continues_prompt: bool) -> Any:
    """A fresh streaming detokenizer. mlx-lm trims the space a reply's first token starts with, which suits a
    chat reply; a legacy completion continues its prompt, and there that space is part of the text."""
    detokenizer = tokenizer.detokenizer
    if continues_prompt:
        if isinstance(detokenizer, SPMStreamingDetokenizer):
            detokenizer.trim_space = False
        elif type(detokenizer) is BPEStreamingDetokenizer:
            detokenizer.__class__ = _KeepLeadingSpace
    return detokenizer


def _check_logit_bias(params: SamplingParams, cached: CachedModel) -> None:
    if not params.logit_bias:
        return
    vocabulary = _vocabulary_size(cached)
    for token, _ in params.logit_bias:
        if not 0 <= token < vocabulary:
            raise EngineError(EngineErrorCode.INVALID_REQUEST, f"logit_bias names token {token}, but this model's "
                              f"vocabulary has {vocabulary} tokens (ids 0 to {vocabulary - 1}).", "logit_bias")


def _vocabulary_size(cached: CachedModel) -> int:
    """Tokens that are both the tokenizer's (added ones included) and rows of the model's logits."""
    size = len(cached.artifacts.tokenizer._tokenizer)
    config = cached.artifacts.config
    width = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    return min(size, width) if isinstance(width, int) else size


def _constraint(command: Generate, tools: ToolRequest | None, tokenizer: Any) -> tuple[Constraint | None, str]:
    grammar = tools.grammar(tokenizer) if tools else None
    if grammar is not None and command.constraint is not None:
        raise EngineError(EngineErrorCode.INVALID_REQUEST, "response_format cannot be combined with a forced or "
                          "strict tool call; send one of them.", "response_format")
    if grammar is not None:
        return Constraint(kind="lark", source=grammar), "tools"
    return command.constraint, "response_format"


def _params_of_choice(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of a seeded request draws from seed + i, so n choices differ and each is reproducible."""
    if index == 0 or params.seed is None:
        return params
    return msgspec.structs.replace(params, seed=(params.seed + index) % 2**64)


def _logprob(logprobs: Any, token: int, *, params: SamplingParams, text: TokenText) -> Any:
    return token_logprob(logprobs, token, params, text)
