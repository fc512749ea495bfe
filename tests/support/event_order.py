"""The documented event order of the Responses API and of Anthropic's Messages API, as checks.

Each stream is reduced to one letter per event and matched against a regular expression of the order the
API documents; then the details the letters leave out (sequence numbers, indexes, ids, types of deltas)
are checked event by event. Both work on `(event name, data)` pairs as `named_events` reads them from SSE.
"""

from __future__ import annotations

import json
import re
from typing import Any

Events = list[tuple[str, dict[str, Any]]]


def named_events(body: str) -> Events:
    """`event: <name>` + `data: <json>` frames; the name must match the data's `type`."""
    events: Events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if line)
        assert set(lines) == {"event", "data"}, block
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"], block
        events.append((lines["event"], data))
    return events


# -- Responses API ---------------------------------------------------------------------------------------

_RESPONSES_LETTERS = {
    "response.created": "C", "response.in_progress": "P", "response.content_part.added": "B",
    "response.output_text.delta": "D", "response.output_text.done": "T", "response.content_part.done": "E",
    "response.output_item.done": "Z", "response.function_call_arguments.delta": "F",
    "response.function_call_arguments.done": "G", "response.completed": "X", "response.incomplete": "X",
    "response.failed": "Y", "response.reasoning_text.delta": "R", "response.reasoning_text.done": "U",
}
# A message item: added, part added, deltas, text done, part done, item done; a call: added, argument
# deltas, arguments done, item done; reasoning: added, part added, reasoning deltas, reasoning done, part done,
# item done. A failure may leave the last item open.
_RESPONSES_ORDER = re.compile(r"CP(?:ABD*TEZ|aF*GZ|rBR*UEZ)*(?:X|(?:ABD*|aF*|rBR*)?Y)")


def _responses_letter(name: str, data: dict[str, Any]) -> str:
    if name == "response.output_item.added":
        return {"message": "A", "reasoning": "r"}.get(data["item"]["type"], "a")
    return _RESPONSES_LETTERS[name]


def check_responses_events(events: Events) -> dict[str, Any]:
    """Check a Responses stream; returns the final response object."""
    letters = "".join(_responses_letter(name, data) for name, data in events)
    assert _RESPONSES_ORDER.fullmatch(letters), f"events out of order: {letters}"
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    response_id = events[0][1]["response"]["id"]
    assert all(data["response"]["id"] == response_id for _, data in events if "response" in data)
    item: dict[str, Any] = {}
    for name, data in events:
        if name == "response.output_item.added":
            assert data["output_index"] == (item.get("index", -1) + 1)
            item = {"index": data["output_index"], "id": data["item"]["id"], "text": "", "arguments": ""}
            assert data["item"]["status"] == "in_progress"
        elif "item_id" in data:
            assert (data["item_id"], data["output_index"]) == (item["id"], item["index"]), (name, data)
        if name in ("response.output_text.delta", "response.reasoning_text.delta"):
            item["text"] += data["delta"]
        elif name in ("response.output_text.done", "response.reasoning_text.done"):
            assert data["text"] == item["text"]
        elif name == "response.function_call_arguments.delta":
            item["arguments"] += data["delta"]
        elif name == "response.function_call_arguments.done":
            assert data["arguments"] == item["arguments"]
        elif name == "response.output_item.done":
            assert data["item"]["id"] == item["id"] and data["item"]["status"] in ("completed", "incomplete")
    final = events[-1][1]["response"]
    assert events[-1][0] == f"response.{final['status']}", "the last event names the response's status"
    assert [o["id"] for o in final["output"]] == [d["item"]["id"] for n, d in events if n.endswith("item.added")]
    return final  # type: ignore[no-any-return]


# -- Anthropic Messages API ------------------------------------------------------------------------------

_ANTHROPIC_LETTERS = {
    "message_start": "S", "ping": "p", "content_block_start": "s", "content_block_delta": "d",
    "content_block_stop": "t", "message_delta": "M", "message_stop": "Q", "error": "E",
}
# message_start, ping, blocks (start, deltas, stop), message_delta, message_stop; or an error event,
# after which nothing comes (the block in progress stays open).
_DELTA_OF = {"text": "text_delta", "tool_use": "input_json_delta", "thinking": "thinking_delta"}
_ANTHROPIC_ORDER = re.compile(r"Sp?(?:sd*t)*(?:MQ|(?:sd*)?E)")


def check_anthropic_events(events: Events) -> dict[str, Any]:
    """Check a Messages stream; returns the message it builds (content, stop_reason, usage), as the SDK would."""
    letters = "".join(_ANTHROPIC_LETTERS[name] for name, _ in events)
    assert _ANTHROPIC_ORDER.fullmatch(letters), f"events out of order: {letters}"
    message = dict(events[0][1]["message"])
    assert message["content"] == [] and message["stop_reason"] is None
    content: list[dict[str, Any]] = []
    partial = ""
    for name, data in events[1:]:
        if name == "content_block_start":
            assert data["index"] == len(content)
            content.append(dict(data["content_block"]))
            partial = ""
        elif name == "content_block_delta":
            assert data["index"] == len(content) - 1
            block, delta = content[-1], data["delta"]
            expected = _DELTA_OF[block["type"]]
            if block["type"] == "thinking" and delta["type"] == "signature_delta":
                block["signature"] += delta["signature"]
                continue
            assert delta["type"] == expected and not block.get("signature"), (block, delta)
            if expected == "text_delta":
                block["text"] += delta["text"]
            elif expected == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                partial += delta["partial_json"]
        elif name == "content_block_stop":
            assert data["index"] == len(content) - 1
            assert content[-1]["type"] != "thinking" or content[-1]["signature"], "a thinking block is signed"
            if content[-1]["type"] == "tool_use":
                content[-1]["input"] = json.loads(partial) if partial else {}
        elif name == "message_delta":
            message["stop_reason"] = data["delta"]["stop_reason"]
            message["stop_sequence"] = data["delta"]["stop_sequence"]
            message["usage"] = {**message["usage"], **data["usage"]}
        elif name == "error":
            message["error"] = data["error"]
    message["content"] = content
    return message
