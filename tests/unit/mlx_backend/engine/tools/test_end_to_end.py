"""A tiny random model of each family, forced by its grammar, generating through mlx-lm: the text its
streaming detokenizer produces, fed segment by segment to the parser, comes back as schema-valid calls.

This is the whole path the batcher will run, except the batcher itself: prompt rendering, the grammar
compiled against the model's real tokenizer, decoding with a token mask (a small test-only processor
stands in for the constrained-decoding one being built), mlx-lm's detokenizer, and the stream parser.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import llguidance.hf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler

from mlx_backend.contract import ChatMessage, Generate, SamplingParams
from mlx_backend.engine.tools import ToolRequest, encode_prompt
from tests.support.tool_specs import specs
from tests.unit.mlx_backend.engine.tools.replies import collect

pytestmark = pytest.mark.slow

PARAMETERS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                    "required": ["city"], "additionalProperties": False},
    "add": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["a"], "additionalProperties": False},
}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": p}} for n, p in PARAMETERS.items()]


class MaskProcessor:
    """Test-only: llguidance's token mask as an mlx-lm logits processor."""

    def __init__(self, tokenizer: Any, grammar: str, prompt_length: int) -> None:
        lltokenizer = llguidance.hf.from_tokenizer(tokenizer._tokenizer, eos_token=sorted(tokenizer.eos_token_ids))
        self.matcher = llguidance.LLMatcher(lltokenizer, llguidance.LLMatcher.grammar_from_lark(grammar),
                                            log_level=0)
        assert not self.matcher.is_error(), self.matcher.get_error()
        self._seen = prompt_length

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        for token in tokens.tolist()[self._seen:]:
            assert self.matcher.consume_token(token), self.matcher.get_error()
        self._seen = len(tokens)
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = mx.array(bits[: logits.shape[-1]].astype(bool))
        return mx.where(allowed, logits, -mx.inf)


@pytest.mark.parametrize("fmt", ["qwen2.5", "qwen3", "llama3.1", "mistral"])
@pytest.mark.parametrize(("choice", "name", "parallel"), [("required", None, True), ("function", "add", False)])
def test_a_forced_random_model_s_reply_streams_back_as_calls(model_dirs: dict[str, Path], fmt: str, choice: str,
                                                            name: str | None, parallel: bool) -> None:
    model, tokenizer = mlx_lm.load(str(model_dirs[fmt]))[:2]
    command = Generate("r", fmt, SamplingParams(120), messages=(ChatMessage("user", "Weather in Paris?"),),
                       tools=specs(TOOLS), tool_choice=choice, tool_choice_name=name, parallel_tool_calls=parallel)
    request = ToolRequest.from_command(command, tokenizer)
    assert request is not None
    prompt = encode_prompt(command, tokenizer, request)
    grammar = request.grammar(tokenizer)
    assert grammar is not None
    for seed in range(3):
        mx.random.seed(seed)
        processor = MaskProcessor(tokenizer, grammar, len(prompt))
        parser = request.parser()
        outputs, texts, last = [], [], None
        for response in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=120,
                                               sampler=make_sampler(temp=1.0), logits_processors=[processor]):
            texts.append(response.text)
            outputs.append(parser.feed(response.text))
            last = response
        outputs.append(parser.finish())
        assert last is not None
        # One call: the grammar ends in an EOS token. Parallel calls: a random model may go on adding calls
        # until it runs out of tokens; then only its last call may be cut short.
        assert last.finish_reason == "stop" or (parallel and last.finish_reason == "length")
        reply = collect(outputs)
        assert re.sub(r"^<think>.*</think>", "", reply.content, flags=re.DOTALL) == "", "".join(texts)
        assert len(reply.calls) == 1 or parallel
        whole = parser.calls if last.finish_reason == "stop" else parser.calls[:-1]
        assert whole and all(c.complete for c in whole), "".join(texts)
        for call in whole:
            assert call.name == (name or call.name) and call.name in PARAMETERS
            jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
        assert [c["arguments"] for c in reply.calls] == [c.arguments for c in parser.calls]  # streamed = whole


@pytest.mark.parametrize("fmt", ["qwen2.5", "qwen3", "llama3.1", "mistral"])
def test_auto_with_strict_tools_gives_text_or_valid_calls_and_never_markup(model_dirs: dict[str, Path],
                                                                          fmt: str) -> None:
    model, tokenizer = mlx_lm.load(str(model_dirs[fmt]))[:2]
    strict = [{"type": "function", "function": {**t["function"], "strict": True}} for t in TOOLS]
    command = Generate("r", fmt, SamplingParams(60), messages=(ChatMessage("user", "Weather in Paris?"),),
                       tools=specs(strict))
    request = ToolRequest.from_command(command, tokenizer)
    assert request is not None
    prompt = encode_prompt(command, tokenizer, request)
    grammar = request.grammar(tokenizer)
    assert grammar is not None
    for seed in range(4):
        mx.random.seed(seed)
        processor = MaskProcessor(tokenizer, grammar, len(prompt))
        parser = request.parser()
        outputs = [parser.feed(r.text) for r in mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=60, sampler=make_sampler(temp=1.0), logits_processors=[processor])]
        outputs.append(parser.finish())
        reply = collect(outputs)
        assert not any(m in reply.content for m in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>"))
        for call in parser.calls:
            if call.complete:
                jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
