"""One choice's generated tokens -> what its client sees, and when it must end. Pure bookkeeping, no MLX
calls except through the logprobs it is handed.

Each token goes through the choice's streaming detokenizer, then (for a reasoning model) the splitter that
takes the reasoning out (mlx_backend/engine/reasoning.py), then the tool-call parser (markup never reaches
the content), then the stop strings (matched on the content only, so a stop string cannot cut a call's
JSON), and becomes a Delta with the token count and, when asked for, the tokens' logprobs. The choice ends
at EOS or max_tokens (the generator says which), at a stop string, or when the parser has the one call a
request without parallel calls may make.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlx_backend.contract import Delta, TokenLogprob, ToolCallDelta, join_pieces
from mlx_backend.engine.reasoning import HarmonySplitter, Split, ThinkingBudget, ThinkSplitter
from mlx_backend.engine.stops import StopMatcher
from mlx_backend.engine.tools import ToolCallParser


class ChoiceOutput:
    def __init__(
        self,
        request_id: str,
        index: int,
        detokenizer: Any,  # a StreamingDetokenizer of its own
        stops: StopMatcher,
        parser: ToolCallParser | None,
        logprob_of: Callable[[Any, int], TokenLogprob] | None,  # (logprobs row, token) -> entry; None: off
        splitter: ThinkSplitter | HarmonySplitter | None = None,  # a reasoning model's chat reply
        budget: ThinkingBudget | None = None,  # the thinking budget, forced by a logits processor of the plan
    ) -> None:
        self.request_id = request_id
        self.index = index
        self._detokenizer = detokenizer
        self._stops = stops
        self._parser = parser
        self._logprob_of = logprob_of
        self.completion_tokens = 0
        self._unsent_tokens = 0
        self._logprobs: list[TokenLogprob] = []
        self._splitter = splitter
        self._budget = budget
        self.reasoning_tokens = 0
        self._reasoning = ""  # not yet sent

    def on_token(self, token: int, finish_reason: str | None, logprobs: Any) -> tuple[Delta | None, str | None]:
        """Take one generated token; `finish_reason` is the generator's ("stop" at EOS, "length" at
        max_tokens). Returns the Delta to send now (if any) and the reason the choice ends now (if it does):
        "stop", "length" or "tool_calls"."""
        self.completion_tokens += 1
        self._unsent_tokens += 1
        if finish_reason == "stop":  # an EOS token: ends the text, is not part of it
            self._detokenizer.finalize()
        else:
            if self._logprob_of is not None:
                self._logprobs.append(self._logprob_of(logprobs, token))
            self._detokenizer.add_token(token)
            if finish_reason is not None:
                self._detokenizer.finalize()
        segment = self._detokenizer.last_segment
        if self._splitter is not None:
            segment = self._split(segment, final=finish_reason is not None)
        calls: tuple[ToolCallDelta, ...] = ()
        calls_done = False
        if self._parser is not None:
            parsed = self._parser.feed(segment)
            segment, calls, calls_done = parsed.content, parsed.tool_calls, parsed.done
            if finish_reason is not None and not calls_done:  # the end: decide whatever the parser holds
                rest = self._parser.finish()
                segment, calls = segment + rest.content, join_pieces(calls + rest.tool_calls)
        text, hit_stop = self._stops.feed(segment)
        if hit_stop:
            return self._delta(text, calls), "stop"
        if finish_reason is not None or calls_done:
            text += self._stops.flush()
            return self._delta(text, calls), self._final_reason(finish_reason)
        if text or calls or self._reasoning:
            return self._delta(text, calls), None
        return None, None

    def _split(self, segment: str, final: bool) -> str:
        """Take the reasoning out of this token's text (kept for the next Delta); count and budget it."""
        assert self._splitter is not None
        was_inside = self._splitter.inside
        split = self._splitter.feed(segment)
        if final:
            rest = self._splitter.finish()
            split = Split(split.reasoning + rest.reasoning, split.content + rest.content)
        self._reasoning += split.reasoning
        if was_inside or self._splitter.inside or split.reasoning:
            self.reasoning_tokens += 1
            if self._budget is not None and self.reasoning_tokens >= self._budget.budget and self._splitter.inside:
                self._budget.spend()
        return split.content

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended this choice, if one did (for Finished.stop_sequence)."""
        return self._stops.matched

    def _final_reason(self, finish_reason: str | None) -> str:
        if self._parser is not None and self._parser.calls and finish_reason != "length":
            return "tool_calls"
        return finish_reason or "stop"

    def _delta(self, text: str, calls: tuple[ToolCallDelta, ...]) -> Delta | None:
        if not text and not calls and not self._unsent_tokens:
            return None
        delta = Delta(self.request_id, text, self._unsent_tokens, calls, tuple(self._logprobs), self.index,
                      self._reasoning)
        self._reasoning = ""
        self._unsent_tokens = 0
        self._logprobs = []
        return delta
