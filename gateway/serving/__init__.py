"""The one path every generation route goes through: the request owner (Exchange), the shared
conversion pieces (tools, sampling, structured output, reasoning), streaming or folding a reply, SSE framing."""
