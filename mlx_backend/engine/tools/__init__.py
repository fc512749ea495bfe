"""Tool calling for the engine: family detection, prompt rendering, call parsing and forcing grammars.

The batcher's part, per request:

    tools = ToolRequest.from_command(command, tokenizer)   # None without tools; EngineError if unsupported
    tokens = encode_prompt(command, tokenizer, tools)
    # == prompt_tokens(command, tokenizer), which CountPrompt counts: keep the two the same
    grammar = tools.grammar(tokenizer) if tools else None  # Lark text for the constrained-decoding processor
    parser = tools.parser() if tools else None             # feed() each decoded segment; finish() at the end
"""

from mlx_backend.engine.tools.families import Detection, Family, detect_family
from mlx_backend.engine.tools.parse import ParsedReply, parse_reply
from mlx_backend.engine.tools.render import encode_prompt, prompt_tokens
from mlx_backend.engine.tools.request import ToolRequest
from mlx_backend.engine.tools.stream import ParsedCall, StreamOutput, ToolCallParser, new_call_id

__all__ = [
    "Detection",
    "Family",
    "ParsedCall",
    "ParsedReply",
    "StreamOutput",
    "ToolCallParser",
    "ToolRequest",
    "detect_family",
    "encode_prompt",
    "new_call_id",
    "parse_reply",
    "prompt_tokens",
]
