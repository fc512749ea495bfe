"""What a request may ask of a model's tool calling, decided before anything runs: refusals name the
model and the parameter, so the gateway answers 400 with them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mlx_backend.contract import ChatMessage, Generate, SamplingParams, ToolCall
from mlx_backend.engine.tools import ToolRequest, families
from mlx_backend.engine.tools.request import CALL_LIMIT
from mlx_backend.errors import EngineError
from tests.support import tiny_models
from tests.support.tool_specs import specs
from tests.unit.mlx_backend.engine.tools.conftest import load

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "noop"}}]
USER = (ChatMessage("user", "Hi"),)


def command(tools: Any = TOOLS, **options: Any) -> Generate:
    return Generate("r", "my-model", SamplingParams(8), messages=options.pop("messages", USER),
                    tools=specs(tools or []), **options)


def refusal(tokenizer: Any, cmd: Generate) -> EngineError:
    with pytest.raises(EngineError) as raised:
        ToolRequest.from_command(cmd, tokenizer)
    assert raised.value.code == "invalid_request"
    return raised.value


def test_no_tools_and_no_earlier_calls_is_no_tool_request(tokenizers: dict[str, Any]) -> None:
    assert ToolRequest.from_command(command(None), tokenizers["qwen2.5"]) is None
    assert ToolRequest.from_command(command([]), tokenizers["qwen2.5"]) is None


def test_a_model_without_tool_support_is_refused_by_name(tmp_path: Path) -> None:
    tokenizer = load(tiny_models.make_tiny_model(tmp_path / "m"))
    error = refusal(tokenizer, command())
    assert error.param == "tools"
    assert error.message.startswith("The model 'my-model' does not support tool calling: ")
    history = (ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "add", "{}"),)),)
    assert refusal(tokenizer, command(None, messages=history)).param == "messages"


def test_earlier_calls_without_tools_still_need_the_family_and_send_no_calls(tokenizers: dict[str, Any]) -> None:
    history = (*USER, ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "add", "{}"),)))
    request = ToolRequest.from_command(command(None, messages=history), tokenizers["qwen2.5"])
    assert request is not None and request.family is families.HERMES
    parser = request.parser()
    out = parser.feed('<tool_call>{"name": "add", "arguments": {}}</tool_call>Done.')
    assert (out.content + parser.finish().content, parser.calls) == ("Done.", [])


@pytest.mark.parametrize(("options", "param", "words"), [
    ({"tool_choice": "sometimes"}, "tool_choice", "must be one of"),
    ({"tool_choice": "function", "tool_choice_name": "subtract"}, "tool_choice", "not one of the tools"),
])
def test_tool_choice_must_make_sense(tokenizers: dict[str, Any], options: dict[str, Any], param: str,
                                     words: str) -> None:
    error = refusal(tokenizers["qwen2.5"], command(**options))
    assert error.param == param and words in error.message


def test_required_and_named_need_tools(tokenizers: dict[str, Any]) -> None:
    assert "needs tools" in refusal(tokenizers["qwen2.5"], command(None, tool_choice="required")).message


@pytest.mark.parametrize("tool", [{"description": "no name"}, {"name": "x", "parameters": []}, {"name": 3}])
def test_tools_cross_the_boundary_typed_so_a_malformed_one_is_never_decoded(tool: dict[str, Any]) -> None:
    """The gateway checks the tools (names unique and not empty: gateway/serving/convert.py); what crosses
    the socket is typed, so a tool without a name or with parameters that are no object cannot arrive."""
    sent = msgspec.to_builtins(command())
    sent["tools"] = [tool]
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(sent), type=Generate)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(msgspec.to_builtins(command())), type=Generate) == command()


def test_formats_that_cannot_be_forced_refuse_required_and_named(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = tiny_models.copy_model(model_dirs["qwen2.5"], tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"tool_parser_type": "pythonic"}))
    tokenizer = load(folder)
    assert ToolRequest.from_command(command(), tokenizer) is not None  # auto is fine
    error = refusal(tokenizer, command(tool_choice="required"))
    assert error.param == "tool_choice" and "cannot be forced" in error.message


def test_the_parser_follows_the_request(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["qwen2.5"]
    named = ToolRequest.from_command(command(tool_choice="function", tool_choice_name="noop"), tokenizer)
    assert named is not None
    p = named.parser()
    p.feed('<tool_call>{"name": "add", "arguments": {}}</tool_call><tool_call>{"name": "noop"}</tool_call>')
    assert [c.name for c in p.calls] == ["noop"]  # only the named function may come out
    single = ToolRequest.from_command(command(parallel_tool_calls=False), tokenizer)
    assert single is not None
    assert single.parser().feed('<tool_call>{"name": "noop"}</tool_call>').done
    none = ToolRequest.from_command(command(tool_choice="none"), tokenizer)
    assert none is not None
    assert none.parser().feed('<tool_call>{"name": "noop"}</tool_call>').tool_calls == ()
    ids = [c.id for c in ToolRequest.from_command(command(), tokenizer).parser().feed(  # type: ignore[union-attr]
        '<tool_call>{"name": "noop"}</tool_call><tool_call>{"name": "noop"}</tool_call>').tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") and len(i) == 29 and i[5:].isalnum() for i in ids)


def test_max_tool_calls_bounds_the_calls_and_must_be_positive(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["qwen2.5"]
    bounded = ToolRequest.from_command(command(max_tool_calls=2), tokenizer)
    assert bounded is not None and bounded.call_limit == 2
    parser = bounded.parser()
    out = parser.feed("".join(f'<tool_call>{{"name": "add", "arguments": {{"a": {i}, "b": 1}}}}</tool_call>'
                              for i in range(3)))
    assert out.done and [c.arguments for c in parser.calls] == ['{"a": 0, "b": 1}', '{"a": 1, "b": 1}']
    assert refusal(tokenizer, command(max_tool_calls=0)).param == "max_tool_calls"
    assert ToolRequest.from_command(command(), tokenizer).call_limit == CALL_LIMIT  # type: ignore[union-attr]
    named = ToolRequest.from_command(command(tool_choice="function", tool_choice_name="noop"), tokenizer)
    assert named is not None and named.call_limit == 1


def test_with_required_a_repeated_call_ends_the_reply_and_is_not_sent(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["qwen2.5"]
    required = ToolRequest.from_command(command(tool_choice="required"), tokenizer)
    assert required is not None
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    other = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 3}}\n</tool_call>'
    parser = required.parser()
    pieces = [parser.feed(ch) for ch in call + "\n" + other + "\n" + call + "\n" + call + "\n" + other]
    assert pieces[-1].done or any(p.done for p in pieces)
    sent = [c.arguments for c in parser.calls]
    assert sent == ['{"a": 1, "b": 2}', '{"a": 1, "b": 3}']  # the repeat of the first ended the reply
    # What was streamed is exactly those two calls: the repeat was held back, never half-sent.
    streamed: dict[int, str] = {}
    for piece in pieces:
        for delta in piece.tool_calls:
            streamed[delta.index] = streamed.get(delta.index, "") + delta.arguments
    assert streamed == {0: sent[0], 1: sent[1]}
    # With auto, a model may mean the same call twice (a dice roll): both are sent.
    auto = ToolRequest.from_command(command(), tokenizer).parser()  # type: ignore[union-attr]
    assert len(auto.feed(call + call).tool_calls) == 2
