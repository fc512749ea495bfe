"""OpenAI chat `tools` lists (as tests write them) as the engine's `ToolSpec`s (as the gateway sends them)."""

from __future__ import annotations

from typing import Any

from mlx_backend.contract import ToolSpec


def specs(tools: list[dict[str, Any]]) -> tuple[ToolSpec, ...]:
    return tuple(ToolSpec(t["function"]["name"], t["function"].get("description"), t["function"].get("parameters"),
                          t["function"].get("strict")) for t in tools)
