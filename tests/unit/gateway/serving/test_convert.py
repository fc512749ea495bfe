"""gateway/serving/convert.py: the tools' checks that need no engine."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.serving.convert import FunctionTool, ToolChoice, tool_fields


def test_a_tool_whose_parameters_hold_an_integer_beyond_64_bits_is_a_400_naming_them() -> None:
    """JSON allows integers of any size; the engine's IPC (msgpack) carries 64-bit ones (found by schemathesis:
    such a schema used to reach the IPC encoder and end as a 500)."""
    fine = FunctionTool("f", None, {"type": "object", "properties": {"n": {"maximum": 2**63 - 1}}}, None, "tools[0]")
    assert tool_fields([fine], ToolChoice("auto"))["tools"][0].name == "f"
    huge = FunctionTool("g", None, {"type": "object", "properties": {"n": {"maximum": 10**30}}}, None, "tools[1]")
    with pytest.raises(GatewayError) as caught:
        tool_fields([fine, huge], ToolChoice("auto"))
    assert caught.value.status == 400 and caught.value.param == "tools[1].parameters"
